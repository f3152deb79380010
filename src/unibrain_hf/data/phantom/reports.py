"""Radiology text for phantom subjects: per-sequence findings, impression, diagnosis.

Reports are written from the facts each lesion model measured on the rendered subject
(location from MNI coordinates, sizes as "a x b x c mm" bounding boxes, enhancement
pattern, oedema, mass effect, diffusion, Fazekas grade ...), in radiology register.
Every fact has several phrasings, chosen by the subject's report random stream, so the
text is never a constant per class. Findings are written only for the sequences the
subject has, and each one names the location so it stands on its own (training uses the
finding of each *input* sequence separately). Sizes use the "a x b x c mm" form that the
training code rewrites to the in-slice size.

    python -m unibrain_hf.data.phantom.reports
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEQUENCE_NAMES = {
    "t1n": "T1-weighted", "t1c": "post-contrast T1", "t2w": "T2-weighted", "t2f": "T2-FLAIR",
    "dwi": "DWI", "adc": "ADC map",
}


@dataclass
class Report:
    findings: dict[str, str]
    impression: str
    global_finding: str


def size_text(size_mm) -> str:
    a, b, c = (int(v) for v in size_mm)
    return f"{a} x {b} x {c} mm"


class _Writer:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, *options: str) -> str:
        return options[int(self.rng.integers(len(options)))]


def _volume_phrase(w: _Writer, anatomy_facts: dict) -> str:
    if anatomy_facts.get("volume_loss", False):
        return w.pick("The ventricles and sulci are mildly prominent, in keeping with mild generalized volume loss.",
                      "Mild generalized parenchymal volume loss with proportionate ventricular prominence.",
                      "There is mild prominence of the sulci and ventricles, consistent with age-related volume loss.")
    return w.pick("The ventricles and sulci are normal in size and configuration.",
                  "Ventricular size and sulcal pattern are within normal limits.",
                  "No ventricular enlargement; the sulci are appropriate for age.")


# ---------------------------------------------------------------------------- glioma
def _glioma(w: _Writer, f: dict, anatomy_facts: dict):
    loc, size, edema = f["location"], size_text(f["size_mm"]), size_text(f["oedema_mm"])
    level = f["mass_effect"]
    ventricle = " and compression of the ipsilateral lateral ventricle" if f["ventricle_effaced"] else ""
    shift = f["midline_shift_mm"]
    shift_text = (f" with about {shift:.0f} mm of midline shift to the {f['shift_towards']}" if shift >= 2 else "")

    def mass() -> str:
        return w.pick(f"There is {level} mass effect with effacement of the adjacent sulci{ventricle}{shift_text}.",
                      f"{level.capitalize()} mass effect is present, with sulcal effacement{ventricle}{shift_text}.",
                      f"The lesion exerts {level} mass effect on the surrounding parenchyma{ventricle}{shift_text}.")

    findings = {
        "t1n": w.pick(
            f"A heterogeneous mass in the {loc}, measuring {size}, is iso- to hypointense on T1-weighted images with a hypointense necrotic center.",
            f"T1-weighted images show an ill-defined mass in the {loc} ({size}), isointense to slightly hypointense to white matter, with central low signal in keeping with necrosis.",
            f"There is a {size} lesion in the {loc} on T1-weighted images with an iso- to hypointense wall and a lower-signal central component.")
        + " " + mass(),
        "t1c": w.pick(
            f"Post-contrast T1 shows thick, irregular ring enhancement of the {loc} mass ({size}) around a non-enhancing necrotic core.",
            f"After contrast the {loc} lesion demonstrates ring enhancement with an irregular, nodular wall and central necrosis, measuring {size}.",
            f"There is ring enhancement on post-contrast T1: a heterogeneously enhancing {loc} mass measuring {size} with a central non-enhancing necrotic cavity."),
        "t2w": w.pick(
            f"On T2-weighted images the {loc} mass ({size}) is heterogeneously hyperintense, with a markedly hyperintense necrotic center and surrounding hyperintense edema.",
            f"The {loc} lesion measures {size} and is heterogeneously hyperintense on T2-weighted images, surrounded by T2-hyperintense vasogenic edema.",
            f"T2-weighted images demonstrate a heterogeneous, predominantly hyperintense {loc} mass of {size} with perilesional edema.")
        + " " + mass(),
        "t2f": w.pick(
            f"T2-FLAIR shows extensive hyperintense vasogenic edema surrounding the {loc} mass, spanning approximately {edema}.",
            f"Hyperintense on T2-FLAIR: peritumoral edema and infiltrative signal extend through the white matter around the {loc} lesion over {edema}.",
            f"There is confluent T2-FLAIR hyperintensity around the {loc} mass ({edema}), consistent with vasogenic edema and possible tumor infiltration."),
    }
    impression = w.pick(
        f"Intra-axial necrotic ring-enhancing mass in the {loc} with extensive vasogenic edema and {level} mass effect, most consistent with glioblastoma.",
        f"Findings are most in keeping with a high-grade glial neoplasm (glioblastoma) of the {loc}, with central necrosis, ring enhancement and surrounding edema.",
        f"Heterogeneous ring-enhancing {loc} mass with necrosis and perilesional edema{shift_text}; appearances favor glioblastoma.")
    return findings, impression


# ---------------------------------------------------------------------------- meningioma
def _meningioma(w: _Writer, f: dict, anatomy_facts: dict):
    loc, size = f["location"], size_text(f["size_mm"])
    if f["site"] == "parafalcine":
        site = w.pick(f"arising from the falx and projecting into the {loc}", f"along the falx, adjacent to the {loc}")
    else:
        site = w.pick(f"along the convexity overlying the {loc}", f"over the {loc} convexity")
    tail = " with an enhancing dural tail" if f["dural_tail"] else ""
    level = f["mass_effect"]
    mass = {"mild": "There is mild compression of the adjacent cortex.",
            "moderate": "There is moderate mass effect on the underlying brain with sulcal effacement.",
            "marked": "There is marked mass effect with compression of the underlying parenchyma."}[level]
    edema = (w.pick(", with hyperintense vasogenic edema in the adjacent white matter",
                    " and mild surrounding parenchymal edema")
             if f["oedema"] else
             w.pick(", without significant edema in the underlying brain", "; no parenchymal edema is seen"))
    findings = {
        "t1n": w.pick(
            f"A well-circumscribed extra-axial mass {site}, measuring {size}, is isointense to gray matter on T1-weighted images with a broad dural base.",
            f"T1-weighted images show a smoothly marginated, dural-based mass {site} ({size}), isointense to cortex, displacing the adjacent brain."),
        "t1c": w.pick(
            f"The extra-axial mass {site} ({size}) enhances avidly and homogeneously on post-contrast T1{tail}.",
            f"Post-contrast T1 demonstrates intense homogeneous enhancement of a dural-based mass {site}, measuring {size}{tail}."),
        "t2w": w.pick(
            f"On T2-weighted images the dural-based mass {site} ({size}) is {f['t2_signal']} to gray matter, with a CSF cleft separating it from the compressed cortex.",
            f"The extra-axial lesion {site} measures {size} and is {f['t2_signal']} relative to cortex on T2-weighted images.")
        + " " + mass,
        "t2f": w.pick(f"T2-FLAIR shows the extra-axial mass {site}, measuring {size}{edema}.",
                      f"On T2-FLAIR the dural-based lesion {site} ({size}) is mildly hyperintense{edema}."),
    }
    impression = w.pick(
        f"Extra-axial, dural-based homogeneously enhancing mass {site}{tail}, most consistent with meningioma.",
        f"Findings are typical of a meningioma {site}, measuring {size}, with {level} mass effect on the adjacent brain.",
        f"Well-circumscribed enhancing extra-axial mass {site}; appearances are characteristic of meningioma.")
    return findings, impression


# ---------------------------------------------------------------------------- metastasis
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


def _metastasis(w: _Writer, f: dict, anatomy_facts: dict):
    lesions = f["lesions"]
    count = len(lesions)
    n = _NUMBER_WORDS.get(count, str(count))
    largest = lesions[0]
    loc, size = largest["location"], size_text(largest["size_mm"])
    others = sorted({l["location"] for l in lesions[1:]} - {loc})
    others_text = (", ".join(others[:3]) if others else f"elsewhere in the {loc}")
    sides = {l["location"].split()[0] for l in lesions if l["location"].split()[0] in ("left", "right")}
    spread = "both cerebral hemispheres" if len(sides) == 2 else "one hemisphere"
    pattern = "ring enhancement" if largest["ring"] else "solid nodular enhancement"
    findings = {
        "t1n": w.pick(
            f"{n.capitalize()} lesions are seen at the gray-white matter junction, mildly hypointense on T1-weighted images; the largest, in the {loc}, measures {size}.",
            f"T1-weighted images show {n} small hypointense foci at the gray-white junction, the largest in the {loc} ({size})."),
        "t1c": w.pick(
            f"Post-contrast T1 shows {n} enhancing lesions at the gray-white matter junction; the largest, in the {loc} ({size}), shows {pattern}. Further lesions: {others_text}.",
            f"There are {n} enhancing foci on post-contrast T1 involving {spread}; the dominant {loc} lesion measures {size} with {pattern}, others in the {others_text}."),
        "t2w": w.pick(
            f"On T2-weighted images the lesions are hyperintense with surrounding edema; the dominant {loc} lesion measures {size}.",
            f"T2-weighted images show {n} hyperintense lesions with perilesional edema, the largest in the {loc} measuring {size}."),
        "t2f": w.pick(
            f"T2-FLAIR shows hyperintense perilesional vasogenic edema around multiple lesions, most marked around the {loc} lesion ({size}).",
            f"Hyperintense on T2-FLAIR: edema surrounds the {n} lesions, disproportionate to their size, most prominently in the {loc} ({size})."),
    }
    impression = w.pick(
        f"Multiple ({count}) enhancing lesions at the gray-white matter junction with perilesional edema, the largest in the {loc}, most consistent with metastatic disease.",
        f"Multifocal ring- and nodular-enhancing lesions involving {spread} with disproportionate edema, consistent with brain metastases.",
        f"{n.capitalize()} enhancing intra-axial lesions at the gray-white junction; appearances are typical of metastatic tumor.")
    return findings, impression


# ---------------------------------------------------------------------------- stroke
def _stroke(w: _Writer, f: dict, anatomy_facts: dict):
    loc, size, territory, side = f["location"], size_text(f["size_mm"]), f["territory"], f["side"]
    extent = ("cortex and the underlying deep white matter" if f["deep"] else "cortex and subcortical white matter")
    findings = {
        "dwi": w.pick(
            f"There is restricted diffusion, hyperintense on DWI, in the {side} {territory} territory involving the {loc} {extent}, measuring {size}.",
            f"DWI shows a wedge-shaped hyperintense region in the {loc} ({side} {territory} territory, {size}), consistent with restricted diffusion.",
            f"High DWI signal involving the {extent} of the {loc} in the {territory} territory, measuring {size}."),
        "adc": w.pick(
            f"The corresponding {loc} region ({size}) is hypointense on the ADC map, with values around {f['adc']} x 10^-6 mm2/s, confirming restricted diffusion.",
            f"ADC map: low values (about {f['adc']} x 10^-6 mm2/s) in the {loc} matching the DWI abnormality, measuring {size}.",
            f"Reduced ADC in the {side} {territory} territory ({loc}, {size}) confirms true restricted diffusion."),
        "t2f": (w.pick(
            f"Subtle T2-FLAIR hyperintensity is present in the same {loc} region ({size}), suggesting an infarct a few hours old.",
            f"Faint hyperintense signal on T2-FLAIR in the {loc} ({size}) corresponds to the diffusion abnormality.")
            if f["flair_visible"] else w.pick(
            f"No definite T2-FLAIR signal abnormality corresponds to the diffusion lesion in the {loc} ({size}); this DWI-FLAIR mismatch suggests a hyperacute infarct.",
            f"The {loc} territory appears near-normal on T2-FLAIR despite the diffusion abnormality ({size}), in keeping with a very recent infarct.")),
    }
    impression = w.pick(
        f"Acute ischemic infarct in the {side} {territory} territory ({loc}) with restricted diffusion.",
        f"Restricted diffusion in the {loc} in a {territory} distribution, consistent with an acute ischemic infarct.",
        f"Acute {side} {territory} territory infarction involving the {loc}.")
    return findings, impression


# ---------------------------------------------------------------------------- WMH
def _wmh(w: _Writer, f: dict, anatomy_facts: dict):
    grade, size = f["grade"], size_text(f["largest_focus_mm"])
    pv = {"caps": "thin periventricular caps at the frontal and occipital horns",
          "smooth halo": "a smooth periventricular halo",
          "irregular confluent": "irregular periventricular hyperintensity extending into the deep white matter"}[f["periventricular"]]
    volume = _volume_phrase(w, anatomy_facts)
    findings = {
        "t1n": w.pick(
            f"Scattered foci in the periventricular and deep white matter are mildly hypointense on T1-weighted images without cavitation; the largest deep focus measures {size}.",
            f"T1-weighted images show subtle hypointensity of the periventricular and deep white matter lesions (largest {size}).")
        + " " + volume,
        "t2f": w.pick(
            f"Multiple foci of T2-FLAIR hyperintensity in the periventricular and deep white matter of both cerebral hemispheres, with {pv}; Fazekas grade {grade}. The largest deep focus measures {size}.",
            f"Hyperintense on T2-FLAIR: {pv} and scattered deep white matter foci (largest {size}), Fazekas grade {grade}.",
            f"T2-FLAIR demonstrates white matter hyperintensities with {pv} and punctate deep lesions up to {size} (Fazekas {grade})."),
    }
    impression = w.pick(
        f"Periventricular and deep white matter hyperintensities (Fazekas grade {grade}), consistent with chronic small vessel disease and white matter degeneration.",
        f"White matter degeneration: Fazekas grade {grade} periventricular and deep white matter hyperintensities.",
        f"Bilateral white matter hyperintensities, Fazekas {grade}, in keeping with chronic microangiopathic white matter degeneration.")
    return findings, impression


# ---------------------------------------------------------------------------- normal
def _normal(w: _Writer, f: dict, anatomy_facts: dict):
    volume = _volume_phrase(w, anatomy_facts)
    findings = {
        "t1n": w.pick("No focal signal abnormality on T1-weighted images. Gray-white matter differentiation is preserved.",
                      "T1-weighted images show normal gray-white matter differentiation without a focal lesion.",
                      "Normal T1-weighted signal of the brain parenchyma; no mass or focal lesion."),
        "t1c": w.pick("No abnormal enhancement on post-contrast T1-weighted images.",
                      "Post-contrast T1 shows no pathological parenchymal or meningeal enhancement.",
                      "No enhancing lesion is seen after contrast."),
        "t2w": w.pick("No abnormal signal intensity on T2-weighted images.",
                      "T2-weighted images show normal parenchymal signal without focal lesion.",
                      "Normal T2-weighted appearance of the gray and white matter.") + " " + volume,
        "t2f": w.pick("No parenchymal or white matter hyperintensity on T2-FLAIR.",
                      "T2-FLAIR shows no white matter or cortical signal abnormality.",
                      "No abnormal T2-FLAIR hyperintensity; the CSF spaces are suppressed normally."),
        "dwi": w.pick("No restricted diffusion on DWI.", "DWI shows no area of abnormal hyperintensity."),
        "adc": w.pick("ADC values are normal throughout the brain.", "No area of reduced ADC."),
    }
    impression = w.pick("No acute intracranial abnormality.", "Normal MRI of the brain.",
                        "No evidence of mass, infarct or significant white matter disease.")
    return findings, impression


_WRITERS = {"glioma": _glioma, "meningioma": _meningioma, "metastasis": _metastasis, "stroke": _stroke,
            "wmh": _wmh, "normal": _normal}


def write_report(lesion_class: str, facts: dict, anatomy_facts: dict, sequences, rng: np.random.Generator) -> Report:
    """Findings for each of ``sequences``, an impression and a global finding."""
    if lesion_class not in _WRITERS:
        raise ValueError(f"no report writer for lesion class {lesion_class!r}")
    writer = _Writer(rng)
    findings, impression = _WRITERS[lesion_class](writer, facts, anatomy_facts)
    missing = [s for s in sequences if not findings.get(s)]
    if missing:
        raise ValueError(f"the {lesion_class} report has no finding for sequence(s) {missing}")
    chosen = {s: findings[s] for s in sequences}
    global_finding = " ".join(chosen[s] for s in sequences)
    return Report(chosen, impression, global_finding)


if __name__ == "__main__":
    demo = {"location": "right frontal lobe", "size_mm": (34, 28, 30), "oedema_mm": (60, 52, 55),
            "mass_effect": "moderate", "midline_shift_mm": 4.0, "shift_towards": "left", "ventricle_effaced": True}
    report = write_report("glioma", demo, {}, ("t1n", "t1c", "t2w", "t2f"), np.random.default_rng(0))
    for code, text in report.findings.items():
        print(f"{code}: {text}")
    print("Impression:", report.impression)
