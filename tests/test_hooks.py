"""Step 1: feature taps, layer names and scan isolation (discovery: test_discover.py)."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from guard.errors import GuardError
from guard.discover import discover_layers
from guard.hooks import FeatureTap, check_layers, peak, pool, scan_mode
from guard.models import CifarResNet18


def test_model_without_submodules_is_an_error():
    with pytest.raises(GuardError, match="no submodules"):
        discover_layers(nn.Linear(4, 2), torch.randn(2, 4))


def test_unknown_layer_names_are_an_error():
    with pytest.raises(GuardError, match="not modules of"):
        check_layers(CifarResNet18(width=8), ["layer9.0"])


def test_pool_grid_and_sequences():
    assert pool(torch.randn(2, 5, 16, 16), 4).shape == (2, 80)
    assert pool(torch.randn(2, 5, 16, 16), 1).shape == (2, 5)
    assert pool(torch.randn(2, 5, 16, 16), 0).shape == (2, 5 * 256)
    # sequences: grid*grid runs of tokens (a trigger token is not averaged away over all of them)
    seq = torch.randn(2, 65, 6)
    runs = pool(seq, 4)
    assert runs.shape == (2, 6 * 16)
    assert torch.allclose(runs.view(2, 6, 16)[:, :, -1], seq[:, 60:].mean(1), atol=1e-6)   # last run: tokens 60..64
    assert pool(torch.randn(2, 7, 6), 4).shape == (2, 6 * 7)          # short sequences keep every token
    assert pool(torch.randn(2, 7, 6), 0).shape == (2, 6 * 7)
    # the peak view: each channel's largest deviation of a token from the sample's mean token
    odd = seq.clone()
    odd[0, 64, 2] += 50.0                                              # one token stands out in channel 2
    assert peak(odd).shape == (2, 6) and peak(odd)[0].argmax() == 2
    assert torch.allclose(peak(seq), (seq - seq.mean(1, keepdim=True)).abs().amax(1))


def test_a_peak_view_is_read_from_its_token_layer():
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Flatten(), nn.Linear(8 * 5, 4))
    x = torch.randn(2, 5, 3)
    assert check_layers(model, ["1:peak"]) == ["1:peak"]
    with FeatureTap(model, ["1", "1:peak"]) as tap, torch.no_grad():
        model(x)
        runs, pk = tap.take(2)
    assert runs.shape == (2, 8 * 5) and torch.allclose(pk, peak(torch.nn.functional.gelu(model[0](x))))
    with pytest.raises(GuardError, match="needs a token sequence"):
        with FeatureTap(model, ["3:peak"]), torch.no_grad():
            model(x)


def test_tap_handles_tuple_outputs_and_always_removes_hooks():
    class TupleLayer(nn.Module):
        def forward(self, x):
            return (x * 2, {"aux": x})

    model = nn.Sequential(nn.Linear(3, 4), TupleLayer())
    with FeatureTap(model, ["1"]) as tap:
        model(torch.ones(2, 3))
        (f,) = tap.take(2)
    assert f.shape == (2, 4)
    assert not model[1]._forward_hooks
    with pytest.raises(RuntimeError):
        with FeatureTap(model, ["1"]):
            raise RuntimeError("boom")
    assert not model[1]._forward_hooks


def test_nan_features_are_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with FeatureTap(model, ["0"]) as tap:
        model(torch.ones(2, 3))
        tap.take(2)
        tap.check_finite()                   # finite so far
        model(torch.full((2, 3), float("nan")))
        tap.take(2)                          # no per-batch check (it would wait for the device) ...
        with pytest.raises(GuardError, match="layer '0' produced NaN/inf"):
            tap.check_finite()               # ... one per pass


def test_scan_mode_restores_modes_grad_and_rng():
    model = CifarResNet18(width=8).train()
    model.layer1.eval()                      # a user-frozen part stays frozen
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    expected = (torch.rand(1).item(), np.random.rand(), random.random())
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    with pytest.raises(KeyError):
        with scan_mode(model):
            assert not model.training and not torch.is_grad_enabled()
            torch.rand(5), np.random.rand(5), random.random()
            raise KeyError("interrupted scan")
    assert model.training and not model.layer1.training and model.layer2.training
    assert torch.is_grad_enabled()
    assert (torch.rand(1).item(), np.random.rand(), random.random()) == expected
