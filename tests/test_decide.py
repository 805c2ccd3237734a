"""The per-class decision on synthetic statistics: every branch and its boundaries, no model."""

import numpy as np
import pytest

from guard.decide import ClassStats, Verdict, beyond_reference_p, binomial_p, decide, flag_cut, take
from guard.thresholds import Thresholds

T = Thresholds()
CAND = dict(n_scanned=900, excess=0.08, p_value=1e-30, n_classes=10)     # a clear candidate before its screen
BAR = T.max_false_alarm / 10


def verdict(trusted=True, **kw):
    return decide(ClassStats(**{**CAND, "trusted": trusted, **kw}), T)[0]


def test_first_step_candidate_watch_clean_and_their_boundaries():
    assert verdict() == Verdict.CANDIDATE
    # excess: min_excess is inclusive; just below it the class is only watched (p is still tiny)
    assert verdict(excess=T.min_excess) == Verdict.CANDIDATE
    assert verdict(excess=np.nextafter(T.min_excess, 0)) == Verdict.WATCH
    # p-value: max_false_alarm / n_classes is exclusive; up to watch_p the class is watched, above it clean
    assert verdict(p_value=np.nextafter(BAR, 0)) == Verdict.CANDIDATE
    assert verdict(p_value=BAR) == Verdict.WATCH
    assert verdict(p_value=np.nextafter(T.watch_p, 0)) == Verdict.WATCH
    assert verdict(p_value=T.watch_p) == Verdict.CLEAN
    # no excess at all is clean whatever the p-value
    assert verdict(excess=0.0) == Verdict.CLEAN
    # a class too small to act on is at most watched
    assert verdict(n_scanned=T.min_class) == Verdict.CANDIDATE
    assert verdict(n_scanned=T.min_class - 1) == Verdict.WATCH


def test_the_candidate_bar_divides_the_false_alarm_rate_among_the_classes_tested():
    # Bonferroni: with 40 classes a class needs p below max_false_alarm / 40, with 2 below / 2
    assert verdict(p_value=T.max_false_alarm / 40 * 1.01, n_classes=40) == Verdict.WATCH
    assert verdict(p_value=T.max_false_alarm / 40 * 0.99, n_classes=40) == Verdict.CANDIDATE
    assert verdict(p_value=T.max_false_alarm / 3, n_classes=2) == Verdict.CANDIDATE
    assert decide(ClassStats(**{**CAND, "trusted": True, "p_value": 5e-4}), Thresholds(max_false_alarm=0.01))[0] \
        == Verdict.CANDIDATE


def test_a_trusted_screen_separates_on_its_share_alone():
    assert verdict(screen_share=T.cluster_share, separation=0.5) == Verdict.SEPARATE
    assert verdict(screen_share=np.nextafter(T.cluster_share, 0), separation=0.5) == Verdict.WATCH
    # trust-free, the same share is not enough (the hard-half reference sits apart from every class)
    assert verdict(trusted=False, screen_share=T.cluster_share, separation=0.5) == Verdict.WATCH


@pytest.mark.parametrize("trusted", [True, False])
def test_a_far_out_cluster_separates_in_both_modes(trusted):
    small = T.min_screen_share
    assert verdict(trusted, screen_share=small, separation=np.nextafter(T.separation_z, 99)) == Verdict.SEPARATE
    assert verdict(trusted, screen_share=small, separation=T.separation_z) == Verdict.WATCH        # exclusive
    assert verdict(trusted, screen_share=np.nextafter(small, 0), separation=50.0) == Verdict.WATCH


def test_trust_free_a_large_share_short_of_separation_z_is_not_acted_on():
    """Early in training a clean class's easy half can lie a third of its screen out against the
    trust-free reference (its hard half) at a median z of 5-6 (two clean classes of the harm grid, 36 %
    at 5.6-5.7, lost 45-48 % of their samples to a rule that took such a share): a share, however
    large, separates trust-free only past separation_z."""
    assert verdict(False, screen_share=0.36, separation=5.7) == Verdict.WATCH
    assert verdict(False, screen_share=0.9, separation=T.separation_z) == Verdict.WATCH
    assert verdict(False, screen_share=0.36, separation=np.nextafter(T.separation_z, 99)) == Verdict.SEPARATE


def test_each_knob_moves_its_own_decision():
    s = ClassStats(900, 0.08, 1e-30, trusted=True, n_classes=10, screen_share=0.1, separation=4.0)
    assert decide(s, T)[0] == Verdict.WATCH
    assert decide(s, Thresholds(cluster_share=0.1))[0] == Verdict.SEPARATE
    assert decide(s, Thresholds(separation_z=3.9))[0] == Verdict.SEPARATE
    assert decide(s, Thresholds(separation_z=3.9, min_screen_share=0.2))[0] == Verdict.WATCH
    verdict_, reason = decide(s, Thresholds(cluster_share=0.1))
    assert "cluster_share" in reason and verdict_.value == "separate cluster" and str(verdict_) == "separate cluster"


def test_verdicts_are_their_report_strings():
    assert Verdict.SEPARATE == "separate cluster" and {"separate cluster": 1}[Verdict.SEPARATE] == 1
    assert f"{Verdict.WATCH}" == "no separation yet"


def test_binomial_p_floors_the_benign_rate_at_half_a_reference_sample():
    # no benign sample out of spread: the rate is 0.5 / 100, so 3 of 900 out is not significant
    assert binomial_p(3 / 900, 0.0, 900, 100, T) > 0.5
    assert binomial_p(40 / 900, 0.0, 900, 100, T) < BAR
    assert binomial_p(40 / 900, 0.0, 900, 100, Thresholds(min_benign_count=8)) > BAR


def test_take_caps_a_class_and_warns_past_the_warning_share():
    idx, susp = np.arange(100, 200), np.linspace(0, 1, 100)
    out = take(3, idx, susp, n_scanned=200, already=0, t=Thresholds(class_drop_cap=0.25, class_drop_warn=0.2))
    assert out.capped and len(out.indices) == 50 and set(out.indices) == set(range(150, 200))   # the most suspicious
    assert len(out.warnings) == 2 and "class_drop_cap" in out.warnings[0] and "class_drop_warn" in out.warnings[1]
    # samples quarantined by earlier scans count towards the cap
    out = take(3, idx, susp, n_scanned=150, already=40, t=Thresholds(class_drop_cap=0.25, class_drop_warn=0.25))
    assert len(out.indices) == int(0.25 * 190) - 40
    quiet = take(3, idx[:10], susp[:10], n_scanned=200, already=0, t=T)
    assert not quiet.capped and quiet.warnings == () and list(quiet.indices) == list(range(100, 110))


def test_flat_names_of_earlier_versions_still_set_what_they_set():
    from guard import GuardConfig

    t = GuardConfig(threshold_z=2.5, min_cluster=0.02, cluster_share=0.2).thresholds
    assert (t.out_z, t.screen_z, t.follow_z, t.filter_z) == (2.5,) * 4          # threshold_z drove all four
    assert (t.min_excess, t.min_screen_share, t.cluster_share) == (0.02, 0.02, 0.2)
    assert GuardConfig(cluster_share=0.2, thresholds={"cluster_share": 0.3}).thresholds.cluster_share == 0.3


def test_a_class_the_model_has_not_learned_is_not_judged():
    # a tail class early in training: its few samples far from its few trusted ones, but the model predicts
    # its label for none of them, so nothing in it is a learned trigger (measured: CIFAR-10-LT, epoch 3)
    unlearned = dict(CAND, screen_share=0.34, separation=3.3)
    assert verdict(**unlearned) == Verdict.SEPARATE                                  # fit unknown: no change
    assert verdict(**unlearned, train_fit=0.0) == Verdict.CLEAN
    assert verdict(**unlearned, train_fit=np.nextafter(T.min_class_fit / 10, 0)) == Verdict.CLEAN
    assert verdict(**unlearned, train_fit=T.min_class_fit / 10) == Verdict.SEPARATE   # chance itself passes
    assert decide(ClassStats(**{**CAND, **unlearned, "trusted": True, "train_fit": 0.0}),
                  Thresholds(min_class_fit=0))[0] == Verdict.SEPARATE                # 0: the rule is off
    assert "not learned" in decide(ClassStats(**{**CAND, "trusted": False, "train_fit": 0.02}), T)[1]


def test_beyond_reference_p_holds_its_rate_whatever_the_distribution():
    # a clean class: screen and reference drawn from the same (heavy-tailed) distribution; the share
    # of tests at p < 0.05 must be about 0.05 or less for 10 and for 100 reference samples
    rng = np.random.default_rng(0)
    for n_ref in (10, 100):
        p = []
        for _ in range(2000):
            ref, screen = rng.standard_t(2, n_ref), rng.standard_t(2, 256)
            p.append(beyond_reference_p(int((screen > ref.max()).sum()), 256, n_ref))
        assert np.mean(np.array(p) < 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 2000)
    # a shifted cluster of 30 % is clear with 100 reference samples, not with 10
    assert beyond_reference_p(154, 512, 100) < 1e-8
    assert beyond_reference_p(154, 512, 10) > 1e-2


def test_beyond_reference_p_is_the_exact_tail_down_to_the_smallest_p():
    """The chance that the ``k`` largest of ``n + m`` exchangeable samples are all screened ones, C(n, k) / C(n + m, k),
    checked against exact rationals; where it is tiny it still orders the tests: the screen of the trust-free Blended
    golden case (512 held out, 2,400 other-class rows) puts 132 and 255 rows beyond in two pairings, whose p-values
    (1e-107, 1e-220) the generic Beta-binomial survival function returned as the same 4e-12 and 4e-11 of rounding."""
    from fractions import Fraction
    from math import comb

    for k, n, m in ((1, 10, 5), (3, 256, 100), (30, 256, 100), (30, 441, 244), (154, 512, 100), (200, 512, 100),
                    (132, 512, 2400), (255, 512, 2400), (2000, 4900, 100), (512, 512, 10)):
        want = float(Fraction(comb(n, k), comb(n + m, k)))
        assert beyond_reference_p(k, n, m) == pytest.approx(want, rel=1e-12), (k, n, m)
    assert beyond_reference_p(255, 512, 2400) < 1e-200 < beyond_reference_p(132, 512, 2400) < 1e-100
    assert beyond_reference_p(0, 256, 100) == beyond_reference_p(-1, 256, 100) == 1.0     # nothing beyond: no evidence
    assert beyond_reference_p(257, 256, 100) == 0.0                                       # more than were screened
    assert beyond_reference_p(5, 256, 0) == beyond_reference_p(5, 0, 100) == 1.0          # nothing to compare with


def test_a_trusted_cluster_needs_more_beyond_every_reference_sample_than_a_clean_class_puts_there():
    sep = dict(screen_share=0.2, separation=4.0)
    assert verdict(**sep, beyond_p=BAR * 0.99) == Verdict.SEPARATE
    assert verdict(**sep, beyond_p=BAR) == Verdict.WATCH
    assert "reference's size" in decide(ClassStats(**{**CAND, "trusted": True, **sep, "beyond_p": 0.2}), T)[1]
    # trust-free references are not exchangeable with the training samples: the gate is not applied
    far = dict(screen_share=0.4, separation=9.0, beyond_p=0.5)
    assert verdict(trusted=False, **far) == Verdict.SEPARATE


def test_a_trust_free_reference_the_model_has_not_learned_judges_nothing():
    far = dict(screen_share=0.45, separation=9.0)
    assert verdict(trusted=False, **far, reference_fit=0.4) == Verdict.SEPARATE
    assert verdict(trusted=False, reference_fit=0.0) == Verdict.CLEAN           # not even a candidate
    assert "not learned of the class" in decide(ClassStats(**{**CAND, "trusted": False, "reference_fit": 0.05}), T)[1]
    assert verdict(trusted=True, reference_fit=0.0) == Verdict.CANDIDATE         # a trusted reference is not selected by loss


def test_a_trusted_main_direction_separates_below_the_same_bar_and_only_with_a_trusted_reference():
    quiet = dict(excess=0.0, p_value=1.0)                     # nothing out of spread: the first step says clean
    assert verdict(**quiet) == Verdict.CLEAN
    assert verdict(**quiet, direction_p=np.nextafter(BAR, 0), direction_share=0.3) == Verdict.SEPARATE
    assert verdict(**quiet, direction_p=BAR, direction_share=0.3) == Verdict.CLEAN
    assert verdict(False, **quiet, direction_p=1e-30, direction_share=0.3) == Verdict.CLEAN
    # a class too small to act on, or one the model has not learned, is not separated by it either
    assert verdict(**quiet, n_scanned=T.min_class - 1, direction_p=1e-30) != Verdict.SEPARATE
    assert verdict(**quiet, train_fit=0.01, direction_p=1e-30) == Verdict.CLEAN
    why = decide(ClassStats(**{**CAND, **quiet, "trusted": True, "direction_p": 1e-12, "direction_share": 0.27}), T)[1]
    assert "27% of the class lies beyond every trusted sample" in why and "p=1e-12" in why


def test_a_main_direction_in_the_images_stands_whatever_the_model_has_learned():
    quiet = dict(excess=0.0, p_value=1.0)
    found = dict(direction_p=1e-30, direction_share=0.3, direction_input=True)
    assert verdict(**quiet, train_fit=0.01, **found) == Verdict.SEPARATE          # the model has not learned the class
    assert verdict(**quiet, **{**found, "direction_p": np.nextafter(BAR, 0)}) == Verdict.SEPARATE
    assert verdict(**quiet, **{**found, "direction_p": BAR}) == Verdict.CLEAN    # the same bar
    assert verdict(False, **quiet, **{**found, "direction_input": False}) != Verdict.SEPARATE   # model layers: trusted only
    assert verdict(False, **quiet, **found) == Verdict.SEPARATE                   # trust-free: the images stand too
    why_tf = decide(ClassStats(**{**CAND, **quiet, "trusted": False, "train_fit": 0.01, **found}), T)[1]
    assert "beyond every image of the other classes" in why_tf
    assert verdict(**quiet, n_scanned=T.min_class - 1, **found) != Verdict.SEPARATE
    why = decide(ClassStats(**{**CAND, **quiet, "trusted": True, "train_fit": 0.01, **found}), T)[1]
    assert "30% of the class's images lie beyond every trusted image" in why


def test_flag_cut_sits_in_the_gap_and_never_flags_more_than_the_floor():
    rng = np.random.default_rng(0)
    # a benign bulk with a long upper tail (as trained samples sit against an unseen trusted reference)
    benign = np.concatenate([rng.normal(0, 1, 400), rng.exponential(1.5, 40) + 2.0])
    poison = rng.normal(10, 1, 200)
    z = np.concatenate([benign, poison])
    cut = flag_cut(z, T.flag_z)
    assert benign.max() < 12 and cut > T.flag_z
    assert (poison > cut).all()                                      # the cluster is taken whole ...
    assert (benign > cut).sum() < (benign > T.flag_z).sum() / 2      # ... with under half of the tail the floor takes
    # no separate cluster: the floor holds, so nothing more than `z > floor` is flagged
    for sample in (rng.normal(0, 1, 500), rng.exponential(1, 500), np.array([5.0]), np.array([]), np.full(9, 4.0)):
        c = flag_cut(sample, T.flag_z)
        assert c >= T.flag_z
        assert (sample > c).sum() <= (sample > T.flag_z).sum()
    assert flag_cut(rng.normal(0, 1, 500), T.flag_z) == T.flag_z
    # ties are never split: equal scores fall on one side
    tied = np.array([0.0] * 50 + [7.0] * 10 + [7.0] * 10)
    assert flag_cut(tied, T.flag_z) == 3.5
