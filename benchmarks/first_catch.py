"""What a guarded run's first catch takes, with and without a decision setting: the measurement for a rule
that acts at the first catch (whole runs are noisier: what happens after a catch moves the end state).

Runs one benchmark cell's guarded arm (no twin) to its first scan that quarantines anything, then stops
and prints, per class acted on, how many benign and poisoned samples that scan took, through which layer or
view, and the probe's bar. Run it twice, with and without ``--guard``: both arms are the same run up to
that scan.

    python benchmarks/first_catch.py --cell finetune --trigger blended:0.1 --seed 1
    python benchmarks/first_catch.py --cell finetune --trigger blended:0.1 --seed 1 \\
        --guard 'thresholds={"images_rival": false}'
    python benchmarks/first_catch.py --cell zoo --trigger zoo:6:13 --adamw
    python benchmarks/first_catch.py --cell main --trigger badnets:0.1 --seed 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_guard import fields  # noqa: E402
from guard.attacks import make_attack  # noqa: E402
from guard.experiment import RunSpec, run  # noqa: E402


class _Caught(Exception):
    pass


def cell_spec(a: argparse.Namespace) -> RunSpec:
    if a.cell == "finetune":              # bench_finetune's cells
        from benchmarks.bench_finetune import cell_spec as finetune
        return finetune(a.trigger, a.recipe, 12, a.seed, a.archive, lr=a.lr)
    if a.cell == "zoo":                   # bench_zoo's guarded runs
        from benchmarks.bench_zoo import spec
        return spec("zoo", a.trigger, make_attack(a.trigger).rate, a.seed,
                    **({"optimizer": "adamw", "lr": 0.001} if a.adamw else {}))
    attack, rate = a.trigger.split(":")
    if a.cell == "main":                  # bench_guard's main table: 10k, no augmentation, 100 trusted
        return RunSpec(data="cifar10", attack=attack, rate=float(rate), n_train=10000, epochs=8, width=16, lr=0.01,
                       seed=a.seed, trusted_per_class=100, augment=False, archive=a.archive)
    return RunSpec(data="cifar10", attack=attack, rate=float(rate), n_train=10000, epochs=16, seed=a.seed,
                   archive=a.archive)        # "long": the all-to-all rows' recipe


def first_catch(gds, data) -> dict:
    """Per class acted on by the last scan: benign / poisoned taken, of how many, the route and the bar."""
    r = gds.last_result
    poisoned = np.isin(r.scanned, data.poisoned)
    taken = np.isin(r.scanned, r.flagged)
    out = {"scan": len(gds.report.scans), "quarantined": int(len(r.flagged)), "classes": {}}
    for v in r.classes:
        if not v.n_flagged:
            continue
        m = r.labels == v.cls
        p, t = poisoned[m], taken[m]
        out["classes"][int(v.cls)] = {"benign_taken": int((t & ~p).sum()), "benign": int((~p).sum()),
                                      "poison_taken": int((t & p).sum()), "poison": int(p.sum()),
                                      "route": v.critical_layers, "bar": float(v.threshold), "reason": v.reason}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", default="finetune", choices=["finetune", "zoo", "main", "long"])
    ap.add_argument("--trigger", required=True, help="'NAME:RATE' or 'zoo:S:I' (zoo and finetune cells)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", default="all", help="finetune cells: all, layer4, layer4-eval or fc")
    ap.add_argument("--lr", type=float, default=0.01, help="finetune cells: the peak learning rate")
    ap.add_argument("--adamw", action="store_true", help="zoo cells: AdamW 0.001")
    ap.add_argument("--guard", nargs="*", default=[], metavar="FIELD=VALUE", help="GuardConfig fields (JSON values)")
    ap.add_argument("--archive", default=os.environ.get("GUARD_CIFAR10_ARCHIVE"))
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = cell_spec(a)
    if a.guard:
        spec = replace(spec, guard={**spec.guard, **fields(a.guard)})

    def on_scan(gds, data):
        if len(gds.last_result.flagged):
            print(json.dumps({"cell": a.cell, "trigger": a.trigger, "seed": a.seed, "guard": a.guard,
                              **first_catch(gds, data)}), flush=True)
            raise _Caught

    try:
        run(spec, compare=False, on_scan=on_scan)
        print(json.dumps({"cell": a.cell, "trigger": a.trigger, "seed": a.seed, "guard": a.guard, "quarantined": 0}))
    except _Caught:
        pass


if __name__ == "__main__":
    main()
