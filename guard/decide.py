"""The per-class decision, as pure functions of a class's statistics and the thresholds.

A class is judged in two steps. First from pass 2's out-of-spread counts alone (``screen_share``
and ``separation`` still None): a class whose samples leave the benign spread significantly more
often than its benign samples do is a *candidate*; a smaller excess is only watched. Significant
means a binomial p-value below ``max_false_alarm / n_classes``: with one test per class, the
chance that a scan makes any clean class a candidate stays under ``max_false_alarm`` however many
classes there are (Bonferroni), as far as the binomial null (the benign rate) holds. A candidate's
screen then measures how much of it sits far out along the suspect-vs-benign discriminant, and
the class holds a *separate cluster* when

* trusted reference: the far-out share reaches ``cluster_share``; or
* the far-out share reaches ``min_screen_share`` with a median z above ``separation_z``.

A trust-free reference is the hard half of each class, so the easy half sits somewhat apart from
it in every clean class: there a share alone never counts, only a far-out cluster (early in
training a clean class's easy half can lie a third of its screen out at a median z of 5-6). And
a class whose trust-free reference the model predicts as the label no more often than chance is
not judged at all: that half is then what the model has not learned of the class, and everything
it has learned (the easy half) would look like a separate cluster.

With a trusted reference a class also holds a separate cluster when its main direction of
variation puts more of its samples beyond every trusted sample than a clean class could
(``direction_p`` from :mod:`guard.direction`, below the same ``max_false_alarm / n_classes``): a
learned trigger that leaves the cosine to the class direction alone (so no out-of-spread excess)
but moves a sizeable part of the class along one direction is seen there. Found in the images
themselves (``direction_input``, :mod:`guard.inputs`), it stands even where the model has not
learned the class: the images do not depend on what the model has learned. With or without a
trusted set, each class's images are also tested against the other classes' images
(:func:`guard.direction.across_classes`; trust-free, the only direction test).

With a trusted reference a separate cluster is acted on only if the screen also puts more of its
samples beyond *every* reference sample of the class than a clean class could: ``beyond_p`` must be
below ``max_false_alarm / n_classes`` too. The count's bound (:func:`beyond_reference_p`) needs no
model of the features (only that a clean class's training and trusted samples are alike), so it
holds for any number of classes and any trusted-set size, for a direction chosen without the samples
it is held against; the model's discriminant is chosen by the trusted samples, so the scan
cross-fits it on halves of them (:mod:`guard.gate`). With few trusted samples it asks for a larger
cluster, with many it costs little.

    >>> from guard.decide import ClassStats, Verdict, decide
    >>> from guard.thresholds import Thresholds
    >>> decide(ClassStats(n_scanned=900, excess=0.08, p_value=1e-30, trusted=True, n_classes=10), Thresholds())[0]
    <Verdict.CANDIDATE: 'candidate'>
    >>> decide(ClassStats(900, 0.08, 1e-30, True, 10, screen_share=0.2, separation=4.0), Thresholds())[0]
    <Verdict.SEPARATE: 'separate cluster'>
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from guard.thresholds import Thresholds


class Verdict(str, Enum):
    """What a scan concluded about a class (the value is what reports show)."""

    CLEAN = "clean"
    WATCH = "no separation yet"             # some excess, not enough to act on
    CANDIDATE = "candidate"                 # significant excess: screen it (never a final verdict)
    SEPARATE = "separate cluster"           # quarantine its far-out part
    LIKE_QUARANTINED = "like quarantined"   # follow-up: look-alikes of what earlier scans quarantined
    PAPER = "flagged by paper rule"         # critical_rule="paper"

    def __str__(self) -> str:                # f-strings and str() give the value on every Python
        return self.value

    def __hash__(self) -> int:               # equal to its value, so it hashes as its value too
        return str.__hash__(self)


@dataclass(frozen=True)
class ClassStats:
    """One class's evidence: pass 2's out-of-spread excess and its binomial p-value, and how many
    classes the scan tests; after a screen, the far-out share of the screen and the far-out samples'
    median discriminant z."""

    n_scanned: int
    excess: float
    p_value: float
    trusted: bool
    n_classes: int
    screen_share: float | None = None
    separation: float | None = None
    train_fit: float = float("nan")        # share of its training samples the model predicts as it (nan: unknown)
    beyond_p: float | None = None          # after a screen: beyond_reference_p of its screen
    reference_fit: float = float("nan")    # share of its reference samples the model predicts as it (nan: unknown)
    direction_p: float | None = None       # guard.direction's p-value (corrected for sides and layers; trust-free: images only)
    direction_share: float = 0.0           # ... and the share of the class beyond every reference sample there
    direction_input: bool = False          # ... in an input view (guard.inputs), which does not depend on the model
    caught_p: float | None = None          # guard.elsewhere's p-value along the other classes' catches
    caught_share: float = 0.0              # ... the share of the class beyond every trusted sample there
    caught_from: tuple[int, ...] = ()      # ... the classes whose catches they were


def decide(s: ClassStats, t: Thresholds) -> tuple[Verdict, str]:
    """``(verdict, reason)`` for one class; CANDIDATE asks for a screen (``screen_share`` unset)."""
    bar = t.max_false_alarm / max(s.n_classes, 1)
    chance = t.min_class_fit / max(s.n_classes, 1)
    direction = ((s.trusted or s.direction_input) and s.direction_p is not None and s.direction_p < bar
                 and s.n_scanned >= t.min_class)
    if direction and s.direction_input:    # the images themselves: whatever the model has learned
        ref = "trusted image" if s.trusted else "image of the other classes"
        return Verdict.SEPARATE, (f"{s.direction_share:.0%} of the class's images lie beyond every {ref} along "
                                  f"their main direction of variation (p={s.direction_p:.2g} < {bar:.2g})")
    if s.train_fit < chance:               # (nan: no logits to tell, the rule does not apply)
        return Verdict.CLEAN, (f"the model predicts the label of {s.train_fit:.0%} of the class's training samples "
                               f"(chance {chance:.0%}): it has not learned the class, so no trigger in it is learned")
    if not s.trusted and s.reference_fit < chance:
        return Verdict.CLEAN, (f"the model predicts the label of {s.reference_fit:.0%} of the class's trust-free reference "
                               f"(chance {chance:.0%}): that high-loss half is what the model has not learned of the "
                               "class, not its benign look, so the class is not judged against it")
    if direction:
        return Verdict.SEPARATE, (f"{s.direction_share:.0%} of the class lies beyond every trusted sample along its main "
                                  f"direction of variation (p={s.direction_p:.2g} < {bar:.2g})")
    if s.trusted and s.caught_p is not None and s.caught_p < bar and s.n_scanned >= t.min_class:
        along = (f"the probe of class {s.caught_from[0]}'s catch" if len(s.caught_from) == 1
                 else f"the mean of the probes of the catches in classes {', '.join(map(str, s.caught_from))}")
        return Verdict.SEPARATE, (f"{s.caught_share:.0%} of the class lies beyond every trusted sample along {along} "
                                  f"(p={s.caught_p:.2g} < {bar:.2g})")
    candidate = s.excess >= t.min_excess and s.p_value < bar and s.n_scanned >= t.min_class
    if not candidate:
        if s.excess > 0 and s.p_value < t.watch_p:
            return Verdict.WATCH, f"excess {s.excess:.3f} with p={s.p_value:.2g} (candidate: p < {bar:.2g})"
        return Verdict.CLEAN, f"excess {s.excess:.3f} with p={s.p_value:.2g}"
    if s.screen_share is None or s.separation is None:
        return Verdict.CANDIDATE, f"excess {s.excess:.3f} with p={s.p_value:.2g} < {bar:.2g}: screen it"
    share, sep = s.screen_share, s.separation
    if not screen_separates(share, sep, s.trusted, t):
        return Verdict.WATCH, f"screened: {share:.0%} of the screen far out at a median z of {sep:.1f}, not separate"
    if s.trusted and share >= t.cluster_share:
        verdict, why = Verdict.SEPARATE, f"{share:.0%} of the screen far out (cluster_share {t.cluster_share})"
    else:
        verdict, why = Verdict.SEPARATE, f"{share:.0%} of the screen at a median z of {sep:.1f} (separation_z)"
    if s.trusted and s.beyond_p is not None and s.beyond_p >= bar:
        return Verdict.WATCH, (f"{why}, but no more of it lies beyond every reference sample than the reference's size "
                               f"allows a clean class (p={s.beyond_p:.2g}, acting needs p < {bar:.2g})")
    return verdict, why


def screen_separates(share: float, separation: float, trusted: bool, t: Thresholds) -> bool:
    """Whether a candidate's screen shows a separate cluster: with trusted data ``cluster_share`` of it far out,
    or ``min_screen_share`` far out at a median discriminant z above ``separation_z``. With trusted data
    :func:`decide` then also asks :func:`beyond_reference_p` whether the reference could tell it from a clean class."""
    return (trusted and share >= t.cluster_share) or (share >= t.min_screen_share and separation > t.separation_z)


def beyond_reference_p(beyond: int, n_screen: int, n_reference: int) -> float:
    """p-value of ``beyond`` of ``n_screen`` screened samples lying above the largest of the class's
    ``n_reference`` reference samples, if the class were clean.

    Distribution-free: were the class's training samples exchangeable with its reference samples,
    the share of them above the reference's maximum would be Beta(1, n_reference) (the maximum of
    n draws leaves a Beta(1, n) mass above it), so the screen's count is Beta-binomial(n_screen, 1,
    n_reference). With 10 reference samples a clean class puts more than 17 % of its samples above
    them one time in six; with 100, one time in 10^8. This is what a small trusted set can and
    cannot tell, whatever the features' distribution.

    Its tail has a closed form: ``beyond`` or more lie above the reference exactly when the ``beyond``
    largest of all ``n_screen + n_reference`` samples are screened ones, C(n_screen, beyond) /
    C(n_screen + n_reference, beyond). Computed as that product, it is exact to rounding at any size
    (``scipy.stats.betabinom.sf`` sums the mass function and returns 1 - cdf, which loses every p
    under about 1e-13, so the smallest of several such p-values was picked by rounding)."""
    if n_reference < 1 or n_screen < 1 or beyond <= 0:
        return 1.0
    if beyond > n_screen:
        return 0.0
    # given the i largest are screened ones, the next is one with chance (n_screen - i) / (n_screen + n_reference - i)
    left = n_screen + n_reference - np.arange(beyond, dtype=np.float64)
    return float(np.exp(np.log1p(-n_reference / left).sum()))


def binomial_p(excess: float, benign_rate: float, n: int, n_reference: int, t: Thresholds) -> float:
    """p-value of seeing the class's out-of-spread count if its samples left the spread as often as
    its benign ones (rate floored at ``min_benign_count`` reference samples' worth)."""
    from scipy import stats

    rate = max(float(benign_rate), t.min_benign_count / max(n_reference, 1))
    k = int(round((excess + benign_rate) * n))
    return float(stats.binom.sf(k - 1, n, rate))


def flag_cut(z: np.ndarray, floor: float) -> float:
    """Where a confirmed class's suspicion scores ``z`` are cut with ``Thresholds.flag_split``:
    between the two groups they split into with the least within-group variance (Otsu's threshold,
    1-D two-means), never below ``floor``. Parameter-free; the flagged samples are those above it.

    The scores are calibrated on trusted samples the model never trained on, and a class's benign
    *training* samples spread wider on them (a benign sd of 1.0-1.8 and a long upper tail: 6-13 % of
    a caught zoo target class above z = 2), so the fixed cut takes that tail with the poison. Where
    the cluster stands apart the two-group cut sits in the gap and leaves the tail; where there is no
    gap it falls below ``floor`` and ``floor`` holds, so it never flags more than ``z > floor``. But
    where the cluster's own lower tail reaches into the benign tail it leaves that part of the poison
    too, which is why it is not the default (measured in BENCHMARKS.md: the zoo's caught patches lose
    half their false alarms, a Blended row of the main table a twentieth of its poison).

    >>> flag_cut(np.array([-1.0, 0.0, 0.5, 2.5, 9.0, 10.0, 11.0]), 2.0)
    5.75
    >>> flag_cut(np.array([-1.0, 0.0, 1.0]), 2.0)
    2.0
    """
    s = np.sort(np.asarray(z, dtype=np.float64))
    n = len(s)
    if n < 2 or s[-1] <= floor:
        return float(floor)
    k = np.arange(1, n)                                   # the lower group is s[:k]
    low = np.cumsum(s)[:-1]
    m0, m1 = low / k, (s.sum() - low) / (n - k)
    between = k * (n - k) * (m1 - m0) ** 2                # n^2 x the between-group variance
    between[s[1:] == s[:-1]] = -1.0                       # no cut between equal scores
    j = int(np.argmax(between))
    return float(max(floor, (s[j] + s[j + 1]) / 2))


def give_back(z: np.ndarray, t: Thresholds) -> np.ndarray:
    """Which of a class's earlier-quarantined samples go back to training, scored ``z`` by the probe
    of a later scan that found the class separate again (a mask). A first catch's probe is fitted
    while the model has learned the trigger only in part, and takes a benign tail with the poison; a
    later probe draws the same cluster's edge sharper. Where it recognises the earlier catch as its
    own cluster (more of it above ``follow_z``, where the probe would take it now, than below
    ``flag_z``), the samples below ``flag_z`` are those no scan would take now: they are given back.
    Where it does not (most of the earlier catch below ``flag_z``: another trigger, such as a second
    of several patches), nothing is. No parameter beyond the two cuts; ``Thresholds.give_back``
    turns it off.

    >>> t = Thresholds()
    >>> give_back(np.array([9.0, 12.0, 8.0, 0.5, 1.2]), t).tolist()
    [False, False, False, True, True]
    >>> give_back(np.array([9.0, 0.1, 0.3, 0.5, 1.2]), t).tolist()
    [False, False, False, False, False]
    """
    z = np.asarray(z, dtype=np.float64)
    low = z < t.flag_z
    if not t.give_back or int((z > t.follow_z).sum()) <= int(low.sum()):
        return np.zeros(len(z), dtype=bool)
    return low


@dataclass(frozen=True)
class Take:
    """Which flagged samples a class gives up, and what the caller must be told."""

    indices: np.ndarray
    capped: bool
    warnings: tuple[str, ...]


def take(cls: int, idx: np.ndarray, susp: np.ndarray, n_scanned: int, already: int, t: Thresholds) -> Take:
    """Apply the per-class cap to the flagged ``idx`` (keeping the most suspicious; ``already``
    quarantined samples of the class count towards it) and the loud warning past ``class_drop_warn``."""
    total = n_scanned + already
    cap = max(int(np.floor(t.class_drop_cap * total)) - already, 0)
    notes, capped = [], len(idx) > cap
    if capped:
        notes.append(f"class {cls}: {len(idx)} of {n_scanned} samples flagged, above class_drop_cap="
                     f"{t.class_drop_cap}; quarantining only the {cap} most suspicious")
        idx = idx[np.argsort(-susp, kind="stable")[:cap]]
    if len(idx) and len(idx) + already > t.class_drop_warn * total:
        notes.append(f"class {cls}: quarantining {len(idx)} more of {n_scanned} samples "
                     f"({(len(idx) + already) / total:.0%} of the class in all), more than "
                     f"class_drop_warn={t.class_drop_warn}: check this class (a poisoned target class looks like this)")
    return Take(np.sort(idx), capped, tuple(notes))
