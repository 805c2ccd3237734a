"""guard.elsewhere: another class's catch, held against a class's trusted samples."""

import numpy as np
import pytest
import torch

from guard.elsewhere import along_catches
from guard.probe import Probe


def _probe(w: torch.Tensor) -> Probe:
    return Probe([0], [w], [0.0], [1.0], 0.0, 1.0)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _class(rng: np.random.Generator, n: int, d: int = 32) -> torch.Tensor:
    mean = np.zeros(d)
    mean[0] = 4.0
    return torch.from_numpy(rng.normal(size=(n, d)) + mean)


def test_a_clean_class_passes_no_more_often_than_its_p_value_says():
    # the probe never saw the class: its screen and trusted samples are exchangeable, so p holds its rate
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.normal(size=32))
    ps = [along_catches([_unit(_class(rng, 300))], [_unit(_class(rng, 20))], {3: _probe(w)}).p for _ in range(300)]
    ps = np.array(ps)
    assert (ps < 0.05).mean() <= 0.08 and (ps < 0.01).mean() <= 0.03, np.sort(ps)[:20]


def test_a_tenth_of_a_class_along_another_class_catch_passes_with_all_its_trusted_samples():
    # all-to-all: 12 % of the class carries the trigger the other class's probe points along; held against
    # all 100 trusted samples (the class's own gate would hold against 50 and need 19 %)
    rng = np.random.default_rng(1)
    trigger = torch.zeros(32, dtype=torch.float64)
    trigger[5] = 6.0
    screen = _class(rng, 500)
    screen[:60] += trigger
    ref = [_unit(_class(rng, 100))]
    test = along_catches([_unit(screen)], ref, {7: _probe(trigger / 6)})
    assert test.sources == [7] and test.p < 1e-4, test.p
    assert test.beyond[:60].mean() >= 0.9 and test.beyond[60:].mean() <= 0.02
    # two catches: their mean score, one direction (the trigger adds up, each class's own look averages out)
    look = torch.zeros(32, dtype=torch.float64)
    look[9] = 1.0
    both = along_catches([_unit(screen)], ref, {7: _probe(trigger / 6 + look), 2: _probe(trigger / 6 - look)})
    assert both.sources == [2, 7] and both.p <= test.p


def test_it_needs_a_catch_and_two_trusted_samples():
    rng = np.random.default_rng(2)
    screen, ref = [_unit(_class(rng, 200))], [_unit(_class(rng, 30))]
    w = torch.from_numpy(rng.normal(size=32))
    assert along_catches(screen, [ref[0][:1]], {0: _probe(w)}) is None
    assert along_catches(screen, ref, {}) is None


@pytest.mark.cifar
@pytest.mark.parametrize("case", ["badnets", "blended"])
def test_after_an_all_to_one_catch_the_clean_classes_are_held_against_it_and_kept(case, cifar_archive):
    # the golden checkpoints (real CIFAR-10, 10 % all-to-one): the target is caught, and every other class
    # is tested along its probe, with its own trusted samples as the extreme; none of them is acted on
    from tests.golden import detect_checkpoint

    report = detect_checkpoint(case, cifar_archive)
    classes = report.scans[-1].classes
    assert classes[0].verdict == "separate cluster" and classes[0].n_flagged > 0
    others = [c for c in classes if c.cls != 0]
    assert sum(c.caught_p < 1.0 for c in others) >= 5, [c.caught_p for c in others]
    assert all(c.caught_p > 1e-3 and c.n_flagged == 0 for c in others), [(c.cls, c.caught_p) for c in others]
    assert "elsewhere" in report.scans[-1].seconds_by_step
