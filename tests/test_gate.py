"""The cross-fitted reference gate (guard.gate) on synthetic features: a trusted draw from one corner
of a clean class passes the gate held against the samples that chose its direction, and not the
cross-fitted one; on clean classes its p-value holds its rate; a cluster still passes it."""

import numpy as np
import torch

from guard.decide import beyond_reference_p
from guard.gate import _held_out_scores, split_gate
from guard.reference import unit

BAR = 1e-3 / 30          # max_false_alarm over 30 classes: the bar of the many-class data


def _class(n, rng, corner=0.0, share=0.0, shift=0.0):
    """Unit features (32-d, one layer) of ``n`` samples around a common mean: the first ``corner`` share
    in a corner of the class (moved along axis 1), the next ``share`` in a cluster (moved along axis 2)."""
    x = np.r_[4.0, np.zeros(31)] + rng.standard_normal((n, 32))
    k, m = int(corner * n), int(share * n)
    x[:k, 1] += 4.0
    x[k:k + m, 2] += shift
    return [unit(torch.from_numpy(x))]


def _naive_p(screen, ref):
    """The gate held against the same trusted samples whose spread chose the direction."""
    d_s, d_h = _held_out_scores(ref, ref, screen, 3.0, 1e-4)
    beyond = int((d_s > d_h.max()).sum())
    return beyond_reference_p(beyond, len(d_s), len(ref[0])), beyond / len(d_s)


def test_a_trusted_draw_from_one_corner_of_a_clean_class_passes_only_the_gate_that_chose_its_direction():
    rng = np.random.default_rng(1)
    screen = _class(300, rng, corner=0.25)           # a clean class: a quarter of it in a corner
    ref = _class(10, rng, corner=1.0)               # ten trusted samples, all from that corner
    naive, share = _naive_p(screen, ref)
    assert naive < BAR and share > 0.7              # the old gate: acted on
    test = split_gate(screen, ref, np.random.default_rng(0), 3.0, 1e-4)
    assert test.p > BAR and test.n_held == 5        # cross-fitted: not


def test_on_clean_classes_the_gate_holds_its_rate():
    rng = np.random.default_rng(1)
    ps = [split_gate(_class(200, rng, corner=0.3), _class(20, rng, corner=0.3), np.random.default_rng(s), 3.0,
                     1e-4).p for s in range(200)]
    assert sum(p < 0.05 for p in ps) <= 20          # at most 10 % where 5 % are allowed


def test_a_cluster_a_third_of_the_class_passes_with_a_hundred_trusted_samples():
    rng = np.random.default_rng(2)
    screen = _class(512, rng, share=1 / 3, shift=6.0)
    test = split_gate(screen, _class(100, rng), np.random.default_rng(0), 3.0, 1e-4)
    assert test.p < 1e-6 and test.share > 0.25 and test.n_held == 50


def test_too_few_trusted_samples_to_split_never_pass():
    rng = np.random.default_rng(3)
    screen = _class(100, rng, share=0.5, shift=8.0)
    assert split_gate(screen, _class(3, rng), np.random.default_rng(0), 3.0, 1e-4).p == 1.0
    test = split_gate(screen, _class(4, rng), np.random.default_rng(0), 3.0, 1e-4)
    assert test.n_held == 2 and test.p >= 2 * 2 / (101 * 102) > 1e-4   # never below the bar of ten classes
