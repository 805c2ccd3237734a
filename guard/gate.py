"""The reference gate of a trusted class's cluster: its direction chosen by one half of the class's
trusted samples, held against the other.

A trusted class's discriminant (:mod:`guard.cluster`) points from its trusted samples towards the
training samples that leave their spread. Held against the same trusted samples, it is not a fixed
direction: a draw of trusted samples that happens to sit in one corner of a clean class makes the
rest of the class "out of spread", and the direction chosen by that draw then puts most of the
class beyond every one of them (measured: 10 trusted images of a clean class of 294, 69 % of the
class beyond all ten, where the Beta-binomial bound for a fixed direction gives p = 1e-5; ten
other images of the class make it not even a candidate; cross-fitted, 60 % beyond a held-out half
of 5, p = 0.02). The bound of
:func:`~guard.decide.beyond_reference_p` holds only for a direction chosen without the samples it
is held against.

So the gate cross-fits: the trusted samples are split in two halves at random; one half's spread
selects the screened samples out of it and their centroid, and that half's discriminant is held
against the *other* half's samples, which had no part in it: the count of screened samples beyond
every one of them is Beta-binomial with the held-out half's size, whatever the features. Both halves
take each role; the smaller of the two p-values, doubled (Bonferroni), is the gate's. The price is
the bound's size: with 100 trusted a class (ten classes, defaults) the gate asks for 19 % of the
class beyond every sample of a half instead of 10 % beyond all 100; with 50, 34 % of 25; with 20,
64 % of 10. A smaller share for the direction does not buy much: its spread is widened for small
samples (:func:`~guard.calibrate.small_sample`), so a quarter of 30 trusted samples leaves nothing
out of it where a half finds the cluster (a BadNets class of the golden tests). With 10 or 20 trusted
a class the model's route in effect cannot act on what an all-to-one attack plants; a class is then
acted on through the tests that need no cross-fitting, :mod:`guard.direction` and :mod:`guard.inputs`.

A follow-up meets the same problem from the other side (:func:`split_follow`, opt-in with
``thresholds={"follow_held_out": True}``): its probe is self-trained on the quarantined samples and
the class's kept ones, so a count of kept samples beyond the trusted ones along it has no known
null: the fit chose the direction with those samples. Cross-fitted over halves of the kept screen,
the count beyond every trusted sample is again Beta-binomial when nothing is left, and a follow-up
runs only where it is past the same bar.

Deterministic for a given seed and class, so every rank of a distributed run agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from guard.calibrate import small_sample
from guard.cluster import _cosine_without
from guard.decide import beyond_reference_p
from guard.probe import self_train
from guard.thresholds import Thresholds


@dataclass(frozen=True)
class GateTest:
    """The cross-fitted gate of one class."""

    p: float          # 2 x the smaller half's p-value (at most 1)
    share: float      # share of the screen beyond every held-out trusted sample, in the half with that p-value
    n_held: int       # trusted samples held out in that half


def _held_out_scores(fit: list[torch.Tensor], held: list[torch.Tensor], screen: list[torch.Tensor],
                     out_z: float, floor: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The discriminant of one half (``fit``: its unit features per layer) for the screen (each
    sample left out of the suspect centroid it is part of) and for the held-out half; None when no
    screened sample leaves the fitted half's spread at any layer. The cosines are the discriminant's
    own (:func:`guard.cluster._cosine_without`), with one class."""
    one = lambda u: torch.zeros(len(u), dtype=torch.long)  # noqa: E731 - every row is the class's
    n_s, n_h = len(screen[0]), len(held[0])
    d_s, d_h = torch.zeros(n_s, dtype=torch.float64), torch.zeros(n_h, dtype=torch.float64)
    any_out = False
    for f, h, s in zip(fit, held, screen):
        total = f.sum(0)[None]
        loo = _cosine_without(f, total, one(f), 1.0)
        sd = max(float(loo.std(unbiased=False)), floor) * small_sample(len(f), out_z)
        cos_s = _cosine_without(s, total, one(s), None)
        out = (cos_s - loo.mean()) / sd < -out_z
        if not out.any():
            continue
        any_out = True
        sus = s[out].sum(0)[None]
        d_s += _cosine_without(s, sus, one(s), out.double()) - cos_s
        d_h += _cosine_without(h, sus, one(h), None) - _cosine_without(h, total, one(h), None)
    return (d_s.numpy(), d_h.numpy()) if any_out else None


def split_gate(screen: list[torch.Tensor], reference: list[torch.Tensor], rng: np.random.Generator,
               out_z: float, floor: float) -> GateTest:
    """The cross-fitted reference gate of one class.

    ``screen``, ``reference``: the class's screened and trusted samples' unit features (float64),
    one tensor per layer of its window; ``out_z``, ``floor``: the out-of-spread cut and the spread's
    numerical floor (:class:`~guard.thresholds.Thresholds`). With fewer than 4 trusted samples no
    half has a spread: p is 1."""
    n = len(reference[0])
    if n < 4 or len(screen[0]) == 0:
        return GateTest(1.0, 0.0, n // 2)
    perm = rng.permutation(n)
    halves = (np.sort(perm[: n // 2]), np.sort(perm[n // 2:]))
    best = GateTest(1.0, 0.0, n // 2)
    for fit, held in (halves, halves[::-1]):
        scores = _held_out_scores([r[fit] for r in reference], [r[held] for r in reference], screen, out_z, floor)
        if scores is None:
            continue
        d_s, d_h = scores
        beyond = int((d_s > d_h.max()).sum())
        test = GateTest(min(2.0 * beyond_reference_p(beyond, len(d_s), len(held)), 1.0), beyond / len(d_s), len(held))
        if (test.p, -test.share) < (best.p, -best.share):
            best = test
    return best


def split_follow(units: list[torch.Tensor], seed: np.ndarray, reference: list[torch.Tensor], t: Thresholds,
                 rng: np.random.Generator, rng_seed: int = 0) -> GateTest:
    """The held-out count of a follow-up: whether a class that already holds quarantined samples
    still holds kept samples like them, more than a clean class would.

    ``units``: unit features per probe layer of the class's quarantined samples (``seed`` above
    ``t.screen_z``) then of a screen of its kept ones (``seed`` 0), as the follow-up fits its probe
    on them; ``reference``: the class's trusted samples' at the same layers. The follow-up's own
    probe is self-trained on the kept samples it would count, so their count beyond the trusted
    samples along it has no known null. Here the kept screen is split in halves at random; a probe
    self-trained on the quarantined samples and one half (:func:`~guard.probe.self_train`) scores
    the other half and the trusted samples, neither of which it saw, so the count of that half beyond
    every trusted sample is Beta-binomial (:func:`~guard.decide.beyond_reference_p`) when no poison
    is left. Both halves take each role; the smaller p-value, doubled, is returned (1 where no
    half's probe fits)."""
    nq = int((seed > t.screen_z).sum())
    kept = np.arange(nq, len(seed))
    n_ref = len(reference[0])
    best = GateTest(1.0, 0.0, n_ref)
    if len(kept) < 4 or n_ref < 1:
        return best
    perm = kept[rng.permutation(len(kept))]
    halves = (np.sort(perm[: len(kept) // 2]), np.sort(perm[len(kept) // 2:]))
    for fit, held in (halves, halves[::-1]):
        rows = torch.from_numpy(np.concatenate([np.arange(nq), fit]))
        probe = self_train([u[rows] for u in units], reference, seed[rows.numpy()], t, rng_seed=rng_seed)
        if probe is None:
            continue
        z_held = probe.z([u[torch.from_numpy(held)] for u in units])
        beyond = int((z_held > probe.z(reference).max()).sum())
        test = GateTest(min(2.0 * beyond_reference_p(beyond, len(held), n_ref), 1.0), beyond / len(held), n_ref)
        if (test.p, -test.share) < (best.p, -best.share):
            best = test
    return best
