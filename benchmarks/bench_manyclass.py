"""Do no harm with many small classes: 30 classes of 200-350 training images, 10-20 trusted each.

No many-class image data ships with this repository, so the benchmark builds one from CIFAR-10 as
an image folder (``--build``): every image gets one orientation, upright, upside down (180 degrees)
or sideways (90 or 270 degrees, one class), and its class is (CIFAR-10 class, orientation): 30
classes in which every class has two near neighbours that share its content. The orientation
classes are kept apart by a horizontal flip (a mirrored upright image is upright; a mirrored
sideways image is sideways), so the usual crop + flip training applies unchanged. Class ``c`` (in
sorted folder order) gets ``350 * 1.75 ** (-c / 29)`` training images (350 down to 200), drawn
anew for every seed, and a disjoint trusted set.

The rest is ``bench_harm``'s: unguarded runs (crop + flip, SGD 0.05 cosine, 24 epochs, width-16
ResNet-18) keep their models at the scan epochs, ``guard.detect`` reads them with 10 and 20 trusted
a class and trust-free, and every clean class of every scan is one decision. Attacked runs poison
2 % of the data into class 0 (about 160 images against its 350): Blended (noise, alpha 0.2) and an
8 px binary zoo patch in the bottom-right corner (``zoo:7:9``). Nothing here was used to set a rule.

    python benchmarks/bench_manyclass.py --build --root R                 # once (needs the CIFAR-10 archive)
    python benchmarks/bench_manyclass.py --root R --train --part 0/2 &    # two pinned single-thread processes, 40 min
    python benchmarks/bench_manyclass.py --root R --train --part 1/2
    python benchmarks/bench_manyclass.py --root R --scan --part 0/2 --out a.json &
    python benchmarks/bench_manyclass.py --root R --scan --part 1/2 --out b.json
    python benchmarks/bench_manyclass.py --merge a.json b.json     # -> results/harm_manyclass.json, BENCHMARKS.md

``--guarded`` runs whole guarded trainings instead, each beside its unguarded twin in lockstep
(``guard.experiment.run``, the guard's default schedule: a scan every 2 epochs from epoch 3 to the
end), for the cells and trusted sizes named, and reports what issue 20 asks of a whole run: the
share of the data dropped, the worst clean class, TPR, FPR and accuracy against the twin:

    python benchmarks/bench_manyclass.py --root R --guarded none:0:0:10 zoo:7:9:0.02:0:10 --out g.json
    python benchmarks/bench_manyclass.py --root R --floors floors.json   # the attacks' floors, from --train's models
    python benchmarks/bench_manyclass.py --merge-guarded g.json h.json --with-floors floors.json
                                                        # -> results/harm_manyclass_guarded.json, BENCHMARKS.md
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
from benchmarks.bench_harm import guarded_row, guarded_table, merge, render, scan_rows, summarise, train  # noqa: E402
from guard.datasets import CIFAR10_CLASSES, load_cifar10  # noqa: E402
from guard.experiment import RunSpec  # noqa: E402

CLASSES, HEAD, IMBALANCE, POOL = 30, 350, 1.75, 600
ORIENT = ("0-upright", "1-upside-down", "2-sideways")
EPOCHS, KEEP, SCANNED, LR = 24, (3, 7, 11, 15, 19, 23), (3, 7, 15), 0.05
CLEAN_SEEDS = 6
ATTACKED = [("blended", 0.02, 0), ("zoo:7:9", 0.02, 0)]


def build(root: Path, archive: str | None = None, seed: int = 0) -> dict:
    """Write the 30-class image folder under ``root`` (``train/`` with ``POOL`` images a class to draw
    from, ``test/`` with every CIFAR-10 test image in its drawn orientation)."""
    from PIL import Image

    splits = load_cifar10(archive)
    names = CIFAR10_CLASSES
    rng = np.random.default_rng(seed)
    counts = {}
    for split, pool in (("train", POOL), ("test", None)):
        s = splits[split]
        orient = rng.integers(0, 3, len(s.labels))
        turns = np.where(orient == 0, 0, np.where(orient == 1, 2, rng.choice([1, 3], len(s.labels))))
        for c in range(10):
            for o in range(3):
                idx = np.flatnonzero((s.labels == c) & (orient == o))
                if pool is not None:
                    idx = np.sort(rng.choice(idx, pool, replace=False))
                folder = root / split / f"{names[c]}-{ORIENT[o]}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in idx:
                    turned = np.ascontiguousarray(np.rot90(s.images[i], int(turns[i])))
                    Image.fromarray(turned).save(folder / f"{i:05d}.png")
                counts[f"{split}/{folder.name}"] = len(idx)
    (root / "built.json").write_text(json.dumps({"seed": seed, "counts": counts}))
    return counts


def spec_for(root: Path):
    def spec(variant: str, attack: str | None, rate: float, seed: int, trusted: int = 10) -> RunSpec:
        return RunSpec(data="imagefolder", archive=str(root), attack=attack, rate=rate, target=0, seed=seed,
                       trusted_per_class=trusted, augment=True, epochs=EPOCHS, lr=LR, n_train=HEAD * CLASSES,
                       imbalance=IMBALANCE, attack_kwargs={"alpha": 0.2} if attack == "blended" else {})
    return spec


def cells(seeds: int) -> list[tuple]:
    return [("many30", a, r, s) for a, r, s in ATTACKED] + [("many30", None, 0.0, s) for s in range(seeds)]


def markdown(summary: list[dict], rows: list[dict]) -> str:
    runs = sorted({(r["cell"], r["acc_unguarded_final"], r["asr_unguarded_final"]) for r in rows})
    clean_acc = [a for c, a, _ in runs if "-none-" in c]
    attacked = ", ".join(f"{c.split('-')[1]} {a:.0%}" for c, _, a in runs if "-none-" not in c)
    seeds = len({r["seed"] for r in rows if r["attack"] == "none"})
    return "\n".join([
        "`python benchmarks/bench_manyclass.py` (two pinned single-thread processes): 30 classes built from CIFAR-10 "
        "(class x orientation: upright, upside down, sideways), 200-350 training images a class (long-tailed, "
        f"imbalance {IMBALANCE}), trained unguarded as users train (crop + flip, SGD {LR} cosine, {EPOCHS} epochs, "
        f"width-16 ResNet-18; clean accuracy at the end {min(clean_acc):.1%}-{max(clean_acc):.1%} over 30 classes). "
        f"`guard.detect` on the models of epochs {', '.join(map(str, SCANNED))}, 10 and 20 trusted a class and "
        f"trust-free, `GuardConfig()` defaults. No attack: {seeds} seeds; every clean class of every scan is one "
        "decision. *Candidate*: passed the first step; *acted on*: lost samples. Attacked (2 % of the data into "
        f"class 0, seed 0), undefended attack success at the end: {attacked}.", "", render(summary)])


def guarded(root: Path, item: str) -> dict:
    """One whole guarded run beside its twin (:func:`bench_harm.guarded_row`); ``item`` is
    ``ATTACK:RATE:SEED:TRUSTED`` (ATTACK ``none`` for no attack, TRUSTED 0 for trust-free; zoo triggers
    keep their colons: ``zoo:7:9:0.02:0:10``)."""
    return guarded_row(item, lambda attack, rate, seed, trusted: spec_for(root)("many30", attack, rate, seed, trusted))


def floors(root: Path, cache: Path, seeds: int) -> dict:
    """Each attacked cell's trigger read by the no-attack runs' models (``--train``'s cache, the model
    after epoch 23 of 24), which never saw it: the never-poisoned floor of its attack success."""
    from guard.experiment import measure, prepare

    out = {}
    for attack, rate, seed in ATTACKED:
        data = prepare(spec_for(root)("many30", attack, rate, seed))
        per = []
        for s in range(seeds):
            model = data.make_model()
            model.load_state_dict(torch.load(cache / f"many30-none-0-s{s}" / "epoch23.pt", weights_only=True))
            m = measure(model, data)
            per.append({"all": m["attack_success"], "correct": m["attack_success_correct"]})
        out[attack] = {k: max(p[k] for p in per) for k in ("all", "correct")} | {"seeds": per}
    return out


def guarded_markdown(rows: list[dict], floor: dict | None = None) -> str:
    return guarded_table(rows, floor, "`python benchmarks/bench_manyclass.py --root R --guarded ATTACK:RATE:SEED:TRUSTED "
                         f"...` (pinned single-thread processes): the 30-class data above, whole runs of {EPOCHS} epochs "
                         "with the guard's defaults (a scan every 2 epochs from epoch 3), each beside its unguarded twin "
                         "in lockstep. Attacked: 2 % of the data into class 0 (floors: the six no-attack `--train` "
                         "models, the highest).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="the built image folder")
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--scan", action="store_true")
    ap.add_argument("--part", default="0/1", help="K/N: this process takes every N-th cell from K")
    ap.add_argument("--seeds", type=int, default=CLEAN_SEEDS, help="clean seeds")
    ap.add_argument("--cache", default=str(HERE.parent / "runs" / "manyclass"))
    ap.add_argument("--out", help="--scan, --merge: where to write (default results/harm_manyclass.json); "
                                  "--guarded: the part's JSON (needed)")
    ap.add_argument("--merge", nargs="+", metavar="JSON")
    ap.add_argument("--guarded", nargs="+", metavar="ATTACK:RATE:SEED:TRUSTED",
                    help="whole guarded runs beside their twins (TRUSTED 0: trust-free)")
    ap.add_argument("--merge-guarded", nargs="+", metavar="JSON")
    ap.add_argument("--floors", metavar="JSON", help="write the attacks' never-poisoned floors here (after --train)")
    ap.add_argument("--with-floors", metavar="JSON", help="--merge-guarded: the floors --floors wrote")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out) if a.out else HERE / "results" / "harm_manyclass.json"
    if a.merge:
        merge(a.merge, out, markdown)
        return
    if a.merge_guarded:
        rows = [r for f in a.merge_guarded for r in json.loads(Path(f).read_text())["rows"]]
        floor = json.loads(Path(a.with_floors).read_text()) if a.with_floors else {}
        out = HERE / "results" / "harm_manyclass_guarded.json"
        md = guarded_markdown(rows, floor)
        out.write_text(json.dumps({"rows": rows, "floors": floor, "markdown": md}, indent=1, default=float))
        render_benchmarks()
        print(md)
        return
    if a.root is None:
        ap.error("--root is needed (the folder --build writes)")
    root = Path(a.root)
    if a.build:
        print(json.dumps(build(root)))
    if a.floors:
        Path(a.floors).write_text(json.dumps(floors(root, Path(a.cache), a.seeds), indent=1))
        print(Path(a.floors).read_text())
        return
    if a.guarded:
        if not a.out:
            ap.error("--guarded needs --out PART.json (then merge the parts with --merge-guarded)")
        rows = []
        for item in a.guarded:
            rows.append(guarded(root, item))
            Path(a.out).write_text(json.dumps({"rows": rows}, indent=1, default=float))
            print(json.dumps(rows[-1], default=float), flush=True)
        print(guarded_markdown(rows))
        return
    k, n = (int(x) for x in a.part.split("/"))
    todo, cache, spec = cells(a.seeds)[k::n], Path(a.cache), spec_for(root)
    if a.train:
        for c in todo:
            print(json.dumps(train(c, cache, make=spec, keep=KEEP)), flush=True)
    if a.scan:
        rows = [r for c in todo for r in scan_rows(c, cache, {"defaults": {}}, make=spec, epochs=SCANNED)]
        meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "epochs": EPOCHS, "scanned": SCANNED, "lr": LR, "classes": CLASSES, "head": HEAD,
                "imbalance": IMBALANCE}
        summary = summarise(rows)
        out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows,
                                   "markdown": markdown(summary, rows)}, separators=(",", ":")))
        print(render(summary))


if __name__ == "__main__":
    main()
