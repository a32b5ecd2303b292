"""The training augmentations: right-angle rotation keeps every cell's pixels exact, any-angle rotation resamples."""

from __future__ import annotations

import pytest
import torch

from flowsort.errors import UserError
from trainer.augment import Augmentation, augment

GEOMETRY_ONLY = dict(gain_jitter=0.0, offset_jitter=0.0)


def cells() -> torch.Tensor:
    return torch.randn(64, 2, 40, 40, generator=torch.Generator().manual_seed(1))


def test_right_angle_without_shift_is_one_of_the_eight_quarter_turns_and_mirrors() -> None:
    x = cells()
    y = augment(x, torch.Generator().manual_seed(0), Augmentation(max_shift=0.0, rotation="right-angle", **GEOMETRY_ONLY))
    views = [torch.rot90(view, k, dims=(-2, -1)) for view in (x, x.flip(-1)) for k in range(4)]
    matched = [next((j for j, view in enumerate(views) if torch.equal(y[i], view[i])), None) for i in range(len(x))]
    assert None not in matched
    assert len(set(matched)) == 8  # 64 cells draw every view


def test_right_angle_with_shifts_keeps_the_recorded_pixel_values() -> None:
    x = cells()
    y = augment(x, torch.Generator().manual_seed(0), Augmentation(max_shift=0.1, rotation="right-angle", **GEOMETRY_ONLY))
    assert all(torch.isin(y[i], x[i]).all() for i in range(len(x)))
    assert y.std().item() == pytest.approx(x.std().item(), rel=0.05)  # no smoothing


def test_any_angle_resamples_and_softens_the_cells() -> None:
    x = cells()
    y = augment(x, torch.Generator().manual_seed(0), Augmentation(**GEOMETRY_ONLY))
    assert y.std() < 0.85 * x.std()  # bilinear interpolation averages neighbouring pixels


def test_an_unknown_rotation_is_refused_naming_the_choices() -> None:
    with pytest.raises(UserError, match="any, right-angle"):
        Augmentation(rotation="free")
