"""Models written the way people write them, for checking the guard on models it did not write.

These follow the styles of the popular CIFAR training repositories and tutorials: their own block
classes, ``F.relu`` in ``forward``, blocks in ``nn.Sequential`` or ``nn.ModuleList``, a head called
``linear``. Layer discovery must read them from structure alone (``tests/test_discover.py`` runs
each, with torchvision and transformers models, and ``benchmarks/bench_archs.py`` trains some).
:data:`ARCHS` maps a name to a constructor taking ``num_classes`` (and ``width`` where it has one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """A CIFAR-repository ResNet block: ``conv1/bn1/conv2/bn2/shortcut``, functional ReLUs."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    """A pre-activation block: BN and ReLU before each conv, shortcut taken from the activated input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


def _stages(block: type[nn.Module], width: int) -> list[nn.Sequential]:
    cin, stages = width, []
    for i, mult in enumerate((1, 2, 4, 8)):
        stages.append(nn.Sequential(block(cin, mult * width, 1 if i == 0 else 2), block(mult * width, mult * width)))
        cin = mult * width
    return stages


class CifarResNet(nn.Module):
    """ResNet-18 as the CIFAR repositories write it (3x3 stem, ``layer1``..``layer4``, ``linear``)."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(_Block, width)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.view(out.size(0), -1))


class PreActResNet(nn.Module):
    """Pre-activation ResNet-18 as the CIFAR repositories write it (a final ``bn`` before pooling)."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(_PreActBlock, width)
        self.bn = nn.BatchNorm2d(8 * width)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.avg_pool2d(F.relu(self.bn(out)), out.shape[-1])
        return self.linear(out.flatten(1))


class CifarVGG(nn.Module):
    """VGG-11 as the CIFAR repositories write it: ``features`` built from a config list."""

    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = int(v) * width // 64
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ModuleListNet(nn.Module):
    """Blocks in an ``nn.ModuleList``, looped over in ``forward`` with a residual add and ``F.relu``."""

    def __init__(self, num_classes: int = 10, width: int = 32, depth: int = 8) -> None:
        super().__init__()
        self.stem = ConvBN(3, width)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i in range(depth):
            self.blocks.append(ConvBN(width, width))
            self.downs.append(nn.Conv2d(width, width, 1, 2) if i % 3 == 2 else nn.Identity())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for block, down in zip(self.blocks, self.downs):
            x = down(F.relu(x + block(x)))
        return self.head(x.mean((2, 3)))


class MLP(nn.Module):
    """A plain MLP on flattened images: ``fc1``..``fc4`` and ``F.relu``."""

    def __init__(self, num_classes: int = 10, width: int = 256, in_features: int = 3 * 32 * 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width // 2)
        self.fc4 = nn.Linear(width // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc4(F.relu(self.fc3(x)))


class LeNet(nn.Module):
    """The tutorial network: layers as attributes, everything else ``torch.nn.functional``."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 5)
        self.conv2 = nn.Conv2d(width, 2 * width, 5)
        self.fc1 = nn.Linear(2 * width * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.relu(self.fc2(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A hand-written ViT in the timm style: ``patch_embed`` conv, class token, ``blocks`` ModuleList."""

    def __init__(self, num_classes: int = 10, width: int = 64, depth: int = 6, patch: int = 4,
                 image: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, width) * 0.02)
        self.blocks = nn.ModuleList(_EncoderBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": CifarResNet,
    "cifar_preact_resnet18": PreActResNet,
    "cifar_vgg11": CifarVGG,
    "modulelist_net": ModuleListNet,
    "mlp": MLP,
    "lenet": LeNet,
    "tiny_vit": TinyViT,
}


def build(name: str, num_classes: int = 10, **kwargs: int) -> nn.Module:
    """``ARCHS[name](num_classes=..., **kwargs)``; usable as ``RunSpec(model="guard.archs:build")``."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHS)}")
    return ARCHS[name](num_classes=num_classes, **kwargs)
