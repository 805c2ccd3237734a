"""The inference-time filter (the paper's setting): trained model + trusted set -> mask and scores."""

import numpy as np
import torch

from guard import GuardConfig, InputFilter
from tests.conftest import Blobs, mlp, train


def test_input_filter_flags_triggered_inputs_and_passes_clean_ones():
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(mlp(), ds, epochs=25)
    flt = InputFilter(model, Blobs(150, seed=7), GuardConfig(thresholds={"filter_z": 3.0}))
    clean = Blobs(300, seed=3)
    triggered = clean.x[clean.y != 0].copy()
    triggered[:, -4:] = 8.0
    m_clean, s_clean = flt(torch.from_numpy(clean.x))
    m_trig, s_trig = flt(torch.from_numpy(triggered))
    assert m_trig.float().mean() >= 0.95
    assert m_clean.float().mean() <= 0.03
    assert s_trig.min() > np.percentile(s_clean.numpy(), 90)
