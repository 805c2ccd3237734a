"""Streaming feature extraction over a dataset (scan passes), with progress (:mod:`guard.progress`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from guard.batches import Feed, autocast
from guard.config import GuardConfig
from guard.errors import GuardError
from guard.hooks import FeatureTap, StopForward, unwrap_model
from guard.inputs import raw_views, view_shape
from guard.progress import Progress


@dataclass
class Batch:
    positions: np.ndarray          # dataset indices of this batch
    labels: torch.Tensor           # (B,) int64, CPU
    feats: list[torch.Tensor]      # per layer (B, D_l) float32, CPU (on the model's device with host=False)
    logits: torch.Tensor | None    # (B, C) float32, likewise; None when the forward was cut short
    bf16: tuple[bool, ...] = ()    # per layer: the features are bfloat16 values (computed under bf16 autocast)
    views: list[torch.Tensor] | None = None   # when asked for: the inputs' raw views (guard.inputs.raw_views), CPU


class Extractor:
    """Runs the model over (part of) a dataset and yields pooled features per layer."""

    def __init__(self, model: nn.Module, feed: Feed, num_classes: int, cfg: GuardConfig) -> None:
        """``cfg``: its batch_size, num_workers, pool_grid and progress apply."""
        self.model, self.adapter, self.num_classes = model, feed.adapter, num_classes
        self.batch_size, self.num_workers = cfg.batch_size, cfg.num_workers or 0
        self.device, self.amp, self.channels_last = feed.device, feed.amp, feed.channels_last
        self.grid, self.progress = cfg.pool_grid, cfg.progress
        self.view_shapes: dict[int, tuple[int, int, int] | None] = {}   # id(dataset) -> its images' fine-view shape
        # a scan needs no gradient or buffer sync: DDP's own forward would issue collectives whose
        # count differs between ranks scoring shards of different sizes; a compiled model runs eagerly
        self._forward_model = unwrap_model(model, keep_data_parallel=True)

    def stream(self, dataset: Dataset, layers: Sequence[str], indices: np.ndarray | None = None,
               desc: str = "scan", stop_early: bool = False,
               seconds: MutableMapping[str, float] | None = None, host: bool = True,
               views: Callable[[], bool] | None = None) -> Iterator[Batch]:
        """Yield batches in dataset order (``indices`` order when given). Call inside ``scan_mode``.

        ``stop_early`` ends each forward once all ``layers`` have run (no logits then). ``host=False``
        leaves features and logits on the model's device (labels stay on the host): nothing in the
        pass then waits for the device, until NaN/inf features are checked for once at its end. ``seconds``
        accumulates where the time goes: ``load`` (waiting for the DataLoader), ``forward`` (the
        model, hooks excluded), ``hooks`` (pooling the layer outputs), ``transfer`` (features and
        logits to the host). Nothing synchronises for it: on an accelerator the device's work shows
        where the host first waits for it (mostly ``transfer``), so there read forward + transfer.
        ``views``, asked before each batch, says whether to also compute its raw input views
        (:func:`guard.inputs.raw_views`) on the host from the batch as loaded, so the stages that test
        the images need not read the data again (``views``, counted in no part: it is analysis); a
        caller that cannot keep them stops their computation."""
        seconds = {} if seconds is None else seconds

        def add(key: str, t0: float, less: float = 0.0) -> float:
            t1 = time.perf_counter()
            seconds[key] = seconds.get(key, 0.0) + t1 - t0 - less
            return t1

        positions = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(positions) == 0:
            return
        view = dataset if indices is None else Subset(dataset, positions.tolist())
        loader = DataLoader(view, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        done = 0
        stop_early = stop_early and not isinstance(self.model, torch.nn.DataParallel)
        with FeatureTap(self.model, layers, self.grid, stop_early) as tap, \
                Progress(len(positions), desc, self.progress) as progress:
            batches, t = iter(loader), time.perf_counter()
            for batch in batches:
                t = add("load", t)
                inputs, labels = self.adapter.split(batch)
                pos = positions[done:done + len(labels)]
                bad = (labels < 0) | (labels >= self.num_classes)
                if bad.any():
                    j = int(bad.nonzero()[0, 0])
                    raise GuardError(f"label {int(labels[j])} of dataset index {int(pos[j])} is outside "
                                     f"[0, {self.num_classes}); set GuardConfig(num_classes=...) to the number "
                                     "of classes or fix the labels")
                raw = None
                if views is not None and views():
                    raw = raw_views(inputs)
                    if raw is not None:
                        self.view_shapes[id(dataset)] = view_shape(inputs)
                    t = add("views", t)
                inputs = self.adapter.move(inputs, self.device, self.channels_last)
                out: torch.Tensor | None = None
                hooks0 = tap.seconds
                try:
                    with autocast(self.device, self.amp):
                        out = self.adapter.forward(self._forward_model, inputs).detach()
                except StopForward:
                    pass
                t = add("forward", t, less=tap.seconds - hooks0)
                logits = None if out is None else out.float()
                feats = tap.take(len(labels))
                if host:
                    logits, feats = None if logits is None else logits.cpu(), [f.cpu() for f in feats]
                t = add("transfer", t)
                yield Batch(pos, labels, feats, logits, tuple(tap.bf16[n] for n in layers), raw)
                done += len(labels)
                progress.update(len(labels))
                t = time.perf_counter()
            seconds["hooks"] = seconds.get("hooks", 0.0) + tap.seconds
            tap.check_finite()
