"""The one preprocessing contract: center crop, or pad with the border median."""

import numpy as np
import pytest

from engines.preprocessing import Fit, border_median, fit_action, fit_to_size


def test_unchanged_size_returns_the_input_itself() -> None:
    images = np.arange(2 * 40 * 40, dtype=np.uint16).reshape(2, 40, 40)
    assert fit_to_size(images, 40) is images


def test_crop_is_centered() -> None:
    image = np.arange(50 * 50, dtype=np.uint16).reshape(50, 50)
    out = fit_to_size(image, 40)
    assert out.shape == (40, 40)
    np.testing.assert_array_equal(out, image[5:45, 5:45])


def test_pad_uses_each_channels_border_median() -> None:
    rng = np.random.default_rng(0)
    cell = np.stack([np.full((30, 30), 900, np.uint16), np.full((30, 30), 120, np.uint16)])
    cell[:, 10:20, 10:20] = rng.integers(0, 4000, (2, 10, 10), dtype=np.uint16)
    cell[0, 0, 0] = 4000  # one outlier on the border must not move the median
    out = fit_to_size(cell[None], 40)[0]
    assert out.shape == (2, 40, 40)
    assert (out[0, :5] == 900).all() and (out[1, :, :5] == 120).all()
    np.testing.assert_array_equal(out[:, 5:35, 5:35], cell)


def test_crop_one_axis_and_pad_the_other_in_a_batch() -> None:
    batch = np.full((3, 2, 50, 30), 7, np.uint16)
    batch[1] = 9
    out = fit_to_size(batch, 40)
    assert out.shape == (3, 2, 40, 40)
    assert (out[0] == 7).all() and (out[1] == 9).all()
    assert fit_action(50, 30, 40) is Fit.CROPPED_AND_PADDED
    assert fit_action(30, 30, 40) is Fit.PADDED and fit_action(41, 40, 40) is Fit.CROPPED
    assert fit_action(40, 40, 40) is Fit.UNCHANGED


def test_odd_differences() -> None:
    image = np.arange(43 * 37, dtype=np.uint16).reshape(43, 37)
    out = fit_to_size(image, 40)
    # rows cropped from offset (43-40)//2 = 1; columns padded with (40-37)//2 = 1 on the left
    np.testing.assert_array_equal(out[:, 1:38], image[1:41, :])
    assert (out[:, 0] == border_median(image)).all() and (out[:, 38:] == border_median(image)).all()
    assert border_median(image[None]).shape == (1,)


def test_empty_image_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        fit_to_size(np.zeros((0, 5), np.uint16), 40)
