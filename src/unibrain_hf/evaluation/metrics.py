"""Image and text metrics of the UniBrain evaluation protocol (docs/EVALUATION.md).

* :func:`psnr` and :func:`ssim` reproduce the reference numbers exactly: both images are
  divided by 255 and handed to scikit-image's ``peak_signal_noise_ratio`` /
  ``structural_similarity`` with ``data_range=1`` and every other argument left at
  scikit-image's default (7-wide uniform window, K1 0.01, K2 0.03, sample covariance).
  A 2-D array is a slice; a 3-D array is a (z, y, x) volume, for which scikit-image slides
  a 7×7×7 window (the reference's 3-D mode). The whole array is compared, background
  included, as the reference does.
* :func:`sampler_ssim` estimates the SSIM a perfect posterior sampler is expected to score, given an
  estimate of the conditional mean (evaluation/predictability.py uses it beside the sampler's PSNR).
* :func:`rouge_scores` gives ROUGE-1/2/L F-measures of generated reports with Google's
  ``rouge_score`` package (Porter stemming on). The reference repository has no ROUGE code,
  so this is our choice of the common convention, not a reproduction.

    python -c "import numpy as np; from unibrain_hf.evaluation.metrics import psnr; print(psnr(np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8)))"
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import uniform_filter
from skimage.metrics import peak_signal_noise_ratio as _skimage_psnr
from skimage.metrics import structural_similarity as _skimage_ssim

#: The intensity that maps to 1.0 for integer images: the reference's slices are uint8.
UINT8_MAX_VALUE = 255.0

#: ROUGE variants reported by default (F-measure of each).
DEFAULT_ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")

#: scikit-image's default SSIM window; every spatial side must be at least this long.
SSIM_WINDOW = 7


def to_unit_range(image, max_value: float | None = None, *, name: str = "image") -> np.ndarray:
    """Return ``image / max_value`` as float64, checked to be finite and inside [0, 1].

    ``max_value=None`` picks the scale from the dtype: integer images are divided by 255
    (uint8 intensities, exactly the reference's ``img / 255.``); float images are taken to
    be in [0, 1] already and are used unchanged. A float image holding 0–255 values is
    rejected rather than silently scored on the wrong scale; pass ``max_value=255`` for it.
    """
    array = np.asarray(image)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be an integer (uint8) or float array, got dtype {array.dtype}")
    if array.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be a 2-D slice (y, x) or a 3-D volume (z, y, x), got shape {array.shape}; "
            "convert RGB images to grayscale first"
        )
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if max_value is None:
        max_value = UINT8_MAX_VALUE if np.issubdtype(array.dtype, np.integer) else 1.0
    if not np.isfinite(max_value) or max_value <= 0:
        raise ValueError(f"max_value must be a positive finite number, got {max_value}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if np.issubdtype(array.dtype, np.integer):
        # Dividing the integer array itself gives float64 values bit-identical to the
        # reference's ``uint8_array / 255.``.
        scaled = array / float(max_value)
    else:
        scaled = array.astype(np.float64) / float(max_value)
    low, high = float(scaled.min()), float(scaled.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{name} values span [{low * max_value:g}, {high * max_value:g}], outside [0, {max_value:g}]; "
            "pass uint8 images, floats in [0, 1], or the right max_value"
        )
    return scaled


def _paired_unit_images(gt, pred, max_value: float | None) -> tuple[np.ndarray, np.ndarray]:
    ground_truth = to_unit_range(gt, max_value, name="gt")
    prediction = to_unit_range(pred, max_value, name="pred")
    if ground_truth.shape != prediction.shape:
        raise ValueError(f"gt and pred shapes differ: {ground_truth.shape} vs {prediction.shape}")
    return ground_truth, prediction


def psnr(gt, pred, *, max_value: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, as the reference computes it.

    Args:
        gt: ground-truth slice (y, x) or volume (z, y, x); uint8 0–255 or float in [0, 1].
        pred: generated image of the same shape and convention.
        max_value: intensity that maps to 1.0; ``None`` = 255 for integer, 1 for float arrays.

    Returns ``inf`` for identical images (zero error); a mean over subjects that includes
    such a pair is therefore ``inf`` too, which is what the reference would print.
    """
    ground_truth, prediction = _paired_unit_images(gt, pred, max_value)
    # Zero error divides by zero inside scikit-image; inf is the correct PSNR there.
    with np.errstate(divide="ignore"):
        return float(_skimage_psnr(ground_truth, prediction, data_range=1))


def ssim(gt, pred, *, max_value: float | None = None) -> float:
    """Structural similarity with scikit-image defaults and ``data_range=1``.

    Same inputs as :func:`psnr`. A 3-D input is scored as one volume with a 7×7×7 window,
    so every side of the array must be at least 7 long.
    """
    ground_truth, prediction = _paired_unit_images(gt, pred, max_value)
    if min(ground_truth.shape) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs every side to be at least {SSIM_WINDOW} (its window), got shape {ground_truth.shape}"
        )
    return float(_skimage_ssim(ground_truth, prediction, data_range=1))


def _windowed_ssim(ground_truth: np.ndarray, prediction: np.ndarray,
                   independent_residual: np.ndarray | None = None) -> float:
    """scikit-image's SSIM with its defaults (uniform 7-wide window, K1 0.01, K2 0.03, sample covariance, data
    range 1, a 3-pixel border cropped), written out so a term can be added; without ``independent_residual`` it
    equals ``structural_similarity`` (a test holds it to that).

    With ``independent_residual`` = r, the prediction is ``prediction + r'`` for a residual r' drawn independently
    of the truth with r's local second moments (the plug-in of E[r'r'ᵀ] by rrᵀ): r' adds its windowed mean² to the
    prediction's mean² and its windowed variance to its variance, and nothing to the covariance with the truth.
    """
    size = SSIM_WINDOW
    points = size ** ground_truth.ndim
    cov_norm = points / (points - 1)
    mean_x, mean_y = uniform_filter(prediction, size), uniform_filter(ground_truth, size)
    var_x = cov_norm * (uniform_filter(prediction * prediction, size) - mean_x * mean_x)
    var_y = cov_norm * (uniform_filter(ground_truth * ground_truth, size) - mean_y * mean_y)
    cov_xy = cov_norm * (uniform_filter(prediction * ground_truth, size) - mean_x * mean_y)
    mean_x_squared = mean_x * mean_x
    if independent_residual is not None:
        r = independent_residual
        mean_r = uniform_filter(r, size)
        mean_x_squared = mean_x_squared + mean_r * mean_r
        var_x = var_x + cov_norm * (uniform_filter(r * r, size) - mean_r * mean_r)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
                / ((mean_x_squared + mean_y * mean_y + c1) * (var_x + var_y + c2)))
    pad = (size - 1) // 2
    return float(ssim_map[tuple(slice(pad, -pad) for _ in range(ssim_map.ndim))].mean(dtype=np.float64))


def sampler_ssim(gt, mean, *, max_value: float | None = None) -> float:
    """Expected SSIM against ``gt`` of one sample from the posterior whose mean ``mean`` estimates E[gt | input].

    PSNR has an exact answer (a perfect sampler's squared error is twice the mean's: −3.01 dB,
    evaluation/predictability.py); SSIM has none, because it divides local statistics. This is the plug-in
    estimate: a sample is ``mean + r'``, r' independent of the truth with the local second moments of the
    observed residual r = gt − mean, and each window's SSIM is evaluated at the expected moments. In simulations
    with a known posterior (tests/test_metrics.py) it was within 0.002 of the Monte Carlo value for pixel-white
    residuals and 0.015–0.04 above it for residuals correlated over 1–2 pixels (a ratio of expectations is not the
    expectation of the ratio); in a synthetic world built from a phantom cohort's T2-FLAIR residuals (their
    spectrum and local size) it was 0.005 below (docs/DEMO_RUN.md). Treat it as good to a few hundredths. Same
    inputs as :func:`ssim`; ``mean`` may be a float image (not quantised).
    """
    ground_truth, estimate = _paired_unit_images(gt, mean, max_value)
    if min(ground_truth.shape) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs every side to be at least {SSIM_WINDOW} (its window), got shape {ground_truth.shape}"
        )
    return _windowed_ssim(ground_truth, estimate, independent_residual=ground_truth - estimate)


def lesion_psnr(gt, pred, lesion, *, max_value: float | None = None) -> float | None:
    """PSNR over the pixels of ``lesion`` (a boolean mask of the same shape) only; ``None`` when it is empty.

    Whole-image scores hide whether the lesion itself is rendered: a few hundred pixels of a 64² slice.
    """
    mask = np.asarray(lesion, dtype=bool)
    ground_truth, prediction = _paired_unit_images(gt, pred, max_value)
    if mask.shape != ground_truth.shape:
        raise ValueError(f"lesion mask is {mask.shape}, images are {ground_truth.shape}")
    if not mask.any():
        return None
    error = float(np.mean((ground_truth[mask] - prediction[mask]) ** 2))
    return float(10 * np.log10(1.0 / error)) if error > 0 else float("inf")


def _check_text_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be lists of strings, not single strings")
    if len(predictions) == 0:
        raise ValueError("predictions is empty")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str) or not isinstance(reference, str):
            raise ValueError(
                f"item {index}: predictions and references must be str, got "
                f"{type(prediction).__name__} and {type(reference).__name__}"
            )


def rouge_per_item(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    rouge_types: Sequence[str] = DEFAULT_ROUGE_TYPES,
    use_stemmer: bool = True,
) -> list[dict[str, float]]:
    """ROUGE F-measure of each (prediction, reference) pair, one dict per pair.

    ``rouge_score`` lower-cases, keeps only ``[a-z0-9]`` tokens and (with ``use_stemmer``)
    Porter-stems them, so "Tumors" and "tumor" match. A text with fewer than two tokens
    has no bigrams, so its ROUGE-2 is 0 even against itself.
    """
    from rouge_score import rouge_scorer  # imported here: optional ``eval`` extra

    _check_text_pairs(predictions, references)
    if isinstance(rouge_types, str) or len(rouge_types) == 0:
        raise ValueError("rouge_types must be a non-empty list such as ['rouge1', 'rouge2', 'rougeL']")
    unknown = [rouge_type for rouge_type in rouge_types if not re.fullmatch(r"rouge([1-9]|L|Lsum)", str(rouge_type))]
    if unknown:
        # rouge_score itself would only complain at the first score() call.
        raise ValueError(f"unknown ROUGE type(s) {unknown}; use rouge1..rouge9, rougeL or rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    per_item = []
    for prediction, reference in zip(predictions, references):
        # rouge_score's argument order is (target, prediction).
        scores = scorer.score(reference, prediction)
        per_item.append({rouge_type: float(scores[rouge_type].fmeasure) for rouge_type in rouge_types})
    return per_item


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    rouge_types: Sequence[str] = DEFAULT_ROUGE_TYPES,
    use_stemmer: bool = True,
) -> dict:
    """Mean ROUGE F-measures over all pairs, plus the per-pair values.

    Returns ``{"rouge1": mean, "rouge2": mean, "rougeL": mean, "per_item": [{...}, ...]}``
    (one mean key per entry of ``rouge_types``). Means are plain arithmetic means of the
    per-pair F-measures (no bootstrap aggregation).
    """
    per_item = rouge_per_item(predictions, references, rouge_types=rouge_types, use_stemmer=use_stemmer)
    means: dict = {rouge_type: float(np.mean([item[rouge_type] for item in per_item])) for rouge_type in rouge_types}
    means["per_item"] = per_item
    return means
