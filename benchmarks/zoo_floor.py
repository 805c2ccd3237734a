"""The never-poisoned floor of every zoo trigger: its attack success on a model trained with the zoo
recipe (``bench_zoo.spec``: 4,000 CIFAR-10 images, crop + flip, 20 epochs) on data *without* poison.

A trigger some of whose test images a never-poisoned model already sends to the target (a blend
close to the target's colours, a noise pattern the model reads as a texture class) cannot be pushed
below that share by removing poison; the zoo's targets ("final attack success within 2 points of
the floor") are read against it. One model per ``--seed`` (its training subset and order); run two
seeds as two pinned single-thread processes and merge:

    GUARD_CIFAR10_ARCHIVE=... taskset -c 0 python benchmarks/zoo_floor.py --seed 0 --out a.json &
    GUARD_CIFAR10_ARCHIVE=... taskset -c 1 python benchmarks/zoo_floor.py --seed 1 --out b.json
    python benchmarks/zoo_floor.py --merge a.json b.json \\
        --against benchmarks/results/zoo_cifar10_seed2_guarded.json ...   # -> results/zoo_floor_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_guard import render_benchmarks  # noqa: E402
from benchmarks.bench_harm import fit  # noqa: E402
from benchmarks.bench_zoo import spec, targets_met, was_learned  # noqa: E402
from guard.experiment import measure, trigger_floor  # noqa: E402


def floors(seed: int, zoo_seeds: list[int], n: int, arch: str | None = None) -> dict:
    sp = spec("zoo", None, 0.0, seed, arch=arch)
    data, model, seconds = fit(sp, f"clean seed {seed}")
    names = [f"zoo:{z}:{i}" for z in zoo_seeds for i in range(n)]
    return {"seed": seed, "arch": arch or "", "train_seconds": seconds, **measure(model, data),
            "floor": trigger_floor(model, data, sp, names)}


def merge(files: list[str], against: list[str]) -> dict:
    runs = [json.loads(Path(f).read_text()) for f in files]
    names = sorted(set.intersection(*(set(r["floor"]) for r in runs)),
                   key=lambda s: tuple(int(p) for p in s.split(":")[1:]))
    floor = {k: {"all": float(np.mean([r["floor"][k]["all"] for r in runs])),
                 "correct": float(np.mean([r["floor"][k]["correct"] for r in runs])),
                 "correct_max": max(r["floor"][k]["correct"] for r in runs)} for k in names}
    return {"seeds": [r["seed"] for r in runs], "clean_acc": [r["clean_acc"] for r in runs], "runs": runs,
            "floor": floor, "markdown": markdown(floor, runs, against)}


def markdown(floor: dict, runs: list[dict], against: list[str]) -> str:
    pct = lambda v: f"{v:.1%}"  # noqa: E731
    corr = np.array([f["correct"] for f in floor.values()])
    high = [k for k, f in floor.items() if f["correct_max"] >= 0.02]
    lines = [f"`python benchmarks/zoo_floor.py`: every zoo trigger of seeds "
             f"{', '.join(sorted({k.split(':')[1] for k in floor}))} on {len(runs)} models "
             + "".join(f"(`guard.archs` `{a}`, `--arch`) " for a in sorted({r.get("arch", "") for r in runs}) if a)
             + "trained with the zoo recipe "
             "on data without poison (subset and order seeds " + ", ".join(str(r["seed"]) for r in runs)
             + ", clean accuracy " + ", ".join(pct(r["clean_acc"]) for r in runs) + "). Floor: attack success of the "
             "trigger on a model that never saw it, over non-target test images (all) and over those it classifies "
             "correctly (correct), mean of the models (max in brackets).", "",
             f"Floor (correct) over {len(floor)} triggers: median {np.median(corr):.1%}, 90th percentile "
             f"{np.quantile(corr, 0.9):.1%}, max {corr.max():.1%}; {len(high)} triggers at >= 2 % on some model:", "",
             "| trigger | floor (all) | floor (correct) |", "|---|---|---|"]
    lines += [f"| {k} | {pct(floor[k]['all'])} | {pct(floor[k]['correct'])} ({pct(floor[k]['correct_max'])}) |"
              for k in high]
    rows = [(Path(f).stem, r) for f in against for r in json.loads(Path(f).read_text())["rows"] if r["trigger"] in floor]
    if rows:
        lines += ["", "Whole guarded runs against the floor (ASR(correct) guard minus its floor). The four targets "
                  "(TPR >= 95 %, FPR <= 1 %, accuracy within 2 points, and the attack-success target) read strictly "
                  "(ASR(correct) <= 5 % *and* within 2 points of the floor) and floor-aware (<= 5 % *or* within 2 "
                  "points of the floor: no defence that removes poison goes below the floor):", "",
                  "| result | trigger | seed | ASR(correct) no guard | guard | floor | guard - floor | TPR | FPR | "
                  "acc guard - no guard | four targets, strict | floor-aware |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for src, r in rows:
            f, a = floor[r["trigger"]]["correct"], r["asr_correct_guarded"]
            verdicts = [("yes" if targets_met(r, ok)[1] else "no") if was_learned(r) else "not learned"
                        for ok in (a <= 0.05 and a - f <= 0.02, a <= 0.05 or a - f <= 0.02)]
            lines.append(f"| `{src}` | {r['trigger']} | {r.get('seed', 0)} | {pct(r['asr_correct_unguarded'])} | "
                         f"{pct(a)} | {pct(f)} | {100 * (a - f):+.1f} | {pct(r['tpr'])} | {r['fpr']:.2%} | "
                         f"{100 * (r['acc_guarded'] - r['acc_unguarded']):+.1f} | {' | '.join(verdicts)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="the clean model's subset and sample order")
    ap.add_argument("--zoo-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=20, help="triggers a zoo seed")
    ap.add_argument("--merge", nargs="+", metavar="JSON")
    ap.add_argument("--against", nargs="*", default=[], metavar="JSON",
                    help="with --merge: bench_zoo --guarded result files to read against the floor")
    ap.add_argument("--arch", help="a hand-written model of guard.archs as NAME[:WIDTH] (bench_zoo.py --arch)")
    ap.add_argument("--out", default=str(HERE / "results" / "zoo_floor_cifar10.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = merge(a.merge, a.against) if a.merge else floors(a.seed, a.zoo_seeds, a.n, a.arch)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    if a.merge:
        print(out["markdown"])
        render_benchmarks()


if __name__ == "__main__":
    main()
