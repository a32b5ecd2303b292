"""The paper's augmentations (any-angle rotation, mirror, shift) plus intensity jitter.

One affine ``grid_sample`` per batch does rotation, mirror and shift together.
Border padding repeats the image edge, which in IFC is background: zero padding
would paint black corners into brightfield images that the model could learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    max_shift: float = 0.1  # fraction of the image side
    gain_jitter: float = 0.1  # per cell and channel, multiplicative
    offset_jitter: float = 0.1  # per cell and channel, in normalized units


def augment(x: torch.Tensor, generator: torch.Generator, params: Augmentation = Augmentation()) -> torch.Tensor:
    """Randomly rotate, mirror, shift and intensity-jitter a normalized batch [N, C, H, W]."""
    n, c = x.shape[:2]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    angle = rand(n) * (2 * math.pi)
    mirror = torch.where(rand(n) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * mirror, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * mirror, cos
    theta[:, :, 2] = (rand(n, 2) * 2 - 1) * (2 * params.max_shift)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)
    gain = 1 + (rand(n, c, 1, 1) * 2 - 1) * params.gain_jitter
    offset = (rand(n, c, 1, 1) * 2 - 1) * params.offset_jitter
    return out * gain.to(x.device) + offset.to(x.device)
