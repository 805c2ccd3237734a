"""Scan stage 4b: a class's main direction of variation, held against its trusted samples.

A poisoned class is a mixture of its benign samples and a cluster that shares the trigger. Once
the cluster is a sizeable part of the class, it is the class's main direction of variation (its
top principal component) at the layers that carry the trigger, whether or not it lowers the
cosine to the class direction that the out-of-spread count reads (a blend the model has learned
can leave that cosine alone and still be linearly apart from the benign samples).

The test, per class and layer: fit the top principal component on one half of the class's
(screened) samples, project the other half and the class's trusted samples on it, and count the
held-out samples beyond every trusted sample on each side; then swap the halves.

Calibrated without a model of the features. Were the class clean (its training samples
exchangeable with its trusted ones), the held-out share beyond the trusted extreme along a
direction fitted without either is Beta(1, n_ref), so the count is Beta-binomial
(:func:`guard.decide.beyond_reference_p`); summed over two halves fitted apart it is no more
dispersed than that. Each half's direction is signed by its own (fit-half) skew and both sides are
tested; a principal direction has no sign of its own, though, and where the poison is about half of a
class no statistic of a fit half tells its two ends apart, so the halves can be signed apart and split
the poison between the two sides. So the two pairings that sign them apart are tested too, with a
small share of the test's false-alarm budget (:data:`SPLIT_SHARE`, a weighted Bonferroni correction:
a poisoned half of a class is far beyond, and the signed-alike pairings keep almost all their power),
at every layer given (x layers): :attr:`DirectionTest.p` carries both corrections.
Needs a trusted reference: a trust-free one is the hard half of each class, not
exchangeable with the rest.

:func:`across_classes` needs no trusted set: it holds each class's images, in an input view that
does not depend on the model (:mod:`guard.inputs`), against the images of all the other classes.
There the Beta-binomial bound assumes that classes look alike in the view, which holds only
roughly (a class with distinct fine structure, ships on water, puts a few more images beyond the
rest), so it also asks for more of the class beyond than the other classes put beyond theirs, and
counts only what lies further out than any class that does not pass reaches.

Cost: two n x n Gram eigendecompositions per class and layer (n: the screen's half), no D x D
matrix; deterministic (no random projection), so every rank of a distributed run agrees.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg
import scipy.stats
import torch

from guard.decide import beyond_reference_p


@dataclass(frozen=True)
class DirectionTest:
    """The most significant layer's result for one class."""

    p: float              # corrected for the sides (side_factor) and every layer tested
    layer: int            # position in the layer list given
    share: float          # share of the samples beyond every trusted sample on the significant side
    beyond: np.ndarray    # (n,) bool: held-out projection beyond every trusted one, on that side
    z: np.ndarray         # (n,) held-out projection in trusted standard deviations, that side positive
    layer_p: tuple[float, ...] = ()   # per layer given: its own p, corrected for the sides only
    side_factor: float = 2.0          # the correction for the sides of the pairing that gave ``p``


SPLIT_SHARE = 0.1
"""The share of a test's false-alarm budget spent on the two pairings that sign its halves apart (each
is then corrected by 2 / SPLIT_SHARE, the two signed alike by 2 / (1 - SPLIT_SHARE)). A design choice,
not fitted to any run: it costs the usual test a factor of 1.11 in p."""


def top_direction(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, unit top principal direction)`` of the rows of ``x``, from the n x n Gram matrix
    (only its top eigenpair is computed: LAPACK ``syevr`` on that one index)."""
    mu, v, _ = _top(x)
    return mu, v


def _top(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`top_direction` and the centred rows it was fitted on."""
    mu = x.mean(0)
    xc = x - mu
    gram = (xc @ xc.T).cpu().numpy()
    n = len(gram)
    _, top = scipy.linalg.eigh(gram, subset_by_index=[n - 1, n - 1], driver="evr", check_finite=False)
    v = xc.T @ torch.from_numpy(top[:, 0]).to(xc)
    return mu, v / v.norm().clamp_min(1e-12), xc


def _halves(units: torch.Tensor, ref: torch.Tensor, folds: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]
            ) -> tuple[np.ndarray, list]:
    """Held-out projections of every sample (by the other half's signed direction) and, per half,
    the trusted samples' projections on that half's direction. ``folds``: per half, its mask and the
    row indices held out and fitted on."""
    proj, ref_proj = np.zeros(len(units)), []
    for out, held, fitted in folds:
        mu, v, xc = _top(units.index_select(0, fitted))
        sign = _skew_sign(xc @ v)
        proj[out] = sign * ((units.index_select(0, held) - mu) @ v).numpy()
        ref_proj.append((out, sign * ((ref - mu) @ v).numpy()))
    return proj, ref_proj


Projections = list[tuple[np.ndarray, list]]
"""Per layer, :func:`project`'s held-out projections of the samples and, per half, the trusted ones'."""


def project(units: list[torch.Tensor], ref: list[torch.Tensor], rng_seed: int = 0) -> Projections | None:
    """The costly half of :func:`direction_test`, layer by layer: each half's top direction fitted on
    the other half, the held-out samples and the trusted ones projected on it. None when either has
    too few samples to split and fit (fewer than 4 screened, fewer than 2 trusted). Each layer's
    entry depends on that layer alone, so a test of the first ``k`` layers reads ``projections[:k]``."""
    n, n_ref = len(units[0]), len(ref[0])
    if n < 4 or n_ref < 2:
        return None
    fold = np.random.default_rng(rng_seed).permutation(n) % 2
    folds = [(fold == f, torch.from_numpy(np.flatnonzero(fold == f)), torch.from_numpy(np.flatnonzero(fold != f)))
             for f in (0, 1)]
    return [_halves(x.float(), r.float(), folds) for x, r in zip(units, ref)]   # float32: 8x faster than float64 here


def most_significant(projections: Projections, n_ref: int) -> DirectionTest:
    """The test of :func:`direction_test` over ``projections`` (:func:`project`'s, or its first layers)
    against ``n_ref`` trusted samples, corrected for the sides (:data:`SPLIT_SHARE`) and every layer given."""
    best, layer_p = None, []
    for li, (proj, ref_proj) in enumerate(projections):
        best, p = _best_side(proj, ref_proj, n_ref, li, len(projections), best)
        layer_p.append(p)
    assert best is not None
    return replace(best, layer_p=tuple(layer_p))


def direction_test(units: list[torch.Tensor], ref: list[torch.Tensor], rng_seed: int = 0) -> DirectionTest | None:
    """Test one class: ``units`` are its screened samples' unit features per layer, ``ref`` its
    trusted samples' at the same layers. None when either has too few samples to split and fit
    (fewer than 4 screened, fewer than 2 trusted)."""
    projections = project(units, ref, rng_seed)
    return None if projections is None else most_significant(projections, len(ref[0]))


def _skew_sign(p_fit: torch.Tensor) -> float:
    """The sign that puts the skew of a fit half's projections on the positive side."""
    return 1.0 if float(((p_fit - p_fit.mean()) ** 3).sum()) >= 0 else -1.0


def _rank(p: float, share: float) -> tuple[float, float]:
    """How tests of the same samples against the same reference are ordered, most significant first: by p,
    and where p-values underflow to 0 (tails under 1e-308, which a strong trigger's screen of 512 reaches against
    the other classes' 4,600 rows), by the share beyond: for a fixed screen and reference the tail falls with
    every sample beyond."""
    return p, (-share if p == 0.0 else 0.0)


def _best_side(proj: np.ndarray, ref_proj: list, n_ref: int, layer: int, n_layers: int,
               best: DirectionTest | None) -> tuple[DirectionTest, float]:
    """Every pairing of the sides of one layer's held-out projections ``proj`` (per half, ``ref_proj``:
    its mask and the reference's projections, skew-signed): the count beyond every reference sample, its p
    corrected for the pairing (:data:`SPLIT_SHARE`) and ``n_layers``; the more significant of that and
    ``best``, and this layer's p corrected for the pairings only."""
    n, side_p = len(proj), 1.0
    for signs in itertools.product((1.0, -1.0), repeat=len(ref_proj)):
        factor = 2.0 / (1.0 - SPLIT_SHARE) if len(set(signs)) == 1 else 2.0 / SPLIT_SHARE
        beyond, z = np.zeros(n, bool), np.zeros(n)
        for side, (out, rp) in zip(signs, ref_proj):
            p_out, rp = side * proj[out], side * rp
            beyond[out] = p_out > rp.max()
            z[out] = (p_out - rp.mean()) / max(float(rp.std()), 1e-12)
        tail, share = beyond_reference_p(int(beyond.sum()), n, n_ref), float(beyond.mean())
        p, side_p = min(1.0, factor * n_layers * tail), min(side_p, 1.0, factor * tail)
        if best is None or _rank(p, share) < _rank(best.p, best.share):
            best = DirectionTest(p, layer, share, beyond, z, side_factor=factor)
    return best, side_p


def across_classes(units: torch.Tensor, labels: np.ndarray, bar: float, rng_seed: int = 0) -> dict[int, DirectionTest]:
    """Trust-free: test every class of ``units`` (one view's unit features of a screen, rows labelled
    ``labels``) against the rows of all the other classes as its reference (:func:`direction_test`).
    Each result's ``p`` is the largest of the p-values below, so a class passes (``p < bar``) only when
    all do:

    * the Beta-binomial bound of its count beyond every other-class row;
    * the one-sided binomial p of that count against the rate at which the other classes put their
      own rows beyond theirs (their counts pooled, plus one), which absorbs how much more one class
      looks like itself than like the rest;
    * both again, counting only its rows further out (in the rest's standard deviations) than the
      furthest row of every other class that does not pass: classes differ in how far their tails
      reach beyond the rest, and a clean class's tail reaches no further than theirs. Its ``beyond``
      and ``share`` are then those rows.

    A class with fewer than 4 rows, or alone, gets no result."""
    labels = np.asarray(labels)
    x = units.float()
    tests: dict[int, DirectionTest] = {}
    for c in np.unique(labels).tolist():
        test = _against_the_rest(x, labels == c, rng_seed)
        if test is not None:
            tests[int(c)] = test

    def p_of(c: int, beyond: np.ndarray) -> float:
        k, n = int(beyond.sum()), len(beyond)
        others = [t for d, t in tests.items() if d != c]
        rate = (sum(int(t.beyond.sum()) for t in others) + 1) / (sum(len(t.beyond) for t in others) + 1)
        p_rate = float(scipy.stats.binom.sf(k - 1, n, rate)) if k else 1.0
        return max(min(1.0, tests[c].side_factor * beyond_reference_p(k, n, int((labels != c).sum()))), p_rate)

    out = {c: replace(t, p=p_of(c, t.beyond)) for c, t in tests.items()}
    quiet = [c for c, t in out.items() if t.p >= bar]
    for c, t in list(out.items()):
        if t.p < bar:
            reach = max((float(out[d].z.max()) for d in quiet if d != c), default=-np.inf)
            beyond = t.beyond & (t.z > reach)
            out[c] = replace(t, p=p_of(c, beyond), beyond=beyond, share=float(beyond.mean()))
    return out


def across_views(views: list[torch.Tensor], labels: np.ndarray, bar: float,
                 rng_seed: int = 0, tests: int | None = None) -> dict[int, tuple[int, DirectionTest]]:
    """:func:`across_classes` in each of ``views`` (per view, the unit features of the same rows, labelled
    ``labels``), each p multiplied by ``tests``, the number of image tests sharing ``bar`` (default: the
    views; Bonferroni, each view's test uses its share of ``bar``). Per class, class -> (view index, its
    test): the first view where it passes ``bar``, else the view of its smallest p; the later views are
    the last resort."""
    k_tests = tests or len(views)
    tests_ = [across_classes(u, labels, bar / k_tests, rng_seed) for u in views]
    out: dict[int, tuple[int, DirectionTest]] = {}
    for c in sorted(set().union(*tests_)):
        found = [(k, replace(t[c], p=min(1.0, t[c].p * k_tests))) for k, t in enumerate(tests_) if c in t]
        out[c] = found[0] if found[0][1].p < bar else min(found, key=lambda kt: _rank(kt[1].p, kt[1].share))
    return out


def _against_the_rest(x: torch.Tensor, mine: np.ndarray, rng_seed: int) -> DirectionTest | None:
    """:func:`direction_test` of the rows ``mine`` of ``x`` (one view) against all the other rows, with
    every row projected once per fitted direction (no copy of the other rows)."""
    rows = np.flatnonzero(mine)
    n, n_ref = len(rows), int((~mine).sum())
    if n < 4 or n_ref < 2:
        return None
    fold = np.random.default_rng(rng_seed).permutation(n) % 2
    proj, ref_proj = np.zeros(n), []
    for f in (0, 1):
        out = fold == f
        mu, v, xc = _top(x.index_select(0, torch.from_numpy(rows[~out])))
        every = _skew_sign(xc @ v) * (x @ v - mu @ v).numpy()
        proj[out] = every[rows[out]]
        ref_proj.append((out, every[~mine]))
    return _best_side(proj, ref_proj, n_ref, 0, 1, None)[0]
