"""Golden outputs of the scan's decision: saved real-data checkpoints, scanned through the public API.

Three small CNNs trained on 3,000 real CIFAR-10 images (BadNets 10 %, Blended 10 %, no attack) are
stored in ``tests/golden/*.pt``; each is scanned twice (a first scan, then a second one that follows
up what the first quarantined) with a trusted set, trust-free, and with the paper's rule. What the
scans decide (quarantined indices, per-class verdicts and statistics) is stored in
``tests/golden/outputs.json`` and ``tests/test_golden.py`` asserts it unchanged: a refactor of the
decision core must not move a single sample. The scans run in float32 (``amp=False``): the guard's
default autocast is bf16 only on hardware that computes it natively, so the default's numbers depend
on the machine, float32's only in their last bits.

    python -m tests.golden --train     # re-make the checkpoints (only when the data or model change)
    python -m tests.golden --record    # re-record the outputs (only in a commit that changes behaviour)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

FOLDER = Path(__file__).parent / "golden"
CASES = {"badnets": "badnets", "blended": "blended", "clean": None}
MODES = {"trusted": {}, "trust-free": {}, "paper": {"critical_rule": "paper"},
         # a screen too small to fit the probe (the centroid fall-back) and a per-class cap that binds;
         # with a trusted set a 16-sample screen cannot pass the cross-fitted reference gate, trust-free it can
         "small-screen": {"thresholds": {"screen_per_class": 16, "class_drop_cap": 0.05, "class_drop_warn": 0.05}},
         "small-screen-trust-free": {"thresholds": {"screen_per_class": 16, "class_drop_cap": 0.05,
                                                    "class_drop_warn": 0.05}}}
_FLOATS = ("excess", "benign_rate", "separation", "screen_share", "threshold")


def _data(case: str, archive: str):
    from guard.experiment import RunSpec, prepare

    return prepare(RunSpec(data="cifar10", attack=CASES[case], rate=0.1, n_train=3000, trusted_per_class=30,
                           archive=archive))


def _model():
    from guard.models import SmallCNN

    return SmallCNN(in_channels=3, width=16)


def detect_checkpoint(case: str, archive: str):
    """``guard.detect`` of the recorded checkpoint of ``case`` with its trusted set, defaults."""
    from guard import GuardConfig, detect

    data = _data(case, archive)
    model = _model()
    model.load_state_dict(torch.load(FOLDER / f"{case}.pt", weights_only=True))
    return detect(model, data.train, data.trusted, GuardConfig(progress=False))


def fit(dataset, epochs: int) -> torch.nn.Module:
    """The small CNN, trained from seed 0 with SGD (lr 0.05, momentum 0.9, batch 64) for ``epochs``."""
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for x, y in DataLoader(dataset, batch_size=64, shuffle=True, generator=g):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def train(archive: str) -> None:
    FOLDER.mkdir(exist_ok=True)
    for case in CASES:
        torch.save(fit(_data(case, archive).train, epochs=4).state_dict(), FOLDER / f"{case}.pt")


def outputs(case: str, mode: str, archive: str) -> dict[str, Any]:
    """The decisions of two scans of one checkpoint in one mode, as plain JSON values."""
    from guard import GuardConfig, GuardedDataset

    data = _data(case, archive)
    model = _model()
    model.load_state_dict(torch.load(FOLDER / f"{case}.pt", weights_only=True))
    cfg = GuardConfig(remedy="none", progress=False, amp=False, **MODES[mode])
    gds = GuardedDataset(data.train, model, cfg, trusted=None if mode.endswith("trust-free") else data.trusted)
    scans = []
    for epoch in (0, 1):
        gds.scan(epoch)
        res, rep = gds.last_result, gds.report.scans[-1]
        scans.append({
            "quarantined": gds.quarantined.tolist(),
            "paper_flagged": int(rep.paper_flagged),
            "suspicion": [round(float(x), 3) for x in np.quantile(res.suspicion, [0.01, 0.5, 0.99])],
            "classes": [{"cls": c.cls, "verdict": c.verdict, "n_flagged": c.n_flagged, "capped": c.capped,
                         "critical_layers": c.critical_layers, "p_value": float(f"{c.p_value:.4g}"),
                         **{k: round(float(getattr(c, k)), 4) for k in _FLOATS}} for c in rep.classes]})
    return {"scans": scans}


def record(archive: str) -> None:
    out = {f"{case}/{mode}": outputs(case, mode, archive) for case in CASES for mode in MODES}
    (FOLDER / "outputs.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    from guard.datasets import find_cifar10_archive

    p = argparse.ArgumentParser()
    p.add_argument("--train", action="store_true")
    p.add_argument("--record", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(2)
    path = str(find_cifar10_archive())
    if a.train:
        train(path)
    if a.record:
        record(path)
