"""The red-team attacks: reproducible, all-to-one, ground truth returned."""

import numpy as np
import pytest

from guard.attacks import BadNets, Blended, WaNet, make_attack


@pytest.fixture
def data():
    g = np.random.default_rng(0)
    return g.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), np.arange(200) % 10


@pytest.mark.parametrize("name", ["badnets", "blended", "wanet"])
def test_poison_is_reproducible_and_relabels_to_target(data, name):
    x, y = data
    a = make_attack(name, target=3, rate=0.1, seed=5).poison(x, y)
    b = make_attack(name, target=3, rate=0.1, seed=5).poison(x, y)
    assert len(a.poisoned) == 20 and np.array_equal(a.poisoned, b.poisoned)
    assert np.array_equal(a.images, b.images)
    assert (y[a.poisoned] != 3).all() and (a.labels[a.poisoned] == 3).all()
    clean = np.setdiff1d(np.arange(200), a.poisoned)
    assert np.array_equal(a.images[clean], x[clean]) and np.array_equal(a.labels[clean], y[clean])
    assert (a.images[a.poisoned] != x[a.poisoned]).any(axis=(1, 2, 3)).all()


def test_trigger_shapes(data):
    x, _ = data
    patched = BadNets(size=3).trigger(x[:2])
    assert (patched[:, -4:-1, -4:-1] != x[:2, -4:-1, -4:-1]).any()
    assert np.array_equal(patched[:, :20, :20], x[:2, :20, :20])
    assert np.abs(Blended(alpha=0.2).trigger(x[:2]).astype(int) - x[:2]).max() <= 52
    assert np.abs(WaNet(strength=0.0).trigger(x[:2]).astype(int) - x[:2]).max() <= 1


def test_bad_attack_arguments(data):
    x, y = data
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("trojan")
    with pytest.raises(ValueError, match="rate"):
        BadNets(rate=1.5).poison(x, y)
    with pytest.raises(ValueError, match="uint8"):
        BadNets().poison(x.astype(np.float32), y)


def test_all_to_all_relabels_each_sample_to_the_next_class(data):
    x, y = data
    a = make_attack("all2all", rate=0.1, seed=5).poison(x, y)
    assert len(a.poisoned) == 20
    assert np.array_equal(a.labels[a.poisoned], (y[a.poisoned] + 1) % 10)
    assert len(np.unique(y[a.poisoned])) > 3                 # no single source or target class
    tx, ty = make_attack("all2all").triggered_test(x, y)
    assert len(tx) == len(x)                                 # every test image has a different target


def test_clean_label_sig_keeps_labels_and_poisons_only_the_target_class(data):
    x, y = data
    a = make_attack("sig", target=3, rate=0.05, seed=5).poison(x, y)
    assert len(a.poisoned) == 10 and (y[a.poisoned] == 3).all()
    assert np.array_equal(a.labels, y)                       # clean label: nothing relabelled
    diff = a.images[a.poisoned].astype(int) - x[a.poisoned]
    assert np.abs(diff).max() <= 20 and (diff != 0).any()
    with pytest.raises(ValueError, match="only 20 are in target class 3"):
        make_attack("sig", target=3, rate=0.2).poison(x, y)


def test_the_trigger_zoo_is_reproducible_varied_and_within_its_ranges(data):
    from guard.attacks import ZOO_FAMILIES, Blended, Frequency, Patch, WaNet, trigger_zoo

    x, y = data
    zoo = trigger_zoo(seed=3, n=40)
    assert [repr(a) for a in zoo] == [repr(a) for a in trigger_zoo(seed=3, n=40)]
    assert [repr(a) for a in zoo] != [repr(a) for a in trigger_zoo(seed=4, n=40)]
    assert {a.name for a in zoo} == {"patch", "blended", "wanet", "frequency"} and len(ZOO_FAMILIES) == 4
    for a in zoo:
        assert 0.03 <= a.rate <= 0.10 and 0 <= a.target < 10
        if isinstance(a, Patch):
            assert 2 <= a.size <= 8 and all(0 <= f <= 1 for f in a.at)
        elif isinstance(a, Blended):
            assert 0.05 <= a.alpha <= 0.25 and a.kind in ("noise", "smooth")
        elif isinstance(a, WaNet):
            assert 3 <= a.k <= 6 and 0.5 <= a.strength <= 1.0
        else:
            assert isinstance(a, Frequency) and 8 <= a.delta <= 24 and 1 <= a.waves <= 3
        res = a.poison(x, y)
        assert len(res.poisoned) == round(a.rate * len(y)) and (res.labels[res.poisoned] == a.target).all()
        changed = (res.images[res.poisoned] != x[res.poisoned]).any(axis=(1, 2, 3))
        assert changed.mean() >= 0.9, a           # a trigger that leaves images as they were is no trigger


def test_zoo_trigger_shapes(data):
    from guard.attacks import Frequency, Patch

    x, _ = data
    centre = Patch(size=4, at=(0.5, 0.5), style="binary", pattern_seed=1).trigger(x[:2])
    assert np.array_equal(centre[:, :14], x[:2, :14]) and np.array_equal(centre[:, 18:], x[:2, 18:])
    assert set(np.unique(centre[:, 14:18, 14:18])) <= {0, 255}
    corner = Patch(size=2, at=(0.0, 1.0), style="colour").trigger(x[:2])
    assert np.array_equal(corner[:, 2:], x[:2, 2:]) and np.array_equal(corner[:, :, :30], x[:2, :, :30])
    wave = Frequency(delta=10, waves=2).trigger(np.full((1, 32, 32, 3), 128, np.uint8)).astype(int) - 128
    assert np.abs(wave).max() == 10 and abs(wave.mean()) < 2           # a zero-mean pattern at amplitude delta
    with pytest.raises(ValueError, match="style"):
        Patch(style="stripes")
    from guard.attacks import make_attack, trigger_zoo

    assert repr(make_attack("zoo:0:7")) == repr(trigger_zoo(0, 8)[7])
    assert make_attack("zoo:0:7", target=2, rate=0.05).target == 2
    with pytest.raises(ValueError, match="zoo:SEED:INDEX"):
        make_attack("zoo:x")


def test_adaptive_blend_trains_on_partial_triggers_with_covers_and_tests_on_the_whole_one(data):
    from guard.attacks import AdaptiveBlend, blend_pattern
    x, y = data
    atk = AdaptiveBlend(target=3, rate=0.05, cover_rate=0.05, seed=5)
    a, b = atk.poison(x, y), AdaptiveBlend(target=3, rate=0.05, cover_rate=0.05, seed=5).poison(x, y)
    assert len(a.poisoned) == 10 and len(a.cover) == 10 and not np.intersect1d(a.poisoned, a.cover).size
    assert np.array_equal(a.images, b.images) and np.array_equal(a.cover, b.cover)
    assert (a.labels[a.poisoned] == 3).all() and np.array_equal(a.labels[a.cover], y[a.cover])  # covers keep labels
    clean = np.setdiff1d(np.arange(200), np.concatenate([a.poisoned, a.cover]))
    assert np.array_equal(a.images[clean], x[clean])
    pattern = blend_pattern(x.shape[1:], atk.pattern_seed)
    for i in np.concatenate([a.poisoned, a.cover]):
        moved = (a.images[i] != x[i]).any(-1)            # pixels the trigger touched
        cells = moved.reshape(4, 8, 4, 8).any(axis=(1, 3))   # 16 cells of 8 x 8
        assert cells.sum() == 8                          # half the pieces, as published
        blended = np.rint(x[i] + 0.15 * (pattern - x[i]))
        assert np.abs(a.images[i][moved].astype(int) - blended[moved]).max() <= 1
    full = atk.trigger(x[:5])
    assert (full != x[:5]).any(-1).mean() > 0.9          # the test trigger covers the whole image
    assert np.abs(full.astype(int) - np.rint(x[:5] + 0.2 * (pattern - x[:5]))).max() <= 1


def test_adaptive_patch_carries_one_faint_patch_per_sample_and_tests_with_two_at_full_opacity(data):
    from guard.attacks import AdaptivePatch
    x, y = data
    atk = AdaptivePatch(target=0, rate=0.1, cover_rate=0.1, seed=1)
    a = atk.poison(x, y)
    assert len(a.poisoned) == 20 and len(a.cover) == 20 and np.array_equal(a.labels[a.cover], y[a.cover])
    corners = [(slice(1, 7), slice(1, 7)), (slice(1, 7), slice(25, 31)), (slice(25, 31), slice(1, 7)),
               (slice(25, 31), slice(25, 31))]
    seen = []
    for i in np.concatenate([a.poisoned, a.cover]):
        moved = (a.images[i] != x[i]).any(-1)
        hit = [moved[r, c].any() for r, c in corners]
        assert sum(hit) == 1                             # one patch per training sample
        outside = moved.copy()
        for r, c in corners:
            outside[r, c] = False
        assert not outside.any()
        seen.append(hit.index(True))
    assert set(seen) == {0, 1, 2, 3}                     # all four patches are used
    test = atk.trigger(x[:4])
    moved = (test != x[:4]).any(-1)
    assert moved[:, 1:7, 1:7].any() and moved[:, 25:31, 1:7].any()       # patches 0 and 2
    assert not moved[:, 1:7, 25:31].any() and not moved[:, 25:31, 25:31].any()
    assert np.array_equal(AdaptivePatch()._paste(x[:1], 0, 1.0)[0, 1:7, 1:7],
                          atk.trigger(np.zeros_like(x[:1]))[0, 1:7, 1:7])  # test patch = pattern at opacity 1
    with pytest.raises(ValueError, match="test_patches"):
        AdaptivePatch(test_patches=(5,))


def test_wanet_noise_mode_adds_twice_as_many_noisy_warps_with_true_labels(data):
    from guard.attacks import WaNet
    x, y = data
    plain = make_attack("wanet", target=2, rate=0.05, seed=3).poison(x, y)
    noisy = make_attack("wanet_noise", target=2, rate=0.05, seed=3).poison(x, y)
    assert len(plain.cover) == 0 and np.array_equal(plain.poisoned, noisy.poisoned)
    assert np.array_equal(plain.images[plain.poisoned], noisy.images[noisy.poisoned])   # same trigger
    assert len(noisy.cover) == 2 * len(noisy.poisoned) and np.array_equal(noisy.labels[noisy.cover], y[noisy.cover])
    fixed = WaNet().trigger(x[noisy.cover])
    crossed = noisy.images[noisy.cover]
    assert (crossed != x[noisy.cover]).any() and (crossed != fixed).mean() > 0.3    # warped, but not the trigger


def test_label_consistent_perturbs_target_images_within_eps_and_stamps_the_corners():
    from torch import nn

    from guard.attacks import LabelConsistent
    g = np.random.default_rng(0)
    x, y = g.integers(0, 256, (120, 16, 16, 3), dtype=np.uint8), np.arange(120) % 4
    surrogate = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16 * 3, 4))
    atk = LabelConsistent(target=1, rate=0.1, seed=0, surrogate=surrogate, steps=5)
    a = atk.poison(x, y)
    assert len(a.poisoned) == 12 and (y[a.poisoned] == 1).all() and np.array_equal(a.labels, y)
    corner = np.zeros((16, 16), bool)
    for t in (1, 12):
        for s in (1, 12):
            corner[t:t + 3, s:s + 3] = True
    d = a.images[a.poisoned].astype(int) - x[a.poisoned]
    assert np.abs(d[:, ~corner]).max() <= round(255 * 16 / 255) + 1 and (d[:, ~corner] != 0).mean() > 0.5
    assert (a.images[a.poisoned][:, corner] % 255 == 0).all()          # the checkerboards, full amplitude
    import torch
    with torch.no_grad():                                # PGD pushed the images away from their class
        def loss(imgs):
            t = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
            return nn.functional.cross_entropy(surrogate(t), torch.full((len(t),), 1)).item()
        assert loss(a.images[a.poisoned]) > loss(atk.trigger(x[a.poisoned]))
    b = LabelConsistent(target=1, rate=0.1, seed=0, surrogate_epochs=1).poison(x, y)   # trains its own surrogate
    assert np.array_equal(b.poisoned, a.poisoned) and not np.array_equal(b.images, x)
    with pytest.raises(ValueError, match="surrogate"):
        LabelConsistent(target=1).train_trigger(x[:2], np.random.default_rng(0))


def test_every_attack_can_be_named_in_a_run_config():
    from typing import get_args

    from guard.attacks import ATTACKS
    from guard.runconfig import AttackSection
    assert set(get_args(AttackSection.model_fields["name"].annotation)) == set(ATTACKS)
    cfg = AttackSection(name="adaptive_blend", rate=0.05, kwargs={"cover_rate": 0.05})
    assert make_attack(cfg.name, rate=cfg.rate, **cfg.kwargs).cover_rate == 0.05
