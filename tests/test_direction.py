"""The main-direction test (guard.direction) on synthetic features: it finds a cluster that moves part
of a class along one direction, and on a clean class its p-value holds its rate."""

import numpy as np
import torch

from guard.decide import beyond_reference_p
from guard.direction import across_classes, direction_test, most_significant, project, top_direction
from guard.reference import unit


def _class(n, d, rng, shift=0.0, share=0.0):
    """Unit features of ``n`` samples around a common mean; a ``share`` of them moved by ``shift``
    along one direction orthogonal to the mean (a trigger that leaves the cosine to the class
    direction nearly alone)."""
    mean = np.zeros(d)
    mean[0] = 4.0
    x = mean + rng.standard_normal((n, d))
    moved = np.zeros(n, bool)
    moved[: int(share * n)] = True
    x[moved, 1] += shift
    return [unit(torch.from_numpy(x))], moved


def test_top_direction_is_the_first_principal_component():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5)) * np.array([5.0, 1, 1, 1, 1])
    mu, v = top_direction(torch.from_numpy(x))
    assert abs(float(v[0])) > 0.99 and abs(float(v.norm()) - 1) < 1e-9
    assert torch.allclose(mu, torch.from_numpy(x.mean(0)))


def test_a_third_of_a_class_moved_along_one_direction_is_found_and_is_what_lies_beyond():
    rng = np.random.default_rng(1)
    units, moved = _class(600, 32, rng, shift=5.0, share=1 / 3)
    ref, _ = _class(100, 32, rng)
    test = direction_test(units, ref)
    assert test.p < 1e-6 and test.layer == 0
    assert test.share > 0.2
    assert moved[test.beyond].mean() > 0.95          # what lies beyond is the moved part
    assert test.z[moved].mean() > test.z[~moved].mean() + 2


def test_half_a_class_moved_is_found_whole_whatever_sign_each_half_gives_its_direction():
    """Where the poison is about half of a class (an all-to-one attack at 10 % of the data), no statistic
    of a fit half tells the two ends of its direction apart, so the two halves can sign their directions
    apart. The pairings that sign them apart are tried too (``SPLIT_SHARE``): all of the moved half lies
    beyond every trusted sample in each of 8 draws (signed by skew alone, about half of it did in 7 of them)."""
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(300, 40, generator=g, dtype=torch.float64)
        x[150:, 0] += 8.0
        ref = torch.randn(50, 40, generator=g, dtype=torch.float64)
        test = direction_test([x], [ref], rng_seed=seed)
        assert test.p < 1e-6 and test.beyond[150:].all() and test.beyond[:150].mean() < 0.05, (seed, test.share)


def test_on_clean_classes_the_p_value_holds_its_rate_with_few_trusted_samples():
    rng = np.random.default_rng(2)
    ps = []
    for _ in range(200):
        units, _ = _class(120, 16, rng)
        ref, _ = _class(10, 16, rng)
        units.append(_class(120, 8, rng)[0][0])       # two layers: the correction covers both
        ref.append(_class(10, 8, rng)[0][0])
        ps.append(direction_test(units, ref).p)
    ps = np.array(ps)
    assert (ps < 0.05).mean() <= 0.05 + 0.03          # at most the nominal rate (plus binomial slack)
    assert (ps < 1e-3).sum() == 0


def test_deterministic_and_leaves_the_global_rng_alone():
    rng = np.random.default_rng(3)
    units, _ = _class(100, 16, rng, shift=2.0, share=0.3)
    ref, _ = _class(20, 16, rng)
    state = torch.get_rng_state()
    a, b = direction_test(units, ref, rng_seed=5), direction_test(units, ref, rng_seed=5)
    assert torch.equal(state, torch.get_rng_state())
    assert a.p == b.p and np.array_equal(a.beyond, b.beyond)
    assert direction_test([u[:3] for u in units], ref) is None     # too few to split
    assert direction_test(units, [r[:1] for r in ref]) is None


def test_a_test_of_the_first_layers_reads_the_projections_of_all_of_them():
    # the scan projects once and tests without its last view where that view is the most significant
    rng = np.random.default_rng(4)
    units, _ = _class(200, 16, rng, shift=3.0, share=0.25)
    ref, _ = _class(30, 16, rng)
    units += [_class(200, 8, rng)[0][0], _class(200, 12, rng, shift=6.0, share=0.3)[0][0]]
    ref += [_class(30, 8, rng)[0][0], _class(30, 12, rng)[0][0]]
    projections = project(units, ref, rng_seed=7)
    for k in (1, 2, 3):
        alone, prefix = direction_test(units[:k], ref[:k], rng_seed=7), most_significant(projections[:k], 30)
        assert (alone.p, alone.layer, alone.layer_p) == (prefix.p, prefix.layer, prefix.layer_p)
        assert np.array_equal(alone.beyond, prefix.beyond) and np.array_equal(alone.z, prefix.z)
    assert direction_test(units, ref, rng_seed=7).layer == 2 and most_significant(projections[:2], 30).layer == 0
    assert project([u[:3] for u in units], ref) is None


def test_where_p_values_underflow_the_test_with_more_beyond_is_the_most_significant():
    """A screen of 512 against 5,000 reference rows: 300 beyond every one of them at the first layer and 450 at
    the second are tails of about 1e-355 and 1e-594, both 0.0 as floats. The second layer is the more
    significant and is the one reported; a tie at 0.0 used to go to the first layer tested."""
    rng = np.random.default_rng(0)
    halves = np.arange(512) % 2 == 0
    ref = [(halves, rng.random(5000)), (~halves, rng.random(5000))]
    layers = []
    for k in (300, 450):
        proj = np.full(512, 0.5)
        proj[rng.choice(512, k, replace=False)] = 5.0
        layers.append((proj, ref))
    assert beyond_reference_p(300, 512, 5000) == beyond_reference_p(450, 512, 5000) == 0.0
    test = most_significant(layers, 5000)
    assert test.p == 0.0 and test.layer == 1 and int(test.beyond.sum()) == 450


def _classes(rng, own_spread=0.0, poisoned=None, shift=5.0, n_first=150, tail=0.0):
    """Ten classes of 150 features sharing one distribution, except that class c varies ``own_spread``
    times more along its own axis c + 2 (each class a little more like itself than like the rest);
    in class ``poisoned`` a third is moved ``shift`` along axis 1 (a trigger). Class 0 has ``n_first``
    features, and with ``tail`` its first 5 % lie ``tail`` further out along its own axis (a clean
    class with a heavier tail)."""
    x, labels, moved = [], [], []
    for c in range(10):
        n = n_first if c == 0 else 150
        f = rng.standard_normal((n, 24))
        f[:, 0] += 4.0
        f[:, c + 2] *= 1.0 + own_spread
        if c == 0 and tail:
            f[: n // 20, 2] = np.abs(f[: n // 20, 2]) + tail
        m = np.zeros(n, bool)
        if c == poisoned:
            m[: n // 3] = True
            f[m, 1] += shift
        x.append(f), labels.append(np.full(n, c)), moved.append(m)
    return unit(torch.from_numpy(np.concatenate(x))), np.concatenate(labels), np.concatenate(moved)


def test_across_classes_finds_the_class_with_a_trigger_against_the_other_classes():
    units, labels, moved = _classes(np.random.default_rng(4), poisoned=3)
    tests = across_classes(units, labels, 1e-3)
    assert sorted(tests) == list(range(10))
    assert tests[3].p < 1e-6 and moved[labels == 3][tests[3].beyond].mean() > 0.95
    assert min(t.p for c, t in tests.items() if c != 3) > 1e-3


def test_across_classes_does_not_act_on_classes_that_each_look_like_themselves():
    """Every class spreads wider along its own direction than the others do: each puts more of itself
    beyond all the other classes' features than the Beta-binomial bound allows a class exchangeable
    with them, but no more than the other classes put beyond theirs, so none passes. A trigger that
    moves a third of a class further out than the classes' own tails reach still does; one that moves
    it no further (5 sd, where these classes reach about 6) is not acted on: trust-free, the images
    cannot tell that from a class's own tail."""
    units, labels, _ = _classes(np.random.default_rng(5), own_spread=1.0)
    tests = across_classes(units, labels, 1e-3)
    bound = [beyond_reference_p(int(t.beyond.sum()), len(t.beyond), int((labels != c).sum())) for c, t in tests.items()]
    assert sum(b < 1e-3 for b in bound) >= 5           # the bound alone would act on most of them
    assert min(t.p for t in tests.values()) > 1e-3
    units, labels, moved = _classes(np.random.default_rng(5), own_spread=1.0, poisoned=7, shift=10.0)
    tests = across_classes(units, labels, 1e-3)
    assert tests[7].p < 1e-6 and min(t.p for c, t in tests.items() if c != 7) > 1e-3
    assert moved[labels == 7][tests[7].beyond].all()
    units, labels, _ = _classes(np.random.default_rng(5), own_spread=1.0, poisoned=7, shift=5.0)
    assert across_classes(units, labels, 0.0)[7].p < 1e-6      # its count alone stands out ...
    assert across_classes(units, labels, 1e-3)[7].p > 1e-3     # ... but its rows reach no further than the tails


def test_across_classes_does_not_act_on_a_larger_class_with_a_heavier_tail():
    """A class of 500 puts 5 % of itself a little further out along its own direction (a clean class
    whose fine structure differs, as a long-tailed subset's head class can): its count beyond the rest
    passes both count tests, but those rows reach no further than the other classes' own tails, so it
    is not acted on. The same class with a trigger on a third is, and what it takes is the trigger."""
    units, labels, _ = _classes(np.random.default_rng(6), own_spread=1.0, n_first=500, tail=3.0)
    assert across_classes(units, labels, 0.0)[0].p < 1e-3    # bar 0: nothing passes, nothing is re-counted
    assert min(t.p for t in across_classes(units, labels, 1e-3).values()) > 1e-3
    units, labels, moved = _classes(np.random.default_rng(6), own_spread=1.0, n_first=500, tail=3.0, poisoned=0,
                                    shift=10.0)
    tests = across_classes(units, labels, 1e-3)
    assert tests[0].p < 1e-6 and min(t.p for c, t in tests.items() if c != 0) > 1e-3
    assert moved[labels == 0][tests[0].beyond].all() and tests[0].share > 0.25
