"""Do no harm when the training data comes from a less careful source than the trusted set: labels
crowd-sourced with mistakes (``RunSpec.label_noise``), images re-encoded as low-quality JPEG while the
trusted images are not (``RunSpec.train_jpeg``).

Neither is poison: a guard that acts on them quarantines data the user wants. Mislabelled samples are
a special case: each class then holds samples of every other class, out of its benign spread, so the
guard may take some, and the table says which (the share of the mislabelled samples taken against
the share of the rest). Whole guarded runs beside their unguarded twins, on the zoo's recipe
(``bench_zoo.spec``: CIFAR-10 4,000 images, random crop + flip, 20 epochs, 50 trusted a class).

    taskset -c 0 python benchmarks/bench_sources.py --guarded noise10:none:0:0 --out a.json &
    taskset -c 1 python benchmarks/bench_sources.py --guarded jpeg25:none:0:0 --out b.json
    python benchmarks/bench_sources.py --merge a.json b.json    # -> results/sources_cifar10.json

Items are ``CONDITION:ATTACK:RATE:SEED`` (CONDITION a key of ``CONDITIONS``; ATTACK ``none``, a
``guard.attacks`` name or a zoo trigger ``zoo:S:I``, whose own target and rate then apply).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_guard import fmt, render_benchmarks, row  # noqa: E402
from benchmarks.bench_harm import clean_classes, mismatch_cell, mismatch_summary  # noqa: E402
from benchmarks.bench_zoo import spec as zoo_spec  # noqa: E402
from guard.experiment import prepare, run  # noqa: E402

CONDITIONS = {
    "clean": {},
    "noise10": {"label_noise": 0.1},
    "noise20": {"label_noise": 0.2},
    "jpeg25": {"train_jpeg": 25},
    "jpeg10": {"train_jpeg": 10},
}


def guarded(item: str) -> dict:
    """One whole guarded run of ``item`` beside its twin."""
    parts = item.split(":")
    cond, attack, rate, seed = parts[0], ":".join(parts[1:-2]), parts[-2], parts[-1]
    attack = None if attack == "none" else attack
    sp = replace(zoo_spec("", attack, float(rate), int(seed)), **CONDITIONS[cond])
    data = prepare(sp)
    r = run(sp, compare=True, data=data)
    report = r.pop("report")
    taken = np.zeros(len(data.labels), bool)
    taken[[q.index for q in report.quarantine]] = True
    noisy = np.zeros(len(data.labels), bool)
    noisy[data.noisy] = True
    poison = np.zeros(len(data.labels), bool)
    poison[data.poisoned] = True
    rest = ~noisy & ~poison
    out = row(item, r)
    out.update(condition=cond, seed=int(seed), n_train=len(data.labels), scans=len(r["scans"]),
               dropped_share=float(taken.mean()), noisy=int(noisy.sum()),
               noisy_taken=float(taken[noisy].mean()) if noisy.any() else float("nan"),
               rest_taken=float(taken[rest].mean()), **clean_classes(r["scans"], None if attack is None else sp.target),
               mismatch_p=[s.get("trusted_mismatch_p") for s in r["scans"]])
    return out


INTRO = ("`python benchmarks/bench_sources.py --guarded CONDITION:ATTACK:RATE:SEED` (the zoo's recipe: CIFAR-10 "
         "4,000 images, random crop + flip, 20 epochs, 50 trusted a class, width-16 ResNet-18; guarded beside its "
         "unguarded twin). *noiseN*: N % of the training labels set to another class at random; *jpegQ*: the "
         "training images re-encoded as JPEG at quality Q, the trusted images not. *mislabelled taken*: the share "
         "of the changed labels quarantined; *rest taken*: of the other benign samples. *code*: the commit the "
         "row ran at.")


def markdown(rows: list[dict]) -> str:
    head = ("| code | condition | attack | seed | dropped % | mislabelled taken % | rest taken % | "
            "worst clean class % | "
            "clean decisions acted on | TPR % | ASR(correct) no guard -> guard % | accuracy no guard -> guard % | "
            "trusted mismatch: scans warned (smallest p) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["condition"], str(r["attack"]), r["seed"])):
        lines.append(
            f"| {r.get('code', '-')} | {r['condition']} | {r['attack'] or '-'} | {r['seed']} | "
            f"{fmt(r['dropped_share'])} | "
            f"{fmt(r['noisy_taken'])} | {fmt(r['rest_taken'])} | {fmt(r['worst_clean_drop'])} | "
            f"{r['clean_acted']} of {r['clean_decisions']} | {fmt(r['tpr'])} | "
            f"{fmt(r['asr_correct_unguarded'])} -> {fmt(r['asr_correct_guarded'])} | "
            f"{fmt(r['acc_unguarded'])} -> {fmt(r['acc_guarded'])} | {_mismatch(r)} |")
    return "\n".join(lines)


def _mismatch(r: dict) -> str:
    """How many scans of the row warned that the trusted samples do not look like the training data,
    and the smallest p; '-' for rows that predate the check."""
    if "mismatch_p" not in r:
        return "-"
    m = mismatch_summary(r["mismatch_p"])
    return mismatch_cell(m) if m else f"0 of {len(r['mismatch_p'])}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guarded", nargs="+", metavar="CONDITION:ATTACK:RATE:SEED")
    ap.add_argument("--merge", nargs="+", metavar="JSON")
    ap.add_argument("--out", default=str(HERE / "results" / "sources_cifar10.json"))
    ap.add_argument("--code", help="--guarded: the commit the rows ran at (recorded in each row)")
    a = ap.parse_args()
    if a.guarded:
        rows = [guarded(item) | ({"code": a.code} if a.code else {}) for item in a.guarded]
        Path(a.out).write_text(json.dumps({"rows": rows}, indent=1, default=float))
    elif a.merge:
        rows = [r for f in a.merge for r in json.loads(Path(f).read_text())["rows"]]
        Path(a.out).write_text(json.dumps({"rows": rows, "markdown": INTRO + "\n\n" + markdown(rows)}, indent=1,
                                          default=float))
        render_benchmarks()
    else:
        ap.error("give --guarded or --merge")


if __name__ == "__main__":
    main()
