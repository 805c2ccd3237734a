"""Sampled scans (``GuardConfig.scan_sample_per_class``): a scan first scores a random sample of each class, and
is redone over every kept sample wherever that sample acts.

The promise: every quarantine, give-back and remedy a sampled scan applies comes from a scan of every kept sample,
exactly as without the option. That rescan reads what the sample's scan read (:class:`~guard.scan.Reuse`: the
sample's features and the trusted calibration, by the same model), so it forwards only the samples the sample left
out. What a sample changes is only when a scan acts on nothing: its classes were judged
on at most ``per_class`` samples each, so a class whose poison a whole scan would just find can pass unseen (the
candidate test's power grows with the poisoned samples in the sample; measured in BENCHMARKS.md). The first scan
is always whole, since the guard learns the labels by reading the items; later scans sample by those labels.
"""

from __future__ import annotations

import numpy as np

from guard.decide import Verdict, screen_separates
from guard.scan import ScanResult
from guard.thresholds import Thresholds

_ACTS = (Verdict.SEPARATE, Verdict.PAPER)   # a follow-up (like quarantined) acts only where it flags samples


def class_sample(kept: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices: at most ``per_class`` of the ``kept`` indices of each class, drawn by ``rng``, and every kept
    index whose label (``labels``, aligned with ``kept``; -1: not read yet) is unknown. ``None`` where the sample
    would hold every kept index, or no label is known yet (the scan is then whole).

    >>> kept = np.arange(10); labels = np.array([0] * 6 + [1] * 3 + [-1])
    >>> class_sample(kept, labels, 2, np.random.default_rng(0)).tolist()
    [3, 4, 6, 8, 9]
    >>> class_sample(kept, labels, 6, np.random.default_rng(0)) is None
    True
    """
    known = labels >= 0
    if not known.any():
        return None
    parts = [kept[~known]]
    for c in np.unique(labels[known]):
        idx = kept[labels == c]
        parts.append(idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False))
    sample = np.sort(np.concatenate(parts)).astype(np.int64)
    return sample if len(sample) < len(kept) else None


def acting_classes(res: ScanResult, t: Thresholds) -> list[int]:
    """The classes a sampled scan acts on: it flags or gives back samples of them, finds them separate, or the
    paper rule flags them, or a class's screen separates and only the reference-size test held it back
    (:func:`~guard.decide.screen_separates`): that test's power grows with the screen, which a sample shrinks. An
    unscreened class (share 0) never separates: both shares it is held to are above 0."""
    trusted = res.calibration_source == "trusted"
    return sorted(c.cls for c in res.classes
                  if c.n_flagged or c.n_released or c.verdict in _ACTS
                  or (c.verdict == Verdict.WATCH and screen_separates(c.screen_share, c.separation, trusted, t)))


def acts(res: ScanResult, t: Thresholds) -> bool:
    """Whether a sampled scan asks for a whole one: it would change something, or it acts on a class
    (:func:`acting_classes`)."""
    return bool(len(res.flagged) or len(res.released) or acting_classes(res, t))
