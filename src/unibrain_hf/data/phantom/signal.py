"""MRI signal equations, acquisition noise and bias for the phantom's six sequences.

Every voxel holds a mixture of tissue compartments; partial volume is mixed at the
*signal* level, ``S(x) = sum_k p_k(x) * S(tissue_k; sequence)``, which for fixed
per-subject tissue values is one matrix product. Then each image gets a smooth
multiplicative receive-bias field (+/-10-20 %), Rician noise ``|S + n1 + i n2|`` at an SNR
drawn from 15-40 and an arbitrary scanner gain.

Sequences (steady state):

* ``t1n`` spoiled 3-D GRE: ``PD sin(a) (1-E1)/(1-cos(a) E1) e^(-TE/T2*)``, ``E1 = e^(-TR/T1)``
* ``t1c`` the same after gadolinium (``1/T1' = 1/T1 + r1 C``, ``1/T2' = 1/T2 + r2 C``)
* ``t2w`` fast spin echo: ``PD (1 - e^(-TR/T1)) e^(-TE/T2)``
* ``t2f`` FLAIR: ``PD |1 - 2 e^(-TI/T1) + e^(-TR/T1)| e^(-TE/T2)`` with TI chosen to null
  CSF of nominal T1 (the subject's own CSF T1 differs slightly, as on a real scanner)
* ``dwi`` b = 1000 s/mm^2 fat-suppressed spin-echo EPI: ``S0 e^(-b ADC)``
* ``adc`` the map ``ln(S0 / S_b) / b`` computed from the *noisy* b0 and b1000 images,
  stored in 1e-6 mm^2/s like clinical ADC maps.

    python -m unibrain_hf.data.phantom.signal
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .fields import smooth_random_field
from .tissue import NOMINAL_CSF_T1, Tissue

SNR_RANGE = (15.0, 40.0)
BIAS_AMPLITUDE_RANGE = (0.10, 0.20)
BIAS_FEATURE_MM = 90.0
ADC_DISPLAY_MAX = 4000.0  # 1e-6 mm^2/s
DWI_B_VALUE = 1000.0  # s/mm^2
IMAGE_LEVEL = 1000.0  # nominal white-matter intensity of a stored image (before gain jitter)
GAIN_RANGE = (0.75, 1.35)


@dataclass(frozen=True)
class Protocol:
    """Acquisition parameters of one sequence (times in ms, flip angle in degrees)."""

    kind: str  # "gre" | "se" | "ir"
    tr: float
    te: float
    flip_deg: float = 90.0
    ti: float | None = None
    contrast: bool = False
    fat_suppressed: bool = False
    b_value: float = 0.0


def flair_null_ti(t1_csf: float, tr: float) -> float:
    """Inversion time that nulls a tissue of longitudinal relaxation ``t1_csf``."""
    return t1_csf * math.log(2.0 / (1.0 + math.exp(-tr / t1_csf)))


FLAIR_TR = 9000.0
PROTOCOLS: dict[str, Protocol] = {
    "t1n": Protocol("gre", tr=20.0, te=4.0, flip_deg=30.0),
    "t1c": Protocol("gre", tr=20.0, te=4.0, flip_deg=30.0, contrast=True),
    "t2w": Protocol("se", tr=5000.0, te=100.0),
    "t2f": Protocol("ir", tr=FLAIR_TR, te=120.0, ti=flair_null_ti(NOMINAL_CSF_T1, FLAIR_TR)),
    "dwi_b0": Protocol("se", tr=6000.0, te=80.0, fat_suppressed=True),
    "dwi": Protocol("se", tr=6000.0, te=80.0, fat_suppressed=True, b_value=DWI_B_VALUE),
}
T2_STAR_FRACTION = 0.6  # T2* of brain tissue is roughly 0.6 x T2 at clinical field strengths


def tissue_signal(tissue: Tissue, protocol: Protocol) -> float:
    """Noise-free signal of a pure ``tissue`` voxel under ``protocol``."""
    if protocol.contrast:
        tissue = tissue.with_gadolinium()
    t1, t2, pd = tissue.t1, tissue.t2, tissue.pd
    e1 = math.exp(-protocol.tr / t1)
    if protocol.kind == "gre":
        alpha = math.radians(protocol.flip_deg)
        signal = pd * math.sin(alpha) * (1 - e1) / (1 - math.cos(alpha) * e1) * math.exp(-protocol.te / (T2_STAR_FRACTION * t2))
    elif protocol.kind == "se":
        signal = pd * (1 - e1) * math.exp(-protocol.te / t2)
    elif protocol.kind == "ir":
        signal = pd * abs(1 - 2 * math.exp(-protocol.ti / t1) + e1) * math.exp(-protocol.te / t2)
    else:
        raise ValueError(f"unknown sequence kind {protocol.kind!r}")
    if protocol.b_value:
        signal *= math.exp(-protocol.b_value * tissue.adc * 1e-3)
    if protocol.fat_suppressed and tissue.fat:
        signal *= 0.05
    return signal


def _bias_field(rng: np.random.Generator, shape, voxel_size: float) -> np.ndarray:
    field = smooth_random_field(rng, shape, BIAS_FEATURE_MM, voxel_size)
    peak = float(np.abs(field).max()) or 1.0
    return (1.0 + rng.uniform(*BIAS_AMPLITUDE_RANGE) * field / peak).astype(np.float32)


def _rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    real = clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def simulate_images(compartments: list[tuple[Tissue, np.ndarray]], sequences: tuple[str, ...],
                    reference: Tissue, rng: np.random.Generator, voxel_size: float,
                    foreground: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Noisy, bias-corrupted float32 images for ``sequences`` from tissue compartments.

    ``compartments`` pairs each tissue with its volume-fraction map (all the same shape);
    ``reference`` (white matter) sets the noise level and the stored intensity scale;
    ``foreground`` (bool), when given, zeroes everything outside it (skull stripping).
    Noise is drawn only for the voxels that are kept.
    """
    known = ("t1n", "t1c", "t2w", "t2f", "dwi", "adc")
    unknown = [s for s in sequences if s not in known]
    if unknown:
        raise ValueError(f"unknown sequence(s) {unknown}; known: {list(known)}")
    shape = compartments[0][1].shape
    # DWI and ADC come from one diffusion acquisition: a b0 and a b1000 image.
    channels = [s for s in sequences if s not in ("dwi", "adc")]
    if "dwi" in sequences or "adc" in sequences:
        channels += ["dwi_b0", "dwi"]
    # Only voxels that are kept are simulated (skull stripping zeroes the rest anyway).
    voxels = None if foreground is None else np.flatnonzero(foreground)
    count = int(np.prod(shape)) if voxels is None else len(voxels)

    def kept(volume: np.ndarray) -> np.ndarray:
        flat = volume.reshape(-1)
        return flat if voxels is None else flat[voxels]

    fractions = np.empty((len(compartments), count), dtype=np.float32)
    for row, (_, fraction) in enumerate(compartments):
        fractions[row] = kept(fraction)
    signals = np.array([[tissue_signal(t, PROTOCOLS[c]) for t, _ in compartments] for c in channels], dtype=np.float32)
    clean = signals @ fractions

    acquired: dict[str, np.ndarray] = {}
    settings: dict[str, tuple[float, np.ndarray, float]] = {}  # channel -> (noise sigma, bias, gain)
    for row, channel in enumerate(channels):
        if channel == "dwi":  # same acquisition as its b0: same noise floor, bias and gain
            settings[channel] = settings["dwi_b0"]
        else:
            level = tissue_signal(reference, PROTOCOLS[channel])
            sigma = level / rng.uniform(*SNR_RANGE)
            bias = kept(_bias_field(rng, shape, voxel_size))
            settings[channel] = (sigma, bias, IMAGE_LEVEL / level * rng.uniform(*GAIN_RANGE))
        sigma, bias, gain = settings[channel]
        acquired[channel] = _rician(clean[row] * bias, sigma, rng) * np.float32(gain)

    images: dict[str, np.ndarray] = {}
    for code in sequences:
        if code == "adc":
            b0, b1000 = acquired["dwi_b0"], acquired["dwi"]
            tiny = np.float32(1e-6)
            values = np.log(np.maximum(b0, tiny) / np.maximum(b1000, tiny)) * np.float32(1e6 / DWI_B_VALUE)
            # Where there is no signal (air, bone) the fit is meaningless; scanners write 0 there.
            sigma, _, gain = settings["dwi_b0"]
            values[b0 < 3.0 * sigma * gain] = 0.0
            values = np.clip(values, 0.0, ADC_DISPLAY_MAX)
        else:
            values = acquired[code]
        if voxels is None:
            images[code] = values.reshape(shape).astype(np.float32, copy=False)
        else:
            image = np.zeros(shape, dtype=np.float32)
            image.reshape(-1)[voxels] = values
            images[code] = image
    return images


if __name__ == "__main__":
    from .tissue import FIELD_STRENGTHS, nominal_tissue

    for field in FIELD_STRENGTHS:
        print(f"--- {field} T (WM-relative signal)")
        for code in ("t1n", "t2w", "t2f", "dwi"):
            ref = tissue_signal(nominal_tissue("wm", field), PROTOCOLS[code])
            row = {name: round(tissue_signal(nominal_tissue(name, field), PROTOCOLS[code]) / ref, 2)
                   for name in ("wm", "gm", "csf", "fat", "muscle", "bone")}
            print(f"{code:4s}", row)
