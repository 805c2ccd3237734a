"""The guard at a larger input size, on the model users reach for there: torchvision's ``resnet18``.

Every other benchmark trains on 32 x 32 CIFAR-10. Users who train on their own images mostly work at
larger sizes with an ImageNet-style network, whose stem downsamples four times before the first
block; the guard's layers then see a trigger through coarser maps, and its fine input view pools
images above 64 px a side. No larger image data ships with this repository, so ``--build`` writes
CIFAR-10 upsampled (bicubic) to ``--side`` px as an image folder: 600 training images a class to draw
from and 200 test images a class. Upsampled images hold less fine detail than photographs taken at
that size, which makes a patch easier to see in the fine view, not harder; read the rows with that.

Whole guarded runs, each beside its unguarded twin in lockstep (``guard.experiment.run``): 4,000
training images, random crop (padding 4) + flip in the Dataset, torchvision ``resnet18`` from scratch
(``num_classes=10``, no pretrained weights: none can be downloaded here), SGD 0.05 cosine, 16 epochs,
``GuardConfig()`` defaults with discovered layers, 50 trusted a class (0: trust-free). Triggers are
scaled with the side: BadNets' checkerboard is ``3 * side / 32`` px and a zoo patch ``side / 32`` times
its size (``zoo:4:2:0.079:0:50``: zoo seed 4's 7 px patch at 14 px, its own target and rate); Blended's
pattern is drawn at the full size. Nothing here was used to set a rule.

    python benchmarks/bench_resolution.py --build --root R --side 64
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_resolution.py --root R --guarded badnets:0.1:0:50 --out a.json &
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_resolution.py --root R --guarded blended:0.1:0:50 --out b.json
    python benchmarks/bench_resolution.py --merge-guarded a.json b.json    # -> results/resolution_cifar10.json, BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_guard import render_benchmarks  # noqa: E402
from benchmarks.bench_harm import guarded_row, guarded_table  # noqa: E402
from guard.attacks import BadNets, Patch, make_attack  # noqa: E402
from guard.datasets import CIFAR10_CLASSES, load_cifar10  # noqa: E402
from guard.experiment import RunSpec  # noqa: E402

N_TRAIN, EPOCHS, LR, MODEL, POOL, TEST = 4000, 16, 0.05, "resnet18", 600, 200


def badnets_size(side: int) -> int:
    """BadNets' checkerboard (its default size at 32 px) scaled with the side."""
    return BadNets.size * side // 32


def build(root: Path, side: int, archive: str | None = None, seed: int = 0) -> dict:
    """Write CIFAR-10 upsampled to ``side`` px under ``root``: ``train/<class>/`` with ``POOL`` images a
    class, ``test/<class>/`` with ``TEST``; ``built.json`` records the side."""
    from PIL import Image

    splits = load_cifar10(archive)
    rng = np.random.default_rng(seed)
    counts = {}
    for split, n in (("train", POOL), ("test", TEST)):
        s = splits[split]
        for c in range(10):
            idx = np.sort(rng.choice(np.flatnonzero(s.labels == c), n, replace=False))
            folder = root / split / f"{c}-{CIFAR10_CLASSES[c]}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(s.images[i]).resize((side, side), Image.BICUBIC).save(folder / f"{i:05d}.png")
            counts[f"{split}/{folder.name}"] = len(idx)
    (root / "built.json").write_text(json.dumps({"side": side, "seed": seed, "counts": counts}))
    return counts


def spec_for(root: Path, side: int):
    """``bench_harm.guarded_row``'s spec maker at ``side`` px: patches grow by ``side / 32`` (BadNets' and a
    zoo patch's), a zoo trigger keeps its own target."""
    def spec(attack: str | None, rate: float, seed: int, trusted: int) -> RunSpec:
        kwargs, target = {}, 0
        if attack == "badnets":
            kwargs = {"size": badnets_size(side)}
        elif attack is not None and attack.startswith("zoo:"):
            atk = make_attack(attack)
            target = atk.target
            if isinstance(atk, Patch):
                kwargs = {"size": atk.size * side // 32}
        return RunSpec(data="imagefolder", archive=str(root), attack=attack, rate=rate, target=target, seed=seed,
                       trusted_per_class=trusted, augment=True, epochs=EPOCHS, lr=LR, n_train=N_TRAIN,
                       model=MODEL, attack_kwargs=kwargs)
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="write the upsampled image folder under --root")
    ap.add_argument("--root", type=Path, help="the image folder (written by --build)")
    ap.add_argument("--side", type=int, default=64, help="--build: image side in px")
    ap.add_argument("--archive", default=None, help="--build: the CIFAR-10 archive (default: GUARD_CIFAR10_ARCHIVE)")
    ap.add_argument("--guarded", nargs="+", metavar="ATTACK:RATE:SEED:TRUSTED", help="whole guarded runs")
    ap.add_argument("--merge-guarded", nargs="+", metavar="JSON", help="merge --guarded parts into --out")
    ap.add_argument("--out", default=str(HERE / "results" / "resolution_cifar10.json"))
    a = ap.parse_args()
    if a.build:
        print(build(a.root, a.side, a.archive))
        return
    if a.guarded:
        side = json.loads((a.root / "built.json").read_text())["side"]
        rows = [guarded_row(item, spec_for(a.root, side)) | {"side": side} for item in a.guarded]
        meta = {"side": side, "model": MODEL, "n_train": N_TRAIN, "epochs": EPOCHS, "lr": LR, "torch": torch.__version__,
                "machine": platform.machine()}
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return
    if a.merge_guarded:
        parts = [json.loads(Path(p).read_text()) for p in a.merge_guarded]
        rows = [r for p in parts for r in p["rows"]]
        meta = parts[0]["meta"]
        intro = (f"`python benchmarks/bench_resolution.py` (pinned single-thread processes): CIFAR-10 upsampled to "
                 f"{meta['side']} x {meta['side']} px, {meta['n_train']:,} training images, crop + flip, torchvision "
                 f"`{meta['model']}` from scratch, SGD {meta['lr']} cosine, {meta['epochs']} epochs, `GuardConfig()` "
                 "defaults with discovered layers, each whole guarded run beside its unguarded twin. BadNets' patch "
                 f"is {badnets_size(meta['side'])} px.")
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows, "markdown": guarded_table(rows, None, intro)},
                                          indent=1))
        render_benchmarks()
        return
    ap.error("give --build, --guarded or --merge-guarded")


if __name__ == "__main__":
    main()
