"""Each class's images held against their own mirror images (guard.mirror): the fine view of a mirror
image, a stamped pattern standing out where a clean or mirror-symmetric one does not, when scans run
the test (asked only), and on real CIFAR-10 a trust-free scan that catches all-to-all poison with no
trusted image and no learned feature, and acts on no clean class."""

import numpy as np
import pytest
import torch

from guard import GuardConfig, GuardedDataset
from guard.inputs import high_pass
from guard.mirror import MIRROR, mirror_steps, mirror_test, mirrored
from guard.reference import unit

SHAPE = (3, 16, 16)
CHECKER = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fine = high_pass(x)
    return unit(fine), unit(mirrored(fine, SHAPE))


def test_the_mirror_of_the_fine_view_is_the_fine_view_of_the_mirror_image():
    x = _images(4, 0)
    assert torch.allclose(mirrored(high_pass(x), SHAPE), high_pass(x.flip(-1)), atol=1e-6)
    big = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(1))   # pooled to 64 x 64 first
    assert torch.allclose(mirrored(high_pass(big), (3, 64, 64)), high_pass(big.flip(-1)), atol=1e-5)


def test_a_pattern_stamped_at_one_place_in_a_tenth_of_a_class_lies_beyond_every_mirror_image():
    x = _images(400, 2)
    stamped = np.arange(0, 400, 10)
    x[torch.from_numpy(stamped), :, -4:-1, -4:-1] = CHECKER          # bottom right, in every channel
    test = mirror_test(*_views(x))
    truth = np.isin(np.arange(400), stamped)
    assert test.p < 1e-6
    assert test.beyond[truth].sum() >= 38 and test.beyond[~truth].sum() <= 4
    assert np.array_equal(test.beyond, test.z > 0)                     # z: how far beyond the furthest mirror image
    # images the test did not hold: beyond on both halves' directions, neither fitted on them
    new = _images(200, 3)
    new[:20, :, -4:-1, -4:-1] = CHECKER
    beyond, z = test.extend(_views(new)[0])
    assert beyond[:20].sum() >= 19 and beyond[20:].sum() <= 2
    assert np.array_equal(beyond, z > 0)


def test_a_class_passing_is_tested_again_on_what_it_leaves_so_each_piece_of_a_split_trigger_is_taken():
    """Two patterns at two places (a fifth of the class top left, a tenth bottom right), each image carrying
    one, as Adaptive-Patch's pieces: the first direction is the larger pattern's and takes none of the other;
    the test on what it leaves finds the second; images the tests did not hold are taken on both."""
    x = _images(400, 2)
    small, large = np.arange(0, 400, 10), np.flatnonzero(np.arange(400) % 10 >= 8)
    x[torch.from_numpy(small), :, -4:-1, -4:-1] = CHECKER
    x[torch.from_numpy(large), :, 1:4, 2:5] = 1 - CHECKER
    units, mirror = _views(x)
    first = mirror_test(units, mirror)
    assert first.beyond[large].all() and not first.beyond[small].any()
    steps = mirror_steps(units, mirror, level=1e-4)
    assert steps.first.p == first.p and len(steps.steps) == 2
    clean = np.setdiff1d(np.arange(400), np.concatenate([small, large]))
    assert steps.beyond[small].all() and steps.beyond[large].all() and steps.beyond[clean].sum() <= 3
    new = _images(200, 3)
    new[:20, :, -4:-1, -4:-1] = CHECKER
    new[20:40, :, 1:4, 2:5] = 1 - CHECKER
    taken, _ = steps.over(torch.cat([units, _views(new)[0]]), np.arange(400))
    assert np.array_equal(taken[:400], steps.beyond)                       # the held images keep their result
    assert taken[400:440].sum() >= 38 and taken[440:].sum() <= 2
    clean_class = mirror_steps(*_views(_images(400, 4)), level=1e-4)
    assert clean_class.steps == ()                                         # nothing passes: no step at all


def test_a_clean_class_and_a_mirror_symmetric_pattern_do_not_stand_out():
    assert mirror_test(*_views(_images(400, 4))).p > 1e-3
    x = _images(400, 5)
    x[::10, :, 6:9, 6:10] = torch.tensor([[1.0, 0.0, 0.0, 1.0]] * 3)   # on the vertical axis, its own mirror image
    assert mirror_test(*_views(x)).p > 1e-3                            # what the test cannot see (module docstring)
    assert mirror_test(*_views(_images(7, 6))) is None                 # too few to split


def test_scans_hold_images_against_their_mirror_images_only_when_asked():
    from torch.utils.data import TensorDataset

    data = TensorDataset(_images(64, 7), torch.arange(64) % 2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    on = lambda **kw: GuardedDataset(data, model, GuardConfig(progress=False, **kw)).scanner.mirror  # noqa: E731
    assert not on()                                                   # off by default: digits are no mirror images
    assert on(mirror_images=True)
    assert not on(mirror_images=True, scan_inputs=False)              # no image tests at all


@pytest.mark.cifar
@pytest.mark.parametrize("attack", ["all2all", None])
def test_a_trust_free_scan_catches_all_to_all_poison_in_the_images_and_no_clean_class(attack, cifar_archive):
    """All-to-all BadNets 10 % on 4,000 CIFAR-10 images trained with crop + flip: every class carries the
    patch on a tenth of its images, so the images of the other classes cannot stand for a clean class
    (``all2all_trustfree_cifar10``: nothing taken), but their own mirror images can. A model at its
    initialisation, no trusted set: every poisoned sample and 10 benign ones taken; the same data clean: nothing."""
    from guard.experiment import RunSpec, prepare
    from tests.golden import _model as small_cnn

    data = prepare(RunSpec(data="cifar10", attack=attack, rate=0.1, n_train=4000, seed=0, trust_free=True,
                           augment=True, archive=cifar_archive))
    torch.manual_seed(0)
    gds = GuardedDataset(data.train, small_cnn(), GuardConfig(remedy="none", progress=False, mirror_images=True),
                         scan_dataset=data.scan)
    rep = gds.scan(0)
    q, poisoned = gds.quarantined, np.asarray(data.poisoned)
    benign = np.isin(q, poisoned, invert=True).sum()
    if attack is None:
        assert len(q) == 0
        assert min(c.mirror_p for c in rep.classes) > 1e-3
        return
    assert np.isin(poisoned, q).mean() >= 0.99
    assert benign <= 0.01 * (len(data.train) - len(poisoned))
    assert all(c.critical_layers == [MIRROR] for c in rep.classes)
