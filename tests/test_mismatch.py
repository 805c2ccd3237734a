"""The classes read together (guard.mismatch): on clean classes Fisher's combination of their direction
tests holds its level; a trusted set from another source, which moves no single class past its bar,
shows in all of them at once."""

import numpy as np
import pytest
import torch

from guard.direction import direction_test
from guard.mismatch import mismatch
from guard.reference import unit


def _class(n: int, d: int, rng: np.random.Generator, wider: float = 1.0) -> torch.Tensor:
    """Unit features around a common mean; ``wider`` stretches one direction orthogonal to it (what a
    lossy re-encoding of the training images, and not of the trusted ones, adds)."""
    x = rng.standard_normal((n, d))
    x[:, 0] += 4.0
    x[:, 1] *= wider
    return unit(torch.from_numpy(x))


def _scan(rng: np.random.Generator, classes: int, wider: float) -> dict[int, object]:
    """Each class's direction test at two layers: 150 training samples against 30 trusted ones."""
    return {c: direction_test([_class(150, 16, rng, wider), _class(150, 8, rng)],
                              [_class(30, 16, rng), _class(30, 8, rng)])
            for c in range(classes)}


def _layer_p(tests: dict) -> dict[int, dict[int, float]]:
    return {c: dict(enumerate(t.layer_p)) for c, t in tests.items()}


def test_each_layer_p_is_corrected_for_the_sides_only():
    tests = _scan(np.random.default_rng(0), 1, 1.0)
    t = tests[0]
    assert len(t.layer_p) == 2 and all(0 < p <= 1 for p in t.layer_p)
    assert abs(t.p - min(1.0, 2 * min(t.layer_p))) < 1e-12      # the test's own p: x 2 layers


def test_on_clean_classes_the_combination_holds_its_level():
    rng = np.random.default_rng(1)
    ps = np.array([mismatch(_layer_p(_scan(rng, 6, 1.0))).p for _ in range(60)])
    assert (ps < 0.05).mean() <= 0.05 + 0.06          # the nominal rate plus binomial slack (60 draws)
    assert ps.min() > 1e-3


def test_a_trusted_set_from_another_source_shows_in_all_classes_together():
    rng = np.random.default_rng(2)
    tests = _scan(rng, 10, 2.0)
    bar = 1e-3 / 10                                   # the per-class bar of a scan of ten classes
    assert all(t.p > 10 * bar for t in tests.values()), [t.p for t in tests.values()]   # no class alone
    m = mismatch(_layer_p(tests))
    assert m.p < 1e-6 and m.layer == 0 and m.classes == 10


def test_it_needs_two_classes_at_a_layer():
    assert mismatch({}) is None
    assert mismatch({0: {0: 1e-9}}) is None
    m = mismatch({0: {0: 0.5, 1: 1e-4}, 1: {0: 0.5, 1: 1e-4}, 2: {0: 0.5}})
    assert m.layer == 1 and m.classes == 2 and m.p < 1e-5


@pytest.mark.cifar
@pytest.mark.parametrize("case", ["badnets", "blended"])
def test_on_real_data_with_its_own_trusted_set_the_scan_reports_no_mismatch(case, cifar_archive):
    # the golden checkpoints (real CIFAR-10, 10 % all-to-one, trusted samples from the same source): the
    # nine clean classes, combined, are far from the bar, and the scan does not warn
    import warnings

    from tests.golden import detect_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = detect_checkpoint(case, cifar_archive)
    scan = report.scans[-1]
    assert scan.trusted_mismatch_p is not None and scan.trusted_mismatch_p > 1e-2, scan.trusted_mismatch_p
    assert scan.trusted_mismatch_at is not None
    assert not any("do not look like" in w for w in scan.warnings)


@pytest.mark.cifar
def test_training_images_from_another_source_make_the_scan_say_so_once(cifar_archive):
    # real CIFAR-10: the 3,000 training images re-encoded as JPEG quality 10, the 30 trusted a class not.
    # No class's own test acts, the classes together do: the report carries the p, the scan warns, and the
    # run raises one GuardWarning however many scans see it. The same images unre-encoded: no warning.
    import warnings

    from guard import GuardConfig, GuardedDataset, GuardWarning
    from guard.experiment import RunSpec, prepare
    from tests.golden import _model

    def scans(jpeg: int | None) -> tuple[GuardedDataset, list]:
        data = prepare(RunSpec(data="cifar10", attack=None, rate=0.0, n_train=3000, trusted_per_class=30,
                               train_jpeg=jpeg, archive=cifar_archive))
        torch.manual_seed(0)                         # an untrained model: the input views decide alone
        gds = GuardedDataset(data.train, _model(), GuardConfig(remedy="none", progress=False), trusted=data.trusted)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gds.scan(0)
            gds.scan(1)
        return gds, [w for w in caught if issubclass(w.category, GuardWarning)]

    gds, caught = scans(10)
    assert all(s.trusted_mismatch_p < 1e-3 for s in gds.report.scans), [s.trusted_mismatch_p for s in gds.report.scans]
    assert all(any("do not look like the training data" in w for w in s.warnings) for s in gds.report.scans)
    assert len(gds.quarantined) == 0
    assert len(caught) == 1 and "trusted_mismatch_p" in str(caught[0].message)

    gds, caught = scans(None)
    assert all(s.trusted_mismatch_p > 1e-2 for s in gds.report.scans) and not caught
