"""The phantom's five lesion classes: where they go, what they look like, what they are made of.

Each class first *plans* its lesions in template (MNI) space from the subject's lesion
random stream - position, size, shape, tissue values, mass effect - and then *renders*
them as volume-fraction maps on the subject's grid, as functions of every voxel's
template position ``u`` (so they follow the subject's warp). Shapes are ellipsoids whose
radius is perturbed by smooth noise, with partial-volume edges.

=============  ==============================================================  =========
class          geometry                                                        labels
=============  ==============================================================  =========
glioma         necrotic core (rho < ~0.4-0.6), thick irregular enhancing rim   1 core,
               to rho = 1, vasogenic oedema to rho ~ 1.5-2.2 weighted by WM;   3 rim,
               pushes brain aside                                              2 oedema
meningioma     extra-axial hemi-ellipsoid on the inner skull table (convexity  3 tumour,
               or falx), homogeneous avid enhancement, dural tail, sometimes   2 oedema
               oedema; pushes brain away
metastasis     2-10 spheres of 3-15 mm at the grey-white junction; >= 10 mm    1 core,
               ones ring-enhance; oedema 2-4 x radius                          3, 2
stroke         acute infarct: a wedge in the MCA, ACA or PCA territory          1
               (cortex and underlying WM), restricted diffusion
wmh            periventricular caps/halo + deep punctate foci in WM, by        1
               Fazekas grade 1-3
=============  ==============================================================  =========

Labels follow BraTS (1 necrosis / non-enhancing, 2 oedema, 3 enhancing) and ISLES/WMH
(1 lesion). Tissue values (3 T nominal; lesion T1 scaled like white matter's at 1.5 T):

* glioma/metastasis necrosis T1 2200-2600, T2 250-400, PD 0.95, ADC 2.0; enhancing
  tumour T1 1400-1600 (metastasis 1300-1500), T2 100-120 (90-130), PD 0.85, ADC 1.0,
  gadolinium 0.3-0.5 mM; oedema T1 1400-1600, T2 120-150, PD 0.88, ADC 1.5;
* meningioma T1 ~ grey matter, T2 1.0-1.25 x grey matter, PD 0.85, ADC 0.8, 0.5-0.8 mM;
* infarct T1 +10 %, T2 +10-20 %, PD +5 % of the tissue it hits, ADC 0.35-0.5; the swollen cortex
  effaces 75-95 % of the sulcal CSF inside the territory;
* WMH T1 1.3-1.5 x, T2 1.6-2.0 x white matter, PD 0.8, ADC 1.0.

    python -m unibrain_hf.data.phantom.lesions
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .anatomy import Push, SubjectAnatomy, soft_below
from .fields import smooth_random_field
from .location import describe_location
from .template import Template
from .tissue import Tissue, lesion_t1_factor

NECROSIS, OEDEMA, ENHANCING = 1, 2, 3
LESION = 1


@dataclass
class Compartment:
    """A lesion tissue and its volume fraction on the subject grid.

    ``source`` says what the lesion replaces: ``None`` displaces every tissue in the voxel
    proportionally (a mass), a tissue name (``"gm"``/``"wm"``) converts that tissue only
    (oedema, infarct, WMH: the fraction was built as a share of that tissue).
    """

    tissue: Tissue
    fraction: np.ndarray
    label: int
    source: str | None = None


@dataclass
class LesionResult:
    compartments: list[Compartment] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # what the report describes


# ---------------------------------------------------------------------------- shared geometry
def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def unit(vector) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    return v / np.linalg.norm(v)


def local_box(u, centre, radius_mm: float) -> tuple[slice, slice, slice]:
    """Index box of the voxels whose template position can lie within ``radius_mm`` of ``centre``."""
    stride = 3
    coarse = [c[::stride, ::stride, ::stride] for c in u]
    near = np.ones(coarse[0].shape, dtype=bool)
    for axis in range(3):
        near &= np.abs(coarse[axis] - np.float32(centre[axis])) < radius_mm
    if not near.any():
        return (slice(0, 0),) * 3
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.nonzero(near.any(axis=other))[0]
        box.append(slice(max(0, hits[0] * stride - stride), min(u[0].shape[axis], hits[-1] * stride + 2 * stride)))
    return tuple(box)


def box_is_empty(box) -> bool:
    return any(s.stop <= s.start for s in box)


def ellipsoid_radius(u_box, centre, rotation: np.ndarray, semi_axes) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) of the points ``u_box``."""
    d = [u_box[a] - np.float32(centre[a]) for a in range(3)]
    total = np.zeros_like(d[0])
    for i in range(3):
        along = (np.float32(rotation[0, i]) * d[0] + np.float32(rotation[1, i]) * d[1]) + np.float32(rotation[2, i]) * d[2]
        total += (along / np.float32(semi_axes[i])) ** 2
    return np.sqrt(total)


def extent_mm(fraction: np.ndarray, voxel_size: float, fallback_mm=None) -> tuple[int, int, int]:
    """Bounding-box size (transverse, antero-posterior, cranio-caudal) of ``fraction >= 0.5`` in mm."""
    mask = fraction >= 0.5
    if not mask.any():
        if fallback_mm is not None:
            return tuple(int(max(1, round(v))) for v in fallback_mm)
        peak = float(fraction.max())
        if peak <= 0:
            return (0, 0, 0)
        mask = fraction >= 0.5 * peak
    sizes = []
    for axis in (2, 1, 0):  # x, y, z of a (z, y, x) array
        other = tuple(a for a in range(3) if a != axis)
        hits = np.nonzero(mask.any(axis=other))[0]
        sizes.append(int(round((hits[-1] - hits[0] + 1) * voxel_size)))
    return tuple(sizes)


def centroid_mm(fraction: np.ndarray, u) -> np.ndarray:
    weight = float(fraction.sum())
    if weight <= 0:
        return np.array([float(c.mean()) for c in u])
    return np.array([float((fraction * c).sum()) / weight for c in u])


def place(full_shape, box, values: np.ndarray) -> np.ndarray:
    out = np.zeros(full_shape, dtype=np.float32)
    out[box] = values
    return out


def sub(u, box):
    return tuple(c[box] for c in u)


def sample_brain(template: Template, points_mm: np.ndarray) -> np.ndarray:
    pts = np.asarray(points_mm, dtype=np.float32).reshape(1, 1, -1, 3)
    return template.maps.sample(pts[..., 0], pts[..., 1], pts[..., 2])["brain"].reshape(-1)


def mass_effect_grade(amplitude_mm: float, moderate_mm: float = 4.5, marked_mm: float = 7.5) -> str:
    """Grade a push of ``amplitude_mm`` (how far the nearest brain is displaced)."""
    if amplitude_mm < moderate_mm:
        return "mild"
    if amplitude_mm < marked_mm:
        return "moderate"
    return "marked"


def tumour_tissues(rng: np.random.Generator, t1_factor: float) -> dict[str, Tissue]:
    """Necrotic core, enhancing rim and oedema tissues of a high-grade tumour."""
    return {
        "core": Tissue("necrosis", rng.uniform(2200, 2600) * t1_factor, rng.uniform(250, 400), 0.95, 2.0),
        "rim": Tissue("enhancing tumour", rng.uniform(1400, 1600) * t1_factor, rng.uniform(100, 120), 0.85, 1.0,
                      gadolinium=rng.uniform(0.3, 0.5)),
        "oedema": Tissue("oedema", rng.uniform(1400, 1600) * t1_factor, rng.uniform(120, 150), 0.88, 1.5),
    }


class LesionModel:
    """Base class: plan in ``__init__`` (from the lesion random stream), then ``render``."""

    key = "normal"
    needs_ventricle_distance = False

    def __init__(self, rng: np.random.Generator, template: Template, tissues: dict[str, Tissue],
                 field_strength: float):
        self.rng = rng
        self.template = template
        self.tissues = tissues
        self.t1_factor = lesion_t1_factor(field_strength)
        self.pushes: tuple[Push, ...] = ()

    def render(self, anatomy: SubjectAnatomy) -> LesionResult:
        return LesionResult()


class NormalModel(LesionModel):
    key = "normal"


# ---------------------------------------------------------------------------- glioma
class GliomaModel(LesionModel):
    key = "glioma"

    def __init__(self, rng, template, tissues, field_strength):
        super().__init__(rng, template, tissues, field_strength)
        sites = template.deep_wm_points_mm
        self.centre = sites[rng.integers(len(sites))] + rng.uniform(-1.5, 1.5, 3)
        radius = rng.uniform(11.0, 20.0)
        self.semi_axes = radius * rng.uniform(0.8, 1.2, 3)
        self.rotation = random_rotation(rng)
        self.core_fraction = rng.uniform(0.4, 0.6)
        self.oedema_factor = rng.uniform(1.5, 2.2)
        self.tumour = tumour_tissues(rng, self.t1_factor)
        mean_radius = float(np.mean(self.semi_axes))
        self.pushes = (Push(tuple(self.centre), float(rng.uniform(0.3, 0.5) * mean_radius),
                            float(0.9 * mean_radius * self.oedema_factor)),)

    def render(self, anatomy):
        grid = anatomy.grid
        vs = grid.voxel_size
        reach = float(self.semi_axes.max() * self.oedema_factor * 1.4 + 2 * vs)
        box = local_box(anatomy.u, self.centre, reach)
        if box_is_empty(box):
            raise RuntimeError("glioma centre fell outside the field of view")
        rng = self.rng
        shape = anatomy.gm[box].shape
        rho = ellipsoid_radius(sub(anatomy.u, box), self.centre, self.rotation, self.semi_axes)
        width = vs / float(self.semi_axes.mean())
        # Irregular outer wall and necrotic cavity: each border gets its own smooth wobble.
        outer_edge = 1.0 + 0.15 * smooth_random_field(rng, shape, 12.0, vs)
        core_edge = self.core_fraction * (1.0 + 0.1 * smooth_random_field(rng, shape, 10.0, vs))
        oedema_edge = self.oedema_factor * (1.0 + 0.2 * smooth_random_field(rng, shape, 20.0, vs))
        brain = anatomy.brain[box]
        inside = soft_below(rho, outer_edge, width)
        core = np.minimum(soft_below(rho, core_edge, width), inside)
        rim = np.clip(inside - core, 0.0, 1.0)
        oedema = np.clip(soft_below(rho, oedema_edge, 2 * width) - inside, 0.0, 1.0) * anatomy.wm[box]
        # Enhancement is patchy: part of the rim takes up half as much contrast.
        patchy = np.clip(0.6 + 0.4 * smooth_random_field(rng, shape, 8.0, vs), 0.0, 1.0)
        rim_tissue = self.tumour["rim"]
        weak_rim = replace(rim_tissue, name="weakly enhancing tumour", gadolinium=0.5 * rim_tissue.gadolinium)
        full = grid.shape
        core_full = place(full, box, core * brain)
        rim_full = place(full, box, rim * brain)
        compartments = [
            Compartment(self.tumour["core"], core_full, NECROSIS),
            Compartment(rim_tissue, rim_full * place(full, box, patchy), ENHANCING),
            Compartment(weak_rim, rim_full * place(full, box, 1.0 - patchy), ENHANCING),
            Compartment(self.tumour["oedema"], place(full, box, oedema), OEDEMA, source="wm"),
        ]
        tumour = core_full + rim_full
        push = self.pushes[0]
        cv = self.template.ventricle_centre_mm
        facts = {
            "location": describe_location(centroid_mm(tumour, anatomy.u)),
            "size_mm": extent_mm(tumour, vs, 2 * self.semi_axes),
            "oedema_mm": extent_mm(tumour + compartments[3].fraction, vs),
            "necrosis_mm": extent_mm(core_full, vs, 2 * self.core_fraction * self.semi_axes),
            "mass_effect": mass_effect_grade(push.amplitude_mm),
            "midline_shift_mm": round(push.displacement_at(abs(self.centre[0])), 1),
            "shift_towards": "left" if self.centre[0] > 0 else "right",
            "ventricle_effaced": bool(np.linalg.norm(self.centre - cv) < self.semi_axes.mean() * self.oedema_factor + 22),
        }
        return LesionResult(compartments, facts)


# ---------------------------------------------------------------------------- meningioma
class MeningiomaModel(LesionModel):
    key = "meningioma"

    def __init__(self, rng, template, tissues, field_strength):
        super().__init__(rng, template, tissues, field_strength)
        side = 1.0 if rng.random() < 0.5 else -1.0
        self.site = "convexity" if rng.random() < 0.7 else "parafalcine"
        if self.site == "convexity":
            self.centre, self.normal = self._convexity_site(rng, side)
        else:
            self.centre, self.normal = self._falcine_site(rng, side)
        # Two tangents spanning the dural base, at a random angle about the normal.
        in_plane = unit(np.cross(self.normal, [0.0, 0.0, 1.0] if abs(self.normal[2]) < 0.9 else [1.0, 0.0, 0.0]))
        angle = rng.uniform(0, np.pi)
        t1 = np.cos(angle) * in_plane + np.sin(angle) * np.cross(self.normal, in_plane)
        self.tangents = (unit(t1), unit(np.cross(self.normal, t1)))
        self.radii_tangential = rng.uniform(9.0, 20.0, 2)
        self.depth = float(self.radii_tangential.mean() * rng.uniform(0.7, 1.05))
        self.tail_mm = float(rng.uniform(6.0, 15.0)) if rng.random() < 0.8 else 0.0
        self.has_oedema = bool(rng.random() < 0.35)
        self.oedema_factor = float(rng.uniform(1.3, 1.8))
        gm = tissues["gm"]
        self.t2_ratio = float(rng.uniform(1.0, 1.25))
        self.tissue = Tissue("meningioma", gm.t1 * rng.uniform(0.95, 1.08), gm.t2 * self.t2_ratio, 0.85, 0.8,
                             gadolinium=rng.uniform(0.5, 0.8))
        self.oedema_tissue = tumour_tissues(rng, self.t1_factor)["oedema"]
        # Brain is pushed away from the middle of the tumour, not from its dural base.
        self.pushes = (Push(tuple(self.centre - 0.4 * self.depth * self.normal), float(self.depth * rng.uniform(0.6, 0.8)),
                            float(1.3 * self.radii_tangential.max())),)

    def _convexity_site(self, rng, side):
        start = self.template.ventricle_centre_mm + np.array([0.0, -4.0, 4.0])
        for _ in range(100):
            direction = unit([side * rng.uniform(0.3, 1.0), rng.uniform(-1.0, 1.0), rng.uniform(-0.25, 0.6)])
            radii = np.arange(5.0, 130.0, 1.0)
            inside = self.template.inside_brain(start[None, :] + radii[:, None] * direction[None, :])
            if inside.any():
                break
        surface = start + radii[np.nonzero(inside)[0][-1]] * direction
        # Outward normal from the gradient of the (trilinear) brain mask.
        offsets = np.eye(3) * 3.0
        grad = (sample_brain(self.template, surface + offsets) - sample_brain(self.template, surface - offsets)) / 6.0
        normal = -unit(grad) if np.linalg.norm(grad) > 1e-3 else direction
        return surface + 1.5 * normal, normal

    def _falcine_site(self, rng, side):
        for _ in range(100):
            centre = np.array([0.0, rng.uniform(-50.0, 30.0), rng.uniform(25.0, 55.0)])
            if self.template.inside_brain(centre + np.array([side * 12.0, 0.0, 0.0])):
                break
        # The tumour grows from the falx into the `side` hemisphere; the normal points at the falx.
        return centre, np.array([-side, 0.0, 0.0])

    def render(self, anatomy):
        grid = anatomy.grid
        vs = grid.voxel_size
        rng = self.rng
        reach = float(max(self.radii_tangential.max() + self.tail_mm, self.depth * self.oedema_factor) + 3 * vs)
        box = local_box(anatomy.u, self.centre, reach)
        if box_is_empty(box):
            raise RuntimeError("meningioma site fell outside the field of view")
        u = sub(anatomy.u, box)
        shape = u[0].shape
        d = [u[a] - np.float32(self.centre[a]) for a in range(3)]

        def project(vector):
            return (np.float32(vector[0]) * d[0] + np.float32(vector[1]) * d[1]) + np.float32(vector[2]) * d[2]

        normal_mm = project(self.normal)
        b1 = project(self.tangents[0]) / np.float32(self.radii_tangential[0])
        b2 = project(self.tangents[1]) / np.float32(self.radii_tangential[1])
        tangential = np.sqrt(b1 * b1 + b2 * b2)
        rho = np.sqrt(tangential ** 2 + (normal_mm / np.float32(self.depth)) ** 2)
        rho = rho / (1.0 + 0.08 * smooth_random_field(rng, shape, 10.0, vs))
        width = vs / float(self.radii_tangential.mean())
        inward = soft_below(normal_mm, 0.0, vs)  # the half below the dural attachment
        tumour = soft_below(rho, 1.0, width) * inward
        compartments = []
        full = grid.shape
        tumour_full = place(full, box, tumour)
        compartments.append(Compartment(self.tissue, tumour_full, ENHANCING))
        if self.tail_mm > 0:
            # A thin (1.5 mm) enhancing dural slab tapering away from the tumour base.
            thickness = 1.5
            slab = np.clip((thickness / 2 + vs / 2 - np.abs(normal_mm + thickness / 2)) / vs, 0.0, min(1.0, thickness / vs))
            reach_norm = self.tail_mm / float(self.radii_tangential.mean())
            taper = np.clip((1.0 + reach_norm - tangential) / reach_norm, 0.0, 1.0) * (tangential > 0.95)
            tail = np.clip(slab * taper - tumour, 0.0, 1.0)
            compartments.append(Compartment(self.tissue, place(full, box, tail), ENHANCING))
        if self.has_oedema:
            rho_oedema = rho / np.float32(self.oedema_factor)
            oedema = np.clip(soft_below(rho_oedema, 1.0, width) - tumour, 0.0, 1.0) * anatomy.wm[box] * (normal_mm < 0)
            compartments.append(Compartment(self.oedema_tissue, place(full, box, oedema), OEDEMA, source="wm"))
        centroid = centroid_mm(tumour_full, anatomy.u)
        location = describe_location(centroid - 4.0 * self.normal)  # name the brain region it abuts
        facts = {
            "location": location,
            "site": self.site,
            "size_mm": extent_mm(tumour_full, vs, (2 * self.radii_tangential[0], 2 * self.radii_tangential[1], self.depth)),
            "dural_tail": self.tail_mm > 0,
            "oedema": self.has_oedema,
            # Meningiomas grow slowly and the brain accommodates: grade more leniently than gliomas.
            "mass_effect": mass_effect_grade(self.pushes[0].amplitude_mm, moderate_mm=7.0, marked_mm=11.0),
            "t2_signal": "hyperintense" if self.t2_ratio > 1.12 else "isointense",
        }
        return LesionResult(compartments, facts)


# ---------------------------------------------------------------------------- metastasis
class MetastasisModel(LesionModel):
    key = "metastasis"

    def __init__(self, rng, template, tissues, field_strength):
        super().__init__(rng, template, tissues, field_strength)
        count = 2 + int(rng.binomial(8, 0.3))
        diameters = rng.uniform(3.0, 15.0, count)
        diameters[0] = max(diameters[0], rng.uniform(9.0, 15.0))  # one lesion always clearly visible
        diameters = np.sort(diameters)[::-1]
        sites = template.junction_points_mm
        centres: list[np.ndarray] = []
        for diameter in diameters:
            for _ in range(200):
                candidate = sites[rng.integers(len(sites))] + rng.uniform(-1.0, 1.0, 3)
                if all(np.linalg.norm(candidate - c) > (diameter + d) / 2 + 8.0 for c, d in zip(centres, diameters)):
                    break
            centres.append(candidate)
        self.centres = centres
        self.diameters = diameters
        self.shapes = [rng.uniform(0.85, 1.15, 3) for _ in diameters]
        self.rotations = [random_rotation(rng) for _ in diameters]
        self.core_fractions = rng.uniform(0.4, 0.6, count)
        self.oedema_factors = rng.uniform(2.0, 4.0, count)
        lesion = tumour_tissues(rng, self.t1_factor)
        self.core_tissue = lesion["core"]
        self.oedema_tissue = lesion["oedema"]
        self.enhancing_tissue = Tissue("metastasis", rng.uniform(1300, 1500) * self.t1_factor, rng.uniform(90, 130),
                                       0.85, 1.0, gadolinium=rng.uniform(0.3, 0.5))

    def render(self, anatomy):
        grid = anatomy.grid
        vs = grid.voxel_size
        full = grid.shape
        enhancing = np.zeros(full, np.float32)
        core = np.zeros(full, np.float32)
        oedema = np.zeros(full, np.float32)
        lesions = []
        for centre, diameter, shape, rotation, core_fraction, oedema_factor in zip(
                self.centres, self.diameters, self.shapes, self.rotations, self.core_fractions, self.oedema_factors):
            radius = diameter / 2
            semi_axes = radius * shape
            box = local_box(anatomy.u, centre, float(semi_axes.max() * oedema_factor + 2 * vs))
            if box_is_empty(box):
                continue
            rho = ellipsoid_radius(sub(anatomy.u, box), centre, rotation, semi_axes)
            width = vs / radius
            solid = soft_below(rho, 1.0, width)
            ring = diameter >= 10.0
            necrotic = soft_below(rho, core_fraction, width) if ring else np.zeros_like(solid)
            enhancing[box] = np.maximum(enhancing[box], solid - necrotic)
            core[box] = np.maximum(core[box], necrotic)
            oedema[box] = np.maximum(oedema[box], soft_below(rho, oedema_factor, 2 * width))
            lesion_fraction = place(full, box, solid)
            lesions.append({
                "location": describe_location(centre),
                "size_mm": extent_mm(lesion_fraction, vs, 2 * semi_axes),
                "ring": bool(ring),
                "diameter_mm": float(diameter),
            })
        brain = anatomy.brain
        tumour = np.clip(enhancing + core, 0.0, 1.0)
        oedema = np.clip(oedema - tumour, 0.0, 1.0) * anatomy.wm
        compartments = [
            Compartment(self.enhancing_tissue, np.clip(enhancing, 0.0, 1.0) * brain, ENHANCING),
            Compartment(self.core_tissue, np.clip(core, 0.0, 1.0) * brain, NECROSIS),
            Compartment(self.oedema_tissue, oedema, OEDEMA, source="wm"),
        ]
        facts = {"count": len(lesions), "lesions": lesions,
                 "oedema": bool(any(d >= 8 for d in self.diameters))}
        return LesionResult(compartments, facts)


# ---------------------------------------------------------------------------- stroke
STROKE_TERRITORIES = {
    # name: (probability, wedge apex in the right hemisphere (mm), ranges of the wedge axis
    #        components (x, y, z), half-angle range (deg), inner-radius range (mm)); x is mirrored
    #        for left-sided infarcts.
    "middle cerebral artery": (0.60, (20.0, -8.0, 4.0), ((1.0, 1.0), (-0.5, 0.5), (-0.2, 0.6)),
                               (14.0, 32.0), (10.0, 30.0)),
    "anterior cerebral artery": (0.15, (5.0, 18.0, 5.0), ((0.05, 0.2), (0.0, 0.6), (1.0, 1.0)),
                                 (12.0, 25.0), (15.0, 30.0)),
    "posterior cerebral artery": (0.25, (12.0, -30.0, 2.0), ((0.1, 0.4), (-1.0, -1.0), (-0.3, 0.2)),
                                  (14.0, 28.0), (15.0, 35.0)),
}


class StrokeModel(LesionModel):
    key = "stroke"

    def __init__(self, rng, template, tissues, field_strength):
        super().__init__(rng, template, tissues, field_strength)
        names = list(STROKE_TERRITORIES)
        probabilities = np.array([STROKE_TERRITORIES[n][0] for n in names])
        self.territory = names[int(rng.choice(len(names), p=probabilities / probabilities.sum()))]
        _, apex, axis_ranges, angle_range, inner_range = STROKE_TERRITORIES[self.territory]
        self.side = 1.0 if rng.random() < 0.5 else -1.0
        self.apex = np.array([self.side * apex[0], apex[1], apex[2]])
        axis = np.array([rng.uniform(*r) for r in axis_ranges])
        axis[0] *= self.side
        self.axis = unit(axis)
        self.half_angle = np.radians(rng.uniform(*angle_range))
        self.inner_mm = float(rng.uniform(*inner_range))
        self.t2_factor = float(rng.uniform(1.10, 1.20))
        adc = float(rng.uniform(0.35, 0.50))
        self.adc = adc
        self.infarcts = {
            name: Tissue(f"infarcted {name}", tissues[name].t1 * 1.10, tissues[name].t2 * self.t2_factor,
                         tissues[name].pd * 1.05, adc)
            for name in ("gm", "wm")}
        # Cytotoxic oedema swells the infarcted cortex and effaces the sulci inside the territory, so
        # the lesion's voxels hold little CSF (whose ADC, ~3e-3 mm^2/s, would otherwise mask the restriction).
        self.sulcal_effacement = float(rng.uniform(0.75, 0.95))

    def render(self, anatomy):
        grid = anatomy.grid
        vs = grid.voxel_size
        rng = self.rng
        ux, uy, uz = anatomy.u
        d = [ux - np.float32(self.apex[0]), uy - np.float32(self.apex[1]), uz - np.float32(self.apex[2])]
        r = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) + np.float32(1e-3)
        cos_angle = ((np.float32(self.axis[0]) * d[0] + np.float32(self.axis[1]) * d[1]) + np.float32(self.axis[2]) * d[2]) / r
        angle = np.arccos(np.clip(cos_angle, -1.0, 1.0))
        edge = np.float32(self.half_angle) * (1.0 + 0.2 * smooth_random_field(rng, grid.shape, 15.0, vs))
        # A voxel spans about vs / r radians at distance r from the apex.
        wedge = np.clip((edge - angle) * r / np.float32(vs) + 0.5, 0.0, 1.0)
        beyond_inner = 1.0 - soft_below(r, self.inner_mm, vs)
        same_side = soft_below(-self.side * ux, 0.0, vs)
        shape = (wedge * beyond_inner * same_side).astype(np.float32)
        gm_part = shape * anatomy.gm
        wm_part = shape * anatomy.wm
        # Only sulcal CSF (sharing its voxel with brain tissue) is effaced, not the ventricles or cisterns.
        sulcal = np.clip(2.0 * (anatomy.gm + anatomy.wm), 0.0, 1.0)
        effaced = (shape * anatomy.csf * sulcal * np.float32(self.sulcal_effacement)).astype(np.float32)
        compartments = [
            Compartment(self.infarcts["gm"], gm_part, LESION, source="gm"),
            Compartment(self.infarcts["wm"], wm_part, LESION, source="wm"),
            Compartment(self.infarcts["gm"], effaced, LESION, source="csf"),
        ]
        infarct = gm_part + wm_part + effaced
        facts = {
            "location": describe_location(centroid_mm(infarct, anatomy.u)),
            "territory": self.territory,
            "side": "right" if self.side > 0 else "left",
            "size_mm": extent_mm(infarct, vs),
            "deep": self.inner_mm < 18.0,
            "adc": int(round(self.adc * 1000)),
            "flair_visible": self.t2_factor >= 1.15,
        }
        return LesionResult(compartments, facts)


# ---------------------------------------------------------------------------- WMH
class WhiteMatterHyperintensityModel(LesionModel):
    key = "wmh"
    needs_ventricle_distance = True

    # grade: (probability, periventricular base width, cap width, deep-focus count range, focus radius range)
    GRADES = {
        1: (0.35, (0.0, 0.0), (4.0, 6.0), (2, 6), (1.5, 3.0)),
        2: (0.40, (3.0, 5.0), (7.0, 10.0), (6, 15), (2.0, 4.0)),
        3: (0.25, (7.0, 11.0), (11.0, 15.0), (12, 25), (2.5, 6.0)),
    }

    def __init__(self, rng, template, tissues, field_strength):
        super().__init__(rng, template, tissues, field_strength)
        grades = list(self.GRADES)
        probabilities = np.array([self.GRADES[g][0] for g in grades])
        self.grade = grades[int(rng.choice(len(grades), p=probabilities))]
        _, base, cap, count_range, radius_range = self.GRADES[self.grade]
        self.base_mm = float(rng.uniform(*base))
        self.cap_mm = float(rng.uniform(*cap))
        count = int(rng.integers(count_range[0], count_range[1] + 1))
        sites = template.deep_wm_points_mm
        self.focus_centres = [sites[rng.integers(len(sites))] + rng.uniform(-1.0, 1.0, 3) for _ in range(count)]
        self.focus_radii = rng.uniform(*radius_range, count)
        wm = tissues["wm"]
        self.tissue = Tissue("white matter hyperintensity", wm.t1 * rng.uniform(1.3, 1.5), wm.t2 * rng.uniform(1.6, 2.0),
                             0.80, 1.0)

    def render(self, anatomy):
        if anatomy.ventricle_mm is None:
            raise ValueError("WMH rendering needs the anatomy's ventricle distance map")
        grid = anatomy.grid
        vs = grid.voxel_size
        rng = self.rng
        cv = self.template.ventricle_centre_mm
        # Caps: the halo is thickest at the frontal and occipital horns.
        cap = np.clip((np.abs(anatomy.u[1] - np.float32(cv[1])) - 10.0) / 20.0, 0.0, 1.0)
        wobble = 1.0 + 0.35 * smooth_random_field(rng, grid.shape, 12.0, vs)
        width = (self.base_mm + (self.cap_mm - self.base_mm) * cap) * wobble
        periventricular = soft_below(anatomy.ventricle_mm, width, vs) * (width > 0.5)
        foci = np.zeros(grid.shape, np.float32)
        sizes = []
        for centre, radius in zip(self.focus_centres, self.focus_radii):
            box = local_box(anatomy.u, centre, float(radius + 2 * vs))
            if box_is_empty(box):
                continue
            rho = ellipsoid_radius(sub(anatomy.u, box), centre, np.eye(3), (radius, radius, radius))
            foci[box] = np.maximum(foci[box], soft_below(rho, 1.0, vs / radius))
            sizes.append(radius)
        shape = np.clip(np.maximum(periventricular, foci), 0.0, 1.0)
        fraction = shape * anatomy.wm
        largest = float(max(self.focus_radii)) if len(self.focus_radii) else 0.0
        facts = {
            "grade": self.grade,
            "deep_foci": len(sizes),
            "largest_focus_mm": (int(round(2 * largest)),) * 3,
            "periventricular": {1: "caps", 2: "smooth halo", 3: "irregular confluent"}[self.grade],
            "size_mm": extent_mm(foci * anatomy.wm, vs, (2 * largest,) * 3),
        }
        return LesionResult([Compartment(self.tissue, fraction.astype(np.float32), LESION, source="wm")], facts)


LESION_MODELS: dict[str, type[LesionModel]] = {
    model.key: model for model in (GliomaModel, MeningiomaModel, MetastasisModel, StrokeModel,
                                   WhiteMatterHyperintensityModel, NormalModel)
}


if __name__ == "__main__":
    from .template import load_template
    from .tissue import subject_tissues

    template = load_template()
    for key, model in LESION_MODELS.items():
        rng = np.random.default_rng(0)
        plan = model(rng, template, subject_tissues(3.0, rng), 3.0)
        scalars = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in vars(plan).items()
                   if isinstance(v, (int, float, str, bool))}
        print(f"{key:10s} pushes={[round(p.amplitude_mm, 1) for p in plan.pushes]} {scalars}")
