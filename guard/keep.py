"""Features kept from a scan's pass over the training samples, so later stages need not run the model again.

The scoring pass reads every kept sample at every analysed layer; the screen, confirm and
follow-up stages read a few classes of the same samples at some of the same layers. When all of
the pass's features fit in ``GuardConfig.keep_mb``, :class:`KeptFeatures` holds them (on the host,
in the dtype they were computed in: bfloat16 under the guard's autocast, so half the bytes of
float32 and no precision lost) and those stages read them instead of forwarding the samples again.
When they do not fit, nothing is kept and the stages run their own passes: same numbers, more
model time. Whether it fits is decided at the pass's first batch, from its per-sample size. A second
holder keeps the same pass's raw input views (:mod:`guard.inputs`, float32) in what the features leave
of the budget, so the stages that test the images need not read the data again.

One budget covers the scan's passes (:func:`keep_budget`: ``keep_mb``, or by default a quarter of the
host memory available when the scan starts, at least 512 MB). A full-size CIFAR-10 scan keeps about
1.4 GB (ResNet-18 width 16) to 3.6 GB (width 64); under 512 MB its later stages forward about 21,000
samples again. Everything kept is released when the scan ends.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

#: the budget of ``keep_mb=None``: this share of the host memory available when the scan starts, and at
#: least ``MIN_AUTO_MB`` (which holds a scan of 10,000 CIFAR-10 images with a width-16 ResNet-18)
AUTO_SHARE = 0.25
MIN_AUTO_MB = 512


def available_bytes() -> int | None:
    """Host memory available to a new allocation now: Linux's ``MemAvailable`` (free memory plus what the
    page cache can give back), else the free physical pages (``sysconf``); None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def keep_budget(keep_mb: float | None) -> float:
    """Bytes a scan may keep (``GuardConfig.keep_mb``): ``keep_mb`` MB; for None, ``AUTO_SHARE`` of
    :func:`available_bytes` now, at least ``MIN_AUTO_MB`` MB (that minimum where it is unknown)."""
    if keep_mb is not None:
        return keep_mb * 2**20
    free = available_bytes()
    return max(MIN_AUTO_MB * 2**20, AUTO_SHARE * free if free else 0.0)


class KeptFeatures:
    """Rows ``0..n-1`` of a pass at every layer, within ``budget`` bytes, or nothing.

    Invariant: after the pass, either every row was added (:attr:`complete`) or no memory is held."""

    def __init__(self, n: int, budget: float) -> None:
        self.n, self.budget = n, budget
        self.layers: list[torch.Tensor] | None = None
        self.added = 0
        self.refused = False

    def add(self, feats: Sequence[torch.Tensor], bf16: Sequence[bool], rows: torch.Tensor | None = None) -> None:
        """The next batch's features (at the next rows in pass order, or at ``rows``, each row once);
        ``bf16[l]``: layer ``l``'s values are bfloat16 values (:attr:`guard.extract.Batch.bf16`), so they are
        kept as such."""
        if self.refused:
            return
        if self.layers is None:
            dtypes = [torch.bfloat16 if exact else torch.float32 for exact in bf16]
            size = self.n * sum(f.shape[1] * torch.finfo(d).bits // 8 for f, d in zip(feats, dtypes))
            if size > self.budget:
                self.refused = True
                return
            self.layers = [torch.empty(self.n, f.shape[1], dtype=d) for f, d in zip(feats, dtypes)]
        b = len(feats[0])
        for store, f in zip(self.layers, feats):
            if rows is None:
                store[self.added:self.added + b] = f
            else:
                store.index_copy_(0, rows, f.to(store.device, store.dtype))
        self.added += b

    def drop(self) -> None:
        """Hold nothing and refuse the rest of the pass (a batch without these features)."""
        self.layers, self.refused = None, True

    @property
    def complete(self) -> bool:
        return self.layers is not None and self.added == self.n

    @property
    def nbytes(self) -> int:
        return 0 if self.layers is None else sum(x.numel() * x.element_size() for x in self.layers)

    def rows(self, rows: np.ndarray, layer_ids: Sequence[int],
             dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Features of ``rows`` at the layers ``layer_ids``, in ``dtype`` (float32 or wider: exact)."""
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        # index_select, not x[idx]: on the CPU the advanced-indexing path is 10-20x slower on these tables
        return [self.layers[i].index_select(0, idx).to(dtype) for i in layer_ids]

