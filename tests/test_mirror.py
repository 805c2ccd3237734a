"""Each class's images held against their own mirror images (guard.mirror): the fine view of a mirror
image, a stamped pattern standing out where a clean or mirror-symmetric one does not, when scans run
the test (told, or by default where the trusted images, or trust-free most training images, pass the
symmetry check), and on real CIFAR-10
a trust-free scan that catches all-to-all poison with no trusted image and no learned feature, and
acts on no clean class."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from guard import GuardConfig, GuardedDataset, GuardWarning
from guard.inputs import high_pass
from guard.mirror import MIRROR, mirror_steps, mirror_test, mirrored, symmetry
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


def test_the_symmetry_check_holds_for_images_exchangeable_with_their_mirrors_and_not_for_digits():
    """``mirror_images="auto"`` rests on :func:`symmetry`: digits (a mirrored 2 is no 2) fail it at the smallest
    trusted set the guard accepts (10 a class), as 10 classes and as 30, and so do two classes that are each
    other's mirror images (arrows); images each flipped at random, exchangeable with their mirror images by
    construction, pass."""
    from guard.datasets import load_digits

    digits = load_digits()["train"]
    x = torch.from_numpy(digits.images).permute(0, 3, 1, 2).float() / 255
    labels = np.asarray(digits.labels)
    rows = np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(10)])
    shape = tuple(x.shape[1:])
    check = symmetry(high_pass(x[rows]), labels[rows], shape, 50, 0.05)
    assert not check.holds(0.05) and check.read == 10
    flips = torch.from_numpy(np.random.default_rng(0).random(len(x)) < 0.5)
    x_flipped = torch.where(flips[:, None, None, None], x.flip(-1), x)
    rows = np.concatenate([np.flatnonzero(labels == c)[:50] for c in range(10)])
    assert symmetry(high_pass(x_flipped[rows]), labels[rows], shape, 50, 0.05).holds(0.05)
    sevens = x[labels == 7][:20]
    arrows = torch.cat([sevens, sevens.flip(-1)])                        # class 0: as written, class 1: mirrored
    assert not symmetry(high_pass(arrows), np.repeat([0, 1], 20), shape, 50, 0.05).holds(0.05)
    assert symmetry(high_pass(x[:6]), np.array([0, 0, 0, 1, 1, 1]), shape, 50, 0.05) is None   # 3 a class
    # 30 classes of 10 digits: one class alone can never reach 0.05 / 30 (1,024 sign patterns), together they do
    rows = np.concatenate([np.flatnonzero(labels == c)[:30] for c in range(10)])
    assert not symmetry(high_pass(x[rows]), np.repeat(np.arange(30), 10), shape, 50, 0.05).holds(0.05)


def _smooth(n: int, seed: int) -> torch.Tensor:
    """Images with little fine detail of their own (as photographs), mirror-symmetric in distribution."""
    coarse = torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=SHAPE[1:], mode="bilinear", align_corners=False)


def test_the_trust_free_check_sets_aside_a_stamped_minority_and_still_fails_lopsided_classes():
    """Trust-free the check reads the training images, poison included. A pattern stamped on a fifth or a quarter of
    every class (all-to-all) makes the images, read whole as a trusted set is, fail :func:`symmetry`, and the mirror
    test would be off where it is the one test that sees the poison; with the 30 % of each class that differ most from
    their mirror images set aside (``trim``) they pass. Stamped on half of every class, and on digits and arrows, they
    fail."""
    from guard.datasets import load_digits

    labels = np.arange(400) % 4
    for share, passes in ((0.2, True), (0.25, True), (0.5, False)):
        x = _smooth(400, 1)
        stamped = np.flatnonzero((np.arange(400) // 4) % 100 < share * 100)
        x[torch.from_numpy(stamped), :, -4:-1, -4:-1] = CHECKER
        fine = high_pass(x)
        assert not symmetry(fine, labels, SHAPE, 50, 0.05).holds(0.05)          # read whole
        for seed in range(3):
            check = symmetry(fine, labels, SHAPE, 50, 0.05, seed, trim=0.3)
            assert check.holds(0.05) == passes and check.read == 50
    assert all(symmetry(high_pass(_smooth(400, 1)), labels, SHAPE, 50, 0.05, s, trim=0.3).holds(0.05) for s in range(3))
    digits = load_digits()["train"]
    x = torch.from_numpy(digits.images).permute(0, 3, 1, 2).float() / 255
    dl = np.asarray(digits.labels)
    shape = tuple(x.shape[1:])
    rows = np.concatenate([np.flatnonzero(dl == c)[:10] for c in range(10)])
    assert not symmetry(high_pass(x[rows]), dl[rows], shape, 50, 0.05, trim=0.3).holds(0.05)
    flips = torch.from_numpy(np.random.default_rng(0).random(len(x)) < 0.5)
    rows = np.concatenate([np.flatnonzero(dl == c)[:50] for c in range(10)])
    x_flipped = torch.where(flips[:, None, None, None], x.flip(-1), x)
    assert symmetry(high_pass(x_flipped[rows]), dl[rows], shape, 50, 0.05, trim=0.3).holds(0.05)
    sevens = x[dl == 7][:20]
    arrows = torch.cat([sevens, sevens.flip(-1)])
    assert not symmetry(high_pass(arrows), np.repeat([0, 1], 20), shape, 50, 0.05, trim=0.3).holds(0.05)
    assert symmetry(high_pass(x[:6]), np.array([0, 0, 0, 1, 1, 1]), shape, 50, 0.05, trim=0.3) is None


@pytest.mark.filterwarnings("ignore:guard. at scan 1 the trusted samples do not look like")   # the lopsided set
def test_scans_hold_images_against_their_mirror_images_where_the_trusted_images_are_symmetric_or_when_told():
    from torch.utils.data import TensorDataset

    data = TensorDataset(_images(64, 7), torch.arange(64) % 2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    lopsided = _images(40, 8)
    lopsided[:, :, :, :4] += 1.0                                         # every image brighter at its left edge

    def scan(trusted, train=data, **kw):
        gds = GuardedDataset(train, model, GuardConfig(progress=False, remedy="none", **kw), trusted=trusted)
        return gds.scan(0)

    rep = scan(TensorDataset(_images(40, 9), torch.arange(40) % 2))  # random pixels: symmetric
    assert rep.mirror_symmetry_p >= 0.05
    rep = scan(TensorDataset(lopsided, torch.arange(40) % 2))
    assert rep.mirror_symmetry_p < 0.05                                  # read, and the test stays off
    rep = scan(TensorDataset(lopsided, torch.arange(40) % 2), mirror_images=True)
    assert rep.mirror_symmetry_p is None                                 # told: not read
    rep = scan(None)
    assert rep.mirror_symmetry_p >= 0.05                                 # trust-free: the training images read
    lopsided_train = _images(64, 10)
    lopsided_train[:, :, :, :4] += 1.0
    rep = scan(None, TensorDataset(lopsided_train, torch.arange(64) % 2))
    assert rep.mirror_symmetry_p < 0.05
    assert scan(None, mirror_images=False).mirror_symmetry_p is None

    class Flipping(torch.utils.data.Dataset):                           # random flips the guard cannot switch off
        def __len__(self):
            return 40

        def __getitem__(self, i):
            x = lopsided[i]
            return (x.flip(-1) if torch.rand(()) < 0.5 else x), i % 2

    with pytest.warns(GuardWarning, match="trusted set returns different data"):
        rep = scan(Flipping())
    assert rep.mirror_symmetry_p is None and any("cannot be read" in w for w in rep.warnings)


def test_on_digits_the_check_keeps_the_mirror_test_off_where_it_would_take_clean_samples():
    """sklearn's digits trained with crop + flip, 20 trusted a class, no attack: by default the check reads
    the trusted digits as unlike their mirror images at every scan, and nothing is taken; told to run the
    mirror test anyway, the same run takes hundreds of clean digits (482 of 1,147 recorded)."""
    from guard.experiment import RunSpec, run

    spec = RunSpec(data="digits", attack=None, epochs=6, augment=True, trusted_per_class=20,
                   guard={"warmup_epochs": 2, "scan_every": 1})
    r = run(spec, compare=False)
    assert r["guarded"]["flagged"] == 0 and all(s["mirror_symmetry_p"] < 0.05 for s in r["scans"])
    told = run(replace(spec, guard={**spec.guard, "mirror_images": True}), compare=False)
    assert told["guarded"]["flagged"] > 100


@pytest.mark.cifar
@pytest.mark.parametrize("attack", ["all2all", None])
def test_a_trust_free_scan_catches_all_to_all_poison_in_the_images_and_no_clean_class(attack, cifar_archive):
    """All-to-all BadNets 10 % on 4,000 CIFAR-10 images trained with crop + flip: every class carries the
    patch on a tenth of its images, so the images of the other classes cannot stand for a clean class
    (``all2all_trustfree_cifar10``: nothing taken), but their own mirror images can. A model at its
    initialisation, no trusted set, the defaults (the training images pass the trust-free symmetry check, the
    poisoned tenth set aside): every poisoned sample and 10 benign ones taken; the same data clean: nothing."""
    from guard.experiment import RunSpec, prepare
    from tests.golden import _model as small_cnn

    data = prepare(RunSpec(data="cifar10", attack=attack, rate=0.1, n_train=4000, seed=0, trust_free=True,
                           augment=True, archive=cifar_archive))
    torch.manual_seed(0)
    gds = GuardedDataset(data.train, small_cnn(), GuardConfig(remedy="none", progress=False), scan_dataset=data.scan)
    rep = gds.scan(0)
    assert rep.mirror_symmetry_p >= 0.05
    q, poisoned = gds.quarantined, np.asarray(data.poisoned)
    benign = np.isin(q, poisoned, invert=True).sum()
    if attack is None:
        assert len(q) == 0
        assert min(c.mirror_p for c in rep.classes) > 1e-3
        return
    assert np.isin(poisoned, q).mean() >= 0.99
    assert benign <= 0.01 * (len(data.train) - len(poisoned))
    assert all(c.critical_layers == [MIRROR] for c in rep.classes)
    assert any("mirror test acted on 10 of 10 classes" in w and "watermark" in w for w in rep.warnings)


@pytest.mark.cifar
def test_with_a_trusted_set_of_natural_images_scans_run_the_mirror_test_by_default(cifar_archive):
    """The golden clean checkpoint's scan (3,000 CIFAR-10 images, 30 trusted a class): the trusted photographs
    pass the check, so the classes the scan screens are held against their mirror images (``mirror_p`` read)
    and none is acted on; with ``mirror_images=False`` none is read."""
    from tests.golden import FOLDER, _data, _model

    data = _data("clean", cifar_archive)
    model = _model()
    model.load_state_dict(torch.load(FOLDER / "clean.pt", weights_only=True))
    reps = {}
    for asked in ("auto", False):
        gds = GuardedDataset(data.train, model, GuardConfig(progress=False, remedy="none", mirror_images=asked),
                             trusted=data.trusted)
        reps[asked] = gds.scan(0)
        assert len(gds.quarantined) == 0
    assert reps["auto"].mirror_symmetry_p >= 0.05 and reps[False].mirror_symmetry_p is None
    assert min(c.mirror_p for c in reps["auto"].classes) < 1.0
    assert min(c.mirror_p for c in reps[False].classes) == 1.0
