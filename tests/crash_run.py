"""A plain training loop with checkpoints, run as a subprocess by test_resume.py.

    python tests/crash_run.py OUT_DIR [--resume] [--hang-after-scan N]

Each epoch appends its sample order to OUT_DIR/orders.jsonl and then checkpoints model,
optimizer and guard state atomically. ``--hang-after-scan N`` writes OUT_DIR/scanned once scan N
has run and then waits mid-epoch for the parent to SIGKILL it. The final quarantine goes to
OUT_DIR/final.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from guard import GuardConfig, GuardedDataset  # noqa: E402
from tests.conftest import Blobs, mlp  # noqa: E402

EPOCHS = 8


def main() -> None:
    out = Path(sys.argv[1])
    resume = "--resume" in sys.argv
    hang = int(sys.argv[sys.argv.index("--hang-after-scan") + 1]) if "--hang-after-scan" in sys.argv else None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = Blobs(600, poison=0.08, seed=0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gds = GuardedDataset(ds, model, GuardConfig(warmup_epochs=2, scan_every=2, progress=False),
                         trusted=Blobs(150, seed=7))
    start = 0
    ckpt = out / "ckpt.pt"
    if resume:
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gds.load_state_dict(state["guard"])
        torch.set_rng_state(state["rng"])
        start = state["epoch"] + 1
    loader = DataLoader(gds, batch_size=64, sampler=gds.sampler)
    for epoch in range(start, EPOCHS):
        gds.sampler.set_epoch(epoch)
        model.train()
        order = []
        for step, (x, y) in enumerate(loader):
            if step == 0:
                order = gds.sampler.indices(epoch).tolist()
                if hang is not None and len(gds.report.scans) >= hang:
                    (out / "scanned").write_text(str(epoch))
                    time.sleep(600)                       # killed here, mid-epoch, after the scan
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        with open(out / "orders.jsonl", "a") as f:
            f.write(json.dumps({"epoch": epoch, "order": order}) + "\n")
        tmp = out / "ckpt.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "guard": gds.state_dict(),
                    "rng": torch.get_rng_state(), "epoch": epoch}, tmp)
        os.replace(tmp, ckpt)
    (out / "final.json").write_text(json.dumps({"quarantined": gds.quarantined.tolist(),
                                                "scans": len(gds.report.scans)}))


if __name__ == "__main__":
    main()
