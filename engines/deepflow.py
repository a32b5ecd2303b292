"""DeepFlow (Eulenberg et al. 2017, Nat Commun 8:463): an Inception-style CNN for small IFC images.

Stem 3x3 conv (96), then 13 dual-path modules of conv-BN-ReLU units:

* a *normal* module concatenates a 1x1 and a 3x3 branch (stride 1);
* a *reduction* module concatenates a stride-2 3x3 conv with a stride-2 3x3
  max-pool of its input, halving the map size.

The channel plan below is the paper's. At width 1.0 the last module has 336
maps (8x8 for a 64x64 input); global average pooling gives the 336-d embedding
in which the paper found damaged cells as a separate cluster, and a linear
layer gives the class logits. The network is fully convolutional up to the
pooling, so any input size >= 32 works (40x40 for the ImageStream sample).

This module needs torch: it is imported by the trainer and the torch engine
only, never by the streamer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


@dataclass(frozen=True)
class Normal:
    """A normal module: ``conv1x1`` and ``conv3x3`` output channels, concatenated."""

    conv1x1: int
    conv3x3: int


@dataclass(frozen=True)
class Reduction:
    """A reduction module: a stride-2 3x3 conv with ``conv3x3`` channels beside a stride-2 max-pool."""

    conv3x3: int


STEM_CHANNELS = 96
CHANNEL_PLAN: tuple[Normal | Reduction, ...] = (
    Normal(32, 32),
    Normal(32, 48),
    Reduction(80),
    Normal(112, 48),
    Normal(96, 64),
    Normal(80, 80),
    Normal(48, 96),
    Reduction(96),
    Normal(176, 160),
    Normal(176, 160),
    Reduction(96),
    Normal(176, 160),
    Normal(176, 160),
)
MIN_INPUT_SIZE = 32
BN_EPS = 1e-3


def scaled(channels: int, width: float) -> int:
    """Channels at a width multiplier, rounded to a multiple of 8 (fast on every backend)."""
    if width == 1.0:
        return channels
    return max(8, int(round(channels * width / 8)) * 8)


class ConvBNReLU(nn.Sequential):
    """The paper's unit: convolution, batch normalization, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels, eps=BN_EPS),
            nn.ReLU(inplace=True),
        )


class NormalModule(nn.Module):
    def __init__(self, in_channels: int, conv1x1: int, conv3x3: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBNReLU(in_channels, conv1x1, 1)
        self.branch3x3 = ConvBNReLU(in_channels, conv3x3, 3)
        self.out_channels = conv1x1 + conv3x3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch3x3(x)], dim=1)


class ReductionModule(nn.Module):
    def __init__(self, in_channels: int, conv3x3: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBNReLU(in_channels, conv3x3, 3, stride=2)
        self.branch_pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels = conv3x3 + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch_pool(x)], dim=1)


class DeepFlowOutput(NamedTuple):
    logits: torch.Tensor
    embedding: torch.Tensor


class DeepFlow(nn.Module):
    """DeepFlow; ``forward`` returns class logits and the pooled embedding."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 2,
        input_size: int = 64,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if input_size < MIN_INPUT_SIZE:
            raise ValueError(f"input_size must be >= {MIN_INPUT_SIZE}, got {input_size}")
        if not 0 < width <= 4:
            raise ValueError(f"width multiplier must be in (0, 4], got {width}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = input_size
        self.width = width

        self.stem = ConvBNReLU(in_channels, scaled(STEM_CHANNELS, width), 3)
        channels = scaled(STEM_CHANNELS, width)
        modules: list[nn.Module] = []
        for spec in CHANNEL_PLAN:
            if isinstance(spec, Normal):
                module = NormalModule(channels, scaled(spec.conv1x1, width), scaled(spec.conv3x3, width))
            else:
                module = ReductionModule(channels, scaled(spec.conv3x3, width))
            modules.append(module)
            channels = module.out_channels
        self.features = nn.Sequential(*modules)
        self.embedding_dim = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    @property
    def feature_map_size(self) -> int:
        """Side of the last feature maps: the input halved (rounding up) by each reduction."""
        reductions = sum(isinstance(spec, Reduction) for spec in CHANNEL_PLAN)
        size = self.input_size
        for _ in range(reductions):
            size = math.ceil(size / 2)
        return size

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(self.stem(x))), 1)

    def forward(self, x: torch.Tensor) -> DeepFlowOutput:
        embedding = self.forward_embedding(x)
        return DeepFlowOutput(self.classifier(embedding), embedding)


def create_deepflow(
    num_classes: int,
    in_channels: int = 2,
    input_size: int = 64,
    width: float = 1.0,
) -> DeepFlow:
    """Build DeepFlow: width 1.0 is the paper's network, smaller widths give fast students."""
    return DeepFlow(num_classes=num_classes, in_channels=in_channels, input_size=input_size, width=width)
