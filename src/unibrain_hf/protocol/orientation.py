"""The voxel frame UniBrain sees its slices in, and how any NIfTI volume is brought to it and back.

Training volumes (``unibrain prepare``, the phantom cohort, RadGenome's preprocessing) are
reoriented to the axis codes L, P, I and stored as ``(z, y, x)`` arrays: ``z`` runs towards
the patient's inferior, ``y`` towards posterior, ``x`` towards the patient's left. An axial
slice ``volume[k]`` is therefore a ``(y, x)`` image with anterior at the top and the patient's
right on the image's left (radiological convention), and ``k = 0`` is the most superior slice.
That array is the **training frame**; the model has only ever seen planes of it.

A NIfTI file stores ``(i, j, k)`` voxels with an affine to RAS millimetres, in any axis order
and direction. :func:`to_training_frame` reorders and flips its voxels (nibabel's
``io_orientation`` / ``ornt_transform`` / ``apply_orientation``, no resampling, so an
oblique affine goes to its closest axes) into the training frame; :func:`from_training_frame`
is its exact inverse, so results go back on the input's own voxel grid and affine.

Planes of the training frame, by name (the index counts along the named axis):

============  ===========  =========================  ==================================
plane         array axis   index runs towards         slice image (rows, columns)
============  ===========  =========================  ==================================
``axial``     0 (z)        inferior (0 = superior)    (y, x): anterior top, patient right left
``coronal``   1 (y)        posterior (0 = anterior)   (z, x): superior top, patient right left
``sagittal``  2 (x)        patient left (0 = right)   (z, y): superior top, anterior left
============  ===========  =========================  ==================================

These are the stage-1 planes of ``data.sequence_builder.build_recon_sample`` (before its
random rotation); stage-2/3 training and the evaluation use axial slices only.

    python -c "from unibrain_hf.protocol.orientation import training_frame_affine as a; print(a((1, 1, 2)))"
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

#: nibabel axis codes (the direction each voxel axis increases towards) of the stored (x, y, z) data.
TRAINING_AXCODES = ("L", "P", "I")

#: Plane name -> axis of the (z, y, x) training-frame array.
PLANES = MappingProxyType({"axial": 0, "coronal": 1, "sagittal": 2})


def _orientation_transform(affine: np.ndarray):
    """nibabel's transform from an image's voxel axes to L, P, I (x, y, z)."""
    from nibabel import orientations

    current = orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return orientations.ornt_transform(current, orientations.axcodes2ornt(TRAINING_AXCODES))


def to_training_frame(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A 3-D voxel array with its voxel->RAS affine -> the (z, y, x) training-frame array (a view when possible)."""
    from nibabel import orientations

    if np.ndim(data) != 3:
        raise ValueError(f"expected a 3-D voxel array, got shape {np.shape(data)}")
    lpi = orientations.apply_orientation(data, _orientation_transform(affine))
    return lpi.transpose(2, 1, 0)


def from_training_frame(volume_zyx: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_training_frame`: voxels back in the order ``affine`` describes."""
    from nibabel import orientations

    # ornt_transform(training, current) undoes the permutation and the flips exactly.
    current = orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    backward = orientations.ornt_transform(orientations.axcodes2ornt(TRAINING_AXCODES), current)
    return orientations.apply_orientation(np.asarray(volume_zyx).transpose(2, 1, 0), backward)


def training_frame_affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """The voxel->RAS affine of an (x, y, z) array in L, P, I order with ``spacing`` (x, y, z) mm."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be three positive numbers (x, y, z); got {spacing.tolist()}")
    affine = np.diag([-spacing[0], -spacing[1], -spacing[2], 1.0])  # L, P, I are the negative RAS axes
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


def training_frame_nifti(volume_zyx: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    """A NIfTI image whose training frame is ``volume_zyx`` itself (e.g. a parquet record's volume)."""
    import nibabel as nib

    volume_zyx = np.asarray(volume_zyx)
    if volume_zyx.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume_zyx.shape}")
    return nib.Nifti1Image(np.ascontiguousarray(volume_zyx.transpose(2, 1, 0)), training_frame_affine(spacing, origin))


def plane_axis(plane: str) -> int:
    """The training-frame array axis of a plane name (``"axial"``, ``"coronal"``, ``"sagittal"``)."""
    if not isinstance(plane, str) or plane not in PLANES:
        raise ValueError(f"axis must be one of {tuple(PLANES)} (a plane of the training frame); got {plane!r}")
    return PLANES[plane]


__all__ = ["TRAINING_AXCODES", "PLANES", "to_training_frame", "from_training_frame", "training_frame_affine",
           "training_frame_nifti", "plane_axis"]
