"""The never-poisoned floor of every zoo trigger: its attack success on a model trained with the zoo
recipe (``bench_zoo.spec``: 4,000 CIFAR-10 images, crop + flip, 20 epochs) on data *without* poison.

A trigger some of whose test images a never-poisoned model already sends to the target (a blend
close to the target's colours, a noise pattern the model reads as a texture class) cannot be pushed
below that share by removing poison; the zoo's targets ("final attack success within 2 points of
the floor") are read against it. One model per ``--seed`` (its training subset and order); run two
seeds as two pinned single-thread processes and merge:

    GUARD_CIFAR10_ARCHIVE=... taskset -c 0 python benchmarks/zoo_floor.py --seed 0 --out a.json &
    GUARD_CIFAR10_ARCHIVE=... taskset -c 1 python benchmarks/zoo_floor.py --seed 1 --out b.json
    python benchmarks/zoo_floor.py --merge a.json b.json      # -> results/zoo_floor_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_zoo import spec  # noqa: E402
from guard.experiment import _epoch, measure, prepare, trigger_floor  # noqa: E402


def floors(seed: int, zoo_seeds: list[int], n: int) -> dict:
    sp = spec("zoo", None, 0.0, seed)
    torch.manual_seed(sp.seed)
    data = prepare(sp)
    model = data.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=sp.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=sp.epochs)
    loader = DataLoader(data.train, batch_size=sp.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(sp.seed))
    t = time.perf_counter()
    for epoch in range(sp.epochs):
        _epoch(model, opt, loader, f"clean seed {seed} epoch {epoch + 1}")
        sched.step()
    names = [f"zoo:{z}:{i}" for z in zoo_seeds for i in range(n)]
    return {"seed": seed, "train_seconds": time.perf_counter() - t, **measure(model, data),
            "floor": trigger_floor(model, data, sp, names)}


def merge(files: list[str]) -> dict:
    runs = [json.loads(Path(f).read_text()) for f in files]
    names = sorted(set.intersection(*(set(r["floor"]) for r in runs)),
                   key=lambda s: tuple(int(p) for p in s.split(":")[1:]))
    table = {k: {"all": [r["floor"][k]["all"] for r in runs], "correct": [r["floor"][k]["correct"] for r in runs]}
             for k in names}
    return {"seeds": [r["seed"] for r in runs], "clean_acc": [r["clean_acc"] for r in runs], "runs": runs,
            "floor": {k: {"all": float(np.mean(v["all"])), "correct": float(np.mean(v["correct"])),
                          "all_max": max(v["all"]), "correct_max": max(v["correct"])} for k, v in table.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="the clean model's subset and sample order")
    ap.add_argument("--zoo-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=20, help="triggers a zoo seed")
    ap.add_argument("--merge", nargs="+", metavar="JSON")
    ap.add_argument("--out", default=str(HERE / "results" / "zoo_floor_cifar10.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = merge(a.merge) if a.merge else floors(a.seed, a.zoo_seeds, a.n)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
