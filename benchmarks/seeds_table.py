"""The main table over seeds: each row's mean and worst case across ``bench_guard.py`` runs of several seeds.

    python benchmarks/bench_guard.py --attacks badnets blended --rates 0.05 0.1 --trust-free --seed 1 --out s1.json
    python benchmarks/bench_guard.py --attacks badnets blended --rates 0.05 0.1 --trust-free --seed 2 --out s2.json
    python benchmarks/seeds_table.py benchmarks/results/guard_cifar10.json s1.json s2.json \\
        --out benchmarks/results/guard_cifar10_seeds.json

Rows are matched by run name without its seed suffix; a row missing from a seed's file is left out
of that seed. Worst = the lowest TPR, the highest FPR and attack success, the largest accuracy loss
against the unguarded twin, the highest overhead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_guard import render_benchmarks, row, with_floors  # noqa: E402

epochs: set[int] = set()          # the runs' epochs, for the table's description

WORST = {"tpr": min, "fpr": max, "asr_unguarded": min, "asr_guarded": max, "asr_correct_guarded": max,
         "acc_delta": min, "scan_over_epoch": max, "overhead": max}


def rows_of(path: str) -> tuple[int, dict[str, dict]]:
    saved = json.loads(Path(path).read_text())
    epochs.update(p.get("epochs", 8) for p in saved["meta"].get("parts", [saved["meta"]]))
    rows = with_floors({"runs": saved["runs"], "rows": [row(n, r) for n, r in saved["runs"].items()]})["rows"]
    seeds = {p.get("seed", 0) for p in saved["meta"].get("parts", [saved["meta"]])}
    out = {}
    for r in rows:
        r["acc_delta"] = r["acc_guarded"] - r["acc_unguarded"]
        out[re.sub(r" seed \d+$", "", r["run"])] = r
    return seeds.pop(), out


def markdown(per_seed: list[tuple[int, dict[str, dict]]], note: str = "") -> str:
    names = [n for n in per_seed[0][1]]
    pct = lambda v: "-" if v != v else f"{100 * v:.1f}"  # noqa: E731 - nan prints as '-'
    lines = ["`python benchmarks/seeds_table.py` over `bench_guard.py` runs of seeds "
             + ", ".join(str(s) for s, _ in per_seed) + " (the main table's recipe: CIFAR-10 10k, no augmentation, "
             f"{'/'.join(str(e) for e in sorted(epochs)) or 8} epochs, 100 trusted a class). Each cell: mean (worst) over the seeds that ran the row. "
             "Accuracy delta = guarded - unguarded twin, in points." + (f" {note}" if note else ""), "",
             "| run | seeds | TPR % | FPR % | ASR no guard % | ASR guard % | ASR(correct) guard % | accuracy delta | "
             "scan / epoch | overhead % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        have = [rows[n] for _, rows in per_seed if n in rows]
        cells = []
        for k in ("tpr", "fpr", "asr_unguarded", "asr_guarded", "asr_correct_guarded", "acc_delta", "scan_over_epoch",
                  "overhead"):
            vals = [float(r[k]) for r in have]
            if all(v != v for v in vals):
                cells.append("-")
                continue
            vals = [v for v in vals if v == v]
            f = (lambda v: f"{v:.2f}") if k == "scan_over_epoch" else pct
            cells.append(f"{f(float(np.mean(vals)))} ({f(WORST[k](vals))})")
        lines.append(f"| {n} | {len(have)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default=str(HERE / "results" / "guard_cifar10_seeds.json"))
    ap.add_argument("--note", default="", help="a sentence added to the table's description (e.g. the guard setting)")
    a = ap.parse_args()
    per_seed = [rows_of(p) for p in a.results]
    md = markdown(per_seed, a.note)
    Path(a.out).write_text(json.dumps({"seeds": {str(s): rows for s, rows in per_seed}, "markdown": md}, indent=1))
    print(md)
    render_benchmarks()


if __name__ == "__main__":
    main()
