"""The input images as two more views for the direction test, read without the model.

An additive trigger (a patch, a blended pattern, a frequency pattern) changes every poisoned image
the same way, whatever the model has learned of it so far; in raw pixels natural variation
(brightness, colour, layout) hides that change. Two views take the natural variation out:

* :data:`FINE` (``"<input>"``), the high-pass: each pixel minus the mean of its 3 x 3
  neighbourhood, per channel. It keeps fine structure only: natural edges, which differ from image
  to image, and a patch's or noise pattern's own, which is the same in every poisoned image.
* :data:`COARSE` (``"<input:coarse>"``), the whitened thumbnail: each channel average-pooled to
  :data:`COARSE_SIDE` a side, its own mean removed (so a global brightness shift is no signal), and
  whitened by the within-class covariance of the scan's screen (Ledoit-Wolf shrinkage). Natural
  layout varies along a few strong directions, which whitening damps; a smooth blended image is the
  same small shift in every poisoned image, along directions natural images seldom take, which
  whitening brings out. The screen is the data the test runs on, so the trusted images it is
  compared with are out of sample: at worst they look more spread, and the test is conservative.

A class that holds poison then has the trigger as its main direction of variation in a view, and
the direction test (:mod:`guard.direction`) decides with its own distribution-free calibration
against the class's trusted images, as at any layer (the views count as layers in its correction).

What they do not see: sample-specific or geometric triggers (WaNet's warps), and fine structure
once random crops move it between reads (the scan reads the data without augmentation, see
``scan_dataset``).

Only 4-D floating image batches ``(B, C, H, W)`` have these views; anything else (tokens, tables,
dicts) has none. Images larger than :data:`MAX_SIDE` are average-pooled to it before the high-pass,
which keeps the fine view's size bounded (C x 64 x 64 at most).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from guard.batches import BatchAdapter
from guard.reference import unit

MAX_SIDE = 64
COARSE_SIDE = 8
FINE = "<input>"                # how reports name the views among the layers
COARSE = "<input:coarse>"
NAMES = (FINE, COARSE)


def high_pass(x: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` float32: each pixel of ``x`` (B, C, H, W) minus its 3 x 3 neighbourhood mean (edges
    replicated), after pooling to at most :data:`MAX_SIDE` a side."""
    x = x.float()
    if x.shape[2] > MAX_SIDE or x.shape[3] > MAX_SIDE:
        x = torch.nn.functional.adaptive_avg_pool2d(x, (min(x.shape[2], MAX_SIDE), min(x.shape[3], MAX_SIDE)))
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = xp[..., :, :-2] + xp[..., :, 1:-1] + xp[..., :, 2:]            # the 3 x 3 box sum, separably:
    blur = (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]) / 9   # 3x faster than avg_pool2d here
    return (x - blur).flatten(1)


def coarse(x: torch.Tensor) -> torch.Tensor:
    """``(B, C * s * s)`` float32: each channel of ``x`` (B, C, H, W) average-pooled to ``s`` =
    min(:data:`COARSE_SIDE`, H, W) a side, less its own mean."""
    x = torch.nn.functional.adaptive_avg_pool2d(x.float(), (min(x.shape[2], COARSE_SIDE), min(x.shape[3], COARSE_SIDE)))
    return (x - x.mean(dim=(2, 3), keepdim=True)).flatten(1)


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """The Ledoit-Wolf shrunk covariance of the rows of ``x`` (already centred), float64: the sample
    covariance pulled toward a multiple of the identity by the amount that minimises the expected
    squared error (Ledoit and Wolf, 2004; the estimate of ``sklearn.covariance.ledoit_wolf``)."""
    x = x.double()
    n, p = x.shape
    s = x.T @ x / n
    mu = float(torch.trace(s)) / p
    sq = x.square()
    beta = (float((sq.sum(1) ** 2).sum()) / n - float(s.square().sum())) / (n * p)
    delta = float((s - mu * torch.eye(p, dtype=s.dtype)).square().sum()) / p
    shrink = 0.0 if delta <= 0 else min(beta, delta) / delta
    return (1.0 - shrink) * s + shrink * mu * torch.eye(p, dtype=s.dtype)


class InputViews:
    """The unit features of both views for one scan: :data:`FINE` as it is, :data:`COARSE` whitened
    by the within-class covariance of ``screen`` (its raw coarse view, rows labelled ``labels``)."""

    names = NAMES

    def __init__(self, screen: torch.Tensor, labels: np.ndarray) -> None:
        centred = screen.double().clone()
        for c in np.unique(labels):
            m = torch.from_numpy(labels == c)
            centred[m] -= centred[m].mean(0)
        e, v = torch.linalg.eigh(ledoit_wolf(centred))
        self.whiten = (v / e.clamp_min(1e-12).sqrt()).float()

    def units(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        """``raw`` as :func:`read_views` returns it -> unit features, one per view of :data:`NAMES`."""
        return [self.view(raw, k) for k in range(len(NAMES))]

    def view(self, raw: list[torch.Tensor], k: int) -> torch.Tensor:
        """View ``k`` of :meth:`units` alone."""
        return unit(raw[0]) if k == 0 else unit(raw[1] @ self.whiten)


def is_image(inputs: object) -> bool:
    return isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and inputs.is_floating_point() \
        and min(inputs.shape[2:]) >= 3


def raw_views(inputs: object) -> list[torch.Tensor] | None:
    """The raw views of one batch of inputs, per sample: high-passed (:func:`high_pass`) and coarse
    (:func:`coarse`, not yet whitened); None when the inputs are not an image batch. Each sample's
    rows depend on that sample alone, so views computed batch by batch in any grouping are the same."""
    if not is_image(inputs):
        return None
    return [high_pass(inputs), coarse(inputs)]


def view_shape(inputs: torch.Tensor) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image batch's images as the fine view holds them (after :func:`high_pass`'s pooling)."""
    c, h, w = inputs.shape[1:]
    return int(c), min(int(h), MAX_SIDE), min(int(w), MAX_SIDE)


def fine_shape(dataset: Dataset, position: int, adapter: BatchAdapter) -> tuple[int, int, int] | None:
    """:func:`view_shape` of one item's image, read once; None when the item's input is not an image."""
    inputs, _ = adapter.split(next(iter(DataLoader(Subset(dataset, [int(position)]), batch_size=1))))
    return view_shape(inputs) if is_image(inputs) else None


def read_views(dataset: Dataset, positions: np.ndarray, adapter: BatchAdapter, batch_size: int,
               num_workers: int = 0) -> list[torch.Tensor] | None:
    """:func:`raw_views` of ``dataset[positions]`` in that order, read without the model; None when the
    items' inputs are not image batches. A scan reads these from its scoring pass where it could keep
    them (``GuardConfig.keep_mb``); this reads the data again."""
    if len(positions) == 0:
        return None
    loader = DataLoader(Subset(dataset, np.asarray(positions, dtype=np.int64).tolist()), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    fine, smooth = [], []
    for batch in loader:
        inputs, _ = adapter.split(batch)
        views = raw_views(inputs)
        if views is None:
            return None
        fine.append(views[0])
        smooth.append(views[1])
    return [torch.cat(fine), torch.cat(smooth)]
