"""Where a scan's time goes, before and after a change: two ``bench_guard.py`` result files side by side.

    python benchmarks/bench_guard.py --attacks badnets --rates 0.1 --trust-free --out before.json  # at the old commit
    python benchmarks/bench_guard.py --attacks badnets --rates 0.1 --trust-free --out after.json
    python benchmarks/cost_table.py before.json after.json --labels 2ace2e4 d02698b \\
        --out benchmarks/results/cost_cifar10.json

Per run and scan: the stage times (``ScanReport.seconds_by_step``), the split of the scan's time into
data loading, model forward, hooks, transfer and analysis (``seconds_by_part``, where the code had
it), the samples the model forwarded and those read from kept features, the remedy's time, and per
run scan / epoch and the guard's overhead (scans + remedy over the unguarded training time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_guard import render_benchmarks, row  # noqa: E402


def lines_of(label: str, result: dict) -> list[str]:
    out = []
    for name, r in result["runs"].items():
        summary = row(name, r)
        for s in r["scans"]:
            parts = s.get("seconds_by_part") or {}
            total = sum(parts.values())
            fwd = f"{1 - parts['forward'] / total:.0%}" if total else "-"
            forwarded = sum(v for k, v in s["passes"].items() if not k.endswith("(kept)"))
            kept = sum(v for k, v in s["passes"].items() if k.endswith("(kept)"))
            steps = ", ".join(f"{k} {v:.2f}" for k, v in s["seconds_by_step"].items())
            split = ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) or "-"
            out.append(f"| {label} | {name} | {s['epoch']} | {s['seconds']:.2f} | {steps} | {split} | {fwd} | "
                       f"{forwarded:,} | {kept:,} | {s['remedy_seconds']:.2f} | {summary['scan_over_epoch']:.2f} | "
                       f"{summary['overhead']:.1%} |")
    return out


def markdown(results: list[tuple[str, dict]]) -> str:
    head = ("| code | run | scan epoch | scan s | stages s | split s | non-forward | samples forwarded | read from "
            "kept | remedy s | scan / epoch (first) | overhead (run) |")
    body = [line for label, r in results for line in lines_of(label, r)]
    meta = results[-1][1]["meta"]
    meta = meta.get("parts", [meta])[0]                  # merged result files keep each part's meta
    return "\n".join([
        "`python benchmarks/cost_table.py` over `bench_guard.py --attacks badnets --rates 0.1 --trust-free` runs "
        f"(CIFAR-10 {meta['n_train']:,}, width-{meta['width']} ResNet-18, {meta['epochs']} epochs, no augmentation, "
        f"{meta.get('threads', 1)} thread(s) a process, {meta['device']}): the guarded run and its unguarded twin in "
        "lockstep. "
        "*non-forward*: the share of the scan outside the model's forward (data loading, hooks, transfer, analysis). "
        "*overhead*: scans + remedy over the unguarded training time.", "",
        head, "|" + "---|" * (head.count("|") - 1), *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--labels", nargs="+")
    ap.add_argument("--out", default=str(HERE / "results" / "cost_cifar10.json"))
    a = ap.parse_args()
    labels = a.labels or [Path(p).stem for p in a.results]
    results = [(lab, json.loads(Path(p).read_text())) for lab, p in zip(labels, a.results)]
    md = markdown(results)
    Path(a.out).write_text(json.dumps({"runs": {lab: r["runs"] for lab, r in results},
                                       "meta": {lab: r["meta"] for lab, r in results}, "markdown": md}, indent=1))
    print(md)
    render_benchmarks()


if __name__ == "__main__":
    main()
