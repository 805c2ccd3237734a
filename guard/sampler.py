"""Step 5: the sampler that leaves quarantined samples out of training."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from guard.distributed import world


class GuardSampler(Sampler[int]):
    """Yields the indices of a :class:`~guard.GuardedDataset` that are not quarantined.

    Invariant: an epoch yields only kept indices, every one of them at least once, in an order
    that depends only on ``(seed, epoch)``; per process group the union of the ranks' shards is
    the epoch, the last shard padded by wrapping around so all ranks take the same number of steps.

    By default (``GuardConfig(pad_epochs=True)``) an epoch keeps the full dataset's length: the
    kept indices once each, topped up with kept indices drawn again (each at most once more while
    fewer than half are quarantined), so step counts, LR schedules and progress bars computed from
    the initial length stay exact and the last batch keeps its size. With ``pad_epochs=False`` an
    epoch yields every kept index exactly once and shrinks by the quarantine.

    Each call to ``iter()`` is one epoch: the sampler counts epochs itself and honours
    ``set_epoch``. It only hands out indices; ``on_epoch(epoch)``, if given, is called when an
    epoch's iteration starts, before its first index is drawn (a :class:`~guard.GuardedDataset`
    runs its scheduled scans there; ``gds.scan_if_due()`` runs one earlier, e.g. to time it
    apart). ``len()`` calls nothing: frameworks ask for it at odd moments (Lightning after the
    last epoch); before a due scan it reports the current quarantine.

    >>> import torch
    >>> from torch.utils.data import TensorDataset, DataLoader
    >>> from guard import GuardedDataset, GuardConfig
    >>> ds = TensorDataset(torch.randn(40, 8), torch.arange(40) % 2)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> gds = GuardedDataset(ds, model, GuardConfig(warmup_epochs=100))
    >>> sorted(gds.sampler) == list(range(40))
    True
    """

    def __init__(self, kept: Callable[[], np.ndarray], n: int, shuffle: bool = True, seed: int = 0,
                 pad: bool = True, on_epoch: Callable[[int], None] | None = None) -> None:
        """``kept()``: the indices not quarantined now (sorted); ``n``: the dataset's length."""
        self.kept, self.n, self.on_epoch = kept, n, on_epoch
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next iteration (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """The indices this process yields in ``epoch`` (default: the upcoming one); calls nothing."""
        epoch = self.epoch if epoch is None else epoch
        kept = self.kept()
        rng = np.random.default_rng([self.seed, epoch])
        if self.pad and 0 < len(kept) < self.n:
            kept = np.concatenate([kept, np.resize(rng.permutation(kept), self.n - len(kept))])
        if self.shuffle:
            kept = kept[rng.permutation(len(kept))]
        rank, size = world()
        if size > 1 and len(kept):
            total = -(-len(kept) // size) * size
            kept = np.resize(kept, total)[rank:total:size]
        return kept

    def __len__(self) -> int:
        return len(self.indices())

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)
        order = self.indices(epoch)
        self.epoch = epoch + 1
        return iter(order.tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.seed, self.shuffle = int(state["epoch"]), int(state["seed"]), bool(state["shuffle"])
