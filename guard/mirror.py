"""Scan stage 4d: a class's images held against their own mirror images, read without the model.

Where an image mirrored left to right is as good a sample of its class as the image itself (natural
photographs; what training with ``RandomHorizontalFlip`` assumes), a clean class's images and their
mirror images are exchangeable in any view that commutes with the flip, as the fine view does
(:func:`guard.inputs.high_pass`: a symmetric 3 x 3 filter). A pattern stamped at one place in some of
the class's images is not: its mirror image carries it at the mirrored place. So the class's images
are tested against their mirror images as the direction test tests them against trusted samples
(:mod:`guard.direction`): the class's top principal direction fitted on one half, the other half and
*its* mirror images projected on it, the held-out images beyond every one of those mirror images
counted against the Beta-binomial bound (:func:`guard.decide.beyond_reference_p`), then the halves
swapped. This needs no trusted sample and
no other class, so it sees poison planted alike in every class (all-to-all), which the test against the
other classes' images cannot (their images, the clean class's stand-in, carry it too).

What it promises: under exchangeability, each held-out clean image lies beyond every one of its half's
``m`` mirror images with probability at most ``1 / (m + 1)``, whatever the view's distribution; the p
is corrected for the two sides. A class that passes is tested again on what the test leaves of it
(:func:`mirror_steps`), for as long as the rest passes at the same level: a trigger split into pieces,
each sample carrying one at its own place (Adaptive-Patch), is one direction a piece. The steps are
nested, each run only where the one before acted, so a clean class is acted on no more often than by
the first test alone, and a poisoned class's clean rest no more often than a clean class. An image and
its own mirror image are a pair, which the bound does not model; on clean CIFAR-10 data the test acted
on none of 1,342 class decisions (benchmarks/NOTES.md).
What it cannot see: a trigger that is its own mirror image (centred on the vertical axis and
mirror-symmetric, or a symmetric global blend), a warp. Where classes are not
mirror-symmetric (digits, text) the assumption fails and clean images are taken: a recipe that flips
such data does not make it symmetric (sklearn's digits trained with flips lost 482 clean samples of
1,147 with the test on). So by default (``GuardConfig(mirror_images="auto")``) it runs only where the
images show the assumption: with a trusted set, its images (:func:`symmetry`: each class's trusted
images against their own mirror images, a sign-flip test that digits fail at 10 a class); without one,
the training images themselves, poison and all (the same check with the share of each class that
differs most from its mirror images set aside, so a poisoned minority in every class passes and a
lopsided class fails). ``True`` runs it anyway, ``False`` never.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from guard.decide import beyond_reference_p
from guard.direction import _skew_sign, _top
from guard.reference import unit


MIRROR = "<input:mirror>"       # how reports name the test among the layers and views


def mirrored(fine: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """The fine view (:func:`guard.inputs.high_pass`, rows of images of ``shape`` = (C, H, W) after its
    pooling) of the same images mirrored left to right: the high-pass commutes with the flip."""
    return fine.reshape(len(fine), *shape).flip(-1).reshape(len(fine), -1)


@dataclass(frozen=True)
class MirrorTest:
    """One class's test. ``beyond``: per image, held out from the direction it is projected on, beyond
    every mirror image of its half (the significant side positive); ``z``: how far beyond the furthest
    of them, in their standard deviations (positive exactly where ``beyond``). ``fits``: per half, the
    direction fitted on the other half and its held-out mirror images' projections, for :meth:`extend`."""

    p: float
    share: float
    beyond: np.ndarray
    z: np.ndarray
    fits: tuple[tuple[torch.Tensor, torch.Tensor, np.ndarray], ...]

    def extend(self, units: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(beyond, z)`` of images the test did not hold (rows of the class's fine view, unit
        features): beyond every mirror image on *both* halves' directions, neither fitted on them, so
        a clean image is beyond with probability at most ``1 / (m + 1)`` (m: the smaller half);
        ``z`` the smaller of its two."""
        beyond, z = np.ones(len(units), bool), np.full(len(units), np.inf)
        for mu, v, ref in self.fits:
            proj = ((units.float() - mu) @ v).numpy()
            beyond &= proj > ref.max()
            z = np.minimum(z, (proj - ref.max()) / max(float(ref.std()), 1e-12))
        return beyond, z

    def over(self, units: torch.Tensor, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(beyond, z)`` of every image of the class: ``units`` all its images' unit fine view, ``held``
        the positions among them of the images the test held out, in the test's order. Those keep their
        held-out result; the others are extended (:meth:`extend`)."""
        beyond, z = self.extend(units)
        beyond[held], z[held] = self.beyond, self.z
        return beyond, z


@dataclass(frozen=True)
class MirrorSteps:
    """One class's tests in order (:func:`mirror_steps`): ``first`` on all its screened images, ``steps`` those
    that acted, each with the positions among the screened images it held (the first: all of them; each next:
    those no step before put beyond)."""

    first: MirrorTest
    steps: tuple[tuple[MirrorTest, np.ndarray], ...]

    @property
    def beyond(self) -> np.ndarray:
        """Per screened image: beyond in the step that held it last."""
        out = np.zeros(len(self.first.beyond), bool)
        for test, held in self.steps:
            out[held] = test.beyond
        return out

    def over(self, units: torch.Tensor, screened: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(beyond, z)`` of every image of the class (``units``: all its images' unit fine view; ``screened``:
        the positions among them of the screened images, in the tests' order): each step's
        :meth:`MirrorTest.over` on the images no step before put beyond; ``z`` the largest of a sample's steps."""
        taken, z = np.zeros(len(units), bool), np.full(len(units), -np.inf)
        for test, held in self.steps:
            left = np.flatnonzero(~taken)
            beyond, z_step = test.over(units[torch.from_numpy(left)], np.searchsorted(left, screened[held]))
            z[left] = np.maximum(z[left], z_step)
            taken[left[beyond]] = True
        return taken, z


def mirror_steps(units: torch.Tensor, mirror: torch.Tensor, level: float, rng_seed: int = 0) -> MirrorSteps | None:
    """:func:`mirror_test` of one class (``units``, ``mirror``: as there), then again on the images it did not put
    beyond, for as long as a test's p is below ``level``. None with fewer than 8 images."""
    first = mirror_test(units, mirror, rng_seed)
    if first is None:
        return None
    steps, left, test = [], np.arange(len(units)), first
    while test is not None and test.p < level:
        steps.append((test, left))
        left = left[~test.beyond]
        rows = torch.from_numpy(left)
        test = mirror_test(units[rows], mirror[rows], rng_seed) if test.beyond.any() else None
    return MirrorSteps(first, tuple(steps))


def mirror_test(units: torch.Tensor, mirror: torch.Tensor, rng_seed: int = 0) -> MirrorTest | None:
    """Test one class: ``units`` its images' unit features in the fine view, ``mirror`` the same rows'
    mirror images'. None with fewer than 8 images (4 a half)."""
    n = len(units)
    if n < 8:
        return None
    x, xm = units.float(), mirror.float()
    fold = np.random.default_rng(rng_seed).permutation(n) % 2
    proj, halves = np.zeros(n), []
    for f in (0, 1):
        out = fold == f
        held = torch.from_numpy(np.flatnonzero(out))
        mu, v, xc = _top(x.index_select(0, torch.from_numpy(np.flatnonzero(~out))))
        v = v * _skew_sign(xc @ v)
        proj[out] = ((x.index_select(0, held) - mu) @ v).numpy()
        halves.append((out, mu, v, ((xm.index_select(0, held) - mu) @ v).numpy()))
    m = min(len(ref) for *_, ref in halves)
    best: MirrorTest | None = None
    for side in (1.0, -1.0):                 # both halves signed by their own skew, either end of them
        beyond, z = np.zeros(n, bool), np.zeros(n)
        for out, _, _, ref in halves:
            p_out, r = side * proj[out], side * ref
            beyond[out] = p_out > r.max()
            z[out] = (p_out - r.max()) / max(float(r.std()), 1e-12)
        p = min(1.0, 2.0 * beyond_reference_p(int(beyond.sum()), n, m))
        if best is None or p < best.p:
            fits = tuple((mu, side * v, side * ref) for _, mu, v, ref in halves)
            best = MirrorTest(p, float(beyond.mean()), beyond, z, fits)
    return best


@dataclass(frozen=True)
class Symmetry:
    """Whether images are as good samples of their classes as their mirror images (:func:`symmetry`):
    ``p`` the smaller of its two tests' p (the classes one by one, corrected for them; the classes together),
    doubled for the two; ``worst`` the class with the smallest p of its own; ``read`` the most images read of
    a class."""

    p: float
    worst: int
    read: int

    def holds(self, level: float) -> bool:
        return self.p >= level


def _leaning(gram: np.ndarray, fold: np.ndarray, signs: np.ndarray, trim: float) -> np.ndarray:
    """Per row of ``signs`` (a sign per pair), the count of :func:`symmetry`'s statistic: each half's pairs
    projected on the other half's signed mean difference (``gram``: the differences' inner products), the
    ``trim`` share of largest projections set aside, the rest counted where positive."""
    count = np.zeros(len(signs), np.int64)
    for f in (0, 1):
        held, fit = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        proj = signs[:, held] * (signs[:, fit] @ gram[np.ix_(fit, held)])
        keep = int(np.ceil((1.0 - trim) * len(held)))
        small = np.take_along_axis(proj, np.argsort(np.abs(proj), axis=1, kind="stable")[:, :keep], axis=1)
        count += (small > 0).sum(1)
    return count


def symmetry(fine: torch.Tensor, labels: np.ndarray, shape: tuple[int, int, int], per_class: int, level: float,
             rng_seed: int = 0, trim: float = 0.0) -> Symmetry | None:
    """Test the assumption the mirror test rests on: that an image and its mirror image are exchangeable samples of
    its class. ``fine``: the images' fine view (:func:`guard.inputs.high_pass`, rows of images of ``shape``),
    ``labels`` their classes. Per class, at most ``per_class`` images (a seeded choice), each paired with its own
    mirror image; each image's difference from its mirror image, ``d``, is projected on the mean ``d`` of the other
    half of the class, and the images are counted where that is positive. Under the assumption ``d`` is as likely as
    ``-d``, so the count is compared with its distribution under random sign flips of the pairs (an exact
    permutation test). Two tests: each class on its own, the smallest p times the classes (one lopsided class,
    arrows), and the classes' counts summed, each class flipped on its own (every class a little lopsided, as
    letters, where a class's few images cannot show it alone); ``ceil(40 * classes / level)`` flips, so the
    corrected ``level`` can be reached, from 999 to 9,999 (beyond 250 classes at the default level only the classes
    together can show it); the smaller p doubled. Natural photographs carry a slight left-right bias that hundreds of
    images a class resolve and that the mirror test's bound does not feel, so ``per_class`` caps the check's
    resolution (benchmarks/NOTES.md).

    ``trim``: the share of each half with the largest projections either way that is set aside before counting
    (the flipped copies are counted the same way, so the test stays exact). Trusted images are clean by
    assumption and read whole (0: a mark on a minority of them turns the test off). Training images may hold poison,
    which makes a minority of a class differ from its mirror images all one way; with ``trim`` set above that
    minority, a poisoned minority passes and a lopsided class still fails. What the check cannot then tell from
    poison: a mark at one place on a minority of every class's images (a watermark).
    Digits fail it at 10 a class. Counting images rather than summing their differences, a few photographs lopsided
    by their content do not turn the test off. None where a class has fewer than 4 images."""
    rng = np.random.default_rng(rng_seed)
    classes = np.unique(labels)
    flips = min(9_999, max(999, int(np.ceil(40 * len(classes) / level))))
    p_min, worst, read = 1.0, -1, 0
    pooled, pooled_null = 0, np.zeros(flips, np.int64)
    for c in classes:
        rows = np.flatnonzero(labels == c)
        if len(rows) < 4:
            return None
        rows = np.sort(rng.permutation(rows)[:per_class])
        read = max(read, len(rows))
        u = unit(fine[torch.from_numpy(rows)].double())
        d = u - mirrored(u, shape)
        gram = (d @ d.T).numpy()
        fold = rng.permutation(len(rows)) % 2
        signs = np.vstack([np.ones(len(rows)), rng.choice([-1.0, 1.0], size=(flips, len(rows)))])
        count = _leaning(gram, fold, signs, trim)
        seen, null = int(count[0]), count[1:]
        p = (1 + int((null >= seen).sum())) / (flips + 1)
        pooled, pooled_null = pooled + seen, pooled_null + null
        if p < p_min:
            p_min, worst = p, int(c)
    p_pooled = (1 + int((pooled_null >= pooled).sum())) / (flips + 1)
    return Symmetry(min(1.0, 2 * min(p_min * len(classes), p_pooled)), worst, read)
