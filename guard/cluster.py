"""The suspect-vs-benign discriminant of the confirm and follow-up stages.

A class's *suspect* centroid (the mean direction of its out-of-spread samples, or of samples
already quarantined) and its *benign* centroid (the reference) define, per layer, how much closer a
sample is to the suspects than to the benign samples; summed over the class's layer window and
standardised on the benign reference samples (leave-one-out, widened for small classes), it is a
z-score in benign standard deviations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from guard.calibrate import small_sample
from guard.reference import _EPS, unit

_EMPTY = 1e-10   # a centroid whose squared norm cancels below this share of its sum's is empty (rounding)


def _cosine_without(u: torch.Tensor, sums: torch.Tensor, labels: torch.Tensor,
                    own: torch.Tensor | float | None) -> torch.Tensor:
    """cos(u_i, sums[labels_i] - own_i * u_i) for unit rows ``u`` (``own``: 1 where a sample is part of
    its class's sum, 0 or None where not), from the class sums' dot products and norms: a (B, C)
    product instead of a (B, D) centroid per sample. A centroid with nothing left in it scores 0."""
    dot = (u @ sums.T).gather(1, labels[:, None])[:, 0]
    full = (sums * sums).sum(1)[labels]
    sq = full
    if own is not None:                                   # |s - o u|^2 = |s|^2 - 2 o u.s + o (|u| = 1, o in {0, 1})
        sq, dot = full - 2 * own * dot + own, dot - own
    empty = sq <= _EMPTY * full.clamp_min(1.0)
    return torch.where(empty, torch.zeros_like(dot), dot / sq.clamp_min(0).sqrt().clamp_min(_EPS))


@dataclass
class Zscore:
    """Per-class benign mean and spread of a score: ``z = (score - mu[c]) / sd[c]``."""

    mu: dict[int, float]
    sd: dict[int, float]

    def __call__(self, d: np.ndarray, lab: np.ndarray) -> np.ndarray:
        return (d - np.array([self.mu[int(c)] for c in lab])) / np.array([self.sd[int(c)] for c in lab])


@dataclass
class RefFeats:
    """Features of benign reference samples at some layers, their labels and rows in the calibration."""

    feats: list[torch.Tensor]
    labels: np.ndarray
    rows: np.ndarray

    def units(self, c: int, at: list[int]) -> list[torch.Tensor]:
        """Unit features of class ``c`` at positions ``at`` of ``feats``."""
        sel = torch.from_numpy(self.labels == c)
        return [unit(self.feats[i][sel].double()) for i in at]


@dataclass
class Centroids:
    """Suspect and benign class sums (of unit features) at some layers, and per class which of those
    layers its discriminant sums over (``use_of[c]``: a boolean mask)."""

    sus: list[torch.Tensor]
    ben: list[torch.Tensor]
    use_of: dict[int, np.ndarray]

    def discriminant(self, feats: list[torch.Tensor], lab: np.ndarray, loo: bool = False,
                     own_suspect: np.ndarray | None = None, normalised: bool = False) -> np.ndarray:
        """Sum over each sample's window of cos(x, suspect centroid) - cos(x, benign centroid).

        ``loo``: the samples are part of the benign centroid; ``own_suspect`` (B x layers): where a
        sample is part of the suspect centroid. Either way it is left out of that centroid.
        ``normalised``: ``feats`` are already ``unit(f.double())`` (a caller that needs them too)."""
        labels = torch.from_numpy(np.asarray(lab, dtype=np.int64))
        use = np.stack([self.use_of[int(c)] for c in lab]) if len(lab) else np.zeros((0, len(feats)), bool)
        out = torch.zeros(len(lab), dtype=torch.float64)
        for pos, f in enumerate(feats):
            u = f if normalised else unit(f.double())
            own = None if own_suspect is None else torch.from_numpy(own_suspect[:, pos]).double()
            d = _cosine_without(u, self.sus[pos], labels, own) - _cosine_without(u, self.ben[pos], labels,
                                                                                  1.0 if loo else None)
            out += torch.where(torch.from_numpy(use[:, pos]), d, torch.zeros_like(d))
        return out.numpy()

    def calibration(self, ref: RefFeats, tail_z: float, floor: float) -> Zscore:
        """The discriminant's benign spread per class, from the reference samples (leave-one-out),
        widened by :func:`~guard.calibrate.small_sample` for a tail at ``tail_z``."""
        return self.reference_z(ref, tail_z, floor)[0]

    def reference_z(self, ref: RefFeats, tail_z: float, floor: float) -> tuple[Zscore, np.ndarray]:
        """:meth:`calibration` and the reference samples' own (leave-one-out) z on it."""
        d = self.discriminant(ref.feats, ref.labels, loo=True)
        classes = list(self.use_of)
        z = Zscore({c: float(d[ref.labels == c].mean()) for c in classes},
                   {c: max(float(d[ref.labels == c].std()), floor) * small_sample(int((ref.labels == c).sum()),
                                                                                  tail_z) for c in classes})
        return z, z(d, ref.labels)
