"""Shared fixtures. Real CIFAR-10 comes from $GUARD_CIFAR10_ARCHIVE, set here to the checkout's
../shared/data/cifar10-jpg.tar.gz when unset (a developer's layout; the library reads only the
variable or an explicit path)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from guard.datasets import find_cifar10_archive

# `pytest -n N` (pytest-xdist) runs N workers: each takes its share of the cores, not all of them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _WORKERS))
_DEV_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"
if "GUARD_CIFAR10_ARCHIVE" not in os.environ and _DEV_ARCHIVE.is_file():
    os.environ["GUARD_CIFAR10_ARCHIVE"] = str(_DEV_ARCHIVE)          # subprocesses (CLI, DDP ranks) see it too


def pytest_collection_modifyitems(items):
    """The real-CIFAR-10 tests (the long ones) first: under ``pytest -n`` the short tests then even out
    the workers' loads to the end instead of one worker finishing a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("cifar") is None)


@pytest.fixture(scope="session")
def cifar_archive():
    path = find_cifar10_archive()
    if path is None:
        msg = ("CIFAR-10 archive not found: set GUARD_CIFAR10_ARCHIVE to cifar10-jpg.tar.gz "
               "(or place it at ../shared/data/cifar10-jpg.tar.gz beside the checkout)")
        if os.environ.get("GUARD_REQUIRE_CIFAR"):
            pytest.fail(msg)
        pytest.skip(msg)
    return str(path)


class Blobs(Dataset):
    """Real-valued Gaussian blobs, (x, y) items; ``trigger`` sets the last features of some samples
    to a fixed pattern and relabels them to class 0 (a feature-space backdoor)."""

    def __init__(self, n: int = 600, classes: int = 3, dim: int = 16, seed: int = 0,
                 poison: float = 0.0) -> None:
        centers = np.random.default_rng(1234).normal(0, 3, (classes, dim))
        g = np.random.default_rng(seed)
        self.y = np.arange(n) % classes
        self.x = (centers[self.y] + g.normal(0, 1, (n, dim))).astype(np.float32)
        self.poisoned = np.empty(0, np.int64)
        if poison:
            pool = np.flatnonzero(self.y != 0)
            self.poisoned = np.sort(g.choice(pool, int(poison * n), replace=False))
            self.x[self.poisoned, -4:] = 8.0
            self.y[self.poisoned] = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def mlp(dim: int = 16, classes: int = 3, hidden: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def train(model: nn.Module, ds: Dataset, epochs: int = 30, lr: float = 0.05, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model
