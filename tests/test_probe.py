"""Step 4b: the self-trained LDA probe that sharpens a confirmed cluster."""

import numpy as np
import pytest
import torch

from guard.probe import lda_direction, self_train
from guard.thresholds import Thresholds
from guard.reference import unit


@pytest.mark.parametrize("n_pos,n_neg", [(12, 15), (60, 70)])     # solved in the sample / the feature space
def test_lda_direction_matches_the_explicit_shrunk_covariance_solve(n_pos, n_neg):
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(n_pos, 30, generator=g, dtype=torch.float64) + 0.5
    neg = torch.randn(n_neg, 30, generator=g, dtype=torch.float64)
    lam = 0.3
    c = torch.cat([pos - pos.mean(0), neg - neg.mean(0)])
    cov = c.T @ c / len(c)
    shrunk = (1 - lam) * cov + lam * torch.trace(cov) / 30 * torch.eye(30, dtype=torch.float64)
    expected = torch.linalg.solve(shrunk, pos.mean(0) - neg.mean(0))
    assert torch.allclose(lda_direction(pos, neg, lam), expected, rtol=1e-8, atol=1e-10)
    # full shrinkage: the plain mean difference, up to scale
    w = lda_direction(pos, neg, 1.0)
    assert torch.allclose(unit(w[None])[0], unit((pos.mean(0) - neg.mean(0))[None])[0])


def _blended_like(n_benign: int, n_poison: int, seed: int, shift: float, d: int = 40):
    """Benign samples spread along many directions; poisoned ones carry their own source content
    plus a small shared shift along low-variance directions, which a centroid half sees and a
    linear direction sees fully."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(3.0, 0.2, d, dtype=torch.float64)
    benign = torch.randn(n_benign, d, generator=g, dtype=torch.float64) * scale + 4.0
    poison = torch.randn(n_poison, d, generator=g, dtype=torch.float64) * scale + 4.0
    poison[:, -4:] += shift   # the trigger
    return unit(benign), unit(poison)


def _scan_like(shift: float):
    """Screen, benign reference and the seed a scan would have: a centroid discriminant from a few
    out-of-spread samples (a tenth of the poison and some benign outliers), calibrated on the
    benign reference."""
    b, p = _blended_like(300, 300, 0, shift)
    screen = torch.cat([b, p])
    truth = np.r_[np.zeros(300, bool), np.ones(300, bool)]
    trusted, _ = _blended_like(100, 0, 1, shift)
    rng = np.random.default_rng(0)
    few = torch.from_numpy((truth & (rng.random(600) < 0.1)) | (~truth & (rng.random(600) < 0.05)))
    direction = unit(screen[few].mean(0)[None])[0] - unit(trusted.mean(0)[None])[0]
    d, dt = (screen @ direction).numpy(), (trusted @ direction).numpy()
    return screen, trusted, truth, (d - dt.mean()) / dt.std()


def test_self_training_draws_the_edge_the_seed_blurs():
    screen, trusted, truth, seed = _scan_like(3.0)
    assert (seed[truth] > 3.0).mean() < 0.85          # the seed alone misses poison
    probe = self_train([screen], [trusted], seed, Thresholds(window=1))
    assert probe is not None
    flagged = probe.z([screen]) > 2.0
    assert flagged[truth].mean() >= 0.99
    assert flagged[~truth].mean() <= 0.04
    # calibrated on the benign reference: it sits around 0 with unit spread
    zt = probe.z([trusted])
    assert abs(zt.mean()) < 1e-6 and abs(zt.std() - 1) < 1e-6


def test_self_training_declines_when_the_seed_is_too_weak_to_steer_it():
    screen, trusted, truth, seed = _scan_like(2.0)
    assert self_train([screen], [trusted], seed, Thresholds(window=1)) is None


def test_self_training_declines_without_enough_calls():
    b, p = _blended_like(50, 3, 2, 3.0, d=10)
    seed = np.r_[np.zeros(50), np.full(3, 4.0)]
    assert self_train([torch.cat([b, p])], [b[:20]], seed, Thresholds(window=1, probe_shrinkage=0.5)) is None


def test_self_training_splits_a_seed_that_sits_in_one_half():
    """A seed drawn from a direction test's held-out calls (guard.direction) can put every suspect in
    one half of the same random split; fitting the other half then had no suspect at all (a crash,
    ZeroDivisionError, in the second round). The halves are then split evenly by the seed's calls."""
    screen, trusted, truth, _ = _scan_like(3.0)
    folds = np.random.default_rng(0).permutation(len(truth)) % 2
    seed = np.where(truth & (folds == 0), 4.0, 0.0)               # suspects only in half 0
    probe = self_train([screen], [trusted], seed, Thresholds(window=1), rng_seed=0)
    assert probe is not None
    flagged = probe.z([screen]) > 2.0
    assert flagged[truth].mean() >= 0.95 and flagged[~truth].mean() <= 0.05
