"""Layer discovery from structure: a spread of layers on every architecture of the zoo, a scan on
each, and a clear error instead of a silent fall-back."""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from guard import GuardConfig, GuardedDataset, GuardError, GuardWarning
from guard.discover import MAX_LAYERS, MIN_LAYERS, discover, discover_layers
from guard.hooks import PEAK
from guard.models import CifarResNet18, SmallCNN
from tests.zoo import ZOO


def _plain(layers):
    return [n for n in layers if not n.endswith(PEAK)]


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_architecture_gets_a_spread_of_layers_and_scans(name):
    make, size = ZOO[name]
    torch.manual_seed(0)
    model = make(3)
    found = discover(model, torch.randn(4, 3, size, size))
    layers = _plain(found.layers)
    assert MIN_LAYERS <= len(layers) <= MAX_LAYERS, layers
    depth = [found.depth[n] for n in layers]
    assert depth == sorted(depth)
    assert depth[0] <= 0.25 and depth[-2] >= 0.75 and depth[-1] >= 0.9, found.describe()   # early .. late + head
    assert len(set(layers)) == len(layers) and not found.opened
    # the guard scans on those layers, reading every one of them
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.normal(size=(36, 3, size, size)).astype(np.float32))
    gds = GuardedDataset(TensorDataset(x, torch.arange(36) % 3), model, GuardConfig(remedy="none", batch_size=12))
    assert gds.layers == found.layers and gds.report.layers_source == "discovered"
    gds.scan()
    (scan,) = gds.report.scans
    assert all(len(c.layer_excess) == len(found.layers) for c in scan.classes)
    assert ", ".join(found.layers) in gds.report.summary()


def test_the_popular_cifar_resnet_is_read_at_its_blocks_not_its_logits():
    """The case that used to be scanned on ``fc`` alone: own block class, F.relu, a ``linear`` head."""
    from guard.archs import CifarResNet

    layers = discover_layers(CifarResNet(width=8), torch.randn(2, 3, 32, 32))
    assert layers == ["bn1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)] + ["linear"]


def test_reference_models_and_torchvision():
    assert discover_layers(CifarResNet18(width=8), torch.randn(2, 3, 32, 32)) == [
        "stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1", "fc"]
    r = discover_layers(torchvision.models.resnet18(num_classes=5), torch.randn(2, 3, 64, 64))
    assert r == ["relu"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)] + ["fc"]
    m = discover_layers(torchvision.models.mobilenet_v2(num_classes=5), torch.randn(2, 3, 64, 64))
    assert len(m) == MAX_LAYERS and m[0] == "features.0" and m[-2] == "features.18" and m[-1] == "classifier"
    assert discover_layers(SmallCNN(width=4), torch.randn(2, 1, 16, 16)) == ["block1", "block2", "block3", "block4",
                                                                            "head"]


def test_transformer_encoder_layers_come_with_their_peak_views():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 3)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)).mean(1))

    blocks = ["embed"] + [f"encoder.layers.{i}" for i in range(3)]
    assert discover_layers(Tiny(), torch.randn(2, 5, 8)) == [v for b in blocks for v in (b, b + PEAK)] + ["head"]


def test_a_small_mlp_is_read_whole_after_each_activation():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert discover_layers(model, torch.randn(2, 4)) == ["1", "3", "4"]    # three weight layers: all of them


def test_residual_blocks_are_kept_whole_whatever_their_class():
    """A block whose output is not one of its modules' outputs (residual add, in-place add,
    activation of a sum) is a boundary; a Sequential is opened."""
    class Add(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU()

        def forward(self, x):
            return self.act(self.b(self.a(x)) + x)

    class InPlace(Add):
        def forward(self, x):
            out = self.b(self.a(x))
            out += x
            return out

    model = nn.Sequential(nn.Linear(4, 8), Add(), InPlace(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 3))
    assert discover_layers(model, torch.randn(2, 4)) == ["0", "1", "2", "3", "4"]


def test_a_single_opaque_body_is_opened_with_a_loud_warning():
    """A body whose modules are joined by functional calls is a block, but the only one: rather than
    read the head alone, discovery opens it, and says so."""
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(8 if i else 3, 8, 3, padding=1) for i in range(6))

        def forward(self, x):
            for conv in self.convs:
                x = torch.nn.functional.relu(conv(x))
            return x.mean((2, 3))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = Body(), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.body(x))

    with pytest.warns(GuardWarning, match=r"opened \['body'\].*GuardConfig\(layers=\[\.\.\.\]\)"):
        found = discover(Net(), torch.randn(2, 3, 16, 16))     # loud even while the guard's log is off
    assert found.opened == ["body"] and found.layers == [f"body.convs.{i}" for i in range(6)] + ["head"]


def test_too_few_layers_is_an_error_that_names_what_to_pass():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            for _ in range(4):
                x = self.block(x)
            return self.head(x)

    with pytest.raises(GuardError, match=r"found only 1 layer\(s\) \['head'\].*called more than once.*'block'.*"
                                         r"modules of their own.*GuardConfig\(layers="):
        GuardedDataset(TensorDataset(torch.randn(30, 16), torch.arange(30) % 3), Shared())
    # named by hand, the user gets what they asked for
    gds = GuardedDataset(TensorDataset(torch.randn(30, 16), torch.arange(30) % 3), Shared(),
                         GuardConfig(layers=["head"]))
    assert gds.layers == ["head"] and gds.report.layers_source == "named"


def test_discovery_leaves_the_model_as_it_was():
    model = CifarResNet18(width=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    discover(model, torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())     # BN statistics untouched
