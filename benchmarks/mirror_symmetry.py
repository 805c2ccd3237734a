"""The check behind ``mirror_images="auto"``: are a trusted set's images mirror-symmetric, class by class?

``guard.mirror.symmetry`` reads each class's trusted images against their own mirror images (an exact
sign-flip test of the paired differences in the fine view, at most ``mirror_check_max`` images a class, the
smallest class's p corrected for the classes); the mirror test runs where that p is at least
``mirror_symmetry_p``. This reads the check on many random trusted draws of real data, without a model, as
a scan reads the trusted images (normalised, no augmentation), and says how often it lets the mirror test
run:

* CIFAR-10's training split (where the cap was chosen), its test split (held out), and 30 classes of
  CIFAR-10 test images x orientation (upright, upside down, sideways 90 / 270; ``bench_manyclass``'s classes,
  held out): natural images, where the test should run;
* sklearn's digits: not mirror-symmetric, where it must not (it took 482 of 1,147 clean samples there).

Beside it, on the same images, the trust-free check (the same with ``mirror_check_trim`` of each class set aside), which a scan without a
trusted set reads on its first screen (poisoned data: ``input_view.py --mirror``'s check column).

For the orientation classes it also runs the mirror test itself on each whole class (clean), at the bar a
scan uses (``max_false_alarm`` / classes / 3 views), since the test had never read them.

    python benchmarks/mirror_symmetry.py --draws 20 --out benchmarks/results/mirror_symmetry.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from guard.datasets import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, load_digits  # noqa: E402
from guard.inputs import high_pass  # noqa: E402
from guard.mirror import mirror_steps, mirrored, symmetry  # noqa: E402
from guard.reference import unit  # noqa: E402
from guard.thresholds import Thresholds  # noqa: E402

def _normalised(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def orientation(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image turned to one orientation, drawn per image: upright, upside down, or sideways (90 or
    270 degrees, one class); its class (label, orientation): 30 classes."""
    rng = np.random.default_rng(seed)
    o = rng.integers(0, 3, len(labels))
    quarter = rng.choice([1, 3], len(labels))
    out = images.copy()
    for i in range(len(labels)):
        if o[i] == 1:
            out[i] = np.rot90(images[i], 2)
        elif o[i] == 2:
            out[i] = np.rot90(images[i], quarter[i])
    return out, labels * 3 + o


def draws(x: torch.Tensor, labels: np.ndarray, per_class: int, n: int, cap: int, level: float, trim: float) -> dict:
    """``n`` random trusted sets of ``per_class`` images a class: the check's p each (read at ``cap``, and at
    ``per_class`` uncapped), and the trust-free check's (at ``cap`` with ``trim``) on the same
    images, as a trust-free scan reads its first screen."""
    fine = high_pass(x)
    shape = (x.shape[1], x.shape[2], x.shape[3])
    rng = np.random.default_rng(per_class)
    capped, uncapped, lean = [], [], []
    for d in range(n):
        rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                               for c in np.unique(labels)])
        capped.append(symmetry(fine[rows], labels[rows], shape, cap, level, d).p)
        lean.append(symmetry(fine[rows], labels[rows], shape, cap, level, d, trim=trim).p)
        if per_class > cap:
            uncapped.append(symmetry(fine[rows], labels[rows], shape, per_class, level, d).p)
    row = {"per_class": per_class, "draws": n, "p": capped, "holds": float(np.mean(np.array(capped) >= level)),
           "p_lean": lean, "holds_lean": float(np.mean(np.array(lean) >= level))}
    if uncapped:
        row |= {"p_uncapped": uncapped, "holds_uncapped": float(np.mean(np.array(uncapped) >= level))}
    return row


def mirror_classes(x: torch.Tensor, labels: np.ndarray, per_class: int, seed: int, level: float) -> dict:
    """The mirror test (with its steps) on ``per_class`` images of each class, all clean: the classes it acts
    on and the smallest p."""
    fine = unit(high_pass(x))
    shape = (x.shape[1], x.shape[2], x.shape[3])
    rng = np.random.default_rng(seed)
    acted, ps = [], []
    for c in np.unique(labels):
        rows = torch.from_numpy(rng.choice(np.flatnonzero(labels == c), per_class, replace=False))
        steps = mirror_steps(fine[rows], mirrored(fine[rows], shape), level, seed)
        ps.append(steps.first.p)
        if steps.steps:
            acted.append(int(c))
    return {"classes": len(ps), "acted": acted, "min_p": float(min(ps)), "bar": level}


def markdown(rows: list[dict], mirror: list[dict], t: Thresholds, command: str) -> str:
    lines = [f"`{command}`: `guard.mirror.symmetry` on random trusted draws (normalised images, no augmentation), "
             f"at most {t.mirror_check_max} a class read, the mirror test run where p >= {t.mirror_symmetry_p:g}.", "",
             "| data | trusted a class | draws | check holds (test runs) | p: min / median | uncapped: holds, min p "
             f"| trust-free check ({t.mirror_check_trim:.0%} of a class set aside): holds, min p |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = np.array(r["p"])
        unc = (f"{r['holds_uncapped']:.0%}, {min(r['p_uncapped']):.2g}" if "p_uncapped" in r else "-")
        lean = f"{r['holds_lean']:.0%}, {min(r['p_lean']):.2g}" if "p_lean" in r else "-"
        lines.append(f"| {r['data']} | {r['per_class']} | {r['draws']} | {r['holds']:.0%} | "
                     f"{p.min():.2g} / {np.median(p):.2g} | {unc} | {lean} |")
    if mirror:
        lines += ["", "The mirror test on whole clean classes (no model), at a scan's bar:", "",
                  "| data | classes | images a class | acted on | smallest p | bar |", "|---|---|---|---|---|---|"]
        for m in mirror:
            lines.append(f"| {m['data']} | {m['classes']} | {m['per_class']} | {len(m['acted'])} | "
                         f"{m['min_p']:.2g} | {m['bar']:.2g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--archive", default=os.environ.get("GUARD_CIFAR10_ARCHIVE"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t = Thresholds()
    cap, level, trim = t.mirror_check_max, t.mirror_symmetry_p, t.mirror_check_trim
    rows, mirror = [], []
    digits = load_digits()["train"]
    dx = _normalised(digits.images, (0.5,), (0.5,))
    for n in (10, 20, 50):
        if np.bincount(digits.labels).min() >= n:
            rows.append({"data": "digits (train)", **draws(dx, digits.labels, n, args.draws, cap, level, trim)})
    cifar = load_cifar10(args.archive)
    for split in ("train", "test"):
        x = _normalised(cifar[split].images, CIFAR10_MEAN, CIFAR10_STD)
        for n in (10, 20, 50, 100, 200):
            rows.append({"data": f"CIFAR-10 ({split})", **draws(x, cifar[split].labels, n, args.draws, cap, level, trim)})
    images, labels = orientation(cifar["test"].images, cifar["test"].labels, 0)
    x = _normalised(images, CIFAR10_MEAN, CIFAR10_STD)
    for n in (10, 20):
        rows.append({"data": "CIFAR-10 (test) x orientation, 30 classes", **draws(x, labels, n, args.draws, cap, level, trim)})
    bar = t.max_false_alarm / 30 / 3
    for seed in range(3):
        mirror.append({"data": f"CIFAR-10 (test) x orientation, seed {seed}", "per_class": 280,
                       **mirror_classes(x, labels, 280, seed, bar)})
    for r in rows:
        print(r["data"], r["per_class"], f"holds {r['holds']:.0%}", f"min p {min(r['p']):.3g}",
              f"trust-free holds {r['holds_lean']:.0%}",
              f"uncapped holds {r.get('holds_uncapped', float('nan')):.0%}", flush=True)
    command = "python benchmarks/mirror_symmetry.py " + " ".join(sys.argv[1:])
    md = markdown(rows, mirror, t, command)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "mirror": mirror, "markdown": md}, indent=1))


if __name__ == "__main__":
    main()
