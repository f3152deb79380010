"""Real brain anatomy for the phantom: nilearn's packaged MNI152 2009a tissue maps.

nilearn ships the ICBM152 2009a (symmetric) grey-matter, white-matter and T1 templates
at 1 mm inside its package directory, so they are read from disk with nibabel and never
downloaded (nilearn itself is not even imported). From them this module derives, once
per process:

* ``gm``, ``wm``, ``brain``: tissue probabilities and the intracranial mask (T1
  template > 0; CSF is the brain mask minus GM minus WM);
* ``csf_near``, ``outside_mm``, ``ventricle_mm``: how close a point is to CSF (drives
  cortical atrophy), its distance outside the brain (drives the scalp layers) and its
  distance to the lateral ventricles (drives periventricular WMH). These are smooth, so
  they are computed at 2 mm (exact distances at 1 mm take seconds) and interpolated;
* candidate lesion sites: deep white matter and the grey-white junction.

The maps are stored channels-last in 1 mm tensors so that one trilinear ``grid_sample``
call fetches all channels of a point together; the two distance maps live in a second
tensor that is only sampled for subjects that need them.

All coordinates are MNI millimetres (RAS: +x right, +y anterior, +z superior).

    python -m unibrain_hf.data.phantom.template
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

TEMPLATE_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
}
DISTANCE_CAP_MM = 30.0
CORD_EXTENSION_MM = 20


def template_data_dir() -> Path:
    """nilearn's ``datasets/data`` directory, located without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the phantom needs nilearn's packaged MNI152 maps: pip install 'unibrain-hf[phantom]'")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn at {data_dir.parent.parent} lacks the MNI152 2009a maps {missing}; "
                                "install nilearn >= 0.10")
    return data_dir


@dataclass(frozen=True)
class TemplateVolume:
    """Channels on a regular MNI grid, ready for trilinear sampling at arbitrary points."""

    data: torch.Tensor  # (1, C, nz, ny, nx) float32 (channels-last memory); index i is origin + i * spacing
    channels: tuple[str, ...]
    origin_mm: tuple[float, float, float]  # (x, y, z) of voxel (0, 0, 0)
    spacing_mm: float
    padding_mode: str = "zeros"  # what points outside the grid see: "zeros" or "border" (nearest edge value)

    def sample(self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> dict[str, np.ndarray]:
        """Trilinear values of every channel at the MNI points (ux, uy, uz), given as 3-D arrays."""
        sizes = self.data.shape[:1:-1]  # (nx, ny, nz)
        grid = torch.empty((1, *ux.shape, 3), dtype=torch.float32)
        for axis, (u, o, n) in enumerate(zip((ux, uy, uz), self.origin_mm, sizes)):
            scale = np.float32(2.0 / ((n - 1) * self.spacing_mm))
            grid[0, ..., axis] = torch.from_numpy(np.asarray((u - np.float32(o)) * scale - np.float32(1.0), dtype=np.float32))
        with torch.no_grad():
            out = torch.nn.functional.grid_sample(self.data, grid, mode="bilinear", padding_mode=self.padding_mode,
                                                  align_corners=True)[0].contiguous().numpy()
        return {name: out[i] for i, name in enumerate(self.channels)}


@dataclass(frozen=True)
class Template:
    maps: TemplateVolume  # gm, wm, brain, csf_near at 1 mm
    distances: TemplateVolume  # outside_mm, ventricle_mm at 1 mm
    brain_mask: np.ndarray  # bool (x, y, z) at 1 mm, RAS index order
    origin_mm: tuple[float, float, float]
    ventricle_centre_mm: np.ndarray  # (3,)
    deep_wm_points_mm: np.ndarray  # (M, 3)
    junction_points_mm: np.ndarray  # (M, 3)

    def inside_brain(self, points_mm: np.ndarray) -> np.ndarray:
        """Nearest-voxel brain-mask lookup for (..., 3) MNI points (False outside the grid)."""
        idx = np.rint(np.asarray(points_mm, dtype=np.float64) - np.asarray(self.origin_mm)).astype(np.int64)
        shape = np.asarray(self.brain_mask.shape)
        valid = np.all((idx >= 0) & (idx < shape), axis=-1)
        clipped = np.clip(idx, 0, shape - 1)
        return valid & self.brain_mask[clipped[..., 0], clipped[..., 1], clipped[..., 2]]


def _to_volume(maps_zyx: dict[str, torch.Tensor], origin_mm, spacing_mm: float, padding_mode: str) -> TemplateVolume:
    stacked = torch.stack(list(maps_zyx.values()))[None].to(torch.float32)
    channels_last = stacked.contiguous(memory_format=torch.channels_last_3d)
    return TemplateVolume(channels_last, tuple(maps_zyx), tuple(float(o) for o in origin_mm), float(spacing_mm),
                          padding_mode)


def _upsample_twice(coarse_xyz: np.ndarray, fine_shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear 2 mm -> 1 mm (coarse sample i sits on fine voxel 2i), as a (z, y, x) tensor."""
    coarse = torch.from_numpy(np.ascontiguousarray(coarse_xyz.transpose(2, 1, 0), dtype=np.float32))[None, None]
    size = tuple(2 * (n - 1) + 1 for n in coarse.shape[2:])
    fine = torch.nn.functional.interpolate(coarse, size=size, mode="trilinear", align_corners=True)[0, 0]
    target = fine_shape[::-1]
    pad = []
    for n, t in zip(reversed(fine.shape), reversed(target)):
        pad += [0, t - n]
    return torch.nn.functional.pad(fine[None, None], pad, mode="replicate")[0, 0][: target[0], : target[1], : target[2]]


def _zyx(array_xyz: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array_xyz.transpose(2, 1, 0), dtype=np.float32))


def _lateral_ventricles(csf: np.ndarray, coords: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """The largest CSF component in a box around the lateral ventricles (not the cisterns)."""
    from scipy import ndimage

    x, y, z = coords
    box = (np.abs(x)[:, None, None] < 32) & ((y > -60) & (y < 40))[None, :, None] & ((z > -5) & (z < 40))[None, None, :]
    labels, count = ndimage.label((csf > 0.5) & box)
    if count == 0:
        raise RuntimeError("could not find the lateral ventricles in the MNI template")
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _lattice_points(condition: np.ndarray, origin_mm, step: int) -> np.ndarray:
    return (np.argwhere(condition) * step + np.asarray(origin_mm)).astype(np.float64)


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Load and derive all template maps (about 1 s, cached for the process)."""
    import nibabel as nib
    from scipy import ndimage

    data_dir = template_data_dir()
    images = {key: nib.load(str(data_dir / name)) for key, name in TEMPLATE_FILES.items()}
    affine = images["t1"].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError(f"unexpected MNI template affine {affine.tolist()}; expected a 1 mm RAS grid")
    # The template stops at z = -72 mm, through the medulla; continuing its last slice
    # downwards gives the brainstem a cord instead of a cut surface wrapped in scalp.
    origin = (float(affine[0, 3]), float(affine[1, 3]), float(affine[2, 3]) - CORD_EXTENSION_MM)
    arrays = {key: np.pad(np.asarray(img.dataobj, dtype=np.float32), [(0, 0), (0, 0), (CORD_EXTENSION_MM, 0)], mode="edge")
              for key, img in images.items()}
    brain_mask = arrays["t1"] > 0
    brain = brain_mask.astype(np.float32)
    gm = arrays["gm"] * np.float32(1 / 255) * brain
    wm = arrays["wm"] * np.float32(1 / 255) * brain
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.maximum(brain - gm - wm, 0.0)

    coords = tuple(np.arange(n, dtype=np.float64) + o for n, o in zip(brain.shape, origin))
    ventricles = _lateral_ventricles(csf, coords)
    ventricle_centre = np.array([(np.nonzero(ventricles.any(axis=tuple(a for a in range(3) if a != ax)))[0].mean())
                                 + origin[ax] for ax in range(3)])

    # The smooth maps are computed and stored at 2 mm: exact distances at 1 mm would take seconds.
    step = 2
    csf_near = ndimage.gaussian_filter(csf[::step, ::step, ::step], sigma=1.0)
    outside_mm = ndimage.distance_transform_edt(~brain_mask[::step, ::step, ::step], sampling=step)
    ventricle_mm = ndimage.distance_transform_edt(~ventricles[::step, ::step, ::step], sampling=step)
    coarse = {
        "csf_near": csf_near,
        "outside_mm": np.minimum(outside_mm, DISTANCE_CAP_MM),
        "ventricle_mm": np.minimum(ventricle_mm, DISTANCE_CAP_MM),
    }
    # Candidate lesion sites on the 2 mm lattice (plenty, and cheap to find).
    gm_coarse, wm_coarse = gm[::step, ::step, ::step], wm[::step, ::step, ::step]
    z = coords[2][::step][None, None, :]
    deep_wm = ((wm_coarse > 0.95) & (z > -8) & (coarse["ventricle_mm"] > 6)
               & (ndimage.gaussian_filter(gm_coarse, 1.5) < 0.15))
    junction = (gm_coarse > 0.35) & (wm_coarse > 0.35) & (z > -40)
    maps = {"gm": _zyx(gm), "wm": _zyx(wm), "brain": _zyx(brain),
            "csf_near": _upsample_twice(coarse.pop("csf_near"), brain.shape)}
    distances = {name: _upsample_twice(values, brain.shape) for name, values in coarse.items()}
    return Template(
        maps=_to_volume(maps, origin, 1.0, "zeros"),
        # Beyond the template's edge a point is as far from the brain as the edge is.
        distances=_to_volume(distances, origin, 1.0, "border"),
        brain_mask=brain_mask,
        origin_mm=origin,
        ventricle_centre_mm=ventricle_centre,
        deep_wm_points_mm=_lattice_points(deep_wm, origin, step),
        junction_points_mm=_lattice_points(junction, origin, step),
    )


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    template = load_template()
    print(f"loaded in {time.perf_counter() - start:.2f} s; maps {template.maps.channels + template.distances.channels} "
          f"at 1 mm; ventricle centre {template.ventricle_centre_mm.round(1)}; "
          f"{len(template.deep_wm_points_mm)} deep-WM and {len(template.junction_points_mm)} junction sites")
