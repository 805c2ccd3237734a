"""Steps 2-3: streaming references and the critical-layer rules."""

import numpy as np
import torch

from guard.locate import excess_share, guard_layers, paper_window
from guard.reference import Reference, unit


def test_streaming_reference_equals_one_shot_fit():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(50, 6, generator=g), torch.randn(50, 3, generator=g)]
    labels = torch.arange(50) % 4
    whole = Reference([6, 3], 4)
    whole.update(feats, labels)
    stream = Reference([6, 3], 4)
    for s in range(0, 50, 7):
        stream.update([f[s:s + 7] for f in feats], labels[s:s + 7])
    for a, b in zip(whole.sums, stream.sums):
        assert torch.allclose(a, b)
    assert torch.equal(whole.counts, stream.counts)


def test_scores_are_cosines_and_loo_excludes_the_sample():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(30, 5, generator=g)
    y = torch.zeros(30, dtype=torch.long)
    ref = Reference([5], 1)
    ref.update([f], y)
    mean = unit(f.double()).mean(0)
    expected = torch.nn.functional.cosine_similarity(f.double(), mean[None], dim=1)
    assert torch.allclose(ref.score([f], y)[:, 0].double(), expected, atol=1e-5)
    others = (unit(f.double()).sum(0) - unit(f.double())[0]) / 29
    loo0 = torch.nn.functional.cosine_similarity(f[:1].double(), others[None], dim=1)
    assert torch.allclose(ref.loo_score([f], y)[0, 0].double(), loo0[0], atol=1e-5)


def test_paper_window_is_after_largest_rise_in_second_half():
    sim = np.array([0.5, 0.9, 0.6, 0.62, 0.64, 0.8, 0.82, 0.83])   # big rise at 1 is in the first half
    assert paper_window(sim) == [3, 4, 5]
    assert paper_window(np.array([0.3])) == [0]


def test_guard_layers_pick_largest_excess_first():
    z_train = np.zeros((100, 4))
    z_train[:30, 2] = -6          # 30 % of the class far out at layer 2
    z_train[:10, 1] = -6          # 10 % at layer 1
    z_benign = np.zeros((20, 4))
    ex, base = excess_share(z_train, z_benign, 3.0)
    assert np.allclose(ex, [0, 0.1, 0.3, 0]) and np.allclose(base, 0)
    assert guard_layers(ex, 2) == [2, 1]


def test_small_trusted_sets_widen_the_benign_spread():
    from guard.calibrate import small_sample
    f = [small_sample(n, 3.0) for n in (5, 10, 20, 100, 1000)]
    assert all(a > b for a, b in zip(f, f[1:]))            # fewer samples, wider spread
    assert 1.35 < f[1] < 1.5 and 1.0 < f[3] < 1.05 and f[4] < 1.005


def test_calibration_z_is_float32_and_chunked_exactly():
    from guard.calibrate import Calibration
    g = np.random.default_rng(0)
    mean, std = g.normal(size=(3, 4)), g.uniform(0.5, 2.0, size=(3, 4))
    cal = Calibration(None, None, None, np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros((0, 4)), mean, std,
                      "trusted")
    raw = g.normal(size=(10, 4)).astype(np.float32)
    lab = g.integers(0, 3, 10).astype(np.int32)
    z = cal.z(raw, lab, chunk=3)                         # 4 chunks, the last one short
    assert z.dtype == np.float32 and z.shape == raw.shape
    assert np.allclose(z, (raw - mean[lab]) / std[lab], atol=1e-5)
