"""CIFAR ResNets (He et al. 2016, section 4.2) and the CIFAR ResNet-18.

* ``resnet20`` / ``resnet32`` / ``resnet56``: three stages of ``(depth-2)/6``
  basic blocks with 16, 32, 64 channels (times ``width``), about 0.27M
  parameters for ResNet-20 at width 1.  Shortcuts are 1x1 convolutions with
  BatchNorm when the shape changes (option B).
* ``resnet18``: the CIFAR variant of ResNet-18 (3x3 stem, no max-pool, four
  stages of two blocks, 64..512 channels times ``width``), about 11.2M
  parameters at width 1: the user's setting.

``width`` scales every channel count, so a CPU run can use e.g.
``resnet20(width=0.5)``.

``noisy_mlp``: the small tanh classifier on synthetic noisy labels that the tests and
``experiments/bench_mlp_span.py`` share (its dense Hessian is cheap, so every figure made on it
can be checked against the exact spectrum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet56", "resnet18", "build_model", "MODELS",
           "noisy_mlp"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A stem, stages of basic blocks, global average pooling and a linear head."""

    def __init__(self, blocks_per_stage, channels, num_classes: int = 10):
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        layers, cin = [], c0
        for i, (nb, c) in enumerate(zip(blocks_per_stage, channels)):
            for j in range(nb):
                layers.append(BasicBlock(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def _ch(base, width):
    return [max(1, int(round(c * width))) for c in base]


def _he(depth: int, width: float, num_classes: int) -> CifarResNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6k+2, got {depth}")
    k = (depth - 2) // 6
    return CifarResNet([k, k, k], _ch([16, 32, 64], width), num_classes)


def resnet20(width: float = 1.0, num_classes: int = 10) -> CifarResNet:
    return _he(20, width, num_classes)


def resnet32(width: float = 1.0, num_classes: int = 10) -> CifarResNet:
    return _he(32, width, num_classes)


def resnet56(width: float = 1.0, num_classes: int = 10) -> CifarResNet:
    return _he(56, width, num_classes)


def resnet18(width: float = 1.0, num_classes: int = 10) -> CifarResNet:
    return CifarResNet([2, 2, 2, 2], _ch([64, 128, 256, 512], width), num_classes)


MODELS = {"resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56, "resnet18": resnet18}


def build_model(name: str, width: float = 1.0, num_classes: int = 10) -> CifarResNet:
    """The model called ``name`` (one of :data:`MODELS`) at ``width``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](width=width, num_classes=num_classes)


def noisy_mlp(N: int = 3000, seed: int = 0, noise: float = 0.7, steps: int = 100, adam: bool = False):
    """``(model, X, Y)``: a 6-8-3 tanh classifier (float64, 83 parameters) trained on ``N``
    Gaussian inputs whose label is the argmax of the first three coordinates plus ``noise``
    times Gaussian noise; 100 full-batch SGD steps, or with ``adam`` fit hard by Adam."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 6, generator=g, dtype=torch.float64)
    Y = (X[:, :3] + noise * torch.randn(N, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05) if adam else torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()
    return model, X, Y
