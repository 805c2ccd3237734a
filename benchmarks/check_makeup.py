"""What the unlearning's start test reads: the held-out check samples at each remedy, by kind.

The unlearning starts where the model fits the held-out quarantined samples (``guard.remedy``'s check
set) beyond chance. This runs one guarded training (no twin) and, before each remedy, splits the check
set into poisoned, cover (triggered, true label kept) and clean samples, and counts how many of each the
model predicts as the label they carry; with the quarantine's makeup and the start test's own numbers.
The run is the zoo recipe (``bench_zoo.spec``: 4,000 images, crop + flip, 50 trusted a class, 20 epochs, SGD
0.05 cosine, ``GuardConfig()`` defaults); by default with the Adaptive-Patch attack of ``adaptive_current_cifar10``.

    GUARD_CIFAR10_ARCHIVE=... python benchmarks/check_makeup.py --out benchmarks/results/check_makeup_adaptive_patch.json
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

import guard.guarded as gg  # noqa: E402
from benchmarks.bench_guard import render_benchmarks  # noqa: E402
from benchmarks.bench_zoo import spec as zoo_spec  # noqa: E402
from guard import experiment as ex  # noqa: E402
from guard.remedy import predictions  # noqa: E402


def markdown(saved: dict) -> str:
    """The table of a result file: per remedy, the check set by kind (held out, fitted) and the start test."""
    sp, g = saved["spec"], saved["guarded"]
    lines = [f"`python benchmarks/check_makeup.py`: {sp['attack']} {sp['rate']:.0%} ({json.dumps(sp['attack_kwargs'])}), "
             f"{sp['n_train']:,} CIFAR-10 images, crop + flip, {sp['trusted_per_class']} trusted a class, {sp['epochs']} "
             f"epochs, SGD {sp['lr']:g} cosine, seed {sp['seed']}, `GuardConfig()` defaults, guarded run only. Check "
             "samples: the held-out quarantined samples the unlearning's start test reads, held out (fitted: predicted "
             "as the label they carry), before each remedy.", "",
             "| scan (epoch) | poisoned | covers | clean | quarantined: poisoned / covers / clean | fit / allowed | p | "
             "remedy |", "|---|---|---|---|---|---|---|---|"]
    for r in saved["remedies"]:
        q = r["quarantined"]
        lines.append(f"| {r['scan']} ({r['epoch']}) | {r['poison'][0]} ({r['poison'][1]}) | {r['cover'][0]} "
                     f"({r['cover'][1]}) | {r['clean'][0]} ({r['clean'][1]}) | {q['poison']} / {q['cover']} / "
                     f"{q['clean']} | {r['fit']:.1%} / {r['allowed']:.1%} | {r['p']:.1g} | "
                     + (f"{r['steps']} steps, {r['stopped']}" if r["remedy"] else "none") + " |")
    lines += ["", f"End: TPR {g['tpr']:.1%}, FPR {g['fpr']:.2%} (covers counted as benign; {g['cover_flagged']:.1%} of "
              f"them taken), attack success {g['attack_success']:.1%} (correctly classified {g['attack_success_correct']:.2%}), "
              f"accuracy {g['clean_acc']:.1%}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", default="adaptive_patch")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--attack-args", default='{"cover_rate": 0.2, "train_alphas": [1.0, 0.4, 1.0, 0.6]}',
                    help="the attack's keyword arguments, as JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--render", action="store_true", help="only (re)write --out's table from its saved counts")
    a = ap.parse_args()
    if a.render:
        saved = json.loads(Path(a.out).read_text())
        Path(a.out).write_text(json.dumps({**saved, "markdown": markdown(saved)}, indent=1) + "\n")
        render_benchmarks()
        return
    spec = replace(zoo_spec("zoo", a.attack, a.rate, a.seed), attack_kwargs=json.loads(a.attack_args))
    data = ex.prepare(spec)
    kinds = {"poison": set(data.poisoned.tolist()), "cover": set(data.cover.tolist())}
    rows: list[dict] = []
    remedy = gg.GuardedDataset._remedy

    def reading(self, scan, scan_no, new):              # noqa: ANN001, ANN202
        _, check = self._split_records()
        pred, lab = predictions(gg.unwrap_model(self.model), self.dataset, check, self.feed)
        kind = np.array([next((k for k, s in kinds.items() if int(i) in s), "clean") for i in check])
        row: dict = {"scan": scan_no, "epoch": scan.epoch, "n": len(check)}
        for k in ("poison", "cover", "clean"):
            m = kind == k
            row[k] = [int(m.sum()), int((pred[m] == lab[m]).sum())]          # [held out, fitted]
            row[k + "_labels"] = np.bincount(lab[m], minlength=data.num_classes).tolist()
        q = self.quarantined
        row["quarantined"] = {k: int(sum(int(i) in s for i in q)) for k, s in kinds.items()}
        row["quarantined"]["clean"] = len(q) - sum(row["quarantined"].values())
        out = remedy(self, scan, scan_no, new)
        row.update(remedy=scan.remedy, fit=scan.remedy_fit_before, allowed=scan.remedy_fit_allowed, p=scan.remedy_fit_p,
                   steps=scan.remedy_steps, stopped=scan.remedy_stopped)
        print(json.dumps(row), flush=True)
        rows.append(row)
        return out

    gg.GuardedDataset._remedy = reading
    res = ex.run(spec, compare=False, data=data)
    saved = json.loads(json.dumps({"spec": res["spec"], "guarded": res["guarded"], "remedies": rows}, default=float))
    Path(a.out).write_text(json.dumps({**saved, "markdown": markdown(saved)}, indent=1) + "\n")
    render_benchmarks()


if __name__ == "__main__":
    main()
