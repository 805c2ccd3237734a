"""Would a scan that scores a random sample of each class act on the same classes? (the sample's half of
``GuardConfig.scan_sample_per_class``)

A scan forwards every kept sample, so on a CPU without bf16 it cannot cost less than a plain forward over the data
(``scan_stages.py --floor``). ``scan_sample_per_class`` lets scans after the first score a per-class sample and rescan
every kept sample only where the sample acts. This measures the sample's half on the fixed epoch-3 checkpoint of
``scan_stages.py``: the same scan (``remedy="none"``) over all kept samples, then over a random sample of
``--per-class`` samples of each class (``Scanner.run`` with those as the kept samples; draws ``(seed, size)``).
Per scan: the classes acted on, the samples forwarded and the seconds, and TPR / FPR within the samples scanned.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/sampled_scan.py --attack badnets --out a.json

The checkpoint is ``scan_stages.py``'s (``/tmp/guard_stages_ATTACK.pt``, trained there when missing; at another
``--rate``, ``/tmp/guard_stages_ATTACK_RATE.pt``).
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

from benchmarks.scan_stages import checkpoint  # noqa: E402
from guard import GuardConfig, GuardedDataset  # noqa: E402
from guard.decide import Verdict  # noqa: E402
from guard.experiment import RunSpec, prepare  # noqa: E402
from guard.sample import acts  # noqa: E402

ACTS = (Verdict.SEPARATE, Verdict.LIKE_QUARANTINED)


def one(gds: GuardedDataset, kept: np.ndarray, poisoned: set[int]) -> dict:
    """One scan of ``kept`` (nothing applied): what it acts on, forwards and takes."""
    t = time.perf_counter()
    res = gds.scanner.run(gds._source, gds.trusted, kept)
    seconds = time.perf_counter() - t
    flagged, inside = set(map(int, res.flagged)), set(map(int, kept))
    poison_in, benign_in = poisoned & inside, inside - poisoned
    return {"n": len(kept), "seconds": round(seconds, 2),
            "forwarded": sum(v for k, v in res.passes.items() if not k.endswith("(kept)")),
            "acted": sorted(int(c.cls) for c in res.classes if c.verdict in ACTS),
            "rescan": acts(res, gds.config.thresholds),     # scan_sample_per_class would rescan every kept sample
            "verdicts": {int(c.cls): str(c.verdict) for c in res.classes},
            "flagged": len(flagged), "tpr": len(flagged & poison_in) / len(poison_in) if poison_in else None,
            "fpr": len(flagged - poisoned) / len(benign_in)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", default="badnets", help="a guard.attacks name, or none")
    ap.add_argument("--rate", type=float, default=0.1, help="poisoned share (the checkpoint is trained at it)")
    ap.add_argument("--per-class", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--trust-free", action="store_true", help="scan without the trusted set")
    ap.add_argument("--archive", default=os.environ.get("GUARD_CIFAR10_ARCHIVE"))
    ap.add_argument("--out")
    a = ap.parse_args()
    spec = RunSpec(data="cifar10", attack=None if a.attack == "none" else a.attack, rate=a.rate, n_train=10000,
                   epochs=8, width=16, lr=0.01, seed=0, archive=a.archive)
    path = Path(f"/tmp/guard_stages_{a.attack}.pt" if a.rate == 0.1 else f"/tmp/guard_stages_{a.attack}_{a.rate:g}.pt")
    if not path.exists():
        checkpoint(spec, path)
    data = prepare(spec)
    model = data.make_model()
    model.load_state_dict(torch.load(path, weights_only=True))
    gds = GuardedDataset(data.train, model, GuardConfig(seed=0, remedy="none", progress=False),
                         trusted=None if a.trust_free else data.trusted, scan_dataset=data.scan)
    kept, poisoned = gds.kept_indices(), set(map(int, data.poisoned))
    labels = np.asarray(data.train.labels)[kept]
    out = {"all": one(gds, kept, poisoned)}
    print("all", out["all"], flush=True)
    for size in a.per_class:
        for draw in range(a.draws):
            rng = np.random.default_rng([draw, size])
            sample = np.sort(np.concatenate([rng.choice(kept[labels == c], min(size, int((labels == c).sum())),
                                                        replace=False) for c in np.unique(labels)]))
            out[f"{size}/{draw}"] = one(gds, sample, poisoned)
            print(size, draw, out[f"{size}/{draw}"], flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"attack": a.attack, "rate": a.rate, "trust_free": a.trust_free, "runs": out},
                                          indent=1))


if __name__ == "__main__":
    main()
