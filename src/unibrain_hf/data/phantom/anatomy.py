"""Per-subject anatomy: the output grid, a random deformation of the MNI template, and
the resulting tissue volume fractions.

Every subject gets its own anatomy from the shared template:

* a small affine (head size/shape +/-8 %, tilt +/-4 deg, shift +/-4 mm),
* a smooth elastic displacement field (1.5-4 mm, features of ~30 mm),
* ventricle scaling (0.85-1.5 x, larger with more atrophy),
* cortical atrophy (grey matter next to CSF turns into CSF, up to 30 %),
* optional radial "pushes" that displace brain away from a mass (mass effect),
* for non-skull-stripped sources, scalp layers outside the brain (CSF, skull tables with
  fatty diploe, muscle, subcutaneous fat) built from the distance to the brain.

The output grid is LPI-oriented like RadGenome's preprocessed volumes: array axes
(z, y, x) run inferior, posterior and left, so ``volume[k]`` is an axial slice shown in
radiological convention. For every output voxel we keep ``u``, the template (MNI)
position it shows; lesions are drawn as functions of ``u`` so they follow the same warp.

    python -m unibrain_hf.data.phantom.anatomy
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .fields import smooth_random_field
from .template import Template

# Field of view in MNI mm: the brain (x +/-72, y -107..73, z down to the lower
# cerebellum) plus room for a 12 mm scalp and the per-subject deformation.
FOV_MM = {"x": (-88.0, 88.0), "y": (-123.0, 89.0), "z": (-66.0, 98.0)}
LPI_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # ITK (LPS) direction cosines
HEAD_CENTRE_MM = (0.0, -18.0, 10.0)  # the point the per-subject affine rotates and scales about
VOXEL_SIZE_RANGE = (1.0, 8.0)  # the template itself is 1 mm; finer grids add no anatomy

# (tissue, inner, outer) distance outside the brain surface in mm, before per-subject scaling.
SCALP_LAYERS = (
    ("csf", 0.0, 2.0),
    ("bone", 2.0, 4.0),
    ("fat", 4.0, 5.5),  # diploic marrow between the skull tables
    ("bone", 5.5, 7.0),
    ("muscle", 7.0, 9.0),
    ("fat", 9.0, 12.0),
)


def check_voxel_size(voxel_size: float) -> float:
    try:
        value = float(voxel_size)
    except (TypeError, ValueError):
        raise ValueError(f"voxel size must be a number of millimetres, got {voxel_size!r}") from None
    lo, hi = VOXEL_SIZE_RANGE
    if not (lo <= value <= hi):
        raise ValueError(f"voxel size must be between {lo} and {hi} mm, got {voxel_size!r}")
    return value


@dataclass(frozen=True)
class Grid:
    """An LPI output grid: ``x_mm[i]``, ``y_mm[j]``, ``z_mm[k]`` are the MNI coordinates of index (k, j, i)."""

    voxel_size: float
    x_mm: np.ndarray
    y_mm: np.ndarray
    z_mm: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z_mm), len(self.y_mm), len(self.x_mm))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (self.voxel_size,) * 3


@lru_cache(maxsize=8)
def output_grid(voxel_size: float) -> Grid:
    """The fixed field of view sampled at ``voxel_size`` mm (every subject shares it)."""
    size = check_voxel_size(voxel_size)

    def axis(lo: float, hi: float) -> np.ndarray:
        count = int(np.floor((hi - lo) / size)) + 1
        centre = 0.5 * (lo + hi)
        # Decreasing MNI coordinates: L, P and I are the negative RAS directions.
        return (centre + (np.arange(count) - (count - 1) / 2.0)[::-1] * size).astype(np.float32)

    return Grid(size, axis(*FOV_MM["x"]), axis(*FOV_MM["y"]), axis(*FOV_MM["z"]))


@dataclass(frozen=True)
class Push:
    """Radial mass effect: tissue around ``centre_mm`` moves outward by up to ``amplitude_mm``.

    The output voxel at distance r from the centre shows the template tissue at distance
    ``max(r - A exp(-(r/L)^2), 0)``; the map is monotonic, so nothing folds over, and
    everything inside the mass collapses onto its centre (where the lesion is drawn).
    """

    centre_mm: tuple[float, float, float]
    amplitude_mm: float
    length_mm: float

    def apply(self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray):
        cx, cy, cz = (np.float32(c) for c in self.centre_mm)
        dx, dy, dz = ux - cx, uy - cy, uz - cz
        r = np.sqrt(dx * dx + dy * dy + dz * dz)
        shrunk = np.maximum(r - np.float32(self.amplitude_mm) * np.exp(-(r / np.float32(self.length_mm)) ** 2), 0)
        ratio = np.divide(shrunk, r, out=np.zeros_like(r), where=r > 1e-6)
        return cx + dx * ratio, cy + dy * ratio, cz + dz * ratio

    def displacement_at(self, distance_mm: float) -> float:
        """How far tissue at ``distance_mm`` from the centre is displaced (mm)."""
        return float(self.amplitude_mm * np.exp(-(distance_mm / self.length_mm) ** 2))


@dataclass(frozen=True)
class AnatomyParams:
    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    elastic_mm: float
    ventricle_scale: float
    atrophy: float
    scalp_thickness: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> AnatomyParams:
        atrophy = float(rng.uniform(0.0, 0.30))
        return cls(
            rotation_deg=tuple(float(v) for v in rng.uniform(-4.0, 4.0, 3)),
            scale=tuple(float(v) for v in rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)),
            translation_mm=tuple(float(v) for v in rng.uniform(-4.0, 4.0, 3)),
            elastic_mm=float(rng.uniform(1.5, 4.0)),
            ventricle_scale=float(rng.uniform(0.85, 1.15) + 1.2 * atrophy),
            atrophy=atrophy,
            scalp_thickness=float(rng.uniform(0.85, 1.2)),
        )


def _rotation_matrix(degrees) -> np.ndarray:
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def soft_below(value: np.ndarray, edge: float | np.ndarray, width: float) -> np.ndarray:
    """Partial-volume indicator of ``value < edge``: 1 well below, 0 well above, linear over ``width``."""
    return np.clip((edge - value) / np.float32(width) + np.float32(0.5), 0.0, 1.0).astype(np.float32, copy=False)


@dataclass
class SubjectAnatomy:
    """Tissue fractions on the output grid plus the template position of every voxel."""

    grid: Grid
    params: AnatomyParams
    u: tuple[np.ndarray, np.ndarray, np.ndarray]  # template MNI coordinates (before mass effect)
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # intracranial fraction
    extracranial: dict[str, np.ndarray] = field(default_factory=dict)  # scalp tissue -> fraction
    ventricle_mm: np.ndarray | None = None
    pushes: tuple[Push, ...] = ()


def template_coordinates(grid: Grid, params: AnatomyParams, template: Template, rng: np.random.Generator):
    """The template position (ux, uy, uz) shown by every output voxel, before mass effect."""
    centre = np.asarray(HEAD_CENTRE_MM, dtype=np.float32)
    matrix = (_rotation_matrix(params.rotation_deg) * np.asarray(params.scale)[None, :]).astype(np.float32)
    offsets = ((grid.x_mm - centre[0])[None, None, :], (grid.y_mm - centre[1])[None, :, None],
               (grid.z_mm - centre[2])[:, None, None])
    u = []
    for row in range(3):
        coord = (matrix[row, 0] * offsets[0] + matrix[row, 1] * offsets[1]) + matrix[row, 2] * offsets[2]
        coord = coord + np.float32(centre[row] + params.translation_mm[row])
        coord = coord + np.float32(params.elastic_mm) * smooth_random_field(rng, grid.shape, 30.0, grid.voxel_size)
        u.append(coord.astype(np.float32, copy=False))
    # Ventricle scaling: pull sample positions towards the ventricles' centre with a smooth
    # (Gaussian) weight, which enlarges the ventricles by `ventricle_scale` and fades out.
    cv = template.ventricle_centre_mm.astype(np.float32)
    sigma = np.array([22.0, 38.0, 20.0], dtype=np.float32)
    d = [u[a] - cv[a] for a in range(3)]
    weight = np.exp(-0.5 * ((d[0] / sigma[0]) ** 2 + (d[1] / sigma[1]) ** 2 + (d[2] / sigma[2]) ** 2))
    factor = 1.0 - np.float32(1.0 - 1.0 / params.ventricle_scale) * weight
    return tuple((cv[a] + d[a] * factor).astype(np.float32, copy=False) for a in range(3))


def build_anatomy(grid: Grid, params: AnatomyParams, template: Template, rng: np.random.Generator,
                  pushes: tuple[Push, ...] = (), scalp: bool = False, ventricles: bool = False) -> SubjectAnatomy:
    """Warp the template into one subject's tissue fractions on ``grid``."""
    u = template_coordinates(grid, params, template, rng)
    warped = u
    for push in pushes:
        warped = push.apply(*warped)
    maps = template.maps.sample(*warped)
    brain = np.clip(maps["brain"], 0.0, 1.0)
    gm = np.clip(maps["gm"], 0.0, 1.0)
    wm = np.clip(maps["wm"], 0.0, 1.0)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    # Atrophy: cortex bordering CSF thins (sulci and ventricles widen).
    loss = np.float32(params.atrophy) * gm * np.clip(3.0 * maps["csf_near"], 0.0, 1.0)
    gm = gm - loss
    csf = csf + loss
    anatomy = SubjectAnatomy(grid, params, u, gm, wm, csf, brain, pushes=tuple(pushes))
    distances = template.distances.sample(*warped) if (scalp or ventricles) else {}
    if scalp:
        outside = distances["outside_mm"]
        outside_brain = 1.0 - brain
        width = grid.voxel_size
        for name, inner, outer in SCALP_LAYERS:
            inner_mm, outer_mm = inner * params.scalp_thickness, outer * params.scalp_thickness
            layer = soft_below(outside, outer_mm, width)
            if inner > 0:
                layer = layer - soft_below(outside, inner_mm, width)
            fraction = np.clip(layer, 0.0, 1.0) * outside_brain
            if name in anatomy.extracranial:
                anatomy.extracranial[name] = anatomy.extracranial[name] + fraction
            else:
                anatomy.extracranial[name] = fraction
    if ventricles:
        anatomy.ventricle_mm = distances["ventricle_mm"]
    return anatomy


if __name__ == "__main__":
    import time

    from .template import load_template

    template = load_template()
    for size in (4.0, 1.5):
        grid = output_grid(size)
        start = time.perf_counter()
        anatomy = build_anatomy(grid, AnatomyParams.draw(np.random.default_rng(0)), template,
                                np.random.default_rng(1), scalp=True, ventricles=True)
        print(f"{size} mm: grid {grid.shape}, {time.perf_counter() - start:.3f} s; "
              f"GM {anatomy.gm.sum() * size ** 3 / 1000:.0f} mL, WM {anatomy.wm.sum() * size ** 3 / 1000:.0f} mL, "
              f"CSF {anatomy.csf.sum() * size ** 3 / 1000:.0f} mL")
