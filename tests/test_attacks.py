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
