"""Reference models for the demo, tests and benchmarks (any ``nn.Module`` works with the guard)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool) with a configurable base width.

    ``width=64`` is the usual ResNet-18; ``width=16`` trains about 10x faster on a CPU.
    Its blocks are torchvision ``BasicBlock`` s, so layer discovery treats it like torchvision's.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, inplanes = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallCNN(nn.Module):
    """A small CNN for tiny images (the digits demo): three conv blocks and a classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.block1 = block(in_channels, width)
        self.block2 = nn.Sequential(block(width, 2 * width), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(block(2 * width, 4 * width), nn.MaxPool2d(2))
        self.block4 = block(4 * width, 4 * width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block4(self.block3(self.block2(self.block1(x)))))
