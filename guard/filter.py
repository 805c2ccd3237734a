"""The paper's own setting: flag suspicious inputs to a trained model at inference time."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from guard.batches import BatchAdapter, Feed, Unpack
from guard.config import GuardConfig
from guard.errors import GuardError
from guard.calibrate import calibrate
from guard.extract import Extractor
from guard.hooks import FeatureTap, scan_mode
from guard.keep import keep_budget
from guard.locate import paper_window
from guard.setup import check_device, check_trusted, layers_and_classes


class InputFilter:
    """Flags inputs whose features leave the benign spread of their *predicted* class.

    Per class, the layer window comes from benign behaviour alone (the paper's rule: the layers
    up to the largest rise of benign within-class similarity); scores are the window's mean
    leave-one-out-standardised cosine, so the threshold (``GuardConfig.threshold_z``) is in
    benign standard deviations calibrated on trusted samples that did not build the reference;
    an input is flagged above ``thresholds.filter_z``.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from guard import InputFilter
    >>> x = torch.randn(200, 8); y = (x[:, 0] > 0).long()
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> flt = InputFilter(model, TensorDataset(x, y))
    >>> mask, scores = flt(x[:5])
    >>> mask.shape, scores.shape
    (torch.Size([5]), torch.Size([5]))
    """

    def __init__(self, model: nn.Module, trusted: Dataset, config: GuardConfig | None = None,
                 unpack: Unpack | None = None) -> None:
        self.model = model
        self.config = cfg = config or GuardConfig()
        th = cfg.thresholds
        self.adapter = BatchAdapter(cfg.input_key, cfg.label_key, unpack)
        self.device = check_device(cfg.device, model)
        self.layers, self.num_classes = layers_and_classes(model, trusted, self.adapter, cfg, self.device)
        check_trusted(trusted, self.adapter, self.num_classes, 2)
        extractor = Extractor(model, Feed(self.adapter, self.device, cfg.channels_last, cfg.amp), self.num_classes,
                              cfg.model_copy(update={"progress": False}))
        with scan_mode(model):
            cal = calibrate(extractor.stream, self.layers, (trusted, None, "trusted"), self.num_classes, th,
                            keep_budget(cfg.keep_mb))
        cal.feats = None                       # the filter keeps the reference's sums and spreads only
        self.calibration = cal
        self.windows = {}
        self._mu, self._sd = np.zeros(self.num_classes), np.ones(self.num_classes)
        zb = cal.z(cal.loo, cal.labels)
        for c in range(self.num_classes):
            m = cal.labels == c
            self.windows[c] = paper_window(cal.in_sample[m].mean(0), th.paper_width)
            s = zb[m][:, self.windows[c]].mean(1)
            self._mu[c], self._sd[c] = s.mean(), max(s.std(), th.std_floor)

    @torch.no_grad()
    def __call__(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(flagged mask, suspicion score) for a batch of model inputs; higher score = more suspicious."""
        cfg = self.config
        with scan_mode(self.model), FeatureTap(self.model, self.layers, cfg.pool_grid) as tap:
            logits = self.adapter.forward(self.model, self.adapter.move(inputs, self.device, cfg.channels_last))
            if logits.dim() != 2 or logits.shape[1] != self.num_classes:
                raise GuardError(f"model output has shape {tuple(logits.shape)}; expected (batch, {self.num_classes})")
            pred = logits.argmax(1).cpu()
            feats = tap.take(len(pred))
            tap.check_finite()
        raw = self.calibration.reference.score(feats, pred).cpu().numpy()
        z = self.calibration.z(raw, pred.numpy())
        score = np.array([(-(z[i, self.windows[int(c)]].mean()) + self._mu[int(c)]) / self._sd[int(c)]
                          for i, c in enumerate(pred)])
        s = torch.from_numpy(score).float()
        return s > cfg.thresholds.filter_z, s
