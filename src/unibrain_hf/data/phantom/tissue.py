"""Tissue relaxation tables for the phantom (T1, T2, proton density, ADC, gadolinium).

Normal-tissue values follow Stanisz et al. (MRM 2005) for white matter, grey matter and
muscle; CSF, fat and cortical bone are approximate. Every subject jitters every value by
up to +/-10 % (literature values themselves vary by about 20 % between methods), so the
intensity of a tissue is never a constant the model could memorise.

Units: T1/T2 in ms, proton density relative to CSF, ADC in 1e-3 mm^2/s, gadolinium
concentration in mM.

    python -m unibrain_hf.data.phantom.tissue
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

FIELD_STRENGTHS = (1.5, 3.0)

# Gadobutrol relaxivities at body temperature (L/mmol/s); r2 is about 1.3 x r1.
R1_GADOLINIUM = 5.1
R2_GADOLINIUM = 6.6


@dataclass(frozen=True)
class Tissue:
    """Relaxation properties of one tissue compartment."""

    name: str
    t1: float
    t2: float
    pd: float
    adc: float
    gadolinium: float = 0.0
    fat: bool = False  # fat-suppressed sequences (DWI) null its signal

    def with_gadolinium(self) -> Tissue:
        """The tissue after contrast: 1/T1' = 1/T1 + r1*C, 1/T2' = 1/T2 + r2*C (T in s, C in mM)."""
        if self.gadolinium <= 0:
            return self
        t1 = 1000.0 / (1000.0 / self.t1 + R1_GADOLINIUM * self.gadolinium)
        t2 = 1000.0 / (1000.0 / self.t2 + R2_GADOLINIUM * self.gadolinium)
        return replace(self, t1=t1, t2=t2)

    def scaled(self, name: str, t1: float = 1.0, t2: float = 1.0, pd: float = 1.0) -> Tissue:
        """A derived tissue with relaxation times / density multiplied by the given factors."""
        return replace(self, name=name, t1=self.t1 * t1, t2=self.t2 * t2, pd=self.pd * pd)


# name: (T1 at 1.5 T, T1 at 3 T, T2 at 1.5 T, T2 at 3 T, PD, ADC)
NORMAL_TISSUE_TABLE: dict[str, tuple[float, float, float, float, float, float]] = {
    "wm": (884.0, 1084.0, 72.0, 69.0, 0.70, 0.70),
    "gm": (1124.0, 1820.0, 95.0, 99.0, 0.80, 0.85),
    "csf": (4300.0, 4300.0, 2000.0, 1750.0, 1.00, 3.00),
    "muscle": (1008.0, 1412.0, 44.0, 50.0, 0.75, 1.50),
    "fat": (290.0, 370.0, 165.0, 130.0, 0.90, 0.01),
    # Cortical bone: almost no mobile protons and a sub-millisecond T2, so it is dark everywhere.
    "bone": (250.0, 300.0, 1.0, 1.0, 0.05, 0.10),
}
NOMINAL_CSF_T1 = 4300.0  # what a scanner's FLAIR inversion time is chosen for


def check_field_strength(field_strength: float) -> float:
    """Return ``field_strength`` as 1.5 or 3.0, or raise a ValueError naming the choices."""
    try:
        value = float(field_strength)
    except (TypeError, ValueError):
        raise ValueError(f"field strength must be 1.5 or 3 (tesla), got {field_strength!r}") from None
    for allowed in FIELD_STRENGTHS:
        if abs(value - allowed) < 1e-6:
            return allowed
    raise ValueError(f"field strength must be 1.5 or 3 (tesla), got {field_strength!r}")


def nominal_tissue(name: str, field_strength: float) -> Tissue:
    """The table value of a normal tissue at 1.5 or 3 T (no jitter)."""
    field = check_field_strength(field_strength)
    t1_15, t1_3, t2_15, t2_3, pd, adc = NORMAL_TISSUE_TABLE[name]
    high = field == 3.0
    return Tissue(name, t1_3 if high else t1_15, t2_3 if high else t2_15, pd, adc, fat=name == "fat")


def jittered(tissue: Tissue, rng: np.random.Generator, fraction: float = 0.10) -> Tissue:
    """``tissue`` with T1, T2, PD and ADC each multiplied by an independent U(1-f, 1+f)."""
    t1, t2, pd, adc = rng.uniform(1.0 - fraction, 1.0 + fraction, size=4)
    return replace(tissue, t1=tissue.t1 * t1, t2=tissue.t2 * t2, pd=min(tissue.pd * pd, 1.2),
                   adc=tissue.adc * adc)


def subject_tissues(field_strength: float, rng: np.random.Generator) -> dict[str, Tissue]:
    """Every normal tissue, jittered for one subject."""
    return {name: jittered(nominal_tissue(name, field_strength), rng) for name in NORMAL_TISSUE_TABLE}


def lesion_t1_factor(field_strength: float) -> float:
    """Lesion T1 values are tabulated at 3 T; at 1.5 T they shrink like white matter's."""
    return 1.0 if check_field_strength(field_strength) == 3.0 else NORMAL_TISSUE_TABLE["wm"][0] / NORMAL_TISSUE_TABLE["wm"][1]


if __name__ == "__main__":
    for field in FIELD_STRENGTHS:
        print(f"{field} T:", {name: (nominal_tissue(name, field).t1, nominal_tissue(name, field).t2)
                              for name in NORMAL_TISSUE_TABLE})
