"""Uncertainty for evaluation numbers: paired bootstrap intervals, confusion matrices, rates.

Every "ours vs baseline" comparison in a report is *paired*: both are scored on the same
subjects, so the quantity of interest is the mean of the per-subject differences. Its 95 %
interval comes from the percentile bootstrap over subjects (resampling subjects with
replacement, a fixed seed so reports repeat exactly). An interval that excludes zero is what
"beats the baseline" means here; with a few dozen subjects a difference of a few tenths of a dB
or a few accuracy points often does not.

    python -c "from unibrain_hf.evaluation.statistics import paired_difference as p; print(p([3, 4, 5], [1, 2, 2]))"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: Bootstrap resamples per interval; 10,000 keeps the 2.5 % / 97.5 % percentiles stable to ~0.01 SD.
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Interval:
    """A mean with its percentile-bootstrap 95 % interval over ``n`` subjects."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}

    def format(self, digits: int = 2) -> str:
        """``+1.23 [+0.80, +1.70]`` (signed, as differences are read)."""
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def bootstrap_mean(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                   level: float = 0.95) -> Interval:
    """The mean of ``values`` (one per subject) and its percentile-bootstrap interval."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"need a non-empty 1-D list of per-subject values, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("per-subject values must be finite (an infinite PSNR cannot be averaged)")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, array.size, size=(resamples, array.size))
    means = array[indices].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(array.mean()), float(low), float(high), int(array.size))


def paired_difference(ours: Sequence[float], baseline: Sequence[float], **kwargs) -> Interval:
    """Mean of ``ours[i] - baseline[i]`` over subjects with its bootstrap interval (same subjects, same order)."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired lists differ in length: {a.shape} vs {b.shape}")
    return bootstrap_mean(a - b, **kwargs)


def confusion_matrix(truths: Sequence[str], predictions: Sequence[str | None], classes: Sequence[str],
                     predicted_classes: Sequence[str] | None = None) -> dict:
    """``{"classes": rows (true classes), "columns": predicted classes + "(none)", "counts": [[...]]}``.

    ``predicted_classes`` defaults to ``classes``; an answer naming none of them goes to "(none)".
    """
    labels = list(classes)
    columns = list(labels if predicted_classes is None else predicted_classes) + ["(none)"]
    counts = np.zeros((len(labels), len(columns)), dtype=int)
    for truth, prediction in zip(truths, predictions, strict=True):
        if truth not in labels:
            raise ValueError(f"true class {truth!r} is not one of {labels}")
        column = columns.index(prediction) if prediction in columns[:-1] else len(columns) - 1
        counts[labels.index(truth), column] += 1
    return {"classes": labels, "columns": columns, "counts": counts.tolist()}


def best_constant_answer(truths: Sequence[str]) -> tuple[str, float]:
    """The single answer that would score best on these subjects, and its accuracy (an oracle baseline)."""
    if len(truths) == 0:
        raise ValueError("no subjects")
    values, counts = np.unique(np.asarray(truths, dtype=object).astype(str), return_counts=True)
    best = int(np.argmax(counts))
    return str(values[best]), float(counts[best] / len(truths))


__all__ = ["BOOTSTRAP_RESAMPLES", "Interval", "best_constant_answer", "bootstrap_mean", "confusion_matrix",
           "paired_difference"]
