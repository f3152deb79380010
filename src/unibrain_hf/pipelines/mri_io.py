"""MRI inputs for the pipeline: one call turns what a caller passed into a model-ready slice.

:func:`load_slice` is the whole input path for one modality of one row. What a caller may pass:

* a 2-D slice — ``PIL.Image`` (``L``/``I``/``F``/``1`` or RGB), ``numpy`` array or ``torch`` tensor
  of shape (H, W), (H, W, 1|3) or, for tensors, (1|3, H, W). It is taken as a plane of the
  training frame already (rows = the first in-plane axis, e.g. anterior→posterior for an axial
  slice); no reorientation happens, because a bare array has no affine to reorient from;
* a 3-D volume — a NIfTI path (``.nii``/``.nii.gz``) or a ``nibabel`` image — with ``slice_index``
  and ``axis``. The volume is first brought to the training frame from its affine
  (:mod:`unibrain_hf.protocol.orientation`: L, P, I voxel order as (z, y, x), no resampling), then
  sliced there: ``axis="axial"`` and ``slice_index=k`` is the k-th axial slice counted from the
  top of the head, the same slice ``SubjectRecord.volumes[code][k]`` holds after ``unibrain prepare``.

Intensities: ``uint8`` data is taken as already scaled (UniBrain's evaluation feeds uint8
slices); ``bool`` data becomes 0/255; any other real dtype gets UniBrain's percentile foreground
scaling — over the whole volume for volumes (``data.intensity.rescale_intensity``), over the
slice itself for a 2-D slice. Complex data and arrays of strings/objects are refused (never cast).
Single-channel slices are replicated to RGB for the model; outputs of single-channel inputs come
back single-channel (the mean of the generated RGB, truncated to uint8 like the reference).
Geometry: slices are zero-padded (centred) to the VAE stride and to the processor's minimum
size — UniBrain pads its 240×240 slices to 256×256 the same way — and outputs are cropped back,
so they align pixel-for-pixel with the inputs. Whole volumes (``impute_volume``) go through
:func:`load_volume`, whose :class:`TrainingFrameVolume` also writes results back onto the
input's own voxel grid, affine and header.

Every error is a package error type naming the argument (``images['t1n']``) and, for files, the path.

    python -c "import numpy as np; from unibrain_hf.pipelines.mri_io import load_slice; \
from unibrain_hf.processing.image_transforms import StrideResize; \
print(load_slice(np.random.rand(30, 40), 'x', StrideResize(64, 32, 16)).model_size)"
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data.intensity import center_crop, pad_to_size, rescale_intensity
from ..errors import CorruptFileError, InvalidInputError
from ..protocol.orientation import from_training_frame, plane_axis, to_training_frame
from ..utils.readers import NIFTI_SUFFIXES, read_nifti

_GRAY_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "F", "1")


# --------------------------------------------------------------------------- call structure
def image_rows(images, name: str = "images") -> list[dict]:
    """``images`` as a list of rows (one dict per row); every row names the same modalities in one order."""
    rows = images if isinstance(images, (list, tuple)) else [images]
    if not rows:
        raise InvalidInputError(f"{name} is an empty list; pass a dict {{modality: slice or volume}} or a list of them")
    for index, row in enumerate(rows):
        where = f"{name}[{index}]" if len(rows) > 1 else name
        if not isinstance(row, dict) or not row:
            raise InvalidInputError(f"{where} must be a non-empty dict {{modality code: slice or volume}}; "
                                    f"got {type(row).__name__}")
        for code in row:
            if not isinstance(code, str) or not code.strip():
                raise InvalidInputError(f"{where} keys must be non-empty modality strings; got {code!r}")
        if list(row) != list(rows[0]):
            raise InvalidInputError(f"{where} has modalities {list(row)} but {name}[0] has {list(rows[0])}; every row "
                                    f"of a batch must give the same modalities in the same order")
    return list(rows)


def is_volume_source(value) -> bool:
    """A path or a nibabel image (anything with ``dataobj`` and an affine), as opposed to a 2-D slice."""
    if isinstance(value, (str, os.PathLike)):
        return True
    return hasattr(value, "dataobj") and hasattr(value, "affine")


# --------------------------------------------------------------------------- pixel values
def _numeric(array: np.ndarray, name: str) -> np.ndarray:
    """Refuse what holds no real pixel values; ``bool`` becomes 0/255 uint8."""
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if kind == "c":
        raise InvalidInputError(f"{name} is complex ({array.dtype}); the model takes real magnitude images, and complex "
                                f"data is not cast silently: pass e.g. np.abs(data)")
    if kind not in "iuf":
        raise InvalidInputError(f"{name} has dtype {array.dtype}, which holds no pixel values; pass a numeric array, "
                                f"a PIL image, a torch tensor or a NIfTI volume")
    return array


def _check_finite_and_varying(array: np.ndarray, name: str) -> None:
    if array.size == 0:
        raise InvalidInputError(f"{name} is empty (shape {array.shape})")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInputError(f"{name} contains NaN or Inf values")
    if array.min() == array.max():
        raise InvalidInputError(f"{name} has constant intensity {array.min()!r}; there is no image content to "
                                f"condition on")


def _scale_volume(volume: np.ndarray, name: str) -> np.ndarray:
    """Whole-volume percentile scaling to uint8 (uint8 volumes pass through)."""
    _check_finite_and_varying(volume, name)
    if volume.dtype == np.uint8:
        return volume
    try:
        return rescale_intensity(volume)
    except ValueError as exc:
        raise InvalidInputError(f"{name}: {exc}") from None


def _scale_slice(array: np.ndarray, name: str) -> np.ndarray:
    """One 2-D slice to uint8 with the same percentile rule as volumes (uint8 passes through)."""
    _check_finite_and_varying(array, name)
    if array.dtype == np.uint8:
        return array
    if array.ndim != 2:
        raise InvalidInputError(f"{name}: only single-channel slices can be intensity-scaled; got shape {array.shape} "
                                f"of dtype {array.dtype} (pass RGB images as uint8)")
    try:
        scaled = rescale_intensity(array[None].astype(np.float32))[0]
    except ValueError as exc:
        raise InvalidInputError(f"{name}: {exc}") from None
    return scaled


def _slice_array(value, name: str) -> np.ndarray:
    """A 2-D input (PIL / numpy / torch) as (H, W) or (H, W, 3) numpy of a real dtype."""
    if isinstance(value, Image.Image):
        array = np.asarray(value if value.mode in _GRAY_MODES else value.convert("RGB"))
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
        raise InvalidInputError(f"{name}: unsupported type {type(value).__name__}; pass a PIL image, numpy array, "
                                f"torch tensor, NIfTI path or nibabel image")
    array = _numeric(array, name)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise InvalidInputError(f"{name}: expected a 2-D slice (H, W), (H, W, 1) or (H, W, 3); got shape "
                                f"{array.shape}. Pass volumes as a NIfTI path or nibabel image with slice_index")
    return array


# --------------------------------------------------------------------------- volumes
@dataclass
class TrainingFrameVolume:
    """A NIfTI volume scaled to uint8 and brought to the training frame, plus what maps results back."""

    data: np.ndarray  # (z, y, x) uint8 in the training frame
    source: object  # the nibabel image it came from (affine, header, voxel order)

    def plane(self, index: int, axis: str) -> np.ndarray:
        return np.take(self.data, index, axis=plane_axis(axis))

    def to_input_frame(self, volume_zyx: np.ndarray):
        """A training-frame (z, y, x) uint8 result as a NIfTI image on the input's grid, affine and header."""
        import nibabel as nib

        data = np.ascontiguousarray(from_training_frame(volume_zyx, self.source.affine))
        header = self.source.header.copy()
        header.set_data_dtype(np.uint8)
        image = nib.Nifti1Image(data, self.source.affine, header)
        # A result has no scaling of its own: write its uint8 values as they are.
        image.header.set_slope_inter(1.0, 0.0)
        return image


def _volume_data(value, name: str):
    source = read_nifti(value, name)
    try:
        data = np.asanyarray(source.dataobj)
    except (zlib.error, EOFError, OSError, ValueError) as exc:  # an in-memory image backed by a damaged file
        raise CorruptFileError(f"{name} ({source.get_filename()}) could not be read: it is damaged or truncated "
                               f"({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InvalidInputError(f"{name}: expected a 3-D volume, got shape {data.shape}")
    return source, _numeric(np.asarray(data), name)


def load_volume(value, name: str) -> TrainingFrameVolume:
    """A NIfTI path / nibabel image -> whole-volume-scaled uint8 voxels in the training frame."""
    source, data = _volume_data(value, name)
    canonical = to_training_frame(data, source.affine)
    return TrainingFrameVolume(np.ascontiguousarray(_scale_volume(canonical, name)), source)


def _take(volume: np.ndarray, slice_index, axis: str, name: str) -> np.ndarray:
    if slice_index is None:
        raise InvalidInputError(f"{name} is a volume: pass slice_index (or use impute_volume for every slice)")
    depth = volume.shape[plane_axis(axis)]
    if not 0 <= int(slice_index) < depth:
        raise InvalidInputError(f"slice_index {slice_index!r} is out of range for {name}: its {axis} axis has "
                                f"{depth} slices (0..{depth - 1}, counted in the training frame)")
    return np.take(volume, int(slice_index), axis=plane_axis(axis))


# --------------------------------------------------------------------------- model-ready slices
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


def load_slice(value, name: str, vae_resize, slice_index: int | None = None, axis: str = "axial") -> PreparedSlice:
    """One modality of one row -> a padded uint8 RGB slice in the training frame (see the module docstring)."""
    if is_volume_source(value):
        if isinstance(value, (str, os.PathLike)) and not str(value).endswith(NIFTI_SUFFIXES):
            raise InvalidInputError(f"{name}: {value!s} is not a NIfTI file (.nii or .nii.gz); pass 2-D slices as "
                                    f"arrays, tensors or PIL images")
        source, data = _volume_data(value, name)
        canonical = to_training_frame(data, source.affine)
        _check_finite_and_varying(_take(canonical, slice_index, axis, name), f"{name} slice {slice_index}")
        # Scale with whole-volume statistics, as UniBrain does, then keep the one plane.
        plane = _take(_scale_volume(canonical, name), slice_index, axis, name)
    else:  # a 2-D slice is one plane already; slice_index and axis concern volumes only
        plane = _scale_slice(_slice_array(value, name), name)
    return prepare_slice(np.ascontiguousarray(plane), vae_resize)


__all__ = ["image_rows", "is_volume_source", "load_slice", "load_volume", "TrainingFrameVolume", "PreparedSlice",
           "prepare_slice", "padded_size_for"]
