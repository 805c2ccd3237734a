"""The guard in a PyTorch Lightning run: one callback (offline, scikit-learn digits, about a minute
on a CPU).

    python examples/lightning_digits.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from guard import GuardConfig, GuardedDataset
from guard.experiment import RunSpec, detection, measure, prepare
from guard.integrations.lightning import GuardCallback


class Classifier(pl.LightningModule):
    """An ordinary LightningModule; nothing in it knows about the guard."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    torch.manual_seed(0)
    data = prepare(RunSpec(data="digits", attack="badnets", rate=0.1, trusted_per_class=20))
    module = Classifier(data.make_model())
    gds = GuardedDataset(data.train, module, GuardConfig(warmup_epochs=4, scan_every=4),
                         trusted=data.trusted)
    trainer = pl.Trainer(max_epochs=12, accelerator="cpu", devices=1, callbacks=[GuardCallback(gds)],
                         default_root_dir="runs/lightning_digits", enable_model_summary=False)
    trainer.fit(module, DataLoader(gds, batch_size=64, sampler=gds.sampler))
    d = detection(gds.quarantined, data.poisoned, len(data.labels))
    m = measure(module, data)
    print(gds.report.summary())
    print(f"caught {d['tpr']:.1%} of the poison, dropped {d['fpr']:.1%} of benign samples; "
          f"clean accuracy {m['clean_acc']:.1%}, attack success {m['attack_success']:.1%}")


if __name__ == "__main__":
    main()
