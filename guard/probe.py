"""Step 4b: a linear probe that sharpens a confirmed cluster.

A centroid discriminant (closer to the suspects' mean than to the benign mean) finds a
backdoor cluster but blurs its edge when the trigger is a small shift on top of natural
content (Blended): every poisoned sample still carries the look of its source class. The
trigger is nevertheless a *linear* direction in the features, and a shrinkage LDA finds it:
seeded with the discriminant's confident calls on a screen sample of the class, refitted a
few times on its own calls (out-of-fold, so no sample vouches for itself), and calibrated on
the benign reference samples, which never enter the fit.

Memory: the screen (at most ``screen_per_class`` samples) and one weight vector per layer;
the LDA is solved in the feature space when a layer has no more dimensions than the screen has
samples, else in the sample space (Woodbury), so no D x D matrix larger than n x n is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from guard.thresholds import Thresholds


def lda_direction(pos: torch.Tensor, neg: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Shrinkage LDA direction ``(S + a I)^-1 (mean(pos) - mean(neg))`` for the pooled
    within-group covariance ``S`` shrunk towards its average variance; (D,) float64.

    Solved in the smaller of the feature space (D x D, when D <= n) and the sample space (the n x n
    Gram matrix): cost O(n D min(n, D)), memory O((n + D) min(n, D)), whatever D is."""
    delta = pos.mean(0) - neg.mean(0)
    centred = torch.cat([pos - pos.mean(0), neg - neg.mean(0)])       # (n, D)
    n, d = centred.shape
    var = float((centred * centred).sum()) / (n * d)
    a = max(shrinkage * var, 1e-12)                                    # ridge: lambda * average variance
    b = (1.0 - shrinkage) / n                                          # weight of the sample covariance
    if b == 0.0:
        return delta / a
    if d <= n:
        return torch.linalg.solve(a * torch.eye(d, dtype=centred.dtype) + b * (centred.T @ centred), delta)
    # (a I + b C^T C)^-1 v = (v - C^T (a/b I + C C^T)^-1 C v) / a
    gram = centred @ centred.T + (a / b) * torch.eye(n, dtype=centred.dtype)
    inner = torch.linalg.solve(gram, centred @ delta)
    return (delta - centred.T @ inner) / a


@dataclass
class Probe:
    """Per-layer LDA weights over ``layers`` (positions in the probe's layer list) and the benign
    calibration of their averaged score: ``z = (mean_l x_l . w_l - mu) / sd``."""

    layers: list[int]
    weights: list[torch.Tensor]
    layer_mu: list[float]
    layer_sd: list[float]
    mu: float
    sd: float

    def raw(self, feats: list[torch.Tensor]) -> np.ndarray:
        """Averaged per-layer benign z of unit features ``feats`` (one tensor per probe layer)."""
        cols = [((feats[l] @ w).numpy() - m) / s
                for l, w, m, s in zip(self.layers, self.weights, self.layer_mu, self.layer_sd)]
        return np.mean(cols, 0)

    def z(self, feats: list[torch.Tensor]) -> np.ndarray:
        return (self.raw(feats) - self.mu) / self.sd


def _calibrate(scores: torch.Tensor) -> tuple[float, float]:
    return float(scores.mean()), max(float(scores.std(correction=0)), 1e-8)


def _fits_both_halves(folds: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> bool:
    """Each half's complement (what a fold is fitted on) holds calls of either kind."""
    return all((pos & (folds != f)).any() and (neg & (folds != f)).any() for f in (0, 1))


def _stratified_folds(pos: np.ndarray, neg: np.ndarray, rng_seed: int) -> np.ndarray:
    """Two halves that split the suspect calls, the benign calls and the rest evenly."""
    rng = np.random.default_rng([rng_seed, 1])
    folds = np.zeros(len(pos), dtype=np.int64)
    for group in (pos, neg, ~pos & ~neg):
        idx = np.flatnonzero(group)
        folds[idx] = rng.permutation(len(idx)) % 2
    return folds


def self_train(screen: list[torch.Tensor], benign: list[torch.Tensor], seed: np.ndarray, t: Thresholds,
               rng_seed: int = 0) -> Probe | None:
    """Fit a :class:`Probe` for one class.

    ``screen``/``benign``: unit features per layer of the class's screened training samples and
    of its benign reference samples; ``seed``: a first suspicion z per screened sample. Each of
    ``t.probe_rounds`` rounds takes samples above ``t.screen_z`` as suspects and below
    ``t.benign_z`` as benign, fits every layer on half of the screen and scores the other half,
    keeps the ``t.window`` layers that set the suspects furthest from the benign reference, and
    uses their averaged z as the next round's calls. Returns None when either side has fewer than
    ``t.probe_min_side`` samples (twice that in a round, which fits on halves), or when the probe
    ends up calling fewer than ``t.probe_keep`` times as many suspects as its seed did: a seed too
    weak to steer the fit lets it drift, and the caller keeps the seed's own discriminant instead."""
    hi, lo, side = t.screen_z, t.benign_z, t.probe_min_side
    n = len(seed)
    folds = np.random.default_rng(rng_seed).permutation(n) % 2
    s = np.asarray(seed, dtype=np.float64)
    n_seed = int((s > hi).sum())
    chosen: list[int] = []
    for _ in range(t.probe_rounds):
        pos, neg = s > hi, s < lo
        if min(int(pos.sum()), int(neg.sum())) < 2 * side:
            return None
        if not _fits_both_halves(folds, pos, neg):
            # calls can sit all in one half (a seed drawn from a direction test's held-out calls on
            # the same halves), leaving the other half's fit without a side: split them evenly
            folds = _stratified_folds(pos, neg, rng_seed)
        z = np.zeros((n, len(screen)))
        for li, (x, b) in enumerate(zip(screen, benign)):
            for f in (0, 1):
                fit, out = folds != f, folds == f
                w = lda_direction(x[torch.from_numpy(fit & pos)], x[torch.from_numpy(fit & neg)], t.probe_shrinkage)
                mu, sd = _calibrate(b @ w)
                z[out, li] = ((x[torch.from_numpy(out)] @ w).numpy() - mu) / sd
        separation = np.median(z[pos], axis=0)
        chosen = [int(i) for i in np.argsort(-separation, kind="stable")[:t.window]]
        s = z[:, chosen].mean(1)
    pos, neg = s > hi, s < lo
    if min(int(pos.sum()), int(neg.sum())) < side or pos.sum() < t.probe_keep * n_seed:
        return None
    weights, mus, sds = [], [], []
    for li in chosen:
        w = lda_direction(screen[li][torch.from_numpy(pos)], screen[li][torch.from_numpy(neg)], t.probe_shrinkage)
        mu, sd = _calibrate(benign[li] @ w)
        weights.append(w), mus.append(mu), sds.append(sd)
    probe = Probe(chosen, weights, mus, sds, 0.0, 1.0)
    probe.mu, probe.sd = _calibrate(torch.from_numpy(probe.raw(benign)))
    return probe
