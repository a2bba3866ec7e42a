"""Architectures the zoo does not have, from plain nn modules: what a user brings to SelfCompression.

Tiny on purpose (8x8 digits, 12-token sequences) so a few hundred training steps fit a test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block with a 1x1 projection shortcut, which runs *last* in forward."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, width: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


class SqueezeExcite(nn.Module):
    """Channel gates from 1x1 convs on the pooled map: 4-D outputs of spatial size 1x1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(channels // 4, 1), 1)
        self.expand = nn.Conv2d(max(channels // 4, 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.hardsigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, 3x3 depthwise, squeeze-excitation, 1x1 project, residual."""

    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()
        )
        self.se = SqueezeExcite(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class TinyMobileNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.Hardswish()),
            InvertedResidual(width, 2),
            InvertedResidual(width, 2),
        )
        self.classifier = nn.Sequential(nn.Linear(width, 16), nn.Hardswish(), nn.Dropout(0.1), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class TinyLM(nn.Module):
    """Causal transformer LM: token and position embeddings, nn.TransformerEncoderLayer, tied head.

    ``tied_linear=True`` computes the head as ``F.linear(h, tok.weight)``: no nn.Linear head at all.
    """

    def __init__(self, vocab: int = 11, dim: int = 16, block: int = 12, tied_linear: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.block = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.ln = nn.LayerNorm(dim)
        self.tied_linear = tied_linear
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        steps = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(steps, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(steps, device=idx.device)
        h = self.ln(self.block(h, src_mask=mask, is_causal=True))
        return F.linear(h, self.tok.weight) if self.tied_linear else self.head(h)


def counting_sequences(n: int, vocab: int = 11, block: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token data a small LM learns fast: each sequence counts up mod ``vocab`` from a random start.

    Every third sequence ends early: its last targets are -1 (padding, not scored).
    """
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=generator)
    tokens = (start + torch.arange(block + 1)) % vocab
    x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    y[::3, -3:] = -1
    return x, y
