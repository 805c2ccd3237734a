"""GuardedDataset: the one object a user adds to a training loop."""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import time
import warnings
from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
from loguru import logger
from torch import nn
from torch.utils.data import Dataset

from guard.batches import BatchAdapter, Feed, Unpack
from guard.config import GuardConfig
from guard.distributed import agree, broadcast_model, broadcast_object, world
from guard.errors import GuardError, GuardWarning
from guard.extract import Extractor
from guard.hooks import preserve_rng, unwrap_model
from guard.remedy import (Unlearning, accuracy_change, allowed_fit, chance_fit, fit_excess_p, predictions,
                          recalibrate_bn, restart, split_check, start_p, taught_class, unlearn)
from guard.report import (SAMPLE_COLUMNS, GuardReport, QuarantineRecord, RestoreRecord, ScanReport, SweepReport,
                          atomic_write, now, quarantined_row)
from guard.sample import acting_classes, acts, class_sample
from guard.sampler import GuardSampler
from guard.scan import Scanner, ScanResult
from guard.scanview import what_scans_read
from guard.schedule import ScanSchedule
from guard.setup import check_device, check_trusted, dataset_labels, layers_and_classes, length
from guard.sweep import Sweep, SweepResult

_REMEDY_FIELDS = ("remedy", "remedy_seconds", "remedy_fit_before", "remedy_fit_after", "remedy_fit_allowed",
                  "remedy_steps", "remedy_stopped", "sweep", "remedy_accuracy_before", "remedy_accuracy_after",
                  "remedy_accuracy_p")


def _inner(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _squared_gradients(opt: torch.optim.Optimizer, params: list[nn.Parameter]
                       ) -> list[tuple[torch.Tensor, float] | None]:
    """Per parameter, ``opt``'s state tensor estimating its squared gradient (Adam's family:
    ``exp_avg_sq``; RMSprop: ``square_avg``) and its bias correction (the tensor over it is the
    estimate); None where it keeps none."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    return [_squared_gradient(opt.state.get(p) or {}, group_of.get(id(p))) for p in params]


def _squared_gradient(st: dict, group: dict | None) -> tuple[torch.Tensor, float] | None:
    if "exp_avg_sq" in st and group is not None and "betas" in group:
        return st["exp_avg_sq"], 1.0 - group["betas"][1] ** float(st["step"])
    if "square_avg" in st:
        return st["square_avg"], 1.0
    return None


def second_moments(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    """Per parameter, ``opt``'s estimate of its squared gradient, bias-corrected, on the CPU; None
    where it keeps none (:func:`_squared_gradients`)."""
    return [None if held is None else held[0].detach().cpu() / held[1] for held in _squared_gradients(opt, params)]


def raise_second_moments(opt: torch.optim.Optimizer, params: list[nn.Parameter],
                         floors: list[torch.Tensor | None]) -> int:
    """Raise ``opt``'s squared-gradient estimate of each of ``params`` to at least ``floors`` (as
    :func:`second_moments` gives them, bias-corrected), element by element. Returns the parameters
    whose state was there to raise."""
    raised = 0
    with torch.no_grad():
        for held, floor in zip(_squared_gradients(opt, params), floors):
            if held is not None and floor is not None:
                v, scale = held
                torch.maximum(v, floor.to(v.device, v.dtype) * scale, out=v)
                raised += 1
    return raised


class GuardedDataset(Dataset):
    """Wraps a training dataset; scans the model during training and quarantines poisoned samples.

    ``gds[i]`` is ``dataset[i]`` unchanged and ``len(gds) == len(dataset)``: only ``gds.sampler``
    leaves quarantined indices out. Scans run by themselves when a scheduled epoch's iteration
    starts (``warmup_epochs``, then every ``scan_every``; ``gds.schedule``); ``scan()`` forces one.

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from guard import GuardedDataset, GuardConfig
    >>> ds = TensorDataset(torch.randn(64, 8), torch.arange(64) % 2)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> gds = GuardedDataset(ds, model, GuardConfig(warmup_epochs=1, scan_every=1, remedy="none"))
    >>> loader = DataLoader(gds, batch_size=16, sampler=gds.sampler)
    >>> for epoch in range(2):
    ...     for x, y in loader:
    ...         pass
    >>> len(gds.report.scans), gds.quarantined.dtype
    (1, dtype('int64'))
    """

    def __init__(self, dataset: Dataset, model: nn.Module, config: GuardConfig | None = None,
                 trusted: Dataset | None = None, scan_dataset: Dataset | None = None,
                 unpack: Unpack | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """``optimizer``: the one training ``model`` (also settable later as ``gds.optimizer``; the
        Lightning and HF adapters set it); unlearning then uses a fresh optimizer of its type at its
        current learning rate, at most ``unlearn_lr`` (its first parameter group's settings) instead of
        ``SGD(lr=GuardConfig.unlearn_lr, momentum=0.9)``, whose fixed rate late in a decaying schedule
        costs accuracy that the rest of training does not win back (a ``GuardWarning`` says so)."""
        self.dataset, self.model, self.optimizer = dataset, model, optimizer
        self._warned_lr = False
        self._warned_mismatch = False
        self._warned_short = False
        self.config = cfg = config if config is not None else GuardConfig()
        self.trusted, self.scan_dataset = trusted, scan_dataset
        n = length(dataset, "dataset")
        if n == 0:
            raise GuardError("dataset is empty (len 0): there is nothing to guard")
        if scan_dataset is not None and length(scan_dataset, "scan_dataset") != n:
            raise GuardError(f"scan_dataset has {len(scan_dataset)} samples but dataset has {n}; it must be the "
                             "same samples in the same order (without random augmentation)")
        self._n = n
        self.scan_dataset, self.trusted, scan_source, trusted_random = what_scans_read(dataset, scan_dataset, trusted,
                                                                                       cfg.scan_view)
        logger.info("scans read {}", scan_source)
        self.adapter = BatchAdapter(cfg.input_key, cfg.label_key, unpack)
        self.device = check_device(cfg.device, model)
        if cfg.remedy == "unlearn" and not any(p.requires_grad for p in model.parameters()):
            raise GuardError(f"every parameter of {type(model).__name__} is frozen (requires_grad=False), so "
                             "remedy='unlearn' cannot change it; unfreeze the trained layers, or set "
                             "GuardConfig(remedy='none') to only quarantine")
        with preserve_rng():            # the set-up reads items: a random transform must not shift the user's stream
            self.layers, self.num_classes = layers_and_classes(model, self._source, self.adapter, cfg, self.device)
            if trusted is not None:
                check_trusted(trusted, self.adapter, self.num_classes, cfg.min_trusted_per_class, n)
        self.feed = Feed(self.adapter, self.device, cfg.channels_last, cfg.amp)
        self.extractor = Extractor(model, self.feed, self.num_classes, cfg)
        self.scanner = Scanner(model, self.layers, self.extractor, cfg, trusted_random)
        self._initial_state = ({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                               if cfg.remedy == "restart" else None)
        self._records: dict[int, QuarantineRecord] = {}
        self._pinned: set[int] = set()
        self._kept: np.ndarray | None = None
        self.schedule = ScanSchedule(cfg.warmup_epochs, cfg.scan_every, cfg.max_scans, cfg.scan_backoff)
        self._scores = np.full(n, np.nan, dtype=np.float32)
        self._thresholds = np.full(n, np.nan, dtype=np.float32)
        self._labels = np.full(n, -1, dtype=np.int32)
        self.last_result: ScanResult | None = None
        self.report = GuardReport(config=cfg, n_samples=n, num_classes=self.num_classes, layers=self.layers,
                                  layers_source="discovered" if cfg.layers is None else "named",
                                  scan_source=scan_source)
        self.report._samples = self.table
        self.sampler = GuardSampler(self.kept_indices, n, cfg.shuffle, cfg.seed, cfg.pad_epochs, self._epoch_starts)

    @property
    def _source(self) -> Dataset:
        """What scans read: ``scan_dataset`` when given, else the training dataset."""
        return self.scan_dataset if self.scan_dataset is not None else self.dataset

    def check_length(self) -> None:
        """Indices are positions in the wrapped dataset: a dataset that grows or shrinks while
        training would make the quarantine point at other samples."""
        for name, ds in (("dataset", self.dataset), ("scan_dataset", self.scan_dataset)):
            if ds is not None and len(ds) != self._n:
                raise GuardError(f"{name} has {len(ds)} samples now but {self._n} when it was wrapped; keep its "
                                 "length constant while training (or wrap the new dataset in a new GuardedDataset)")

    # ---- Dataset protocol ----------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    # ---- quarantine ----------------------------------------------------------------------
    @property
    def quarantined(self) -> np.ndarray:
        """Sorted int64 indices into the wrapped dataset that are dropped now."""
        return np.array(sorted(self._records), dtype=np.int64)

    def kept_indices(self) -> np.ndarray:
        if self._kept is None:
            mask = np.ones(self._n, dtype=bool)
            mask[self.quarantined] = False
            self._kept = np.flatnonzero(mask).astype(np.int64)
        return self._kept

    def restore(self, indices: Sequence[int] | np.ndarray) -> None:
        """Bring quarantined samples back; they are exempt from later quarantines (recorded)."""
        idx = sorted({int(i) for i in np.asarray(indices).reshape(-1)})
        unknown = [i for i in idx if i not in self._records]
        if unknown:
            raise GuardError(f"indices {unknown[:10]} are not quarantined (quarantined: {len(self._records)}); "
                             "see gds.quarantined")
        for i in idx:
            del self._records[i]
        self._pinned.update(idx)
        self._quarantine_changed()
        self.report.restores.append(RestoreRecord(time=now(), epoch=self.sampler.epoch, indices=idx))
        logger.info("restored {} samples; {} remain quarantined", len(idx), len(self._records))

    def quarantine(self, indices: Sequence[int] | np.ndarray, reason: str = "quarantined by hand") -> None:
        """Quarantine samples you know are bad (recorded with ``reason``, scan 0); restorable like any
        other. Later scans search their classes for look-alikes, and unlearn what they taught."""
        idx = sorted({int(i) for i in np.asarray(indices).reshape(-1)} - set(self._records))
        bad = [i for i in idx if not 0 <= i < self._n]
        if bad:
            raise GuardError(f"indices {bad[:10]} are outside [0, {self._n})")
        labels = dataset_labels(self._source, self.adapter, "dataset", idx)
        self._labels[idx] = labels
        for i, c in zip(idx, labels.tolist()):
            self._records[i] = QuarantineRecord(index=i, label=int(c), scan=0, epoch=self.sampler.epoch, layer="",
                                                score=0.0, threshold=0.0, reason=reason)
        self._pinned.difference_update(idx)
        self._quarantine_changed()

    def _quarantine_changed(self) -> None:
        """After ``_records`` changed: the kept indices are recomputed, the report lists the records."""
        self._kept = None
        self.report.quarantine = [self._records[i] for i in sorted(self._records)]

    # ---- scanning --------------------------------------------------------------------------
    def _epoch_starts(self, epoch: int) -> None:
        self.check_length()
        self.scan_if_due(epoch)
        self._warn_short_epoch()

    def _warn_short_epoch(self) -> None:
        """Once, when training first draws an epoch the quarantine has shortened (``pad_epochs=False``)
        for a model with BatchNorm: the loader's last batch changes size, and a batch of a few samples
        in a BatchNorm model's training steps can cost far more accuracy than the samples removed
        (benchmarks/NOTES.md, "Zoo seed 8"). Decisions and training are unchanged."""
        if self._warned_short or self.config.pad_epochs:
            return
        n, kept = self._n, len(self.kept_indices())
        if kept in (0, n):
            return
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in unwrap_model(self.model).modules()):
            return
        self._warned_short = True
        warnings.warn(
            f"guard: {n - kept:,} samples are quarantined, so an epoch now holds {kept:,} of the dataset's {n:,}: "
            f"a DataLoader with drop_last=False ends each epoch with {kept:,} mod batch_size samples, and a "
            "training step on a batch of a few samples costs a BatchNorm model accuracy (8 points in one "
            "benchmark run). Leave GuardConfig(pad_epochs=True), the default (every epoch keeps its full "
            "length), or pass DataLoader(..., drop_last=True).", GuardWarning, stacklevel=3)

    def scan_if_due(self, epoch: int | None = None) -> ScanReport | None:
        """Run the scheduled scan of ``epoch`` (default: the sampler's upcoming epoch) if it is due and
        has not run; the sampler does this when the epoch's iteration starts."""
        epoch = self.sampler.epoch if epoch is None else int(epoch)
        return self.scan(epoch) if self.schedule.due(epoch) else None

    def scan(self, epoch: int | None = None) -> ScanReport:
        """Scan now: locate, score, decide, quarantine, remedy. Nothing changes if it fails."""
        epoch = self.sampler.epoch if epoch is None else int(epoch)
        t0 = time.monotonic()
        logger.info("guard: scan {} at epoch {} over {:,} kept samples", len(self.report.scans) + 1, epoch,
                    len(self.kept_indices()))
        self.check_length()
        prior: dict[int, list[int]] = {}
        releasable: dict[int, list[int]] = {}         # the guard's own catches; never what was quarantined by hand
        for r in self._records.values():
            prior.setdefault(r.label, []).append(r.index)
            if r.scan > 0:
                releasable.setdefault(r.label, []).append(r.index)
        kept = self.kept_indices()
        # distributed: the same scan of the same model on every rank, and rank 0's decision applied
        agree({"epoch": epoch, "kept samples": len(kept), "kept hash": hashlib.sha1(kept.tobytes()).hexdigest()[:12],
               "layers": self.layers, "classes": self.num_classes, "scans": len(self.report.scans)})
        broadcast_model(unwrap_model(self.model))
        args = ({c: np.asarray(v, dtype=np.int64) for c, v in prior.items()}, self._check_by_class(),
                {c: np.asarray(v, dtype=np.int64) for c, v in releasable.items()})
        sample, first, stands, reuse, acted_on = self._sample(kept), None, False, None, []
        if sample is not None:         # scan_sample_per_class: a sample that acts on nothing stands for the scan
            first, reuse = self.scanner.run_sample(self._source, self.trusted, sample, *args, until_separate=True)
            first = broadcast_object(first, "broadcast of rank 0's sampled scan result")
            stands = not acts(first, self.config.thresholds)
            acted_on = [] if stands else acting_classes(first, self.config.thresholds)
            logger.info("guard: sampled scan over {:,} of {:,} kept samples {}", len(sample), len(kept),
                        "acts on nothing" if stands else f"acts on classes {acted_on}: scanning them all")
        # the rescan reads what the sample read (same model, same samples) from the sample's scan: one forward each
        res = first if stands else broadcast_object(
            self.scanner.run(self._source, self.trusted, kept, *args, reuse=reuse),
            "broadcast of rank 0's scan result")
        del reuse
        self.schedule.done(epoch)
        report = self._apply(res, epoch, time.monotonic() - t0, first, acted_on)
        if report.new_quarantined or report.released or report.remedy_steps:
            self.schedule.done(epoch, acted=True)         # the next scan comes scan_every epochs on
        return report

    def _sample(self, kept: np.ndarray) -> np.ndarray | None:
        """``scan_sample_per_class``: the kept indices this scan scores first (:func:`~guard.sample.class_sample`,
        drawn anew each scan), or None for a scan of every kept sample."""
        if self.config.scan_sample_per_class is None:
            return None
        rng = np.random.default_rng([self.config.seed, 3, len(self.report.scans)])
        return class_sample(kept, self._labels[kept], self.config.scan_sample_per_class, rng)

    def _check_by_class(self) -> dict[int, np.ndarray]:
        """Per class, the held-out check samples of its quarantine (:func:`~guard.remedy.split_check`,
        the same split unlearning uses)."""
        if not self._records:
            return {}
        _, check = self._split_records()
        labels = np.array([self._records[int(i)].label for i in check])
        return {int(c): check[labels == c] for c in np.unique(labels)}

    def _split_records(self) -> tuple[np.ndarray, np.ndarray]:
        """(unlearn, check) of the quarantine (:func:`~guard.remedy.split_check`)."""
        recs = list(self._records.values())
        return split_check(np.array([r.index for r in recs]), np.array([r.score for r in recs]), self.config.seed,
                           self.config.thresholds)

    def _apply(self, res: ScanResult, epoch: int, seconds: float, sampled: ScanResult | None = None,
               sample_acted_on: list[int] | None = None) -> ScanReport:
        """Apply scan ``res``; ``sampled``: the sampled scan before it (``res`` itself where it stood), and the
        classes it acted on (:func:`~guard.sample.acting_classes`)."""
        scan_no = len(self.report.scans) + 1
        self.last_result = res
        self._scores[res.scanned] = res.suspicion
        self._thresholds[res.scanned] = res.threshold
        self._labels[res.scanned] = res.labels
        rule = self.config.critical_rule
        records = dict(self._records)
        released = [int(i) for i in res.released if int(i) in records and records[int(i)].scan > 0]
        for i in released:                             # given back: a later probe put them with the benign
            del records[i]
        new = [int(i) for i in res.flagged if int(i) not in records and int(i) not in self._pinned]
        rows = np.searchsorted(res.scanned, new)        # scanned is sorted: no N-entry dict at N = 10**6
        for i, j in zip(new, rows.tolist()):
            cls = int(res.labels[j])
            verdict = next(v for v in res.classes if v.cls == cls)
            records[i] = QuarantineRecord(
                index=i, label=cls, scan=scan_no, epoch=epoch, layer="/".join(verdict.critical_layers),
                score=float(res.suspicion[j]), threshold=float(res.threshold[j]),
                reason=f"{verdict.verdict} in class {cls} ({rule} rule)")
        self._records = records
        self._quarantine_changed()
        scan = ScanReport(
            scan=scan_no, epoch=epoch, time=now(), seconds=seconds, seconds_by_step=res.seconds,
            calibration=res.calibration_source, rule=rule, n_scanned=len(res.scanned),
            new_quarantined=len(new), total_quarantined=len(records), released=released,
            paper_flagged=len(res.paper_flagged),
            memory_bytes=res.memory_bytes,
            classes=res.classes, warnings=res.warnings, passes=res.passes, seconds_by_part=res.seconds_by_part,
            n_sampled=0 if sampled is None else len(sampled.scanned),
            trusted_mismatch_p=res.mismatch_p, trusted_mismatch_at=res.mismatch_at, mirror_symmetry_p=res.mirror_symmetry_p,
            reference_scores=[] if res.reference_suspicion is None
            else np.round(res.reference_suspicion, 3).tolist())
        if sampled is not None and sampled is not res:     # the whole scan's cost includes the sample's
            scan.seconds_by_step = {**res.seconds, "sample": round(sum(sampled.seconds_by_part.values()), 4)}
            scan.passes = {**res.passes, **{f"sample {k}": v for k, v in sampled.passes.items()}}
            scan.sample_acted_on = sample_acted_on or []
            scan.seconds_by_part = {k: round(v + sampled.seconds_by_part.get(k, 0.0), 4)
                                    for k, v in res.seconds_by_part.items()}
        if (res.mismatch_p is not None and res.mismatch_p < self.config.thresholds.max_false_alarm
                and not self._warned_mismatch):
            self._warned_mismatch = True
            warnings.warn(
                f"guard: at scan {scan_no} the trusted samples do not look like the training data in the classes "
                "the scan did not act on (report.scans[i].trusted_mismatch_p): either the training data come from "
                "another source (compression, camera, resizing; many wrong labels), where the trusted tests' "
                "false-alarm bound does not hold, or poison sits in many classes. The scan's warnings say more.",
                GuardWarning, stacklevel=2)
        if self._records and (new or self.config.remedy == "unlearn"):
            swept: list[SweepResult] = []
            floors: list[torch.Tensor | None] | None = None
            if world()[0] == 0:                    # distributed: rank 0 changes the model, the others copy it
                with preserve_rng():
                    swept, floors = self._remedy(scan, scan_no, bool(new))
            if world()[1] > 1:
                done = broadcast_object({**{k: getattr(scan, k) for k in _REMEDY_FIELDS}, "swept": swept,
                                         "floors": floors}, "broadcast of rank 0's remedy")
                swept, floors = done.pop("swept"), done.pop("floors")
                for k, v in done.items():
                    setattr(scan, k, v)
                broadcast_model(unwrap_model(self.model))
            if floors is not None and self.optimizer is not None:
                # the unlearning's gradient scale joins the user's optimizer (see _remedy)
                scan.remedy_scale_raised = raise_second_moments(_inner(self.optimizer), self._user_params(), floors)
            self._take_swept(swept, scan, epoch)
        self.report.scans.append(scan)
        said = ", ".join(f"class {v.cls}: {v.verdict} ({v.n_flagged})" for v in res.classes if v.n_flagged)
        logger.info("guard: scan {} done in {:.1f}s: +{} quarantined, {} given back ({} total); {}", scan_no,
                    scan.seconds, len(new), len(released), len(records), said or "nothing separates")
        return scan

    def _take_swept(self, swept: list[SweepResult], scan: ScanReport, epoch: int) -> None:
        """Quarantine what the unlearning sweep exposed (:mod:`guard.sweep`)."""
        records = dict(self._records)
        for r in swept:
            for i, z in zip(r.taken.tolist(), r.score.tolist()):
                if i not in records and i not in self._pinned:
                    records[i] = QuarantineRecord(
                        index=i, label=r.cls, scan=scan.scan, epoch=epoch, layer="logits", score=z, threshold=r.threshold,
                        reason=f"exposed by unlearning in class {r.cls}: its label's margin fell further than every "
                               f"trusted sample's (p = {r.p:.1e} for {r.beyond} of {r.n})")
        added = len(records) - len(self._records)
        if added:
            self._records = records
            self._quarantine_changed()
            scan.new_quarantined += added
            scan.total_quarantined = len(records)
            logger.info("guard: unlearning exposed {} more samples ({})", added,
                        ", ".join(f"class {r.cls}: {len(r.taken)}" for r in swept if len(r.taken)))

    def _remedy(self, scan: ScanReport, scan_no: int, new: bool
                ) -> tuple[list[SweepResult], list[torch.Tensor | None] | None]:
        """``restart`` after new quarantines. ``unlearn`` whenever the model fits the held-out check
        set of quarantined samples (predicts the label they carry) more than chance allows and
        explains (see :mod:`guard.remedy`): right after they are found if the backdoor was already
        learned, and at any later scan if a suppressed backdoor creeps back. Nothing is unlearned
        while the model does not know what they teach. With a trusted set and ``unlearn_sweep``, each
        unlearning is swept (see :mod:`guard.sweep`); afterwards kept samples re-estimate the BatchNorm
        statistics, and the samples that set the chance rate are read again, for what it cost in accuracy
        (:func:`~guard.remedy.accuracy_change`).
        With the user's adaptive optimizer (Adam's family, RMSprop), the unlearning's own estimate of
        each parameter's squared gradient (:func:`second_moments`) is returned and :meth:`_apply` raises
        the user's to it: the user's estimate, small late in training, would let the next clean steps
        move the parameters the unlearning set by far more than their gradients justify, and teach the
        trigger back within an epoch (benchmarks/NOTES.md). Returns what the sweep found, for
        :meth:`_take_swept`, and those estimates (None where nothing was unlearned, no optimizer was
        handed over, or ``thresholds.hold_moments`` is off)."""
        cfg = self.config
        if cfg.remedy == "none":
            return [], None
        model = unwrap_model(self.model)           # DDP's own forward would wait for the other ranks
        t = time.monotonic()
        found: list[SweepResult] = []
        floors: list[torch.Tensor | None] | None = None
        if cfg.remedy == "restart":
            assert self._initial_state is not None
            scan.remedy = cfg.remedy
            restart(self.model, self._initial_state)
        else:
            recs = list(self._records.values())
            train, check = self._split_records()
            pred, lab = self._predictions(model, self.dataset, check)
            fitted = int((pred == lab).sum())
            fit = fitted / len(lab) if len(lab) else 0.0
            source, ref_idx, ref_pred, ref_lab = self._chance_samples(model)
            chance = chance_fit(ref_pred, ref_lab, np.array([self._records[int(i)].label for i in check]))
            allowed = allowed_fit(chance, len(check), cfg.thresholds)
            p = fit_excess_p(fitted, len(lab), chance, cfg.thresholds)
            scan.remedy_fit_before, scan.remedy_fit_allowed, scan.remedy_fit_p = fit, allowed, p
            said = (f"the model predicts {fit:.1%} of the {len(lab)} held-out quarantined samples as their label "
                    f"(chance: up to {allowed:.1%}, p = {p:.2g})")
            if start_p(fitted, len(lab), chance, cfg.thresholds) >= cfg.thresholds.max_false_alarm:
                cls, p_cls = taught_class(pred, lab, ref_pred, ref_lab, cfg.thresholds)
                if cls is None or p_cls >= cfg.thresholds.max_false_alarm:
                    logger.info("guard: {}: nothing to unlearn", said)
                    return [], None
                scan.remedy_fit_class, scan.remedy_fit_p = cls, p_cls
                said += f", but those of class {cls} beyond its chance (p = {p_cls:.2g}, corrected for the classes)"
            logger.info("guard: {}{}: unlearning", said, "" if new else " again")
            scan.remedy = cfg.remedy
            sweep = self._sweep(model, sorted({r.label for r in recs}))
            job = Unlearning(self.dataset, self.kept_indices(), train, check, fit, allowed, cfg.seed + scan_no)
            made: list[torch.optim.Optimizer] = []

            def unlearner(params: list[nn.Parameter]) -> torch.optim.Optimizer:
                made.append(self._unlearner(params))
                return made[-1]

            done = unlearn(model, job, self.feed, cfg, unlearner)
            if made and self.optimizer is not None and cfg.thresholds.hold_moments:
                floors = second_moments(made[0], self._user_params())
            scan.remedy_fit_after, scan.remedy_steps, scan.remedy_stopped = done.fit, done.steps, done.stopped
            settled = done.settled
            # the model kept reads kept samples' BatchNorm statistics; the sweep measures that model
            scan.remedy_bn_samples = settled or recalibrate_bn(model, self.dataset, job.kept, self.feed, cfg, job.seed)
            after, _ = predictions(model, source, ref_idx, self.feed)     # not the scan's: the model has changed
            cost = accuracy_change(ref_pred, after, ref_lab)
            scan.remedy_accuracy_before, scan.remedy_accuracy_after, scan.remedy_accuracy_p = cost
            logger.info("guard: unlearning moved the accuracy on {} {} samples from {:.1%} to {:.1%} "
                        "(McNemar p = {:.2g})", len(ref_idx), "trusted" if source is self.trusted else "kept", *cost)
            if sweep is not None:
                found = sweep.after(cfg.thresholds.max_false_alarm / self.num_classes)
                scan.sweep = [SweepReport(cls=r.cls, n=r.n, n_ref=r.n_ref, beyond=r.beyond, p=r.p, taken=len(r.taken))
                              for r in found]
        scan.remedy_seconds = time.monotonic() - t
        return found, floors

    def _user_params(self) -> list[nn.Parameter]:
        """The parameters of the user's optimizer, in its order (the same on every rank)."""
        assert self.optimizer is not None
        return [p for g in _inner(self.optimizer).param_groups for p in g["params"]]

    def _sweep(self, model: nn.Module, classes: list[int]) -> Sweep | None:
        """The margins before unlearning of ``classes``' kept and trusted samples (trusted set and
        ``thresholds.unlearn_sweep`` only)."""
        if self.trusted is None or not self.config.thresholds.unlearn_sweep:
            return None
        kept = self.kept_indices()
        assert self.last_result is not None       # a remedy follows the scan that read every trusted label, in order
        return Sweep(model, self.feed, self._source, kept, self._labels[kept], self.trusted,
                     self.last_result.reference_labels, classes)

    def _unlearner(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer of the unlearning steps: like the user's, at its current learning rate or
        ``unlearn_lr``, whichever is lower."""
        if self.optimizer is None:
            if not self._warned_lr:
                self._warned_lr = True
                warnings.warn(
                    f"guard: unlearning at a fixed learning rate (GuardConfig.unlearn_lr={self.config.unlearn_lr}) "
                    "because the guard was not given your optimizer; late in a decaying schedule such steps can "
                    "cost more accuracy than the rest of training wins back. Pass GuardedDataset(..., "
                    "optimizer=opt) so they follow your learning rate (the Lightning and HF adapters do this).",
                    GuardWarning, stacklevel=2)
            return torch.optim.SGD(params, lr=self.config.unlearn_lr, momentum=self.config.unlearn_momentum)
        user = _inner(self.optimizer)
        group = user.param_groups[0]
        accepted = inspect.signature(type(user).__init__).parameters
        settings = {k: group[k] for k in accepted if k in group and k not in ("self", "params")}
        if "lr" in settings:       # never faster than the rate the remedy's steps were calibrated at
            settings["lr"] = min(float(settings["lr"]), self.config.unlearn_lr)
        return type(user)(params, **settings)

    def _chance_samples(self, model: nn.Module) -> tuple[Dataset, np.ndarray, np.ndarray, np.ndarray]:
        """``(source, indices, predicted, labels)`` of the benign samples that tell how often the model
        predicts a label for images of other classes (:func:`~guard.remedy.chance_fit`): the trusted set,
        or trust-free kept training samples (fitted, so a lower, stricter rate); at most
        ``thresholds.chance_samples`` of them. They also measure what unlearning costs in accuracy."""
        rng = np.random.default_rng([self.config.seed, 2])
        if self.trusted is not None:
            source, pool = self.trusted, np.arange(len(self.trusted))
        else:
            source, pool = self._source, self.kept_indices()
        idx = np.sort(rng.choice(pool, min(len(pool), self.config.thresholds.chance_samples), replace=False))
        pred, lab = self._predictions(model, source, idx)
        return source, idx, pred, lab

    def _predictions(self, model: nn.Module, source: Dataset, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's predicted class and the label of ``source``'s samples ``idx``: read from the scan
        that just ran where it forwarded them from the same dataset (the model has not changed since),
        else a pass."""
        res = self.last_result
        if res is not None and source is self.trusted and res.reference_predicted is not None:
            return res.reference_predicted[idx].astype(np.int64), res.reference_labels[idx].astype(np.int64)
        if res is not None and res.predicted is not None and source is self._source and len(res.scanned):
            rows = np.minimum(np.searchsorted(res.scanned, idx), len(res.scanned) - 1)
            if (res.scanned[rows] == idx).all():
                return res.predicted[rows].astype(np.int64), res.labels[rows].astype(np.int64)
        return predictions(model, source, idx, self.feed)

    # ---- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: quarantine, pins, scan history, schedule and sampler."""
        return {"version": 1, "n_samples": self._n, "report": self.report.model_dump(mode="json"),
                "pinned": sorted(self._pinned), **self.schedule.state_dict(),
                "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_samples") != self._n:
            raise GuardError(f"state is for a dataset of {state.get('n_samples')} samples, this one has {self._n}")
        report = GuardReport.model_validate(state["report"])
        self._records = {r.index: r for r in report.quarantine}
        self.report = report.model_copy(update={"config": self.config})
        self.report._samples = self.table
        self._pinned = set(state["pinned"])
        self.schedule.load_state_dict(state)
        self._kept = None
        self.sampler.load_state_dict(state["sampler"])

    def table(self) -> list[dict[str, Any]]:
        """One row per sample: index, label (-1 if never scanned), status (kept, quarantined, restored),
        its suspicion score and threshold (when quarantined, those of the scan that took it; else of
        the last scan), and for quarantined samples the layer, the reason and the scan."""
        rows = []
        for i in range(self._n):
            r = self._records.get(i)
            rows.append(quarantined_row(r) if r else {
                "index": i, "label": int(self._labels[i]), "status": "restored" if i in self._pinned else "kept",
                "is_quarantined": False, "score": float(self._scores[i]), "threshold": float(self._thresholds[i]),
                "layer": "", "reason": "", "scan": 0})
        return rows

    def save(self, folder: str | PathLike) -> None:
        """Write ``report.json`` (the full report), ``quarantine.csv`` and ``samples.csv`` (per sample)."""
        from pathlib import Path

        folder = Path(folder)
        self.report.save_json(folder / "report.json")
        self.report.save_csv(folder / "quarantine.csv")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SAMPLE_COLUMNS)
        w.writeheader()
        w.writerows(self.table())
        atomic_write(folder / "samples.csv", buf.getvalue())

    def __repr__(self) -> str:
        return (f"GuardedDataset({type(self.dataset).__name__}, n={self._n}, classes={self.num_classes}, "
                f"layers={len(self.layers)}, quarantined={len(self._records)}, scans={len(self.report.scans)})")


def detect(model: nn.Module, dataset: Dataset, trusted: Dataset | None = None, config: GuardConfig | None = None,
           scan_dataset: Dataset | None = None, unpack: Unpack | None = None) -> GuardReport:
    """Scan a trained ``model`` over ``dataset`` once and report what looks poisoned; the model is
    not changed (no remedy runs; modes, grad mode and RNG states are restored). The post-hoc
    counterpart of training with a :class:`GuardedDataset` (ART's ``detect_poison``, cleanlab's
    ``find_issues``); ``report.to_pandas()`` gives one row per sample.

    ``config``: any :class:`GuardConfig` (its ``remedy`` is set to ``"none"``); ``trusted``: a small
    verified set (without it the scan runs trust-free)."""
    cfg = (config or GuardConfig()).model_copy(update={"remedy": "none"})
    gds = GuardedDataset(dataset, model, cfg, trusted=trusted, scan_dataset=scan_dataset, unpack=unpack)
    gds.scan()
    return gds.report
