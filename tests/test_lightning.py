"""The Lightning adapter with the real Lightning 2.x Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch", reason="install layerguard[lightning]")

from lightning.fabric.utilities.distributed import DistributedSamplerWrapper  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from guard import GuardConfig, GuardedDataset, GuardError  # noqa: E402
from guard.experiment import RunSpec, detection, measure, prepare  # noqa: E402
from guard.integrations._common import check_loader  # noqa: E402
from guard.integrations.lightning import GuardCallback  # noqa: E402
from tests.conftest import Blobs, mlp  # noqa: E402


class Classifier(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about the guard."""

    def __init__(self, net: torch.nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def _trainer(tmp_path, epochs: int, gds: GuardedDataset, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[GuardCallback(gds), *kw.pop("cbs", [])],
                      default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                      logger=kw.pop("logger", False), **kw)


@pytest.mark.cifar
def test_lightning_run_quarantines_badnets_on_cifar10(cifar_archive, tmp_path):
    # 6,000 real CIFAR-10 images with a trusted set (the same run trust-free goes through `guard train`,
    # test_cli.py); BadNets 10 % is learned within the 2 warm-up epochs here
    data = prepare(RunSpec(data="cifar10", attack="badnets", rate=0.1, n_train=6000, n_test=2000, archive=cifar_archive))
    torch.manual_seed(0)
    module = Classifier(data.make_model(), lr=0.01)
    gds = GuardedDataset(data.train, module, GuardConfig(warmup_epochs=2, scan_every=2), trusted=data.trusted,
                         scan_dataset=data.scan)
    trainer = _trainer(tmp_path, 3, gds, logger=[CSVLogger(tmp_path), CSVLogger(tmp_path, name="second")],
                       enable_checkpointing=False)
    trainer.fit(module, DataLoader(gds, batch_size=128, sampler=gds.sampler))
    d = detection(gds.quarantined, data.poisoned, len(data.labels))
    paper = detection(gds.last_result.paper_flagged, data.poisoned, len(data.labels))    # the baseline, same scan
    m = measure(module.net, data)
    assert [s.epoch for s in gds.report.scans] == [2]
    assert gds.report.scans[0].remedy_fit_before >= 0.9          # the trigger was learned before the scan
    assert d["tpr"] >= 0.98 and d["fpr"] <= 0.01 and d["f1"] > paper["f1"]
    assert m["attack_success_correct"] <= 0.05                   # unlearned: the trigger no longer works
    # the quarantine counts reached every one of the Trainer's loggers
    for name in ("lightning_logs", "second"):
        logged = (tmp_path / name / "version_0" / "metrics.csv").read_text()
        assert "guard/quarantined" in logged and str(float(len(gds.quarantined))) in logged


def test_scans_follow_lightning_epochs_and_resume_restores_the_quarantine(tmp_path):
    ds = Blobs(600, poison=0.08, seed=0)
    cfg = GuardConfig(warmup_epochs=2, scan_every=2)
    torch.manual_seed(0)
    module = Classifier(mlp())
    gds = GuardedDataset(ds, module, cfg, trusted=Blobs(150, seed=7))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)
    trainer = _trainer(tmp_path, 3, gds, cbs=[ckpt])
    trainer.fit(module, DataLoader(gds, batch_size=32, sampler=gds.sampler))
    assert [s.epoch for s in gds.report.scans] == [2]
    assert np.intersect1d(gds.quarantined, ds.poisoned).size == len(ds.poisoned)
    assert trainer.global_step == 3 * -(-600 // 32)         # the default pad_epochs: every epoch kept its full length
    assert gds.optimizer is trainer.optimizers[0]           # unlearning steps at the Trainer's learning rate

    # a fresh process: new module, new guard, resume from the checkpoint
    torch.manual_seed(1)
    module2 = Classifier(mlp(seed=1))
    gds2 = GuardedDataset(ds, module2, cfg, trusted=Blobs(150, seed=7))
    seen: list[np.ndarray] = []

    class Spy(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(gds2.quarantined.copy())

    trainer2 = _trainer(tmp_path, 4, gds2, cbs=[Spy()])
    trainer2.fit(module2, DataLoader(gds2, batch_size=32, sampler=gds2.sampler), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert len(seen) == 1 and np.array_equal(seen[0], gds.quarantined)   # restored before epoch 3 trained
    assert np.array_equal(gds2.quarantined, gds.quarantined)
    assert [s.epoch for s in gds2.report.scans] == [2]                   # no scan repeated


def test_a_loader_without_the_guards_sampler_is_refused(tmp_path):
    ds = Blobs(120)
    module = Classifier(mlp())
    gds = GuardedDataset(ds, module, GuardConfig(remedy="none"))
    with pytest.raises(GuardError, match="sampler=gds.sampler"):
        _trainer(tmp_path, 1, gds).fit(module, DataLoader(gds, batch_size=32, shuffle=True))


def test_distributed_sampler_wrapping_is_refused_with_the_setting_to_change():
    gds = GuardedDataset(Blobs(120), mlp(), GuardConfig(remedy="none"))
    wrapped = DataLoader(gds, batch_size=8, sampler=DistributedSamplerWrapper(gds.sampler, num_replicas=2, rank=0))
    with pytest.raises(GuardError, match="use_distributed_sampler=False"):
        check_loader(gds, wrapped, "train DataLoader")


def test_reloaded_dataloaders_keep_the_schedule_and_are_checked_each_epoch(tmp_path):
    ds = Blobs(600, poison=0.08, seed=0)
    torch.manual_seed(0)
    gds = GuardedDataset(ds, mlp(), GuardConfig(warmup_epochs=2, scan_every=2), trusted=Blobs(150, seed=7))

    class Reloading(Classifier):
        def train_dataloader(self):
            if self.current_epoch == 4:            # a loader that forgets the guard's sampler
                return DataLoader(gds, batch_size=32, shuffle=True)
            return DataLoader(gds, batch_size=32, sampler=gds.sampler)

    module = Reloading(gds.model)
    trainer = _trainer(tmp_path, 6, gds, reload_dataloaders_every_n_epochs=1, enable_checkpointing=False)
    with pytest.raises(GuardError, match="sampler=gds.sampler"):
        trainer.fit(module)
    assert [s.epoch for s in gds.report.scans] == [2]
    assert trainer.current_epoch == 4


@pytest.mark.parametrize("model", ["mlp", "batchnorm"])
def test_lightning_ddp_on_two_cpu_processes(model, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "lightning_ddp_run.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(script), str(tmp_path)] + (["batchnorm"] if model == "batchnorm" else []),
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["quarantined"] == r1["quarantined"] and r0["scans"] == r1["scans"] == 2
    assert r0["steps"] == r1["steps"] and r0["weights"] == r1["weights"]
    assert r0["scan_states"] == r1["scan_states"]        # weights and buffers equal right after each scan
    q, poisoned = set(r0["quarantined"]), set(r0["poisoned"])
    # this test is about agreement between ranks; detection is the MLP's to show (the BatchNorm MLP on
    # these blobs measured TPR 100 %, FPR 2.4 %: 13 of 552 clean samples)
    fpr_bound = 0.02 if model == "mlp" else 0.05
    assert len(q & poisoned) >= 0.95 * len(poisoned) and len(q - poisoned) <= fpr_bound * (600 - len(poisoned))
    assert r0["asr"] <= 0.05


def test_a_run_shorter_than_the_warm_up_is_flagged_at_the_start(tmp_path):
    from loguru import logger

    lines = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    logger.enable("guard")
    try:
        torch.manual_seed(0)
        module = Classifier(mlp())
        gds = GuardedDataset(Blobs(120, seed=0), module, GuardConfig(warmup_epochs=5), trusted=Blobs(60, seed=7))
        _trainer(tmp_path, 2, gds).fit(module, DataLoader(gds, batch_size=32, sampler=gds.sampler))
    finally:
        logger.disable("guard")
        logger.remove(sink)
    assert any("nothing will be scanned" in m for m in lines) and not gds.report.scans
