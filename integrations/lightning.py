"""PyTorch Lightning 2.x adapter: one callback.

    gds = GuardedDataset(train_ds, lit_module, GuardConfig(), trusted=trusted_ds)
    loader = DataLoader(gds, batch_size=128, sampler=gds.sampler)
    trainer = L.Trainer(callbacks=[GuardCallback(gds)], max_epochs=10)
    trainer.fit(lit_module, loader)

Epochs: Lightning calls ``sampler.set_epoch(epoch)`` before ``on_train_epoch_start`` and then
iterates the loader; the guard's sampler runs a due scan when that epoch's iteration starts, so
a new quarantine applies to that epoch onwards (the model has trained ``epoch`` full epochs).
Lightning counts the batches of an epoch once, at set-up: after a quarantine an epoch ends
early (the loop stops when the sampler is exhausted) with ``GuardConfig(pad_epochs=False)``; the
default keeps every epoch at full length, which also keeps schedulers that use
``trainer.estimated_stepping_batches`` exact.

Checkpoints: the callback's ``state_dict`` is the guard's (quarantine, scans, sampler), so
``trainer.fit(..., ckpt_path=...)`` restores the quarantine exactly.

Distributed: the guard's sampler shards by rank itself; Lightning's
``use_distributed_sampler=True`` would wrap it in a ``DistributedSamplerWrapper`` that assumes a
constant size, so the callback refuses that setting with a message naming it.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("guard.integrations.lightning needs Lightning: pip install 'layerguard[lightning]'") from e

from loguru import logger

from guard.errors import GuardError
from guard.guarded import GuardedDataset
from guard.integrations._common import check_loader, metrics, warn_if_never_scans


class GuardCallback(pl.Callback):
    """Connects a :class:`~guard.GuardedDataset` to a Lightning ``Trainer``: checks that the train
    loader samples with the guard's sampler, logs the quarantine each epoch, and saves/restores the
    guard's state in Lightning checkpoints."""

    def __init__(self, guarded: GuardedDataset, log_prefix: str = "guard/") -> None:
        self.guarded, self.log_prefix = guarded, log_prefix

    @property
    def state_key(self) -> str:
        return f"GuardCallback[{self.log_prefix}]"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise GuardError("Trainer(use_distributed_sampler=True) would wrap the guard's sampler in a "
                             "DistributedSamplerWrapper that assumes a constant dataset size; the guard's sampler "
                             "already shards by rank: pass Trainer(use_distributed_sampler=False)")
        warn_if_never_scans(self.guarded, trainer.max_epochs if trainer.max_epochs not in (None, -1) else None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # unlearning then steps at the optimizer's current learning rate, not a fixed one
        if self.guarded.optimizer is None and trainer.optimizers:
            self.guarded.optimizer = trainer.optimizers[0]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # checked every epoch: reload_dataloaders_every_n_epochs may have built a new loader
        check_loader(self.guarded, trainer.train_dataloader, "train DataLoader")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # logged after the epoch: a due scan runs when the epoch's iteration starts, after the start hooks
        for lg in trainer.loggers:           # every logger the Trainer has, not only the first
            lg.log_metrics(metrics(self.guarded, self.log_prefix), step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger.info(self.guarded.report.summary())

    def state_dict(self) -> dict[str, Any]:
        return self.guarded.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.guarded.load_state_dict(state_dict)
