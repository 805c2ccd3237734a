"""The input images as one more view for the direction test: their high-passed pixels.

An additive trigger (a patch, a blended noise pattern, a frequency pattern) changes every
poisoned image the same way, whatever the model has learned of it so far. In raw pixels natural
variation (brightness, colour, layout) hides that change. A high-pass (each pixel minus the mean of
its 3 x 3 neighbourhood, per channel) keeps fine structure only: natural edges, which differ from
image to image, and the trigger's own, which is the same in every poisoned image. A class that
holds poison then has the trigger as its main direction of variation in this view, and the
direction test (:mod:`guard.direction`) decides with its own distribution-free calibration against
the class's trusted images, as at any layer.

What it does not see: triggers without fine structure (a smooth blended image), sample-specific
or geometric triggers (WaNet's warps), and anything once random crops move the trigger between
reads (the scan reads the data without augmentation, see ``scan_dataset``).

Only 4-D floating image batches ``(B, C, H, W)`` have this view; anything else (tokens, tables,
dicts) has none. Images larger than :data:`MAX_SIDE` are average-pooled to it first, which keeps
the view's size bounded (C x 64 x 64 at most).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from guard.batches import BatchAdapter

MAX_SIDE = 64
NAME = "<input>"        # how reports name this view among the layers


def high_pass(x: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` float32: each pixel of ``x`` (B, C, H, W) minus its 3 x 3 neighbourhood mean (edges
    replicated), after pooling to at most :data:`MAX_SIDE` a side."""
    x = x.float()
    if x.shape[2] > MAX_SIDE or x.shape[3] > MAX_SIDE:
        x = torch.nn.functional.adaptive_avg_pool2d(x, (min(x.shape[2], MAX_SIDE), min(x.shape[3], MAX_SIDE)))
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return (x - blur).flatten(1)


def is_image(inputs: object) -> bool:
    return isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and inputs.is_floating_point() \
        and min(inputs.shape[2:]) >= 3


def read_view(dataset: Dataset, positions: np.ndarray, adapter: BatchAdapter, batch_size: int,
              num_workers: int = 0) -> torch.Tensor | None:
    """The high-passed inputs of ``dataset[positions]`` in that order, read without the model; None
    when the items' inputs are not image batches."""
    if len(positions) == 0:
        return None
    loader = DataLoader(Subset(dataset, np.asarray(positions, dtype=np.int64).tolist()), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    out = []
    for batch in loader:
        inputs, _ = adapter.split(batch)
        if not is_image(inputs):
            return None
        out.append(high_pass(inputs))
    return torch.cat(out)
