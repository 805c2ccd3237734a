"""Scan stage 1: the benign reference and its spread, per class and layer.

The reference samples are the trusted set, or trust-free a training subset cleaned by the loss
cue. Their class sums make the reference (C x D per layer); their leave-one-out cosines give each
class's benign spread, widened for small classes (:func:`small_sample`). One model pass reads the
reference when its features fit in ``keep_bytes`` (they are then kept for the later stages); a
second pass scores it otherwise, so memory never grows with the reference beyond that budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch.utils.data import Dataset

from guard.errors import GuardError
from guard.extract import Batch
from guard.reference import Reference
from guard.thresholds import Thresholds

Stream = Callable[..., Iterator[Batch]]   # Passes.stream: (dataset, layer names, indices, desc, stop_early=False)


def small_sample(n: int, z: float) -> float:
    """Widening of a benign spread estimated from ``n`` samples, so that a new benign sample passes
    ``z`` standard deviations as rarely as the normal tail says: Student's t quantile over the
    normal one, times the prediction-interval term sqrt(1 + 1/n). About 1.03 for n = 100 and 1.5
    for n = 10, where a handful of trusted samples would otherwise make a class's natural
    variety look like a separate cluster."""
    if n < 3:
        return 1.0
    q = stats.norm.cdf(z)
    return float(stats.t.ppf(q, n - 1) / z * np.sqrt(1.0 + 1.0 / n))


@dataclass
class Calibration:
    """Benign reference and the benign spread of scores per class and layer."""

    reference: Reference
    dataset: Dataset            # where the benign reference samples come from
    indices: np.ndarray | None  # which of its samples (None: all)
    labels: np.ndarray
    loo: np.ndarray             # (n, L) leave-one-out cosines
    in_sample: np.ndarray       # (n, L) in-sample cosines (the paper's calibration)
    mean: np.ndarray            # (C, L)
    std: np.ndarray             # (C, L)
    source: str
    fit: np.ndarray | None = None   # (C,) share of each class's reference samples the model predicts as it
    feats: list[torch.Tensor] | None = None   # (n, D_l) per layer: the reference's features, when kept
    predicted: np.ndarray | None = None       # (n,) the class the model predicts for each (None: no class scores)
    views: list[torch.Tensor] | None = None   # the reference's raw input views (guard.inputs), when kept

    @property
    def kept_bytes(self) -> int:
        """Host memory held by the kept features and views."""
        return sum(f.numel() * f.element_size() for f in (self.feats or []) + (self.views or []))

    def z(self, raw: np.ndarray, labels: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        """float32 z-scores, filled in chunks of rows: at N = 1,000,000 a float64 result and its
        temporaries would each be N x L x 8 bytes."""
        mean, std = self.mean.astype(np.float32), self.std.astype(np.float32)
        out = np.empty(raw.shape, dtype=np.float32)
        for s in range(0, len(raw), chunk):
            lab = labels[s:s + chunk]
            np.subtract(raw[s:s + chunk], mean[lab], out=out[s:s + chunk])
            out[s:s + chunk] /= std[lab]
        return out

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Positions in ``dataset`` of the reference samples at ``rows``."""
        return rows if self.indices is None else self.indices[rows]


def calibrate(stream: Stream, layers: list[str], source: tuple[Dataset, np.ndarray | None, str], num_classes: int,
              t: Thresholds, keep_bytes: float = 0, views: bool = False) -> Calibration:
    """A streaming pass over the reference samples ``source`` = (dataset, indices or None, name) for
    the class sums, then their leave-one-out and in-sample scores: from the features kept during
    that pass if they fit in ``keep_bytes``, else from a second pass. ``views``: the pass also keeps
    the images' raw input views where they fit in what the features leave of ``keep_bytes``."""
    dataset, indices, name = source
    ref: Reference | None = None
    labels: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    kept: list[list[torch.Tensor]] | None = []
    kept_views: list[list[torch.Tensor]] | None = [] if views else None
    size = view_size = 0
    known = True                           # every batch had class logits (else the fit is unknown)
    for b in stream(dataset, layers, indices, f"scan/{name}", views=lambda: kept_views is not None):
        ref = ref or Reference([f.shape[1] for f in b.feats], num_classes)
        ref.update(b.feats, b.labels)
        labels.append(b.labels.numpy())
        known = known and is_logits(b.logits, num_classes)
        if known:
            hits.append(b.logits.argmax(1).numpy())
        size += sum(f.numel() * f.element_size() for f in b.feats)
        if kept is not None and size > keep_bytes:
            kept = None                        # past the budget: the spread comes from a second pass
        elif kept is not None:
            kept.append(b.feats)
        view_size += sum(v.numel() * v.element_size() for v in b.views or [])
        if kept_views is not None and (b.views is None or size + view_size > keep_bytes):
            kept_views = None
        elif kept_views is not None:
            kept_views.append(b.views)
    if ref is None:
        raise GuardError(f"the {name} reference is empty; pass a trusted set with samples of every class")
    lab = np.concatenate(labels)
    counts = np.bincount(lab, minlength=num_classes)
    few = [int(c) for c in np.flatnonzero((counts > 0) & (counts < 2))]
    if few:
        raise GuardError(f"the {name} reference has fewer than 2 samples of classes {few} "
                         f"(counts {[int(counts[c]) for c in few]}); a class needs at least 2 to have a spread: "
                         + ("pass a trusted set with samples of these classes" if name == "trust-free"
                            else "add verified samples of these classes"))
    loo, ins = [], []
    again = (zip(kept, (torch.from_numpy(x) for x in labels)) if kept is not None else
             ((b.feats, b.labels) for b in stream(dataset, layers, indices, f"scan/{name}-calibrate")))
    for feats, lab_b in again:
        loo.append(ref.loo_score(feats, lab_b).numpy())
        ins.append(ref.score(feats, lab_b).numpy())
    loo_a, ins_a = np.concatenate(loo), np.concatenate(ins)
    mean = np.full((num_classes, len(layers)), np.nan)
    std = np.full((num_classes, len(layers)), np.nan)
    for c in np.flatnonzero(counts):
        mean[c] = loo_a[lab == c].mean(0)
        std[c] = np.maximum(loo_a[lab == c].std(0), t.std_floor) * small_sample(int(counts[c]), t.out_z)
    pred = np.concatenate(hits) if known else None
    fit = class_fit(pred == lab, lab, num_classes) if known else None
    feats = None if kept is None else [torch.cat([k[li] for k in kept]) for li in range(len(layers))]
    views_kept = None if not kept_views else [torch.cat([k[i] for k in kept_views]) for i in range(len(kept_views[0]))]
    return Calibration(ref, dataset, indices, lab, loo_a, ins_a, mean, std, name, fit, feats, pred, views=views_kept)


def is_logits(logits: torch.Tensor | None, num_classes: int) -> bool:
    """Whether a batch's model output is (batch, num_classes) class scores."""
    return logits is not None and logits.dim() == 2 and logits.shape[1] == num_classes


def class_fit(hit: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) share of each class's samples predicted as their label (nan for a class without samples)."""
    n = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(labels, weights=hit.astype(float), minlength=num_classes) / n


def trust_free_indices(stream: Stream, train: Dataset, kept: np.ndarray, head: str, num_classes: int,
                       per_class_seed: tuple[int, int]) -> np.ndarray:
    """Trust-free reference: a random training subset of twice ``per_class`` samples a class, keeping
    per class the half the model fits worst (so about ``per_class`` remain). Poisoned samples are
    fitted fastest (their trigger is an easy shortcut), so the high-loss half of a class is mostly
    benign even when poison is a majority of it. ``head``: any layer (the pass needs only the logits)."""
    pool = trust_free_pool(kept, num_classes, per_class_seed)
    losses, labels = [], []
    for b in stream(train, [head], pool, "scan/trust-free-pool"):
        losses.append(pool_loss(b, num_classes))
        labels.append(b.labels.numpy())
    return pool[hard_half(np.concatenate(losses), np.concatenate(labels))]


def trust_free_pool(kept: np.ndarray, num_classes: int, per_class_seed: tuple[int, int]) -> np.ndarray:
    """The random subset of the ``kept`` indices (sorted) that :func:`trust_free_indices` reads: twice
    ``per_class`` samples a class, drawn with ``seed``; ``per_class_seed`` = (per_class, seed)."""
    per_class, seed = per_class_seed
    rng = np.random.default_rng(seed)
    n = min(len(kept), per_class * num_classes * 2)
    return np.sort(rng.choice(kept, n, replace=False))


def pool_loss(b: Batch, num_classes: int) -> np.ndarray:
    """The cross-entropy of each sample of a pool batch (its logits on the host)."""
    if not is_logits(b.logits, num_classes):
        raise GuardError("trust-free mode needs the model to output (batch, num_classes) logits; "
                         "pass a trusted set instead")
    return torch.nn.functional.cross_entropy(b.logits, b.labels, reduction="none").numpy()


def hard_half(loss: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class, the samples whose ``loss`` is at least the class's median: the mask of the pool that
    :func:`trust_free_indices` keeps."""
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep[idx[loss[idx] >= np.median(loss[idx])]] = True
    return keep
