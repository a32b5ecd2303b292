"""The paper's augmentations (rotation, mirror, shift) plus intensity jitter.

One affine ``grid_sample`` per batch does rotation, mirror and shift together.
Border padding repeats the image edge, which in IFC is background: zero padding
would paint black corners into brightfield images that the model could learn.

Two kinds of rotation: ``any`` (the paper's: every angle and sub-pixel shifts,
resampled bilinearly, which softens every training cell while the cells the
model later classifies are sharp) and ``right-angle`` (quarter turns, mirrors
and whole-pixel shifts, sampled at the nearest pixel: each training cell is an
exact rearrangement of the recorded pixels, as sharp as the cells served).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flowsort.errors import UserError

ROTATIONS = ("any", "right-angle")


@dataclass(frozen=True)
class Augmentation:
    max_shift: float = 0.1  # fraction of the image side
    gain_jitter: float = 0.1  # per cell and channel, multiplicative
    offset_jitter: float = 0.1  # per cell and channel, in normalized units
    rotation: str = "any"  # one of ROTATIONS

    def __post_init__(self) -> None:
        if self.rotation not in ROTATIONS:
            raise UserError(f"rotation must be one of {', '.join(ROTATIONS)}, got {self.rotation!r}")


def augment(x: torch.Tensor, generator: torch.Generator, params: Augmentation = Augmentation()) -> torch.Tensor:
    """Randomly rotate, mirror, shift and intensity-jitter a normalized batch [N, C, H, W]."""
    n, c, height, width = x.shape
    exact = params.rotation == "right-angle"
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    angle = torch.floor(rand(n) * 4) * (math.pi / 2) if exact else rand(n) * (2 * math.pi)
    mirror = torch.where(rand(n) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    shift = (rand(n, 2) * 2 - 1) * (2 * params.max_shift)  # normalized units: 2 is the whole side
    if exact:  # quarter turns land on pixel centres, and a normalized shift of 2 / side is one whole pixel
        cos, sin = cos.round(), sin.round()
        sides = torch.tensor([width, height], dtype=shift.dtype)
        shift = torch.round(shift * sides / 2) * 2 / sides
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * mirror, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * mirror, cos
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid.to(x.device), mode="nearest" if exact else "bilinear", padding_mode="border",
                        align_corners=False)
    gain = 1 + (rand(n, c, 1, 1) * 2 - 1) * params.gain_jitter
    offset = (rand(n, c, 1, 1) * 2 - 1) * params.offset_jitter
    return out * gain.to(x.device) + offset.to(x.device)
