"""MRI intensity scaling and slice geometry, exactly as UniBrain trained and evaluated.

* :func:`rescale_intensity` — whole-volume percentile scaling to uint8 (stage 2/3 and
  evaluation): the foreground (voxels > 0) is mapped linearly from its 0.5th..99.5th
  percentiles onto 1..255, the background stays 0.
* :func:`minmax_uint8` — per-slice min-max scaling (stage-1 self-alignment).
* :func:`pad_to_target` / :func:`crop_to_target` — the reference's centred pad and crop,
  *with* their quirks (see their docstrings); :func:`pad_to_size`, :func:`center_crop` and
  :func:`pad_to_multiple` are the straightforward versions for new code paths.
* :func:`lesion_slice_indices`, :func:`middle_lesion_slice`, :func:`lesion_bbox_size` —
  where the lesion is, used to choose slices and to rewrite lesion sizes.
* :func:`slice_to_rgb` — one scaled slice, padded and replicated to 3 channels.

    python -c "import numpy as np; from unibrain_hf.data.intensity import rescale_intensity; print(rescale_intensity(np.arange(8, dtype=np.float32).reshape(2, 2, 2)))"
"""

from __future__ import annotations

import numpy as np

#: Percentiles of the foreground that map to 1 and 255.
LOWER_PERCENTILE = 0.5
UPPER_PERCENTILE = 99.5
#: Target size the reference pads every 2-D slice to.
REFERENCE_IMAGE_SIZE = 256


def _as_float32_volume(volume, name: str = "volume") -> np.ndarray:
    array = np.asarray(volume)
    if array.ndim != 3:
        raise ValueError(f"{name} must be 3-D (z, y, x); got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    # The reference volumes are float32 bytes and its arithmetic runs in float32; doing the
    # same keeps the rounding of values that land on .5 identical.
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or Inf")
    return array


def rescale_intensity(volume) -> np.ndarray:
    """Whole-volume percentile scaling of a (z, y, x) MRI volume to uint8.

    Over the foreground voxels (``> 0``) of the *whole* volume take ``lo``/``hi`` = the
    0.5th/99.5th percentiles (numpy's default linear interpolation); map every foreground
    voxel to ``round((v - lo) / (hi - lo) * 255)`` clipped to [1, 255]; background stays 0.
    Because the clip starts at 1, no foreground voxel can turn into background.

    Raises ValueError when the volume has no foreground or the foreground has no spread
    between the two percentiles (the reference would divide by zero and produce NaNs).
    """
    array = _as_float32_volume(volume)
    foreground = array > 0
    values = array[foreground]
    if values.size == 0:
        raise ValueError("volume has no foreground (no voxel > 0); cannot rescale its intensities")
    lo = np.percentile(values, LOWER_PERCENTILE)
    hi = np.percentile(values, UPPER_PERCENTILE)
    if not hi > lo:
        raise ValueError(
            f"volume foreground has no intensity spread (0.5th and 99.5th percentiles are both {float(lo)!r})")
    scaled = np.clip(np.round((values - lo) / (hi - lo) * 255), 1, 255)
    out = np.zeros(array.shape, dtype=np.uint8)
    out[foreground] = scaled.astype(np.uint8)
    return out


def minmax_uint8(image) -> np.ndarray:
    """Per-slice min-max scaling to uint8, as the stage-1 task does it.

    ``(v - min) / (max - min) * 255`` computed in float32, then *truncated* to uint8 (a
    plain cast, not rounding), so only the maximum reaches 255. A constant slice is not
    rescaled: the reference casts its raw values; here they are clipped to [0, 255] first
    because casting out-of-range floats to uint8 is undefined (a background slice of zeros
    gives zeros either way).
    """
    array = np.asarray(image)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"minmax_uint8 expects a non-empty 2-D slice; got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError("slice contains NaN or Inf")
    low, high = array.min(), array.max()
    if high - low > 0:
        return ((array - low) / (high - low) * 255).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _image_hw(img: np.ndarray) -> tuple[int, int]:
    if img.ndim == 2:
        return img.shape
    if img.ndim == 3:
        return img.shape[1:]  # (C, H, W) like the reference
    raise ValueError(f"expected an (H, W) or (C, H, W) image; got shape {img.shape}")


def _size_pair(target_size) -> tuple[int, int]:
    if isinstance(target_size, (int, np.integer)):
        target_size = (int(target_size), int(target_size))
    if len(target_size) != 2 or any(int(s) <= 0 for s in target_size):
        raise ValueError(f"target size must be a positive int or (height, width); got {target_size!r}")
    return int(target_size[0]), int(target_size[1])


def _paste_centered(img: np.ndarray, out_h: int, out_w: int, pad_value) -> np.ndarray:
    h, w = _image_hw(img)
    top, left = (out_h - h) // 2, (out_w - w) // 2
    out = np.full(img.shape[:-2] + (out_h, out_w), pad_value, dtype=img.dtype)
    out[..., top:top + h, left:left + w] = img
    return out


def pad_to_target(img, target_size=REFERENCE_IMAGE_SIZE, pad_value=0) -> np.ndarray:
    """The reference's centred zero-padding of a slice, quirk included.

    It returns the image *unchanged* when ``target_h <= h or target_w <= h`` — the width
    test compares against the height. Otherwise it pads to exactly ``target_size`` with
    the extra row/column (odd difference) at the bottom/right. For the square 256 target
    this means: no padding at all when ``h >= 256``; padding of both sides when ``h < 256``.
    An image with ``h < target_h`` but ``w > target_w`` does not fit — the reference
    crashes there; this raises ValueError. ``img`` is (H, W) or (C, H, W).
    """
    img = np.asarray(img)
    h, w = _image_hw(img)
    target_h, target_w = _size_pair(target_size)
    if target_h <= h or target_w <= h:
        return img
    if w > target_w:
        raise ValueError(
            f"cannot pad an image of (h, w)=({h}, {w}) to {(target_h, target_w)}: it is wider than the target")
    return _paste_centered(img, target_h, target_w, pad_value)


def crop_to_target(img, target_size) -> np.ndarray:
    """The reference's centred crop back to the original slice size, quirk included.

    It crops only when the target is *strictly smaller in both* height and width; in every
    other case the image comes back unchanged (even if one side is too large).
    ``img`` is (H, W) or (C, H, W).
    """
    img = np.asarray(img)
    h, w = _image_hw(img)
    target_h, target_w = _size_pair(target_size)
    if target_h >= h or target_w >= w:
        return img
    top, left = (h - target_h) // 2, (w - target_w) // 2
    return img[..., top:top + target_h, left:left + target_w]


def pad_to_size(img, target_size, pad_value=0) -> np.ndarray:
    """Centred padding of each side that is smaller than the target; never crops.

    The result is ``(max(h, target_h), max(w, target_w))``; the odd extra row/column goes
    bottom/right, matching :func:`pad_to_target` wherever that one pads.
    """
    img = np.asarray(img)
    h, w = _image_hw(img)
    target_h, target_w = _size_pair(target_size)
    return _paste_centered(img, max(h, target_h), max(w, target_w), pad_value)


def center_crop(img, target_size) -> np.ndarray:
    """Centred crop of each side that is larger than the target; the inverse of :func:`pad_to_size`."""
    img = np.asarray(img)
    h, w = _image_hw(img)
    target_h, target_w = _size_pair(target_size)
    out_h, out_w = min(h, target_h), min(w, target_w)
    top, left = (h - out_h) // 2, (w - out_w) // 2
    return img[..., top:top + out_h, left:left + out_w]


def pad_to_multiple(img, multiple: int, pad_value=0) -> np.ndarray:
    """Centred padding so height and width become multiples of ``multiple`` (e.g. the VAE's 16)."""
    if int(multiple) <= 0:
        raise ValueError(f"multiple must be a positive integer; got {multiple!r}")
    img = np.asarray(img)
    h, w = _image_hw(img)
    multiple = int(multiple)
    return pad_to_size(img, (-(-h // multiple) * multiple, -(-w // multiple) * multiple), pad_value)


def lesion_slice_indices(mask, axis: int = 0) -> np.ndarray:
    """Indices along ``axis`` of the slices of a 3-D mask that contain any voxel > 0 (sorted)."""
    if mask is None:
        return np.zeros(0, dtype=np.int64)
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D; got shape {mask.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2; got {axis!r}")
    other_axes = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(np.any(mask > 0, axis=other_axes))


def middle_lesion_slice(mask, depth: int) -> int:
    """The evaluation slice: the middle lesion slice ``indices[len // 2]``, or ``depth // 2``.

    ``mask`` may be None (no segmentation); ``depth`` is the number of axial slices.
    """
    if int(depth) <= 0:
        raise ValueError(f"depth must be a positive number of slices; got {depth!r}")
    if mask is not None and np.asarray(mask).shape[0] != int(depth):
        raise ValueError(f"mask has {np.asarray(mask).shape[0]} slices but depth is {depth}")
    indices = lesion_slice_indices(mask)
    if len(indices):
        return int(indices[len(indices) // 2])
    return int(depth) // 2


def lesion_bbox_size(mask_slice) -> tuple[int, int]:
    """(width, height) in pixels of the bounding box of ``mask_slice > 0``; (0, 0) if empty.

    Slices are resampled to 1 x 1 mm in-plane, so pixels are millimetres.
    """
    mask_slice = np.asarray(mask_slice)
    if mask_slice.ndim != 2:
        raise ValueError(f"mask slice must be 2-D; got shape {mask_slice.shape}")
    rows, cols = np.nonzero(mask_slice > 0)
    if rows.size == 0:
        return 0, 0
    return int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


def slice_to_rgb(scaled_volume, slice_index: int, image_size: int = REFERENCE_IMAGE_SIZE) -> np.ndarray:
    """Axial slice ``slice_index`` of a uint8 volume, reference-padded, as (H, W, 3) uint8."""
    scaled_volume = np.asarray(scaled_volume)
    if scaled_volume.dtype != np.uint8 or scaled_volume.ndim != 3:
        raise ValueError(
            f"slice_to_rgb expects a 3-D uint8 volume (run rescale_intensity first); got {scaled_volume.dtype} "
            f"{scaled_volume.shape}")
    if not 0 <= int(slice_index) < scaled_volume.shape[0]:
        raise ValueError(f"slice index {slice_index} is outside 0..{scaled_volume.shape[0] - 1}")
    plane = pad_to_target(scaled_volume[int(slice_index)], (image_size, image_size))
    return np.repeat(plane[..., None], 3, axis=-1)
