"""The evaluation metrics packaged as local ``evaluate`` modules, loadable offline.

Each ``<name>/<name>.py`` is a thin ``evaluate.Metric`` over the plain functions in
:mod:`unibrain_hf.evaluation.metrics` and :mod:`unibrain_hf.evaluation.diagnosis`.
``evaluate.load("rouge")`` needs the Hub; these load from the installed package:

    python -c "from unibrain_hf.evaluation.metric_modules import load_metric; print(load_metric('unibrain_psnr').compute(predictions=[[[0, 0]]*7], references=[[[0, 255]]*7]))"
"""

from __future__ import annotations

from pathlib import Path

METRIC_NAMES: tuple[str, ...] = ("unibrain_psnr", "unibrain_ssim", "unibrain_diagnosis_accuracy", "unibrain_rouge")


def metric_module_path(name: str) -> Path:
    """Absolute path of the packaged module directory ``name`` (what ``evaluate.load`` wants)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRIC_NAMES)}")
    return Path(__file__).resolve().parent / name


def load_metric(name: str, **load_kwargs):
    """``evaluate.load`` of a packaged metric by its absolute path; works with no network."""
    import evaluate  # optional ``eval`` extra; slow to import, so only when needed

    return evaluate.load(str(metric_module_path(name)), **load_kwargs)


def image_pair_features() -> list:
    """``datasets`` feature schemas of the image metrics: one for 2-D slices, one for 3-D volumes."""
    import datasets

    def nested(dimensions):
        value = datasets.Value("float64")
        for _ in range(dimensions):
            value = datasets.List(value)
        return datasets.Features({"predictions": value, "references": value})

    return [nested(2), nested(3)]


def score_image_pairs(metric, predictions, references, max_value: float) -> tuple[float, list[float]]:
    """``metric(reference, prediction, max_value=…)`` over every pair: (mean, per-pair values)."""
    import numpy as np

    per_item = [metric(np.asarray(reference), np.asarray(prediction), max_value=max_value)
                for prediction, reference in zip(predictions, references)]
    if not per_item:
        raise ValueError("no image pairs to score")
    return float(np.mean(per_item)), per_item
