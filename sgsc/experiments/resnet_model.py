"""He et al.'s CIFAR ResNet-20 written with plain ``nn`` modules, the model of :mod:`sgsc.experiments.resnet`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut: identity, or 1x1 conv + BN where the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        projection = stride != 1 or cin != cout
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if projection else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers; n = ``blocks`` = 3 is ResNet-20) for small grey images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
                 blocks: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for index, width in enumerate(widths):
            stage = []
            for block in range(blocks):
                stage.append(BasicBlock(cin, width, 2 if index > 0 and block == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 3) -> ResNet20:
    """A fresh float ResNet-20 (the factory ``sgsc.load_packed(path, model=...)`` gets)."""
    return ResNet20(in_channels, num_classes, tuple(widths), blocks)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
