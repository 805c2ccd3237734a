"""Step 2 of the pipeline: streaming benign class references per layer.

A reference keeps, for each layer and class, only the sum of unit-normalised features and a
count (C x D per layer), so its size never depends on the number of training samples.
Scores are cosine similarities to the class mean direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from guard.errors import GuardError

_EPS = 1e-12


def unit(f: torch.Tensor) -> torch.Tensor:
    return f / f.norm(dim=1, keepdim=True).clamp_min(_EPS)


def unit_(f: torch.Tensor) -> torch.Tensor:
    """:func:`unit` in place (the same values), for a tensor nothing else holds: a large row block's
    second allocation costs more than the division."""
    return f.div_(f.norm(dim=1, keepdim=True).clamp_min(_EPS))


class Reference:
    """Per-layer, per-class sums of unit-normalised benign features (float64)."""

    def __init__(self, dims: Sequence[int], num_classes: int) -> None:
        self.num_classes = num_classes
        self.sums = [torch.zeros(num_classes, d, dtype=torch.float64) for d in dims]
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self._dirs: dict[torch.device, list[torch.Tensor]] = {}

    def update(self, feats: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        """Add a batch of features (streaming)."""
        labels = labels.cpu()
        self._dirs = {}
        self.counts += torch.bincount(labels, minlength=self.num_classes).double()
        for s, f in zip(self.sums, feats):
            s.index_add_(0, labels, unit(f.cpu().double()))

    def directions(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Unit class-mean directions per layer, (C, D_l) float32 on ``device`` (cached until the next update)."""
        device = torch.device(device)
        if device not in self._dirs:
            self._dirs[device] = [unit(s).float().to(device) for s in self.sums]
        return self._dirs[device]

    def score(self, feats: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """(B, L) cosine similarity of each sample to its own class's mean direction, computed (and
        returned) on the features' device."""
        device = feats[0].device
        labels = labels.to(device, non_blocking=True)
        cols = []
        for m, f in zip(self.directions(device), feats):
            f = f.float()                 # (B, C) products and one norm: no (B, D) direction per sample
            cols.append((f @ m.T).gather(1, labels[:, None])[:, 0] / f.norm(dim=1).clamp_min(_EPS))
        return torch.stack(cols, 1)

    def loo_score(self, feats: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """(n, L) scores of samples that are part of this reference, each against the mean of the
        others (leave-one-out): honest calibration without a separate hold-out split."""
        if (self.counts[labels.cpu()] < 2).any():
            raise GuardError("leave-one-out scoring needs at least 2 reference samples per class")
        cols = []
        for s, f in zip(self.sums, feats):
            u = unit(f.cpu().double())
            m = unit(s[labels] - u)
            cols.append((u * m).sum(1))
        return torch.stack(cols, 1).float()
