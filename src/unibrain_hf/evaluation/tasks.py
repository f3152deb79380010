"""The three UniBrain evaluation tasks (docs/EVALUATION.md): generation, diagnosis and unified.

Each task is one function that walks the subjects of a cohort split, runs a
:class:`~unibrain_hf.UniBrainPipeline` on them and returns a result object holding the
metrics, the baselines that give those metrics context, and one record per subject:

* :func:`evaluate_generation` — impute target sequences from input sequences. 2-D mode
  scores the middle lesion slice; 3-D mode scores every ``slice_stride``-th axial slice as
  one volume. PSNR/SSIM per subject and their means; baseline: copy the first input.
  ``sample_time=K`` averages K generations pixel-wise (an ensemble, as the reference).
* :func:`evaluate_diagnosis` — the diagnosis question on the middle lesion slice, scored
  with the reference's class-word substring rule; baseline: always answer the majority
  class of the training split. ``replaced_by`` feeds images from a directory of
  ``<subject>-<modality>.png`` files (e.g. a previous generation run's ``images/``).
* :func:`evaluate_unified` — impute, then write an impression and a diagnosis in one
  context; accuracy, ROUGE-1/2/L of the impression, and PSNR/SSIM of the imputed images.

With ``out_dir`` every task writes ``metrics.json``, ``summary.md``, ``panels/*.png`` and,
per task, ``images/*.png`` (2-D imputations, usable as ``replaced_by``), ``nifti/*.nii.gz``
(3-D mode) or ``predictions.jsonl`` (text tasks). Every file is written atomically.

Randomness is explicit: sample ``k`` of subject ``s`` uses a ``torch.Generator`` seeded
from ``(seed, s, k)`` (:func:`subject_seed`), so results do not depend on subject order or
``max_subjects``.

    unibrain eval --pipeline out/pipeline --cohort out/cohort --task generation --modalities-in t1n --modalities-out t2f --out out/eval
    python -c "from unibrain_hf.evaluation.tasks import evaluate_generation; help(evaluate_generation)"
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..utils.atomic import atomic_file
from ..data.intensity import middle_lesion_slice, rescale_intensity
from ..data.radgenome import iter_subject_records, load_split, open_parquet, resolve_parquet_files
from ..data.schema import SPLIT_FILE_NAME, modality_code
from ..data.templates import CANONICAL_MODALITIES
from . import metrics as image_metrics
from .diagnosis import as_rules, majority_class, majority_class_baseline, score_diagnoses
from .report import markdown_table, save_nifti_like, save_panel, write_metrics_json, write_summary_markdown

TASK_NAMES = ("generation", "diagnosis", "unified")
MODES = ("2d", "3d")
#: The reference also requires this sequence for a subject to enter the diagnosis task (§8.2).
DIAGNOSIS_ALSO_REQUIRED = ("t1n",)
#: Pipeline arguments the tasks set themselves; passing them through ``**pipeline_kwargs`` is an error.
RESERVED_PIPELINE_ARGUMENTS = ("images", "target_modalities", "task", "generator", "output_type", "return_dict",
                               "slice_index", "axis", "latents", "posterior_eps", "num_inference_steps",
                               "max_new_tokens", "prompt", "num_grid_points")
#: Panels of small slices are magnified to about this many pixels on their long side.
PANEL_TARGET_PIXELS = 192
#: At most this many training impressions are compared to pick the constant-impression baseline.
IMPRESSION_BASELINE_POOL = 100


class EvaluationInputError(ValueError):
    """The cohort, split or modalities asked for cannot be evaluated (the message says what is available)."""


# --------------------------------------------------------------------------- seeds and small utilities


def subject_seed(seed: int, subject_id: str, sample: int = 0) -> int:
    """A 63-bit seed for sample ``sample`` of ``subject_id``, stable across runs, platforms and subject order."""
    digest = hashlib.sha256(f"{int(seed)}/{subject_id}/{int(sample)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed: int, subject_id: str, sample: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(subject_seed(seed, subject_id, sample))


def reference_ensemble(samples: list[np.ndarray], rgb: bool = True) -> np.ndarray:
    """K generated uint8 images → one uint8 image, in the reference's order of operations.

    The reference averages the K RGB images and truncates to uint8, then averages the three
    channels and truncates again (§8.1); with K = 1 this is exactly the pipeline's own grayscale
    output. ``rgb=False`` takes already-gray samples (slices or (z, y, x) volumes) and only
    averages them.
    """
    if not samples:
        raise ValueError("reference_ensemble needs at least one sample")
    stacked = np.stack([np.asarray(sample) for sample in samples])
    if rgb and stacked.shape[-1] != 3:
        raise ValueError(f"rgb=True needs (..., 3) samples, got shape {stacked.shape[1:]}")
    mean = np.mean(stacked, axis=0).astype(np.uint8)
    if rgb:
        mean = np.mean(mean, axis=-1).astype(np.uint8)
    return mean


def _as_rgb(gray: np.ndarray) -> np.ndarray:
    # Three-channel inputs make the pipeline return RGB, so the ensemble can average RGB first.
    return np.repeat(np.asarray(gray)[..., None], 3, axis=-1)


def _mean(values) -> float:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else float("nan")


def _panel_scale(shape) -> int:
    return max(1, PANEL_TARGET_PIXELS // max(int(shape[0]), int(shape[1])))


def _write_text_atomically(path: Path, text: str) -> Path:
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def _save_png(path: Path, image: np.ndarray) -> Path:
    with atomic_file(path, ".png") as temporary:
        Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(temporary, format="PNG")
    return path


def _check_codes(codes, name: str, allow_empty: bool = False) -> list[str]:
    if isinstance(codes, str):
        codes = [codes]
    codes = list(codes or [])
    if not codes and not allow_empty:
        raise EvaluationInputError(f"{name} is empty; name at least one modality code such as 't1n'")
    for code in codes:
        if not isinstance(code, str) or not code.strip():
            raise EvaluationInputError(f"{name} must hold non-empty modality codes, got {code!r}")
    duplicates = sorted({code for code in codes if codes.count(code) > 1})
    if duplicates:
        raise EvaluationInputError(f"{name} lists {duplicates} more than once")
    return codes


def _check_pipeline_kwargs(pipeline_kwargs: dict) -> dict:
    clashes = sorted(set(pipeline_kwargs) & set(RESERVED_PIPELINE_ARGUMENTS))
    if clashes:
        raise EvaluationInputError(f"{clashes} are set by the evaluation itself; use the task function's own "
                                   f"arguments (seed, num_inference_steps, max_new_tokens, ...)")
    return dict(pipeline_kwargs)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise EvaluationInputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- the cohort, without reading volumes


@dataclass
class CohortIndex:
    """What a cohort split holds, read from the parquet metadata columns only (no volumes).

    ``subjects`` maps each subject id of the split to its modality codes, in file order;
    ``split_sizes`` counts the subjects of every split; ``all_modalities`` lists every code
    found in the whole cohort.
    """

    cohort_dir: Path
    split: str
    subjects: dict[str, tuple[str, ...]]
    split_sizes: dict[str, int]
    split_ids: dict[str, list[str]]
    all_modalities: tuple[str, ...]
    impressions: dict[str, str]

    def modality_sets(self) -> dict[str, int]:
        """``"t1n, t2f" -> number of subjects`` of the split with exactly those sequences."""
        counts: dict[str, int] = {}
        for codes in self.subjects.values():
            key = ", ".join(codes)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def eligible(self, required: list[str]) -> list[str]:
        """Subject ids of the split that have every code in ``required``, in file order."""
        return [subject for subject, codes in self.subjects.items() if all(code in codes for code in required)]


def index_cohort(cohort_dir: str | os.PathLike, split: str = "test") -> CohortIndex:
    """Read the split file and the metadata columns of a RadGenome-schema cohort directory."""
    cohort_dir = Path(cohort_dir)
    if not cohort_dir.is_dir():
        raise EvaluationInputError(f"cohort directory {cohort_dir} does not exist or is not a directory")
    try:
        files = resolve_parquet_files(cohort_dir)
        table = load_split(cohort_dir / SPLIT_FILE_NAME)
    except (FileNotFoundError, ValueError) as error:
        raise EvaluationInputError(f"{cohort_dir} is not a usable cohort: {error}") from None
    if split not in table:
        raise EvaluationInputError(f"unknown split {split!r}; the cohort's split file has "
                                   f"{', '.join(f'{name} ({len(ids)} subjects)' for name, ids in table.items())}")
    wanted = set(table[split])
    subjects: dict[str, tuple[str, ...]] = {}
    impressions: dict[str, str] = {}
    present: set[str] = set()
    all_modalities: dict[str, None] = {}
    for path in files:
        open_parquet(path)  # names the file if it is not a RadGenome parquet
        columns = pq.read_table(path, columns=["subject_id", "modality_names", "impression"]).to_pydict()
        for subject, names, impression in zip(columns["subject_id"], columns["modality_names"], columns["impression"]):
            codes = tuple(modality_code(name) for name in names)
            all_modalities.update(dict.fromkeys(codes))
            present.add(subject)
            impressions[subject] = impression or ""
            if subject in wanted:
                subjects[subject] = codes
    sizes = {name: sum(subject in present for subject in ids) for name, ids in table.items()}
    if not subjects:
        raise EvaluationInputError(
            f"split {split!r} of {cohort_dir} has no subjects in the parquet files; subjects per split: "
            f"{', '.join(f'{name}: {count}' for name, count in sizes.items())}")
    return CohortIndex(cohort_dir, split, subjects, sizes, {k: list(v) for k, v in table.items()},
                       tuple(all_modalities), impressions)


def select_subjects(index: CohortIndex, modalities_in: list[str], modalities_out: list[str] = (),
                    also_required: tuple[str, ...] = (), max_subjects: int | None = None) -> list[str]:
    """Eligible subject ids (all inputs, targets and ``also_required``), or an error naming what exists."""
    known = set(CANONICAL_MODALITIES) | set(index.all_modalities)
    unknown = [code for code in [*modalities_in, *modalities_out] if code not in known]
    if unknown:
        raise EvaluationInputError(
            f"unknown modality {', '.join(map(repr, unknown))}; known codes are {', '.join(CANONICAL_MODALITIES)} "
            f"and this cohort has {', '.join(index.all_modalities)}")
    overlap = [code for code in modalities_out if code in modalities_in]
    if overlap:
        raise EvaluationInputError(f"{overlap} are both inputs and targets; a target must be a missing sequence")
    required = list(dict.fromkeys([*modalities_in, *modalities_out, *also_required]))
    eligible = index.eligible(required)
    if not eligible:
        sets = "; ".join(f"[{codes}] x{count}" for codes, count in index.modality_sets().items())
        raise EvaluationInputError(
            f"no subject of split {index.split!r} has all of {required}; the split's subjects have these "
            f"modality sets: {sets}")
    if max_subjects is not None:
        eligible = eligible[:_check_positive_int(max_subjects, "max_subjects")]
    return eligible


def _records(index: CohortIndex, subject_ids: list[str]):
    """The :class:`SubjectRecord` of each wanted subject, read one at a time in file order."""
    wanted = set(subject_ids)
    for record in iter_subject_records(index.cohort_dir, split=index.split):
        if record.subject_id in wanted:
            yield record


def _progress(records, total: int, desc: str, enabled: bool):
    """Yield ``records`` under a tqdm bar that names the current subject; the bar closes even on errors."""
    bar = tqdm(total=total, desc=desc, unit="subject", disable=not enabled)
    try:
        for record in records:
            bar.set_postfix_str(record.subject_id)
            yield record
            bar.update(1)
    finally:
        bar.close()


def record_affine(spacing, direction, z_stride: int = 1) -> np.ndarray:
    """The voxel → RAS affine of a (x, y, z) array from SimpleITK-style spacing and LPS direction.

    The parquet header keeps spacing and direction but not the origin, so the origin is 0.
    ``z_stride`` > 1 describes a volume that keeps every ``z_stride``-th slice.
    """
    spacing = np.asarray(spacing, dtype=np.float64) * np.array([1.0, 1.0, float(z_stride)])
    direction_lps = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction_lps @ np.diag(spacing)  # LPS -> RAS flips x and y
    return affine


class _Skip(Exception):
    """A subject that cannot be scored; the reason goes into the result's ``skipped`` list."""


def _scaled_volumes(record, codes) -> dict[str, np.ndarray]:
    volumes = {}
    for code in codes:
        if code not in record.volumes:
            raise _Skip(f"{code} is empty (no voxel > 0) and was dropped when reading")
        try:
            volumes[code] = rescale_intensity(record.volumes[code])
        except ValueError as error:
            raise _Skip(f"{code}: {error}") from None
    return volumes


# --------------------------------------------------------------------------- results


@dataclass
class EvaluationResult:
    """What a task measured: ``metrics`` (the model), ``baselines`` (context), one record per subject.

    ``settings`` holds every argument that shapes the numbers; ``skipped`` lists eligible
    subjects that could not be scored and why; ``notes`` explain how to read the numbers.
    """

    task: str
    settings: dict
    metrics: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    per_subject: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    out_dir: Path | None = None

    def to_dict(self) -> dict:
        return {"task": self.task, "settings": self.settings, "metrics": self.metrics, "baselines": self.baselines,
                "per_subject": self.per_subject, "skipped": self.skipped, "notes": self.notes}

    def summary_tables(self) -> list[tuple[str, str]]:  # pragma: no cover - each task overrides it
        return []

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Write ``metrics.json`` and ``summary.md`` (and ``predictions.jsonl`` for text tasks) into ``out_dir``."""
        out_dir = Path(out_dir)
        write_metrics_json(out_dir / "metrics.json", self.to_dict())
        notes = list(self.notes)
        if self.skipped:
            notes.append(f"{len(self.skipped)} eligible subject(s) could not be scored: "
                         + "; ".join(f"{item['subject_id']} ({item['reason']})" for item in self.skipped))
        notes.append("settings: " + json.dumps(self.settings, default=str))
        write_summary_markdown(out_dir / "summary.md", f"UniBrain evaluation: {self.task}", self.summary_tables(),
                               notes)
        self.out_dir = out_dir
        return out_dir


def _image_means(per_subject: list[dict], targets: list[str], key: str) -> dict:
    """Means over subjects of ``record[key][target]`` PSNR/SSIM, per target and over targets."""
    per_target = {target: {"psnr": _mean(r[key][target]["psnr"] for r in per_subject),
                           "ssim": _mean(r[key][target]["ssim"] for r in per_subject)} for target in targets}
    # Each subject counts once: its mean over targets, then the mean over subjects (= reference for one target).
    overall_psnr = _mean(_mean(r[key][t]["psnr"] for t in targets) for r in per_subject)
    overall_ssim = _mean(_mean(r[key][t]["ssim"] for t in targets) for r in per_subject)
    return {"psnr": overall_psnr, "ssim": overall_ssim, "num_subjects": len(per_subject), "per_target": per_target}


def _image_table(metrics: dict, baseline: dict, model_label: str, baseline_label: str) -> str:
    rows = []
    targets = list(metrics.get("per_target", {}))
    for target in targets:
        rows.append({"target": target, "method": model_label, "PSNR (dB)": metrics["per_target"][target]["psnr"],
                     "SSIM": metrics["per_target"][target]["ssim"], "subjects": metrics["num_subjects"]})
        rows.append({"target": target, "method": baseline_label, "PSNR (dB)": baseline["per_target"][target]["psnr"],
                     "SSIM": baseline["per_target"][target]["ssim"], "subjects": baseline["num_subjects"]})
    if len(targets) > 1:
        rows.append({"target": "all (mean per subject)", "method": model_label, "PSNR (dB)": metrics["psnr"],
                     "SSIM": metrics["ssim"], "subjects": metrics["num_subjects"]})
        rows.append({"target": "all (mean per subject)", "method": baseline_label, "PSNR (dB)": baseline["psnr"],
                     "SSIM": baseline["ssim"], "subjects": baseline["num_subjects"]})
    return markdown_table(rows, ["target", "method", "PSNR (dB)", "SSIM", "subjects"])


def _per_subject_image_table(per_subject: list[dict], targets: list[str]) -> str:
    rows = []
    for record in per_subject:
        for target in targets:
            rows.append({"subject": record["subject_id"], "target": target,
                         "PSNR (dB)": record["imputed"][target]["psnr"], "SSIM": record["imputed"][target]["ssim"],
                         "copy-input PSNR": record["copy_input"][target]["psnr"],
                         "copy-input SSIM": record["copy_input"][target]["ssim"]})
    return markdown_table(rows, ["subject", "target", "PSNR (dB)", "SSIM", "copy-input PSNR", "copy-input SSIM"])


def _accuracy_table(metrics: dict, baseline: dict, model_label: str) -> str:
    rows = [
        {"method": model_label, "accuracy": metrics["accuracy"], "correct": metrics["correct"],
         "subjects": metrics["num_subjects"]},
        {"method": f"majority class of train ({baseline['class']!r}, {baseline['train_subjects']} subjects)",
         "accuracy": baseline["accuracy"], "correct": baseline["correct"], "subjects": metrics["num_subjects"]},
    ]
    return markdown_table(rows, ["method", "accuracy", "correct", "subjects"])


@dataclass
class GenerationResult(EvaluationResult):
    """Result of :func:`evaluate_generation`: ``metrics`` = imputed vs truth, ``baselines["copy_input"]``."""

    def summary_tables(self):
        targets = self.settings["modalities_out"]
        copy_label = f"copy input ({self.settings['modalities_in'][0]})"
        return [("PSNR / SSIM (mean over subjects)",
                 _image_table(self.metrics, self.baselines["copy_input"], "UniBrain (imputed)", copy_label)),
                ("Per subject", _per_subject_image_table(self.per_subject, targets))]


@dataclass
class DiagnosisResult(EvaluationResult):
    """Result of :func:`evaluate_diagnosis`: accuracy by the class-word rule and the majority-class baseline."""

    def summary_tables(self):
        rows = [{"subject": r["subject_id"], "truth": r["ground_truth"], "parsed": r["parsed_label"],
                 "correct": r["correct"], "replaced": ", ".join(r.get("replaced", [])),
                 "diagnosis": r["diagnosis"][:120]} for r in self.per_subject]
        return [("Diagnosis accuracy", _accuracy_table(self.metrics, self.baselines["majority_class"], "UniBrain")),
                ("Per subject", markdown_table(rows, ["subject", "truth", "parsed", "correct", "replaced",
                                                      "diagnosis"]))]


@dataclass
class UnifiedResult(EvaluationResult):
    """Result of :func:`evaluate_unified`: accuracy, impression ROUGE and imputed-image PSNR/SSIM, with baselines."""

    def summary_tables(self):
        constant = self.baselines["constant_impression"]
        rouge_rows = [
            {"method": "UniBrain impression", **{k: self.metrics[k] for k in ("rouge1", "rouge2", "rougeL")}},
            {"method": "constant training impression", **{k: constant[k] for k in ("rouge1", "rouge2", "rougeL")}},
        ]
        copy_label = f"copy input ({self.settings['modalities_in'][0]})"
        rows = [{"subject": r["subject_id"], "truth": r["ground_truth"], "parsed": r["parsed_label"],
                 "correct": r["correct"], "rougeL": r["rouge"]["rougeL"], "diagnosis": r["diagnosis"][:120]}
                for r in self.per_subject]
        return [("Diagnosis accuracy", _accuracy_table(self.metrics, self.baselines["majority_class"], "UniBrain")),
                ("Impression ROUGE F-measure (ours: the reference has no ROUGE code)",
                 markdown_table(rouge_rows, ["method", "rouge1", "rouge2", "rougeL"])),
                ("Imputed images, PSNR / SSIM (ours: the reference does not score them in this task)",
                 _image_table(self.metrics["images"], self.baselines["copy_input"], "UniBrain (imputed)",
                              copy_label)),
                ("Per subject", markdown_table(rows, ["subject", "truth", "parsed", "correct", "rougeL",
                                                      "diagnosis"]))]


def _write_predictions(out_dir: Path, per_subject: list[dict]) -> Path:
    lines = [json.dumps(record, ensure_ascii=False, default=str) for record in per_subject]
    return _write_text_atomically(out_dir / "predictions.jsonl", "\n".join(lines) + ("\n" if lines else ""))


def _no_subject_scored(skipped: list[dict]) -> EvaluationInputError:
    reasons = "; ".join(f"{item['subject_id']}: {item['reason']}" for item in skipped)
    return EvaluationInputError(f"no eligible subject could be scored ({reasons})")


# --------------------------------------------------------------------------- generation


def _image_scores(gt: np.ndarray, pred: np.ndarray) -> dict:
    return {"psnr": image_metrics.psnr(gt, pred), "ssim": image_metrics.ssim(gt, pred)}


def _generate_slice(pipe, inputs: dict, targets: list[str], sample_time: int, seed: int, subject_id: str,
                    num_inference_steps: int, pipeline_kwargs: dict) -> dict[str, np.ndarray]:
    """``sample_time`` generations of one slice, ensembled per target into uint8 grayscale."""
    samples: dict[str, list[np.ndarray]] = {target: [] for target in targets}
    for sample in range(sample_time):
        output = pipe(images={code: _as_rgb(image) for code, image in inputs.items()}, target_modalities=targets,
                      task="generation", num_grid_points=num_inference_steps,
                      generator=_generator(seed, subject_id, sample), output_type="pil", **pipeline_kwargs)
        for target in targets:
            samples[target].append(np.asarray(output.images[target][0], dtype=np.uint8))
    return {target: reference_ensemble(samples[target]) for target in targets}


def _generate_volume(pipe, inputs: dict, targets: list[str], sample_time: int, seed: int, subject_id: str,
                     num_inference_steps: int, batch_size: int, pipeline_kwargs: dict) -> dict[str, np.ndarray]:
    """``sample_time`` slice-wise imputations of (z, y, x) uint8 volumes, averaged per target."""
    from ..protocol.orientation import to_training_frame, training_frame_nifti

    # The (z, y, x) arrays are the training frame: axial slice k is the (y, x) image the 2-D mode feeds.
    carriers = {code: training_frame_nifti(volume) for code, volume in inputs.items()}
    samples: dict[str, list[np.ndarray]] = {target: [] for target in targets}
    for sample in range(sample_time):
        images = pipe.impute_volume(carriers, targets, axis="axial", batch_size=batch_size, task="generation",
                                    num_grid_points=num_inference_steps,
                                    generator=_generator(seed, subject_id, sample), **pipeline_kwargs)
        for target in targets:
            image = images[target]
            samples[target].append(to_training_frame(np.asarray(image.dataobj, dtype=np.uint8), image.affine))
    return {target: reference_ensemble(samples[target], rgb=False) for target in targets}


def evaluate_generation(pipe, cohort_dir, modalities_in, modalities_out, split: str = "test", mode: str = "2d",
                        sample_time: int = 1, seed: int = 0, slice_stride: int = 1, num_inference_steps: int = 10,
                        out_dir=None, max_subjects: int | None = None, batch_size: int = 8, progress: bool = True,
                        **pipeline_kwargs) -> GenerationResult:
    """Impute ``modalities_out`` from ``modalities_in`` for every eligible subject and score PSNR/SSIM.

    Args:
        pipe: a :class:`~unibrain_hf.UniBrainPipeline` (anything with its ``__call__`` / ``impute_volume``).
        cohort_dir: a RadGenome-schema cohort directory (parquet files + split file).
        modalities_in / modalities_out: sequence codes; a subject is evaluated when it has all of both.
            Each target is imputed from the inputs alone (the ``generation`` task) and scored against itself.
        split: the split of the cohort's split file to evaluate.
        mode: ``"2d"`` scores the middle lesion slice (``z // 2`` without lesion); ``"3d"`` imputes every
            ``slice_stride``-th axial slice and scores the stacked volume once (SSIM with a 7³ window).
        sample_time: generations per slice, averaged pixel-wise into one uint8 image (an ensemble).
        seed: base seed; sample ``k`` of subject ``s`` uses :func:`subject_seed` ``(seed, s, k)``.
        num_inference_steps: flow-sampler grid points (the reference uses 10).
        out_dir: if given, write ``metrics.json``, ``summary.md``, ``panels/<subject>_<target>.png``, and
            ``images/<subject>-<target>.png`` (2-D) or ``nifti/<subject>_<target>_{gen,gt}.nii.gz`` (3-D).
        max_subjects: evaluate only the first N eligible subjects (file order).
        batch_size: slices denoised together in 3-D mode.
        progress: show a tqdm bar over subjects.
        **pipeline_kwargs: other pipeline settings (``guidance_scale``, ``image_guidance_scale``, ...).

    Returns a :class:`GenerationResult`; ``metrics`` = means over subjects, ``baselines["copy_input"]`` the
    same numbers for the first input's slice used as the prediction.
    """
    modalities_in = _check_codes(modalities_in, "modalities_in")
    modalities_out = _check_codes(modalities_out, "modalities_out")
    if mode not in MODES:
        raise EvaluationInputError(f"mode must be one of {MODES}, got {mode!r}")
    sample_time = _check_positive_int(sample_time, "sample_time")
    slice_stride = _check_positive_int(slice_stride, "slice_stride")
    batch_size = _check_positive_int(batch_size, "batch_size")
    pipeline_kwargs = _check_pipeline_kwargs(pipeline_kwargs)
    index = index_cohort(cohort_dir, split)
    subjects = select_subjects(index, modalities_in, modalities_out, max_subjects=max_subjects)
    out_dir = None if out_dir is None else Path(out_dir)
    settings = {"task": "generation", "cohort_dir": str(index.cohort_dir), "split": split, "mode": mode,
                "modalities_in": modalities_in, "modalities_out": modalities_out, "sample_time": sample_time,
                "seed": seed, "slice_stride": slice_stride, "num_inference_steps": num_inference_steps,
                "max_subjects": max_subjects, "pipeline_kwargs": pipeline_kwargs}
    per_subject, skipped = [], []
    for record in _progress(_records(index, subjects), len(subjects), f"generation {mode}", progress):
        try:
            scaled = _scaled_volumes(record, [*modalities_in, *modalities_out])
            depth = record.shape_zyx[0]
            slice_index = middle_lesion_slice(record.mask, depth)
            if mode == "2d":
                inputs = {code: scaled[code][slice_index] for code in modalities_in}
                truths = {code: scaled[code][slice_index] for code in modalities_out}
                imputed = _generate_slice(pipe, inputs, modalities_out, sample_time, seed, record.subject_id,
                                          num_inference_steps, pipeline_kwargs)
            else:
                kept = len(range(0, depth, slice_stride))
                if kept < image_metrics.SSIM_WINDOW:
                    raise _Skip(f"slice_stride {slice_stride} keeps {kept} of {depth} slices; 3-D SSIM needs at least "
                                f"{image_metrics.SSIM_WINDOW}")
                inputs = {code: scaled[code][::slice_stride] for code in modalities_in}
                truths = {code: scaled[code][::slice_stride] for code in modalities_out}
                try:
                    imputed = _generate_volume(pipe, inputs, modalities_out, sample_time, seed, record.subject_id,
                                               num_inference_steps, batch_size, pipeline_kwargs)
                except ValueError as error:
                    raise _Skip(str(error)) from None
        except _Skip as reason:
            skipped.append({"subject_id": record.subject_id, "reason": str(reason)})
            continue
        copy_source = inputs[modalities_in[0]]
        entry = {"subject_id": record.subject_id, "slice_index": int(slice_index) if mode == "2d" else None,
                 "imputed": {t: _image_scores(truths[t], imputed[t]) for t in modalities_out},
                 "copy_input": {t: _image_scores(truths[t], copy_source) for t in modalities_out}}
        per_subject.append(entry)
        if out_dir is not None:
            _write_generation_files(out_dir, record, mode, slice_index, slice_stride, inputs, truths, imputed)
    if not per_subject:
        raise _no_subject_scored(skipped)
    result = GenerationResult(
        "generation", settings, metrics=_image_means(per_subject, modalities_out, "imputed"),
        baselines={"copy_input": {**_image_means(per_subject, modalities_out, "copy_input"),
                                  "modality": modalities_in[0]}},
        per_subject=per_subject, skipped=skipped, notes=_generation_notes(mode, sample_time, slice_stride))
    if out_dir is not None:
        result.write(out_dir)
    return result


def _generation_notes(mode: str, sample_time: int, slice_stride: int) -> list[str]:
    notes = ["PSNR/SSIM as the reference: uint8 images / 255, data_range 1, scikit-image defaults, whole image "
             "including background; means are over subjects.",
             "Copy-input baseline: the first input sequence's (rescaled) image scored as if it were the target."]
    if mode == "2d":
        notes.append("2-D mode: the middle lesion slice of each subject (z // 2 without lesion).")
    else:
        notes.append(f"3-D mode: every {slice_stride}-th axial slice imputed and scored as one volume (7x7x7 SSIM); "
                     "slices whose inputs are all constant are not generated and stay 0.")
    if sample_time > 1:
        notes.append(f"sample_time {sample_time}: the generations of a slice are averaged pixel-wise (uint8 mean), "
                     "an ensemble, as in the reference.")
    return notes


def _write_generation_files(out_dir: Path, record, mode: str, slice_index: int, slice_stride: int, inputs: dict,
                            truths: dict, imputed: dict) -> None:
    subject = record.subject_id
    if mode == "2d":
        panel_index, panel_inputs = None, inputs
    else:
        # The panel shows the kept slice nearest to the middle lesion slice.
        panel_index = min(int(round(slice_index / slice_stride)), next(iter(inputs.values())).shape[0] - 1)
        panel_inputs = {code: volume[panel_index] for code, volume in inputs.items()}
        affine = record_affine(record.spacing, record.direction, slice_stride)
        for target in imputed:
            save_nifti_like(out_dir / "nifti" / f"{subject}_{target}_gen.nii.gz", imputed[target], affine,
                            array_order="zyx")
            save_nifti_like(out_dir / "nifti" / f"{subject}_{target}_gt.nii.gz", truths[target], affine,
                            array_order="zyx")
    for target in imputed:
        pred = imputed[target] if panel_index is None else imputed[target][panel_index]
        truth = truths[target] if panel_index is None else truths[target][panel_index]
        _save_comparison_panel(out_dir / "panels" / f"{subject}_{target}.png", panel_inputs, target, pred, truth)
        if mode == "2d":
            # Named as the reference's --replaced_by directory expects: <subject>-<modality>.png.
            _save_png(out_dir / "images" / f"{subject}-{target}.png", pred)


def _save_comparison_panel(path: Path, inputs: dict, target: str, pred: np.ndarray, truth: np.ndarray) -> None:
    difference = np.abs(truth.astype(np.int16) - pred.astype(np.int16)).astype(np.uint8)
    columns = [(f"in {code}", image) for code, image in inputs.items()]
    columns += [(f"imputed {target}", pred), (f"true {target}", truth), ("|difference|", difference)]
    save_panel(path, columns, scale=_panel_scale(truth.shape))


# --------------------------------------------------------------------------- diagnosis


def resolve_replacement_dir(replaced_by) -> Path:
    """A directory of ``<subject>-<modality>.png``: given directly, or the ``images/`` of a generation run."""
    directory = Path(replaced_by)
    if not directory.is_dir():
        raise EvaluationInputError(f"replaced_by directory {directory} does not exist")
    if (directory / "images").is_dir() and not any(directory.glob("*.png")):
        directory = directory / "images"
    if not any(directory.glob("*.png")):
        raise EvaluationInputError(f"replaced_by directory {directory} holds no <subject>-<modality>.png files "
                                   "(pass a PNG directory or the output directory of a 2-D generation run)")
    return directory


def _replacement_images(directory: Path | None, subject_id: str, codes: list[str]) -> dict[str, np.ndarray]:
    if directory is None:
        return {}
    found = {}
    for code in codes:
        path = directory / f"{subject_id}-{code}.png"
        if path.is_file():
            with Image.open(path) as image:
                found[code] = np.asarray(image.convert("L"), dtype=np.uint8)  # grayscale, as the reference reads it
    return found


def _majority_baseline(index: CohortIndex, subjects: list[str], rules) -> dict:
    train = index.split_ids.get("train", [])
    if not train:
        return {"class": None, "accuracy": float("nan"), "correct": None, "train_subjects": 0}
    answer = majority_class(train, rules)
    accuracy = majority_class_baseline(train, subjects, rules)
    return {"class": answer, "accuracy": accuracy, "correct": int(round(accuracy * len(subjects))),
            "train_subjects": len(train)}


def _accuracy_metrics(records: list[dict]) -> dict:
    correct = sum(bool(r["correct"]) for r in records)
    strict = sum(r["parsed_label"] == r["ground_truth"] for r in records)
    return {"accuracy": correct / len(records), "correct": correct, "num_subjects": len(records),
            "parsed_label_accuracy": strict / len(records)}


def evaluate_diagnosis(pipe, cohort_dir, modalities_in, split: str = "test", replaced_by=None, rules=None,
                       max_new_tokens: int | None = None, seed: int = 0, out_dir=None,
                       max_subjects: int | None = None, also_required=DIAGNOSIS_ALSO_REQUIRED, progress: bool = True,
                       **pipeline_kwargs) -> DiagnosisResult:
    """Ask the diagnosis question on each eligible subject's middle lesion slice and score it.

    Args:
        pipe, cohort_dir, split, seed, out_dir, max_subjects, progress: as in :func:`evaluate_generation`.
        modalities_in: input sequences; a subject needs all of them and ``also_required`` (the
            reference also requires ``t1n``; pass ``()`` to drop that rule).
        replaced_by: a directory of ``<subject>-<modality>.png`` (or a 2-D generation run's output
            directory): an input whose PNG exists there replaces the real slice; the others stay real.
        rules: :class:`~unibrain_hf.evaluation.diagnosis.DiagnosisRules` (or a mapping) deciding each
            subject's class word from its id; default the reference's rules.
        max_new_tokens: text budget; ``None`` = the pipeline default, the reference's 512 tokens
            counting the start token.
        **pipeline_kwargs: other pipeline settings.

    Greedy decoding; the seed only drives the VAE posterior sample of the input images. Correct
    when the class word, lower-cased, occurs in the lower-cased diagnosis text (§8.2).
    """
    modalities_in = _check_codes(modalities_in, "modalities_in")
    pipeline_kwargs = _check_pipeline_kwargs(pipeline_kwargs)
    rules = as_rules(rules)
    replacement_dir = None if replaced_by is None else resolve_replacement_dir(replaced_by)
    index = index_cohort(cohort_dir, split)
    subjects = select_subjects(index, modalities_in, also_required=tuple(also_required), max_subjects=max_subjects)
    out_dir = None if out_dir is None else Path(out_dir)
    settings = {"task": "diagnosis", "cohort_dir": str(index.cohort_dir), "split": split,
                "modalities_in": modalities_in, "also_required": list(also_required),
                "replaced_by": None if replacement_dir is None else str(replacement_dir), "seed": seed,
                "max_new_tokens": max_new_tokens, "max_subjects": max_subjects, "pipeline_kwargs": pipeline_kwargs}
    per_subject, skipped = [], []
    for record in _progress(_records(index, subjects), len(subjects), "diagnosis", progress):
        try:
            scaled = _scaled_volumes(record, modalities_in)
        except _Skip as reason:
            skipped.append({"subject_id": record.subject_id, "reason": str(reason)})
            continue
        slice_index = middle_lesion_slice(record.mask, record.shape_zyx[0])
        inputs = {code: scaled[code][slice_index] for code in modalities_in}
        replacements = _replacement_images(replacement_dir, record.subject_id, modalities_in)
        inputs.update(replacements)
        try:
            output = pipe(images=inputs, task="diagnosis", max_new_tokens=max_new_tokens,
                          generator=_generator(seed, record.subject_id), output_type="np", **pipeline_kwargs)
        except ValueError as error:
            if replacements:
                raise EvaluationInputError(f"subject {record.subject_id}: the images from {replacement_dir} do not "
                                           f"fit the real slices: {error}") from None
            raise
        scored = score_diagnoses([record.subject_id], [output.diagnosis[0]], rules)[0]
        per_subject.append({**scored, "slice_index": int(slice_index), "replaced": sorted(replacements),
                            "diagnosis": output.diagnosis[0]})
        if out_dir is not None:
            columns = [(f"{code}{' (replaced)' if code in replacements else ''}", image)
                       for code, image in inputs.items()]
            save_panel(out_dir / "panels" / f"{record.subject_id}.png", columns,
                       scale=_panel_scale(next(iter(inputs.values())).shape))
    if not per_subject:
        raise _no_subject_scored(skipped)
    if replacement_dir is not None and not any(r["replaced"] for r in per_subject):
        raise EvaluationInputError(f"none of the evaluated subjects has a <subject>-<modality>.png for "
                                   f"{modalities_in} in {replacement_dir}")
    notes = ["Correct when the subject's class word (e.g. 'Gli', 'Mening') occurs in the diagnosis text, "
             "case-insensitively (the reference's rule); parsed_label_accuracy is a stricter single-label reading.",
             "Majority-class baseline: always answer the most frequent class of the train split."]
    result = DiagnosisResult("diagnosis", settings, metrics=_accuracy_metrics(per_subject),
                             baselines={"majority_class": _majority_baseline(index, [r["subject_id"] for r in
                                                                                   per_subject], rules)},
                             per_subject=per_subject, skipped=skipped, notes=notes)
    if out_dir is not None:
        _write_predictions(out_dir, per_subject)
        result.write(out_dir)
    return result


# --------------------------------------------------------------------------- unified


def constant_impression_baseline(index: CohortIndex, references: list[str]) -> dict:
    """ROUGE of always answering one training impression: the most typical of the first training impressions.

    "Most typical" = the highest mean ROUGE-L against the other impressions of a pool of at most
    :data:`IMPRESSION_BASELINE_POOL` training subjects (in split-file order), so the baseline is what a
    model that ignores the images could write at best with one fixed sentence.
    """
    pool = [index.impressions[s] for s in index.split_ids.get("train", []) if index.impressions.get(s, "").strip()]
    pool = pool[:IMPRESSION_BASELINE_POOL]
    if not pool:
        return {"text": None, "rouge1": float("nan"), "rouge2": float("nan"), "rougeL": float("nan")}
    if len(pool) == 1:
        chosen = pool[0]
    else:
        typicality = []
        for position, candidate in enumerate(pool):
            others = [text for other, text in enumerate(pool) if other != position]
            typicality.append(image_metrics.rouge_scores([candidate] * len(others), others)["rougeL"])
        chosen = pool[int(np.argmax(typicality))]
    scores = image_metrics.rouge_scores([chosen] * len(references), references)
    return {"text": chosen, **{k: scores[k] for k in ("rouge1", "rouge2", "rougeL")}}


def evaluate_unified(pipe, cohort_dir, modalities_in, modalities_out, split: str = "test", rules=None,
                     max_new_tokens: int | None = None, seed: int = 0, num_inference_steps: int = 10, out_dir=None,
                     max_subjects: int | None = None, progress: bool = True, **pipeline_kwargs) -> UnifiedResult:
    """Impute ``modalities_out``, then write an impression and a diagnosis, in one context (§8.3).

    Args as in :func:`evaluate_generation` (2-D, middle lesion slice, one sample) and
    :func:`evaluate_diagnosis`. ``max_new_tokens`` = ``None`` uses the reference's 800-token budget for
    the thinking, impression and diagnosis texts.

    Scores: diagnosis accuracy (class-word rule) with the majority-class baseline; ROUGE-1/2/L of the
    generated impression against the subject's impression (ours) with a constant-impression baseline;
    PSNR/SSIM of the imputed images (ours; the reference does not score images in this task) with the
    copy-input baseline. ``out_dir`` gets ``predictions.jsonl`` (thinking, impression, diagnosis per
    subject), panels, ``images/<subject>-<target>.png``, ``metrics.json`` and ``summary.md``.
    """
    modalities_in = _check_codes(modalities_in, "modalities_in")
    modalities_out = _check_codes(modalities_out, "modalities_out")
    pipeline_kwargs = _check_pipeline_kwargs(pipeline_kwargs)
    rules = as_rules(rules)
    index = index_cohort(cohort_dir, split)
    subjects = select_subjects(index, modalities_in, modalities_out, max_subjects=max_subjects)
    out_dir = None if out_dir is None else Path(out_dir)
    settings = {"task": "unified", "cohort_dir": str(index.cohort_dir), "split": split, "mode": "2d",
                "modalities_in": modalities_in, "modalities_out": modalities_out, "seed": seed,
                "num_inference_steps": num_inference_steps, "max_new_tokens": max_new_tokens,
                "max_subjects": max_subjects, "pipeline_kwargs": pipeline_kwargs}
    per_subject, skipped = [], []
    for record in _progress(_records(index, subjects), len(subjects), "unified", progress):
        try:
            scaled = _scaled_volumes(record, [*modalities_in, *modalities_out])
        except _Skip as reason:
            skipped.append({"subject_id": record.subject_id, "reason": str(reason)})
            continue
        slice_index = middle_lesion_slice(record.mask, record.shape_zyx[0])
        inputs = {code: scaled[code][slice_index] for code in modalities_in}
        truths = {code: scaled[code][slice_index] for code in modalities_out}
        output = pipe(images={code: _as_rgb(image) for code, image in inputs.items()}, target_modalities=modalities_out,
                      task="unified", num_grid_points=num_inference_steps, max_new_tokens=max_new_tokens,
                      generator=_generator(seed, record.subject_id), output_type="pil", **pipeline_kwargs)
        imputed = {t: reference_ensemble([np.asarray(output.images[t][0], dtype=np.uint8)]) for t in modalities_out}
        scored = score_diagnoses([record.subject_id], [output.diagnosis[0]], rules)[0]
        rouge = image_metrics.rouge_scores([output.impression[0]], [record.impression])
        copy_source = inputs[modalities_in[0]]
        per_subject.append({
            **scored, "slice_index": int(slice_index), "diagnosis": output.diagnosis[0],
            "impression": output.impression[0], "reference_impression": record.impression,
            "thinking": {t: texts[0] for t, texts in output.thinking.items()}, "rouge": {k: rouge[k] for k in ("rouge1", "rouge2", "rougeL")},
            "imputed": {t: _image_scores(truths[t], imputed[t]) for t in modalities_out},
            "copy_input": {t: _image_scores(truths[t], copy_source) for t in modalities_out}})
        if out_dir is not None:
            _write_generation_files(out_dir, record, "2d", slice_index, 1, inputs, truths, imputed)
    if not per_subject:
        raise _no_subject_scored(skipped)
    evaluated = [r["subject_id"] for r in per_subject]
    metrics = {**_accuracy_metrics(per_subject),
               **{k: _mean(r["rouge"][k] for r in per_subject) for k in ("rouge1", "rouge2", "rougeL")},
               "images": _image_means(per_subject, modalities_out, "imputed")}
    baselines = {"majority_class": _majority_baseline(index, evaluated, rules),
                 "constant_impression": constant_impression_baseline(index, [r["reference_impression"]
                                                                             for r in per_subject]),
                 "copy_input": {**_image_means(per_subject, modalities_out, "copy_input"),
                                "modality": modalities_in[0]}}
    notes = ["Diagnosis scored with the reference's class-word substring rule; the unified diagnosis question "
             "offers Glioblastoma / Meningioma / Metastatic tumor, as in the reference.",
             "ROUGE-1/2/L F-measures (rouge_score, Porter stemming) of the generated impression vs the subject's "
             "impression; the reference releases no ROUGE code, so these are ours.",
             "PSNR/SSIM of the images imputed inside the unified context are ours; the reference does not "
             "accumulate them in this task."]
    result = UnifiedResult("unified", settings, metrics=metrics, baselines=baselines, per_subject=per_subject,
                           skipped=skipped, notes=notes)
    if out_dir is not None:
        _write_predictions(out_dir, per_subject)
        result.write(out_dir)
    return result


def run_task(task: str, pipe, cohort_dir, **kwargs) -> EvaluationResult:
    """Dispatch to one of the three task functions by name."""
    functions: dict[str, Any] = {"generation": evaluate_generation, "diagnosis": evaluate_diagnosis,
                                 "unified": evaluate_unified}
    if task not in functions:
        raise EvaluationInputError(f"unknown task {task!r}; choose from {', '.join(TASK_NAMES)}")
    return functions[task](pipe, cohort_dir, **kwargs)


__all__ = ["CohortIndex", "DiagnosisResult", "EvaluationInputError", "EvaluationResult", "GenerationResult",
           "UnifiedResult", "constant_impression_baseline", "evaluate_diagnosis", "evaluate_generation",
           "evaluate_unified", "index_cohort", "record_affine", "reference_ensemble", "resolve_replacement_dir",
           "run_task", "select_subjects", "subject_seed"]
