"""Step 6b: the poison that unlearning exposes.

A scan can quarantine part of a class's poison and leave the rest, whose features sat too close to
the benign samples to be told apart; left in training, it teaches the trigger again. Unlearning
changes that: a leftover poisoned sample carries its label because of the trigger, so when the
trigger's pull is unlearned its margin (the label's logit over the best other logit) falls far
more than a benign sample's, which the model fits through content that unlearning keeps. So each
time the guard unlearns, every kept sample of a class with quarantined samples is measured twice,
before and after, and the fall of its margin is held against the same fall of the class's trusted
samples.

Calibrated as the reference gate (:func:`guard.decide.beyond_reference_p`): were the class's kept
samples exchangeable with its trusted ones, the share falling further than *every* trusted sample
would be Beta(1, n_ref) whatever the margins' distribution, so the count of such samples is held to
the Beta-binomial bound at ``max_false_alarm / classes``. Only a class that passes loses its
samples beyond the trusted extreme; a class whose poison was all caught keeps them (there is no
excess to find). Needs a trusted set: a trust-free reference is drawn from the training samples
being judged.

Off by default (``thresholds.unlearn_sweep``): the bound needs a clean class's *trained* samples to
lose margin like its trusted ones, which the model never fitted, and once the model fits its
training data they do not. In all-to-all BadNets runs (10k CIFAR-10, epochs 5-15 of 16), every
poisoned sample already quarantined, 24 class sweeps found 1-136 clean kept samples beyond every
trusted one where about 9 were due, and took 136 of one class (benchmarks/NOTES.md, "The unlearning
sweep, off by default"). The scan's follow-ups take a partial catch's leftovers instead.

Cost: two eval-mode passes over the kept samples of the quarantined classes and their trusted
samples (before and after unlearning), only when the guard unlearns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from guard.batches import Feed
from guard.decide import beyond_reference_p
from guard.remedy import eval_logits


def label_margins(model: nn.Module, dataset: Dataset, indices: np.ndarray, feed: Feed,
                  batch_size: int = 256) -> np.ndarray:
    """Eval-mode margin of each sample's carried label: its logit minus the largest other logit
    (positive: predicted as its label); float64 (n,), moved to the host once, when the pass ends."""
    out = []
    for logits, labels in eval_logits(model, dataset, indices, feed, batch_size):
        logits, labels = logits.float(), labels.to(logits.device, non_blocking=True)
        own = logits.gather(1, labels[:, None])[:, 0]
        other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
        out.append(own - other)
    return torch.cat(out).double().cpu().numpy() if out else np.empty(0)


@dataclass(frozen=True)
class SweepResult:
    """One class: of its ``n`` kept samples, ``beyond`` lost more margin than every one of its
    ``n_ref`` trusted samples; ``p`` is that count's p-value for a clean class. ``taken``: the
    samples quarantined (those beyond, or none when ``p`` is above the bar), ``score``: their fall in
    trusted standard deviations above the trusted mean, ``threshold``: the trusted extreme on that
    scale."""

    cls: int
    n: int
    n_ref: int
    beyond: int
    p: float
    taken: np.ndarray
    score: np.ndarray
    threshold: float


def sweep_class(cls: int, indices: np.ndarray, fall: np.ndarray, ref_fall: np.ndarray, bar: float) -> SweepResult:
    """Test one class. ``fall``: margin before minus margin after unlearning of its kept samples
    ``indices``; ``ref_fall``: the same for its trusted samples; ``bar``: the p-value below which the
    class counts as holding poison the scan left."""
    n, n_ref = len(fall), len(ref_fall)
    if n == 0 or n_ref < 2:
        return SweepResult(cls, n, n_ref, 0, 1.0, np.empty(0, np.int64), np.empty(0), float("nan"))
    mu, sd = float(ref_fall.mean()), max(float(ref_fall.std()), 1e-12)
    over = fall > ref_fall.max()
    p = beyond_reference_p(int(over.sum()), n, n_ref)
    take = over if p < bar else np.zeros(n, bool)
    return SweepResult(cls, n, n_ref, int(over.sum()), p, np.asarray(indices)[take].astype(np.int64),
                       (fall[take] - mu) / sd, (float(ref_fall.max()) - mu) / sd)


class Sweep:
    """Margins of the quarantined classes' kept and trusted samples before unlearning; ``after``
    measures them again and tests every class (:func:`sweep_class`)."""

    def __init__(self, model: nn.Module, feed: Feed, dataset: Dataset, kept: np.ndarray, kept_labels: np.ndarray,
                 trusted: Dataset, trusted_labels: np.ndarray, classes: list[int]) -> None:
        self.model, self.feed, self.dataset, self.trusted = model, feed, dataset, trusted
        self.kept = {c: np.asarray(kept)[kept_labels == c] for c in classes}
        self.ref = {c: np.flatnonzero(trusted_labels == c) for c in classes}
        self.before = {c: (self._margins(dataset, self.kept[c]), self._margins(trusted, self.ref[c])) for c in classes}

    def _margins(self, dataset: Dataset, idx: np.ndarray) -> np.ndarray:
        return label_margins(self.model, dataset, idx, self.feed) if len(idx) else np.empty(0)

    def after(self, bar: float) -> list[SweepResult]:
        results = []
        for c, (kept_before, ref_before) in self.before.items():
            kept_fall = kept_before - self._margins(self.dataset, self.kept[c])
            ref_fall = ref_before - self._margins(self.trusted, self.ref[c])
            results.append(sweep_class(c, self.kept[c], kept_fall, ref_fall, bar))
        return results

