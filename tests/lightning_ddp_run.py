"""A Lightning DDP run on 2 CPU processes with the guard; run by test_lightning.py as a script
(Lightning's "ddp" strategy relaunches this file for rank 1).

    python tests/lightning_ddp_run.py OUT_DIR [batchnorm]

With ``batchnorm`` the MLP has BatchNorm layers, whose running statistics differ between ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning.pytorch as pl  # noqa: E402

from guard import GuardConfig, GuardedDataset  # noqa: E402
from guard.integrations.lightning import GuardCallback  # noqa: E402
from tests.conftest import Blobs, mlp  # noqa: E402


def bn_mlp(dim: int = 16, classes: int = 3, hidden: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, classes))


class Classifier(pl.LightningModule):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.net = bn_mlp() if batchnorm else mlp()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = Blobs(600, poison=0.08, seed=0)
    module = Classifier(batchnorm=sys.argv[2:] == ["batchnorm"])
    gds = GuardedDataset(ds, module, GuardConfig(warmup_epochs=10, scan_every=5, progress=False),
                         trusted=Blobs(150, seed=7))
    trainer = pl.Trainer(max_epochs=20, accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False,
                         callbacks=[GuardCallback(gds)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    states = []
    scan = gds.scan

    def scan_and_record(epoch=None):         # the model right after each scan and its remedy, on this rank
        out = scan(epoch)
        states.append(float(sum(t.double().sum() for t in module.state_dict().values())))
        return out
    gds.scan = scan_and_record
    trainer.fit(module, DataLoader(gds, batch_size=32, sampler=gds.sampler))
    trig = torch.from_numpy(ds.x[ds.poisoned])
    module.eval()                             # BatchNorm: running statistics, not the triggered batch's
    with torch.no_grad():
        asr = float((module(trig).argmax(1) == 0).float().mean())
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"quarantined": gds.quarantined.tolist(), "scans": len(gds.report.scans), "asr": asr,
         "poisoned": ds.poisoned.tolist(), "steps": trainer.global_step,
         "weights": float(sum(p.double().sum() for p in module.parameters())),
         "scan_states": states}))
    if torch.distributed.is_initialized():    # shut gloo down before the interpreter does (its threads
        torch.distributed.barrier()           # otherwise can abort the process at exit: "terminate called
        torch.distributed.destroy_process_group()  # without an active exception")


if __name__ == "__main__":
    main()
