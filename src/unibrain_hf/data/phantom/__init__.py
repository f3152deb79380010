"""Synthetic multi-contrast brain MRI cohort ("phantoms") in the RadGenome parquet schema.

Physics-based subjects on real anatomy (nilearn's MNI152 2009a tissue maps, warped per
subject), six sequences (t1n, t1c, t2w, t2f, dwi, adc) from steady-state signal
equations, five lesion classes plus normal controls, lesion masks and templated
radiology reports. The modules follow the data flow: ``classes`` (what each class has),
``template`` and ``anatomy`` (where tissue is), ``tissue`` and ``lesions`` (what it is),
``signal`` (how it looks on each sequence), ``reports`` (what a radiologist writes),
``generator`` (subjects and cohorts), ``preview`` and ``cache``.

    unibrain phantom out/cohort --subjects 12 --seed 0 --size 4 --preview
    python -c "from unibrain_hf.data.phantom import generate_subject; print(generate_subject(0, 0, 4.0).impression)"

Names are imported on first use, so ``python -m unibrain_hf.data.phantom.<module>`` and
light imports (e.g. the class table) do not load torch or the template.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ALL_SEQUENCES": "classes", "CLASS_ORDER": "classes", "PHANTOM_CLASSES": "classes", "PhantomClass": "classes",
    "default_cohort_dir": "cache", "ensure_default_cohort": "cache",
    "INFO_FILE_NAME": "generator", "PREVIEW_FILE_NAME": "generator", "PhantomSubject": "generator",
    "generate_cohort": "generator", "generate_subject": "generator", "simulate_subject": "generator",
    "stratified_split": "generator",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
