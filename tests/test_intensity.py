"""Intensity scaling and slice geometry against hand-computed values and the reference quirks.

    python -m pytest tests/test_intensity.py -q
"""

import numpy as np
import pytest

from unibrain_hf.data.intensity import (
    center_crop,
    crop_to_target,
    lesion_bbox_size,
    lesion_slice_indices,
    middle_lesion_slice,
    minmax_uint8,
    pad_to_multiple,
    pad_to_size,
    pad_to_target,
    rescale_intensity,
    slice_to_rgb,
)


# ---------------------------------------------------------------- rescale_intensity

def _ramp_volume():
    """Foreground 1..100 in one (1, 10, 10) volume plus one background voxel per row."""
    volume = np.arange(1, 101, dtype=np.float32).reshape(1, 10, 10)
    return np.concatenate([volume, np.zeros((1, 10, 1), np.float32)], axis=2)


def test_rescale_intensity_hand_computed_ramp():
    # 0.5th / 99.5th percentiles of 1..100 (linear): 1 + 0.005*99 = 1.495 and 1 + 0.995*99 = 99.505
    out = rescale_intensity(_ramp_volume())
    assert out.dtype == np.uint8 and out.shape == (1, 10, 11)
    foreground = out[0, :, :10].ravel()
    lo, hi = 1.495, 99.505
    for value in (2, 25, 50, 75, 99):
        expected = int(np.round((value - lo) / (hi - lo) * 255))
        assert foreground[value - 1] == expected
    assert foreground[50 - 1] == 126          # (50 - 1.495) / 98.01 * 255 = 126.2
    assert foreground[0] == 1                 # below lo: clipped to 1, not to background 0
    assert foreground[99] == 255              # above hi: clipped to 255
    assert np.all(out[0, :, 10] == 0)         # background stays 0


def test_rescale_intensity_negative_voxels_are_background_and_foreground_never_zero():
    rng = np.random.default_rng(0)
    for _ in range(50):
        volume = rng.normal(50, 40, size=(3, 8, 8)).astype(np.float32)
        out = rescale_intensity(volume)
        assert np.all(out[volume <= 0] == 0)
        assert np.all(out[volume > 0] >= 1)


def test_rescale_intensity_uses_whole_volume_percentiles():
    volume = np.ones((2, 4, 4), np.float32)
    volume[1] = 1000.0
    volume[1, 0, 0] = 500.0  # give the foreground some spread in the middle
    out = rescale_intensity(volume)
    # a per-slice scaling would stretch slice 0 (constant) or slice 1 to the full range
    assert np.all(out[0] == 1)
    assert out[1, 1, 1] == 255 and 100 < out[1, 0, 0] < 160


def test_rescale_intensity_is_monotone():
    rng = np.random.default_rng(1)
    for _ in range(30):
        volume = rng.gamma(2.0, 50.0, size=(2, 6, 6)).astype(np.float32)
        order = np.argsort(volume.ravel(), kind="stable")
        out = rescale_intensity(volume).ravel()[order]
        assert np.all(np.diff(out.astype(int)) >= 0)


@pytest.mark.parametrize("volume, message", [
    (np.zeros((2, 4, 4), np.float32), "no foreground"),
    (-np.ones((2, 4, 4), np.float32), "no foreground"),
    (np.full((2, 4, 4), 7.0, np.float32), "no intensity spread"),
    (np.ones((4, 4), np.float32), "3-D"),
    (np.zeros((0, 4, 4), np.float32), "empty"),
    (np.array([[[1.0, np.nan]]], np.float32), "NaN"),
])
def test_rescale_intensity_rejects_bad_volumes(volume, message):
    with pytest.raises(ValueError, match=message):
        rescale_intensity(volume)


# ---------------------------------------------------------------- minmax_uint8

def test_minmax_uint8_hand_computed_truncates():
    out = minmax_uint8(np.array([[0.0, 1.0], [2.0, 7.0]], np.float32))
    # 1/7*255 = 36.43 -> 36; 2/7*255 = 72.86 -> 72 (a cast, not rounding); max -> 255
    assert out.tolist() == [[0, 36], [72, 255]] and out.dtype == np.uint8
    assert minmax_uint8(np.array([[-5.0, 5.0]])).tolist() == [[0, 255]]


def test_minmax_uint8_full_range_over_many_seeds():
    rng = np.random.default_rng(2)
    for _ in range(100):
        plane = rng.normal(rng.uniform(-100, 100), rng.uniform(0.1, 50), size=(5, 7))
        out = minmax_uint8(plane)
        assert out.min() == 0 and out.max() == 255
        assert out[np.unravel_index(plane.argmax(), plane.shape)] == 255


def test_minmax_uint8_constant_slices():
    assert np.all(minmax_uint8(np.zeros((3, 3))) == 0)
    assert np.all(minmax_uint8(np.full((3, 3), 9.0)) == 9)
    assert np.all(minmax_uint8(np.full((3, 3), 900.0)) == 255)
    with pytest.raises(ValueError, match="2-D"):
        minmax_uint8(np.zeros((2, 2, 2)))


# ---------------------------------------------------------------- padding and cropping

def test_pad_to_target_centres_with_bottom_right_remainder():
    img = np.arange(1, 13, dtype=np.uint8).reshape(3, 4)
    out = pad_to_target(img, (8, 8))
    assert out.shape == (8, 8) and out.dtype == np.uint8
    top, left = (8 - 3) // 2, (8 - 4) // 2  # 2, 2
    assert np.array_equal(out[top:top + 3, left:left + 4], img)
    assert out.sum() == img.sum()
    assert pad_to_target(np.ones((240, 240))).shape == (256, 256)


def test_pad_to_target_reference_quirk_compares_width_with_height():
    # h (5) < target_h (8) and w (3) < target_w (4), yet target_w <= h, so nothing is padded
    assert pad_to_target(np.ones((5, 3)), (8, 4)).shape == (5, 3)
    assert pad_to_target(np.ones((256, 100)), 256).shape == (256, 100)   # h >= target: no padding
    assert pad_to_target(np.ones((300, 100)), 256).shape == (300, 100)
    with pytest.raises(ValueError, match="wider"):
        pad_to_target(np.ones((100, 300)), 256)                           # the reference crashes here


def test_pad_to_target_channel_first():
    img = np.ones((3, 4, 6), np.uint8)
    out = pad_to_target(img, (8, 8))
    assert out.shape == (3, 8, 8) and out.sum() == img.sum()


def test_crop_to_target_reference_quirk():
    img = np.arange(144).reshape(12, 12)
    assert np.array_equal(crop_to_target(img, (10, 10)), img[1:11, 1:11])
    assert crop_to_target(img, (12, 10)).shape == (12, 12)  # not strictly smaller in both: unchanged
    assert crop_to_target(img, (13, 4)).shape == (12, 12)


def test_pad_to_size_and_center_crop_roundtrip_many_shapes():
    rng = np.random.default_rng(3)
    for _ in range(200):
        h, w = rng.integers(1, 40, 2)
        target = tuple(rng.integers(1, 50, 2))
        img = rng.integers(1, 255, (h, w)).astype(np.uint8)
        padded = pad_to_size(img, target)
        assert padded.shape == (max(h, target[0]), max(w, target[1]))
        assert np.array_equal(center_crop(padded, (h, w)), img)
        cropped = center_crop(img, target)
        assert cropped.shape == (min(h, target[0]), min(w, target[1]))
        if h < target[0] and w <= target[1] and target[1] > h:  # where the reference pads, both agree
            assert np.array_equal(padded, pad_to_target(img, target))


def test_pad_to_multiple():
    rng = np.random.default_rng(4)
    for _ in range(100):
        h, w = rng.integers(1, 70, 2)
        img = rng.integers(0, 255, (h, w)).astype(np.uint8)
        out = pad_to_multiple(img, 16)
        assert out.shape[0] % 16 == 0 and out.shape[1] % 16 == 0
        assert out.shape[0] - h < 16 and out.shape[1] - w < 16
        assert np.array_equal(center_crop(out, (h, w)), img)
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(np.ones((4, 4)), 0)


# ---------------------------------------------------------------- lesion geometry

def _cube_mask():
    mask = np.zeros((8, 20, 30), np.float32)
    mask[2:6, 5:9, 10:17] = 1.0
    return mask


def test_lesion_slice_indices_each_axis():
    mask = _cube_mask()
    assert lesion_slice_indices(mask).tolist() == [2, 3, 4, 5]
    assert lesion_slice_indices(mask, axis=1).tolist() == [5, 6, 7, 8]
    assert lesion_slice_indices(mask, axis=2).tolist() == list(range(10, 17))
    assert lesion_slice_indices(None).tolist() == []
    assert lesion_slice_indices(np.zeros((3, 3, 3))).tolist() == []
    with pytest.raises(ValueError, match="axis"):
        lesion_slice_indices(mask, axis=3)


def test_middle_lesion_slice():
    mask = _cube_mask()
    assert middle_lesion_slice(mask, 8) == 4          # [2, 3, 4, 5][4 // 2]
    mask[5] = 0
    assert middle_lesion_slice(mask, 8) == 3          # [2, 3, 4][1]
    assert middle_lesion_slice(np.zeros((7, 2, 2)), 7) == 3
    assert middle_lesion_slice(None, 9) == 4
    with pytest.raises(ValueError, match="slices"):
        middle_lesion_slice(mask, 5)


def test_lesion_bbox_size_is_width_height():
    mask = _cube_mask()
    assert lesion_bbox_size(mask[3]) == (7, 4)
    assert lesion_bbox_size(mask[0]) == (0, 0)


def test_slice_to_rgb():
    volume = rescale_intensity(np.random.default_rng(5).random((4, 10, 12)).astype(np.float32) + 0.1)
    rgb = slice_to_rgb(volume, 2, image_size=16)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    assert np.array_equal(rgb[3:13, 2:14, 1], volume[2])
    with pytest.raises(ValueError, match="uint8"):
        slice_to_rgb(volume.astype(np.float32), 0)
    with pytest.raises(ValueError, match="outside"):
        slice_to_rgb(volume, 4)
