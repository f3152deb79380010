"""MRI slice and volume inputs for the pipeline: loading, intensity scaling, geometry.

What a caller may pass for one modality, and what happens to it:

* a 2-D slice — ``PIL.Image`` (``L``/``I``/``F`` or ``RGB``), ``numpy`` array or ``torch`` tensor
  of shape (H, W), (H, W, 1|3) or (1|3, H, W) for tensors;
* a 3-D volume — a NIfTI path (``.nii``/``.nii.gz``) or a ``nibabel`` image — plus
  ``slice_index`` and ``axis`` (slices are ``np.take(volume, index, axis)``, no reorientation).

Intensities: ``uint8`` data is taken as already scaled (UniBrain's evaluation feeds uint8
slices); any other dtype gets UniBrain's percentile foreground scaling — over the whole volume
for volumes (``data.intensity.rescale_intensity``), over the slice itself for a 2-D slice.
Single-channel slices are replicated to RGB for the model; outputs of single-channel inputs
come back single-channel (the mean of the generated RGB, truncated to uint8 like the
reference). Geometry: slices are zero-padded (centred) to the VAE stride and to the
processor's minimum size — UniBrain pads its 240×240 slices to 256×256 the same way — and
outputs are cropped back, so they align pixel-for-pixel with the inputs.

    python -c "import numpy as np; from unibrain_hf.pipelines.mri_io import scale_to_uint8; \
print(scale_to_uint8(np.random.rand(4, 4), 'x').dtype)"
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.intensity import center_crop, pad_to_size, rescale_intensity

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_volume_source(value) -> bool:
    """A NIfTI path or a nibabel image (anything with ``get_fdata`` and an affine)."""
    if isinstance(value, (str, os.PathLike)):
        return str(value).endswith(NIFTI_SUFFIXES)
    return hasattr(value, "get_fdata") and hasattr(value, "affine")


def load_nifti(value, name: str):
    """A nibabel image from a path or an image (error names the argument)."""
    import nibabel as nib

    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.exists():
            raise ValueError(f"{name}: NIfTI file {path} does not exist")
        return nib.load(str(path))
    return value


def volume_array(image, name: str) -> np.ndarray:
    """The 3-D data of a nibabel image (a trailing singleton 4th axis is dropped)."""
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D volume, got shape {data.shape}")
    return data


def check_finite_and_varying(array: np.ndarray, name: str) -> None:
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    if array.min() == array.max():
        raise ValueError(f"{name} has constant intensity {array.min()!r}; there is no image content to condition on")


def scale_volume(volume: np.ndarray, name: str) -> np.ndarray:
    """Whole-volume percentile scaling to uint8 (uint8 volumes pass through)."""
    check_finite_and_varying(volume, name)
    if volume.dtype == np.uint8:
        return volume
    return rescale_intensity(volume)


def scale_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """One 2-D slice to uint8 with the same percentile rule as volumes (uint8 passes through)."""
    check_finite_and_varying(array, name)
    if array.dtype == np.uint8:
        return array
    if array.ndim != 2:
        raise ValueError(f"{name}: only single-channel slices can be intensity-scaled; got shape {array.shape} "
                         f"of dtype {array.dtype} (pass RGB images as uint8)")
    scaled = rescale_intensity(array[None].astype(np.float32))[0]
    if scaled.max() == 0:
        raise ValueError(f"{name} has no foreground (no pixel > 0) to scale")
    return scaled


def slice_array(value, name: str) -> np.ndarray:
    """A 2-D input (PIL / numpy / torch) as (H, W) or (H, W, 3) numpy, original dtype."""
    if isinstance(value, Image.Image):
        if value.mode in ("L", "I", "I;16", "F"):
            array = np.asarray(value)
        else:
            array = np.asarray(value.convert("RGB"))
    elif isinstance(value, torch.Tensor):
        array = value.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        array = array.numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3):
            array = np.moveaxis(array, 0, -1)
    elif isinstance(value, np.ndarray):
        array = value
    else:
        raise ValueError(f"{name}: unsupported type {type(value).__name__}; pass a PIL image, numpy array, torch "
                         f"tensor, NIfTI path or nibabel image")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise ValueError(f"{name}: expected a 2-D slice (H, W), (H, W, 1) or (H, W, 3); got shape {array.shape}. "
                         f"Pass volumes as a NIfTI path or nibabel image with slice_index")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array


def take_slice(volume: np.ndarray, slice_index, axis: int, name: str) -> np.ndarray:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2; got {axis!r}")
    if slice_index is None:
        raise ValueError(f"{name} is a volume: pass slice_index (or use impute_volume for every slice)")
    depth = volume.shape[axis]
    if not isinstance(slice_index, (int, np.integer)) or not 0 <= int(slice_index) < depth:
        raise ValueError(f"slice_index {slice_index!r} is out of range for {name}: axis {axis} has {depth} slices")
    return np.take(volume, int(slice_index), axis=axis)


@dataclass
class PreparedSlice:
    """A model-ready RGB slice and how to map model outputs back onto the input grid."""

    rgb: np.ndarray  # (H_model, W_model, 3) uint8, at a size the VAE resize keeps
    original_size: tuple[int, int]  # (h, w) of the caller's slice
    padded_size: tuple[int, int]  # (H_pad, W_pad) after centred zero-padding
    single_channel: bool

    @property
    def model_size(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])

    def image(self) -> Image.Image:
        return Image.fromarray(self.rgb, mode="RGB")

    def restore(self, generated_rgb: np.ndarray) -> np.ndarray:
        """A generated (H_model, W_model, 3) uint8 image → the caller's grid (gray if single-channel)."""
        image = generated_rgb
        if tuple(image.shape[:2]) != self.padded_size:
            image = np.asarray(Image.fromarray(image).resize(self.padded_size[::-1], resample=Image.BICUBIC))
        if self.single_channel:
            # The reference's grayscale: mean of RGB truncated to uint8.
            image = np.mean(image, axis=-1).astype(np.uint8)
            return center_crop(image, self.original_size)
        return np.moveaxis(center_crop(np.moveaxis(image, -1, 0), self.original_size), 0, -1)


def padded_size_for(height: int, width: int, stride: int, min_size: int) -> tuple[int, int]:
    """Each side padded up to a stride multiple and to at least ``min_size`` (rounded to the stride)."""
    def side(value):
        value = max(value, min_size)
        return -(-value // stride) * stride
    return side(height), side(width)


def prepare_slice(uint8_slice: np.ndarray, vae_resize) -> PreparedSlice:
    """Pad a uint8 slice (H, W) or (H, W, 3) for the model; resize only if the VAE rule demands it."""
    single = uint8_slice.ndim == 2
    height, width = uint8_slice.shape[:2]
    padded_h, padded_w = padded_size_for(height, width, vae_resize.stride, vae_resize.min_size)
    if single:
        padded = pad_to_size(uint8_slice, (padded_h, padded_w))
        rgb = np.repeat(padded[..., None], 3, axis=-1)
    else:
        rgb = np.moveaxis(pad_to_size(np.moveaxis(uint8_slice, -1, 0), (padded_h, padded_w)), 0, -1)
    target_w, target_h = vae_resize.target_size(padded_w, padded_h)
    if (target_h, target_w) != (padded_h, padded_w):
        # Larger than the model's maximum: resize like the reference's transform, undo on output.
        rgb = np.asarray(Image.fromarray(rgb).resize((target_w, target_h), resample=Image.BICUBIC))
    return PreparedSlice(np.ascontiguousarray(rgb), (height, width), (padded_h, padded_w), single)
