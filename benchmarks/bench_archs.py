"""Detection across architectures the guard did not write, with the layers it discovers itself.

Each cell trains one architecture on a CIFAR-10 subset with random crop + flip in the Dataset (as
users train), poisoned by one attack, with ``GuardConfig()`` defaults (layers discovered, trusted
set of 100 per class), and its unguarded twin in lockstep; it reports the discovered layers, TPR /
FPR, attack success with and without the guard, and clean accuracy.

    python benchmarks/bench_archs.py                                     # every cell, one process
    taskset -c 0 python benchmarks/bench_archs.py --part 0/2 --out a.json &   # two pinned processes
    taskset -c 1 python benchmarks/bench_archs.py --part 1/2 --out b.json
    python benchmarks/bench_archs.py --merge a.json b.json               # -> results/archs_cifar10.json
    python benchmarks/bench_archs.py --layers                            # the discovered-layers table
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_guard import fmt, render_benchmarks  # noqa: E402
from guard.experiment import RunSpec, run  # noqa: E402

# name -> RunSpec model fields; hand-written models from guard.archs, torchvision by name
ARCHS = {
    "CIFAR ResNet-18 (hand, own block, F.relu), w16": dict(model="guard.archs:build",
                                                          model_kwargs={"name": "cifar_resnet18", "width": 16}),
    "PreAct ResNet-18 (hand), w16": dict(model="guard.archs:build",
                                         model_kwargs={"name": "cifar_preact_resnet18", "width": 16}),
    "VGG-11 (hand, features list), w32": dict(model="guard.archs:build",
                                              model_kwargs={"name": "cifar_vgg11", "width": 32}),
    "torchvision resnet18": dict(model="resnet18", model_kwargs={}),
}
ATTACKS = [("badnets", 0.1), ("blended", 0.1), (None, 0.0)]
CLEAN_RUNS = 2          # the no-attack cell runs on the first two architectures only (CPU time)


def cell_row(name: str, r: dict) -> dict:
    g, u = r["guarded"], r.get("unguarded", {})
    return {"arch": name, "attack": r["spec"]["attack"] or "none", "rate": r["spec"]["rate"],
            "layers": [n for n in r["layers"] if not n.endswith(":peak")],
            "tpr": g["tpr"], "fpr": g["fpr"], "quarantined": g["flagged"], "poisoned": g["poisoned"],
            "asr_warmup": r.get("warmup", {}).get("attack_success", float("nan")),
            "asr_unguarded": u.get("attack_success", float("nan")), "asr_guarded": g["attack_success"],
            "asr_correct_unguarded": u.get("attack_success_correct", float("nan")),
            "asr_correct_guarded": g["attack_success_correct"],
            "acc_unguarded": u.get("clean_acc", float("nan")), "acc_guarded": g["clean_acc"],
            "first_catch_epoch": next((s["epoch"] for s in r["scans"] if s["new_quarantined"]), None),
            "critical_layers": sorted({layer for s in r["scans"] for c in s["classes"] if c["n_flagged"]
                                       for layer in c["critical_layers"]})}


def table(rows: list[dict]) -> str:
    head = ("| architecture | attack | layers found | TPR % | FPR % | ASR no guard % | ASR guard % | "
            "ASR(correct) no guard % | ASR(correct) guard % | acc no guard % | acc guard % | first caught at epoch | "
            "critical layers |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        atk = "none" if r["attack"] == "none" else f"{r['attack']} {100 * r['rate']:.0f} %"
        lines.append("| " + " | ".join([
            r["arch"], atk, str(len(r["layers"])), fmt(r["tpr"]), fmt(r["fpr"]), fmt(r["asr_unguarded"]),
            fmt(r["asr_guarded"]), fmt(r["asr_correct_unguarded"]), fmt(r["asr_correct_guarded"]),
            fmt(r["acc_unguarded"]), fmt(r["acc_guarded"]), str(r["first_catch_epoch"] or "-"),
            ", ".join(r["critical_layers"]) or "-"]) + " |")
    return "\n".join(lines)


def layers_table() -> str:
    """The layers discovery picks on every architecture of the test zoo (depth in brackets: share of
    the model's weight layers run before the layer's output)."""
    from tests.zoo import ZOO

    from guard.discover import discover

    lines = ["| architecture | layers | discovered layers (depth) |", "|---|---|---|"]
    for name, (make, size) in ZOO.items():
        torch.manual_seed(0)
        found = discover(make(10), torch.randn(4, 3, size, size))
        n = sum(not v.endswith(":peak") for v in found.layers)
        peaks = " (+ a `:peak` view of each token layer)" if n != len(found.layers) else ""
        lines.append(f"| {name} | {n} | {found.describe()}{peaks} |")
    return "\n".join(lines)


def write(out: Path, result: dict) -> None:
    m = result["meta"]
    result["markdown"] = (
        f"`python benchmarks/bench_archs.py`: CIFAR-10 {m['n_train']:,}-image subset, random crop (pad 4) + flip in "
        f"the Dataset's transform, {m['epochs']} epochs, SGD lr {m['lr']} cosine, seed {m['seed']}, GuardConfig() "
        f"defaults (layers discovered; scan_dataset without augmentation; 100 trusted per class), torch {m['torch']}, "
        f"{m['machine']}. ASR: attack success over non-target test images; ASR(correct): over those classified "
        f"correctly without the trigger.\n\n{table(result['rows'])}"
        + (f"\n\nRe-run at a later commit ({m['rerun_note']}): {'; '.join(m['rerun'])}." if m.get("rerun") else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(result["markdown"])
    render_benchmarks()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="*", default=list(ARCHS), help="names from ARCHS")
    ap.add_argument("--attacks", nargs="*", default=[a or "none" for a, _ in ATTACKS], help="cells of ATTACKS to run")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trust-free", action="store_true", help="no trusted set given to the guard")
    ap.add_argument("--part", default="0/1", help="K/N: run every N-th cell starting at K")
    ap.add_argument("--out", default=str(HERE / "results" / "archs_cifar10.json"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge parts into --out")
    ap.add_argument("--layers", action="store_true", help="write the discovered-layers table (results/layers.json)")
    a = ap.parse_args(argv)
    if a.layers:
        md = layers_table()
        text = ("Layers chosen by `guard.discover` (GuardConfig(layers=None)) on the architecture zoo of "
                "`tests/test_discover.py`, regenerated by `python benchmarks/bench_archs.py --layers`.\n\n" + md)
        (HERE / "results" / "layers.json").write_text(json.dumps({"markdown": text}, indent=1))
        print(md)
        render_benchmarks()
        return 0
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        meta = {**parts[0]["meta"], "wall_seconds": max(p["meta"]["wall_seconds"] for p in parts)}
        order = {(arch, atk or "none"): i for i, (arch, (atk, _)) in
                 enumerate((x, y) for x in ARCHS for y in ATTACKS)}
        rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: order.get((r["arch"], r["attack"]), 99))
        write(Path(a.out), {"meta": meta, "rows": rows, "runs": {k: v for p in parts for k, v in p["runs"].items()}})
        return 0
    k, n = map(int, a.part.split("/"))
    cells = [(arch, atk, rate) for i, arch in enumerate(a.archs) for atk, rate in ATTACKS
             if (atk or "none") in a.attacks and (atk or i < CLEAN_RUNS)][k::n]
    rows, runs, t0 = [], {}, time.time()
    for arch, atk, rate in cells:
        spec = RunSpec(data="cifar10", attack=atk, rate=rate, n_train=a.n_train, epochs=a.epochs, lr=a.lr,
                       seed=a.seed, augment=True, trust_free=a.trust_free, **ARCHS[arch])
        r = run(spec)
        r.pop("report")
        runs[f"{arch} / {atk or 'none'}" + (" / trust-free" if a.trust_free else "")] = r
        rows.append(cell_row(arch + (" (trust-free)" if a.trust_free else ""), r))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    meta = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "n_train": a.n_train, "epochs": a.epochs, "lr": a.lr, "seed": a.seed, "wall_seconds": time.time() - t0}
    write(Path(a.out), {"meta": meta, "rows": rows, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
