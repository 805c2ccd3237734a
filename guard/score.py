"""Scan stage 2, per batch and on the model's device: cosines to the benign reference, out-of-spread sums.

The scoring pass is the one pass over every kept sample, so its per-batch work stays where the
features are: the reference directions and the benign spread are copied to the model's device
once, every batch adds its rows to device tensors, and :meth:`DeviceScores.result` moves them to
the host once, at the end of the pass. No per-batch ``.item()``, ``.cpu()`` or data-dependent
branch makes the host wait for an accelerator. On the CPU the out-of-spread rows are selected
(cheaper there); on an accelerator they are masked (no sync). Both give the same sums.
"""

from __future__ import annotations

import numpy as np
import torch

from guard.calibrate import Calibration
from guard.extract import Batch
from guard.reference import unit


class DeviceScores:
    """Per sample of a pass: the cosine to its class's benign direction at every layer, the class the
    model predicts (-1 where its output is not class scores); per class and layer: the sum of the unit features of samples more
    than ``out_z`` benign standard deviations below their class's benign mean (the suspects)."""

    def __init__(self, cal: Calibration, n: int, out_z: float, device: torch.device) -> None:
        self.device, self.out_z, self.reference = device, out_z, cal.reference
        self.mean = torch.as_tensor(cal.mean, dtype=torch.float32).to(device)
        self.std = torch.as_tensor(cal.std, dtype=torch.float32).to(device)
        self.raw = torch.empty(n, len(cal.reference.sums), dtype=torch.float32, device=device)
        self.pred = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.sums = [torch.zeros(s.shape, dtype=torch.float64, device=device) for s in cal.reference.sums]
        self.select = device.type == "cpu"

    def add(self, rows: slice | torch.Tensor, b: Batch, predicted: torch.Tensor | None) -> None:
        """Score batch ``b`` (features on ``device``) into ``rows`` (a slice, or row numbers on the host);
        ``predicted``: the class the model predicts for each of its samples (None: unknown)."""
        lab = b.labels.to(self.device, non_blocking=True)
        s = self.reference.score(b.feats, lab)
        if isinstance(rows, torch.Tensor):
            rows = rows.to(self.device, non_blocking=True)
        self.raw[rows] = s
        if predicted is not None:
            self.pred[rows] = predicted.to(self.device, non_blocking=True)
        out = (s - self.mean[lab]) / self.std[lab] < -self.out_z
        for li, f in enumerate(b.feats):
            if self.select:
                m = out[:, li]
                if m.any():
                    self.sums[li].index_add_(0, lab[m], unit(f[m].double()))
            else:
                self.sums[li].index_add_(0, lab, unit(f.double()) * out[:, li, None])

    def result(self) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor]]:
        """``(raw (n, L) float32, predicted (n,) int32, suspect sums per layer (C, D_l) float64)`` on the host."""
        return self.raw.cpu().numpy(), self.pred.cpu().numpy().astype(np.int32), [s.cpu() for s in self.sums]
