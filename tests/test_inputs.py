"""The high-passed input view (guard.inputs): what it keeps, where it applies, and on real CIFAR-10
images that it finds poison a model has never learned, without acting on clean data."""

import numpy as np
import pytest
import torch

from guard.batches import BatchAdapter
from guard.inputs import COARSE, COARSE_SIDE, FINE, MAX_SIDE, coarse, high_pass, is_image, ledoit_wolf, read_views


def test_high_pass_removes_smooth_content_and_keeps_fine_structure():
    ramp = torch.linspace(0, 1, 32)[None, None, :, None].expand(2, 3, 32, 32)   # smooth: a linear ramp
    out = high_pass(ramp).view(2, 3, 32, 32)
    assert out[..., 1:-1, 1:-1].abs().max() < 1e-6                              # gone inside (edges replicate)
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2).float().expand(1, 3, 32, 32)
    assert high_pass(checker).abs().mean() > 0.4                                  # fine structure stays


def test_high_pass_is_each_pixel_less_its_replicate_padded_3x3_mean():
    x = torch.rand(4, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    expected = x - torch.nn.functional.avg_pool2d(pad, 3, 1)
    assert torch.allclose(high_pass(x), expected.flatten(1), atol=1e-6)


def test_the_coarse_view_is_a_thumbnail_without_its_brightness():
    x = torch.rand(2, 3, 32, 32)
    out = coarse(x)
    assert out.shape == (2, 3 * COARSE_SIDE * COARSE_SIDE)
    assert torch.allclose(coarse(x + 0.3), out, atol=1e-6)                     # a global brightness shift is no signal
    assert out.view(2, 3, -1).mean(2).abs().max() < 1e-6
    assert coarse(torch.rand(2, 1, 5, 6)).shape == (2, 5 * 6)                   # smaller images keep their size


def test_ledoit_wolf_is_sklearns_estimate():
    from sklearn.covariance import ledoit_wolf as sklearn_lw
    x = torch.randn(300, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    x -= x.mean(0)
    ours = ledoit_wolf(x).numpy()
    theirs, shrink = sklearn_lw(x.numpy(), assume_centered=True)
    assert 0 < shrink < 1
    assert np.abs(ours - theirs).max() < 1e-9 * np.abs(theirs).max()


def test_large_images_are_pooled_to_the_cap_and_non_images_have_no_view():
    assert high_pass(torch.rand(2, 3, 224, 200)).shape == (2, 3 * MAX_SIDE * MAX_SIDE)
    assert is_image(torch.rand(2, 3, 8, 8))
    assert not is_image(torch.randint(0, 9, (2, 3, 8, 8)))          # integer tensors (tokens, raw bytes)
    assert not is_image(torch.rand(2, 16))                           # tables
    rows = [(torch.rand(16), 0) for _ in range(4)]
    assert read_views(rows, np.arange(4), BatchAdapter(), batch_size=2) is None


def _clean_model(trained: bool = True) -> torch.nn.Module:
    """The golden tests' small CNN: trained on clean CIFAR-10 only, or at initialisation (seed 0)."""
    from tests.golden import FOLDER, _model

    torch.manual_seed(0)
    model = _model()
    if trained:
        model.load_state_dict(torch.load(FOLDER / "clean.pt", weights_only=True))
    return model


def _data(attack: str | None, archive: str):
    """3,000 CIFAR-10 training images, 5 % of them poisoned into class 1, 30 trusted a class."""
    from guard.experiment import RunSpec, prepare

    return prepare(RunSpec(data="cifar10", attack=attack, rate=0.05, target=1, n_train=3000, trusted_per_class=30,
                           archive=archive))


def _scan(model, data, **config):
    """One scan (``remedy="none"``): the quarantine and class 1's report."""
    from guard import GuardConfig, GuardedDataset

    gds = GuardedDataset(data.train, model, GuardConfig(remedy="none", progress=False, **config), trusted=data.trusted)
    gds.scan(0)
    return gds.quarantined, next(c for c in gds.report.scans[-1].classes if c.cls == 1)


@pytest.mark.cifar
@pytest.mark.parametrize("attack", ["blended", "zoo:0:12"])
def test_poison_a_model_never_learned_is_found_in_the_input_view(attack, cifar_archive):
    """The golden clean checkpoint (a small CNN trained on clean CIFAR-10 only) cannot have learned a
    trigger; with 150 of 3,000 training images poisoned into class 1 (blended noise, a zoo patch),
    only the input view sees them. Recorded: all 150 taken with 2 benign images each, in the input
    view; with ``scan_inputs=False`` nothing; on the same data without poison nothing either way."""
    model = _clean_model()
    for name in (attack, None):
        data = _data(name, cifar_archive)
        for on in (True, False):
            q, v = _scan(model, data, scan_inputs=on)
            if name is None or not on:
                assert len(q) == 0, (name, on)
                continue
            assert np.isin(data.poisoned, q).all()
            assert (~np.isin(q, data.poisoned)).sum() <= 10          # under 0.4 % of the 2,850 benign
            assert v.critical_layers == [FINE] and FINE in v.reason


@pytest.mark.cifar
def test_a_smooth_blend_a_model_never_learned_is_found_in_the_coarse_view(cifar_archive):
    """A smooth blended image (zoo 1:12: noise on a 4 x 4 grid, upsampled) has no fine structure, so
    the high-pass cannot see it; its whitened thumbnail can. Recorded: all 150 taken with 16 benign
    (0.6 %) at ``<input:coarse>``; nothing with ``scan_inputs=False``."""
    model, data = _clean_model(), _data("zoo:1:12", cifar_archive)
    for on in (True, False):
        q, v = _scan(model, data, scan_inputs=on)
        if not on:
            assert len(q) == 0
            continue
        assert np.isin(data.poisoned, q).all()
        assert (~np.isin(q, data.poisoned)).sum() <= 28              # under 1 % of the 2,850 benign
        assert v.critical_layers == [COARSE] and COARSE in v.reason


@pytest.mark.cifar
def test_trust_free_a_smooth_blend_is_found_against_the_other_classes_coarse_view(cifar_archive):
    """Trust-free, the images are held against the other classes' images in both views; the smooth
    blend of the test above shows only in the coarse one. Without poison nothing is taken."""
    from guard import GuardConfig, GuardedDataset

    for name in ("zoo:1:12", None):
        data = _data(name, cifar_archive)
        gds = GuardedDataset(data.train, _clean_model(), GuardConfig(remedy="none", progress=False))
        gds.scan(0)
        q = gds.quarantined
        if name is None:
            assert len(q) == 0
            continue
        v = next(c for c in gds.report.scans[-1].classes if c.cls == 1)
        assert np.isin(data.poisoned, q).mean() >= 0.95
        assert (~np.isin(q, data.poisoned)).sum() <= 28              # under 1 % of the 2,850 benign
        assert v.critical_layers == [COARSE] and "image of the other classes" in v.reason and COARSE in v.reason


@pytest.mark.cifar
def test_with_ten_trusted_a_class_a_smooth_blend_is_found_against_the_other_classes(cifar_archive):
    """10 trusted images a class (the least allowed) are too few for the trusted tests to act on 150 of
    3,000 (a 5 % cluster); the coarse view against the other classes' images needs none of them."""
    from guard.experiment import RunSpec, prepare

    data = prepare(RunSpec(data="cifar10", attack="zoo:1:12", rate=0.05, target=1, n_train=3000, trusted_per_class=10,
                           archive=cifar_archive))
    q, v = _scan(_clean_model(), data)
    assert np.isin(data.poisoned, q).mean() >= 0.95
    assert (~np.isin(q, data.poisoned)).sum() <= 28              # under 1 % of the 2,850 benign
    assert v.critical_layers == [COARSE] and "image of the other classes" in v.reason


@pytest.mark.cifar
def test_a_class_the_model_has_not_learned_is_still_tested_in_the_images(cifar_archive):
    """A model at initialisation predicts almost no class (``min_class_fit``: nothing it could have
    learned, trigger included, so its layers are not tested), but the images do not depend on the
    model. Recorded: all 150 Blended samples taken with 2 benign; on clean data nothing."""
    model = _clean_model(trained=False)
    for name in ("blended", None):
        data = _data(name, cifar_archive)
        q, v = _scan(model, data)
        if name is None:
            assert len(q) == 0 and "has not learned the class" in v.reason
            continue
        assert np.isin(data.poisoned, q).all()
        assert (~np.isin(q, data.poisoned)).sum() <= 10
        assert v.critical_layers == [FINE] and "images lie beyond every trusted image" in v.reason


@pytest.mark.cifar
def test_a_catch_the_model_never_learned_is_not_followed_up(cifar_archive):
    """Follow-ups search a class again only while the model still fits its held-out quarantined
    samples above chance (``Thresholds.follow_gate``): poison the clean checkpoint never learned,
    caught in the input view, teaches it nothing, so a second scan takes no look-alikes (which
    could only come from the benign tail); without the gate the follow-up runs."""
    from guard import GuardConfig, GuardedDataset

    model, data = _clean_model(), _data("blended", cifar_archive)
    verdicts = {}
    for gate in (True, False):
        cfg = GuardConfig(remedy="none", progress=False, thresholds={"follow_gate": gate})
        gds = GuardedDataset(data.train, model, cfg, trusted=data.trusted)
        gds.scan(0)
        first = len(gds.quarantined)
        gds.scan(1)
        v = next(c for c in gds.report.scans[-1].classes if c.cls == 1)
        verdicts[gate] = (v.verdict, v.reason, len(gds.quarantined) - first)
    assert first >= 150
    assert verdicts[True][2] == 0 and "not followed up" in verdicts[True][1]
    assert verdicts[False][0] == "like quarantined"


@pytest.mark.cifar
def test_a_first_catch_at_the_layers_is_taken_in_the_images_where_they_put_it_further_out(cifar_archive):
    """The golden BadNets checkpoint (a small CNN that learned the trigger), scanned with 60 trusted images
    a class: its layers catch class 0, and so do its images' fine view, where the catch lies further beyond
    the trusted images (``Thresholds.images_rival``). Recorded: all 300 taken either way, 12 benign at
    the layers, none in the fine view; the clean checkpoint on clean data: nothing taken either way."""
    from guard import GuardConfig, GuardedDataset
    from guard.experiment import RunSpec, prepare
    from tests.golden import FOLDER, _model

    for case in ("badnets", None):
        data = prepare(RunSpec(data="cifar10", attack=case, rate=0.1, n_train=3000, trusted_per_class=60,
                               archive=cifar_archive))
        taken = {}
        for on in (True, False):
            torch.manual_seed(0)
            model = _model()
            model.load_state_dict(torch.load(FOLDER / f"{case or 'clean'}.pt", weights_only=True))
            gds = GuardedDataset(data.train, model, GuardConfig(remedy="none", progress=False,
                                                                thresholds={"images_rival": on}), trusted=data.trusted)
            gds.scan(0)
            q = gds.quarantined
            if case is None:
                assert len(q) == 0, on
                continue
            v = next(c for c in gds.report.scans[-1].classes if c.cls == 0)
            assert np.isin(data.poisoned, q).all(), on
            taken[on] = int((~np.isin(q, data.poisoned)).sum())
            assert (v.critical_layers == [FINE]) == on and ("fine view" in v.reason) == on
        if case is not None:
            assert taken[True] <= 3 and taken[True] < taken[False], taken
