"""How far each of the guard's layers separates a trigger's poison, told which samples are poisoned.

A guarded run of one trigger in the zoo's recipe (CIFAR-10 4,000 images, width-16 ResNet-18, crop +
flip in the training Dataset, SGD 0.05 cosine, 20 epochs, 50 trusted a class, guard defaults; no
unguarded twin). After each scan, per layer of the guard, over the target class's training samples
(read as the scan reads them):

* ``lda``: the AUROC of a shrinkage LDA fitted *knowing* which samples are poisoned, scored
  out-of-fold (5 folds) on the unit features: the best a linear read of that layer does. No detector
  that reads the layer one direction at a time does better without the truth.
* ``cos``: the paper's score (cosine to the trusted class mean; ``bench_guard.per_layer_auroc``).

and the scan's verdict and reason for the target class, and how much is quarantined by then. A
trigger the guard misses with ``lda`` near 1 at some layer is a decision to fix; one with ``lda``
well under 1 everywhere is not in the layers the guard reads.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/layer_separability.py zoo:1:14 --out a.json
    python benchmarks/layer_separability.py --merge a.json b.json --out benchmarks/results/F.json

Needs ``GUARD_CIFAR10_ARCHIVE``; scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_guard import per_layer_auroc  # noqa: E402
from guard.attacks import make_attack  # noqa: E402
from guard.experiment import RunSpec, run  # noqa: E402
from guard.hooks import scan_mode  # noqa: E402
from guard.reference import unit  # noqa: E402


def lda_auroc(feats: list[np.ndarray], truth: np.ndarray) -> list[float]:
    """Per layer, the out-of-fold AUROC of a shrinkage LDA told ``truth`` (``feats``: unit rows per layer)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    out = []
    for x in feats:
        score = cross_val_predict(LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"), x, truth,
                                  cv=StratifiedKFold(5, shuffle=True, random_state=0), method="decision_function")
        out.append(float(roc_auc_score(truth, score)))
    return out


def markdown(runs: list[dict]) -> str:
    """Per trigger and scan: the best layer's LDA AUROC, every layer's, the best cosine AUROC, the target
    class's verdict and what was quarantined by then."""
    layers = runs[0]["trace"][0]["layers"]
    head = ("| trigger | scan epoch | best LDA AUROC (layer) | LDA AUROC: " + ", ".join(layers)
            + " | best cosine AUROC | target class's verdict | quarantined (poisoned) |")
    lines = [head, "|" + "---|" * 7]
    for r in runs:
        for t in r["trace"]:
            k = int(np.argmax(t["lda"]))
            lines.append(f"| {r['trigger']} | {t['epoch']} | {t['lda'][k]:.2f} ({t['layers'][k]}) | "
                         + " ".join(f"{x:.2f}" for x in t["lda"]) + f" | {max(t['cos']):.2f} | "
                         + f"{', '.join(t['verdict'])} | {t['q']} ({t['q_pois']}) |")
    lines.append("")
    for r in runs:
        g = r.get("guarded") or {}
        if g:
            lines.append(f"* {r['trigger']} ({r['attack']}), seed {r['seed']}: at the end of the guarded run attack "
                         f"success {g['attack_success']:.1%} ({g['attack_success_correct']:.1%} on correctly "
                         f"classified images), clean accuracy {g['clean_acc']:.1%}, TPR {g['tpr']:.1%}, "
                         f"FPR {g['fpr']:.2%}.")
    return "\n".join(lines).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trigger", nargs="?", help="a guard.attacks name or zoo:SEED:INDEX (its own target and rate)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--archive", default=os.environ.get("GUARD_CIFAR10_ARCHIVE"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge runs into --out, with its table")
    a = ap.parse_args()
    if a.merge:
        runs = [json.loads(Path(p).read_text()) for p in a.merge]
        Path(a.out).write_text(json.dumps({"runs": runs, "markdown": markdown(runs)}, indent=1))
        print(markdown(runs))
        return
    atk = make_attack(a.trigger)
    spec = RunSpec(data="cifar10", attack=a.trigger, rate=atk.rate, target=atk.target, seed=a.seed,
                   trusted_per_class=50, augment=True, epochs=20, lr=0.05, n_train=4000, archive=a.archive)
    trace = []

    def on_scan(gds, data) -> dict:
        rows = np.flatnonzero(data.labels == atk.target)
        truth = np.isin(rows, data.poisoned)
        with scan_mode(gds.scanner.model):
            batches = list(gds.extractor.stream(data.scan, gds.layers, rows, "separability"))
        feats = [unit(torch.cat([b.feats[i].float() for b in batches])).numpy() for i in range(len(gds.layers))]
        scan = gds.report.scans[-1]
        mine = [c for c in scan.classes if c.cls == atk.target]
        q = np.asarray(sorted(gds.quarantined))
        r = {"epoch": scan.epoch, "layers": list(gds.layers), "lda": lda_auroc(feats, truth),
             "cos": [float(x) for x in per_layer_auroc(gds, data, rows)],
             "verdict": [str(c.verdict) for c in mine], "reason": [c.reason for c in mine],
             "q": int(len(q)), "q_pois": int(np.isin(q, data.poisoned).sum()) if len(q) else 0}
        print(json.dumps({k: np.round(v, 3).tolist() if k in ("lda", "cos") else v
                          for k, v in r.items() if k != "layers"}), flush=True)
        trace.append(r)
        return {}

    t0 = time.time()
    res = run(spec, compare=False, on_scan=on_scan)
    res.pop("report", None)
    Path(a.out).write_text(json.dumps({"trigger": a.trigger, "attack": repr(atk), "seed": a.seed, "trace": trace,
                                       "guarded": res.get("guarded"),
                                       "wall": time.time() - t0}, indent=1, default=str))


if __name__ == "__main__":
    main()
