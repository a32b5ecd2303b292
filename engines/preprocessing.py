"""The preprocessing contract shared by the trainer and the streamer.

Cells reach flowsort as raw integer images of whatever size the instrument
exported. The model sees a fixed square input; this module is the one place
that decides how an image of another size is brought to it:

* an axis longer than the input is center-cropped (the cell is centered by the
  instrument's segmentation, so the border is what can be spared);
* an axis shorter than the input is padded symmetrically with the image's own
  background level, the median of its one-pixel border, per channel: padding
  with zeros would draw an artificial dark frame in brightfield that the model
  could learn instead of the cell.

Intensity normalization is *not* done here: it lives inside the exported model
graph so the runtime only copies bytes.
"""

from __future__ import annotations

from enum import Enum

import numpy as np


class Fit(str, Enum):
    """What fitting an image to the input size did to it."""

    UNCHANGED = "unchanged"
    CROPPED = "cropped"
    PADDED = "padded"
    CROPPED_AND_PADDED = "cropped_and_padded"


def border_median(images: np.ndarray) -> np.ndarray:
    """Median of the one-pixel border of each image: its background level.

    ``images`` is ``[..., H, W]``; the result has shape ``[...]``.
    """
    if images.shape[-1] < 2 or images.shape[-2] < 2:
        return np.median(images.reshape(*images.shape[:-2], -1), axis=-1)
    ring = np.concatenate(
        [
            images[..., 0, :],
            images[..., -1, :],
            images[..., 1:-1, 0],
            images[..., 1:-1, -1],
        ],
        axis=-1,
    )
    return np.median(ring, axis=-1)


def fit_action(height: int, width: int, size: int) -> Fit:
    """How an image of ``height`` x ``width`` is brought to ``size`` x ``size``."""
    longer = height > size or width > size
    shorter = height < size or width < size
    if longer and shorter:
        return Fit.CROPPED_AND_PADDED
    if longer:
        return Fit.CROPPED
    if shorter:
        return Fit.PADDED
    return Fit.UNCHANGED


def fit_to_size(images: np.ndarray, size: int) -> np.ndarray:
    """Center-crop or background-pad ``[..., H, W]`` images to ``[..., size, size]``.

    Works on a single image, a ``[C, H, W]`` cell or a ``[N, C, H, W]`` batch in
    one vectorized pass; the padding level is per image and channel. Returns the
    input itself (no copy) when it already has the right size.
    """
    if images.ndim < 2:
        raise ValueError(f"expected images shaped [..., H, W], got shape {images.shape}")
    if size < 1:
        raise ValueError(f"input size must be positive, got {size}")
    height, width = images.shape[-2:]
    if height == 0 or width == 0:
        raise ValueError(f"cannot fit an empty image of {height}x{width} to {size}x{size}")
    if height == size and width == size:
        return images

    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    cropped = images[..., top : top + min(height, size), left : left + min(width, size)]
    if cropped.shape[-2:] == (size, size):
        return np.ascontiguousarray(cropped)

    background = border_median(images).astype(images.dtype, copy=False)
    out = np.empty((*images.shape[:-2], size, size), dtype=images.dtype)
    out[...] = background[..., None, None]
    ch, cw = cropped.shape[-2:]
    pad_top, pad_left = (size - ch) // 2, (size - cw) // 2
    out[..., pad_top : pad_top + ch, pad_left : pad_left + cw] = cropped
    return out
