"""The three UniBrain evaluation tasks (docs/EVALUATION.md): generation, diagnosis and unified.

Each task is a parameterisation of the one per-subject loop in :mod:`.scoring`: which sequences
a subject needs, how one subject is scored, and how the per-subject records are summarised
(:mod:`.results`). Subjects come from :mod:`.cohort`; every pipeline call goes through
:mod:`.calls`.

* :func:`evaluate_generation` — impute target sequences from input sequences. 2-D mode
  scores the middle lesion slice; 3-D mode scores every ``slice_stride``-th axial slice as
  one volume. PSNR/SSIM per subject and their means; baseline: copy the first input; ceiling:
  the VAE's own reconstruction of the truth (2-D). ``sample_time=K`` averages K generations
  pixel-wise (an ensemble, as the reference).
* :func:`evaluate_diagnosis` — the diagnosis question on the middle lesion slice, scored by the
  class named on the answer's final diagnosis line (the reference's substring rule is reported
  beside it); baselines: the majority class of the training split and the best constant answer.
  ``replaced_by`` feeds images from a directory of ``<subject>-<modality>.png`` files (e.g. a
  previous generation run's ``images/``).
* :func:`evaluate_unified` — impute, then write an impression and a diagnosis in one
  context; accuracy, ROUGE-1/2/L of the impression, and PSNR/SSIM of the imputed images.

Every "ours vs baseline" pair also gets the mean per-subject difference with a bootstrap 95 %
interval (``result.comparisons``). With ``out_dir`` every task writes ``metrics.json``,
``summary.md``, ``panels/*.png`` and, per task, ``images/*.png`` (2-D imputations, usable as
``replaced_by``), ``nifti/*.nii.gz`` (3-D mode) or ``predictions.jsonl`` (text tasks). Every file
is written atomically.

Randomness is explicit: sample ``k`` of subject ``s`` uses a ``torch.Generator`` seeded from
``(seed, s, k)`` (:func:`subject_seed`), so results do not depend on subject order or
``max_subjects``.

    unibrain eval --pipeline out/pipeline --cohort out/cohort --task generation --modalities-in t1n --modalities-out t2f --out out/eval
    python -c "from unibrain_hf.evaluation.tasks import evaluate_generation; help(evaluate_generation)"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import EvaluationInputError
from ..utils.atomic import atomic_file
from . import calls
from . import metrics as image_metrics
from .cohort import (DIAGNOSIS_ALSO_REQUIRED, CohortIndex, SkipSubject, check_codes, check_positive_int,
                     evaluation_slice_index, index_cohort, record_affine, scaled_volumes, select_subjects,
                     subject_generator, subject_seed)
from .diagnosis import as_rules, is_correct, parse_diagnosis_label
from .calls import reference_ensemble
from .report import save_nifti_like, save_panel
from .results import (DiagnosisResult, EvaluationResult, GenerationResult, UnifiedResult, accuracy_summary,
                      image_comparisons, image_means, impression_findings_on_normal, lesion_comparisons, mean,
                      write_predictions)
from .scoring import Task, run_task_loop

TASK_NAMES = ("generation", "diagnosis", "unified")
MODES = ("2d", "3d")
#: Pipeline arguments the tasks set themselves; passing them through ``**pipeline_kwargs`` is an error.
RESERVED_PIPELINE_ARGUMENTS = ("images", "target_modalities", "task", "generator", "output_type", "return_dict",
                               "slice_index", "axis", "latents", "posterior_eps", "num_inference_steps",
                               "max_new_tokens", "prompt", "num_grid_points")
#: Panels of small slices are magnified to about this many pixels on their long side.
PANEL_TARGET_PIXELS = 192
#: At most this many training impressions are compared to pick the constant-impression baseline.
IMPRESSION_BASELINE_POOL = 100


# --------------------------------------------------------------------------- small helpers


def _check_pipeline_kwargs(pipeline_kwargs: dict) -> dict:
    clashes = sorted(set(pipeline_kwargs) & set(RESERVED_PIPELINE_ARGUMENTS))
    if clashes:
        raise EvaluationInputError(f"{clashes} are set by the evaluation itself; use the task function's own "
                                   f"arguments (seed, num_inference_steps, max_new_tokens, ...)")
    return dict(pipeline_kwargs)


def _panel_scale(shape) -> int:
    return max(1, PANEL_TARGET_PIXELS // max(int(shape[0]), int(shape[1])))


def _save_png(path: Path, image: np.ndarray) -> Path:
    with atomic_file(path, ".png") as temporary:
        Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(temporary, format="PNG")
    return path


def _image_scores(gt: np.ndarray, pred: np.ndarray, lesion: np.ndarray | None = None) -> dict:
    """PSNR/SSIM of the whole image and, when ``lesion`` (a boolean mask of the slice) has pixels, the PSNR
    over the lesion's pixels only: whether the lesion itself is rendered, which whole-image scores hide."""
    scores = {"psnr": image_metrics.psnr(gt, pred), "ssim": image_metrics.ssim(gt, pred)}
    if lesion is not None and (lesion_psnr := image_metrics.lesion_psnr(gt, pred, lesion)) is not None:
        scores["lesion_psnr"] = lesion_psnr
    return scores


def _lesion_mask(record, slice_index: int) -> np.ndarray | None:
    return None if record.mask is None else np.asarray(record.mask[slice_index]) > 0


def _ceiling_scores(pipe, truths: dict) -> dict:
    """PSNR/SSIM of the VAE's own reconstruction of each true target slice."""
    return {t: _image_scores(truth, calls.vae_reconstruction(pipe, truth)) for t, truth in truths.items()}


def _score_diagnosis_text(subject_id: str, text: str, rules) -> dict:
    """Truth, the class on the final diagnosis line, correctness by it and by the reference's substring rule."""
    truth = rules.classify(subject_id)
    parsed = parse_diagnosis_label(text, rules.class_words)
    return {"subject_id": subject_id, "ground_truth": truth, "parsed_label": parsed, "correct": parsed == truth,
            "reference_correct": is_correct(truth, text)}


def _image_results(per_subject: list[dict], targets: list[str], copy_modality: str) -> tuple[dict, dict, dict]:
    """(metrics, baselines, comparisons) of imputed images: copy-input baseline, VAE ceiling, paired intervals."""
    metrics = image_means(per_subject, targets, "imputed")
    baselines = {"copy_input": {**image_means(per_subject, targets, "copy_input"), "modality": copy_modality}}
    comparisons = {"imputed_vs_copy_input": image_comparisons(per_subject, targets),
                   "lesion_psnr_vs_copy_input": lesion_comparisons(per_subject, targets)}
    if all("vae_ceiling" in r for r in per_subject):
        baselines["vae_ceiling"] = image_means(per_subject, targets, "vae_ceiling")
    return metrics, baselines, comparisons


def _comparison_panel(path: Path, subject: str, inputs: dict, target: str, pred: np.ndarray, truth: np.ndarray,
                      scores: dict, extra_title: str = "") -> None:
    """inputs | imputed | truth | |difference|, titled with the subject id and the scores."""
    difference = np.abs(truth.astype(np.int16) - pred.astype(np.int16)).astype(np.uint8)
    columns = [(f"in {code}", image) for code, image in inputs.items()]
    columns += [(f"imputed {target}", pred), (f"true {target}", truth), ("|difference|", difference)]
    imputed, copy = scores["imputed"][target], scores["copy_input"][target]
    title = [subject, f"{target}: PSNR {imputed['psnr']:.1f} dB, SSIM {imputed['ssim']:.2f} "
                      f"(copy: {copy['psnr']:.1f} / {copy['ssim']:.2f})"]
    if extra_title:
        title.append(extra_title)
    save_panel(path, columns, scale=_panel_scale(truth.shape), title=title)


def _write_generation_files(out_dir: Path, record, entry: dict, mode: str, slice_index: int, slice_stride: int,
                            inputs: dict, truths: dict, imputed: dict, extra_title: str = "") -> None:
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
        _comparison_panel(out_dir / "panels" / f"{subject}_{target}.png", subject, panel_inputs, target, pred, truth,
                          entry, extra_title)
        if mode == "2d":
            # Named as the reference's --replaced_by directory expects: <subject>-<modality>.png.
            _save_png(out_dir / "images" / f"{subject}-{target}.png", pred)


def _majority_train_ids(index: CohortIndex) -> list[str]:
    return index.split_ids.get("train", [])


# --------------------------------------------------------------------------- generation


def evaluate_generation(pipe, cohort_dir, modalities_in, modalities_out, split: str = "test", mode: str = "2d",
                        sample_time: int = 1, seed: int = 0, slice_stride: int = 1, num_inference_steps: int = 10,
                        out_dir=None, max_subjects: int | None = None, batch_size: int = 8, progress: bool = True,
                        subjects: list[str] | None = None, **pipeline_kwargs) -> GenerationResult:
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
        subjects: score exactly these (eligible) subject ids instead.
        **pipeline_kwargs: other pipeline settings (``guidance_scale``, ``image_guidance_scale``, ...).

    Returns a :class:`GenerationResult`; ``metrics`` = means over subjects, ``baselines["copy_input"]`` the
    same numbers for the first input's slice used as the prediction, ``baselines["vae_ceiling"]`` (2-D)
    those of the VAE's reconstruction of the truth, ``comparisons`` the paired differences with intervals.
    """
    modalities_in = check_codes(modalities_in, "modalities_in")
    modalities_out = check_codes(modalities_out, "modalities_out")
    if mode not in MODES:
        raise EvaluationInputError(f"mode must be one of {MODES}, got {mode!r}")
    sample_time = check_positive_int(sample_time, "sample_time")
    slice_stride = check_positive_int(slice_stride, "slice_stride")
    batch_size = check_positive_int(batch_size, "batch_size")
    pipeline_kwargs = _check_pipeline_kwargs(pipeline_kwargs)
    out_dir = None if out_dir is None else Path(out_dir)
    settings = {"task": "generation", "cohort_dir": str(cohort_dir), "split": split, "mode": mode,
                "modalities_in": modalities_in, "modalities_out": modalities_out, "sample_time": sample_time,
                "seed": seed, "slice_stride": slice_stride, "num_inference_steps": num_inference_steps,
                "max_subjects": max_subjects, "pipeline_kwargs": pipeline_kwargs}

    def impute(inputs, subject):
        if mode == "2d":
            samples = [calls.impute_slice(pipe, inputs, modalities_out, subject_generator(seed, subject, k),
                                          num_inference_steps, **pipeline_kwargs)[0] for k in range(sample_time)]
            return {t: reference_ensemble([s[t] for s in samples]) for t in modalities_out}
        try:
            samples = [calls.impute_volume(pipe, inputs, modalities_out, subject_generator(seed, subject, k),
                                           num_inference_steps, batch_size, **pipeline_kwargs)
                       for k in range(sample_time)]
        except ValueError as error:
            raise SkipSubject(str(error)) from None
        return {t: reference_ensemble([s[t] for s in samples], rgb=False) for t in modalities_out}

    def score(record):
        scaled = scaled_volumes(record, [*modalities_in, *modalities_out])
        depth = record.shape_zyx[0]
        slice_index = evaluation_slice_index(record)
        if mode == "2d":
            inputs = {code: scaled[code][slice_index] for code in modalities_in}
            truths = {code: scaled[code][slice_index] for code in modalities_out}
        else:
            kept = len(range(0, depth, slice_stride))
            if kept < image_metrics.SSIM_WINDOW:
                raise SkipSubject(f"slice_stride {slice_stride} keeps {kept} of {depth} slices; 3-D SSIM needs at "
                                  f"least {image_metrics.SSIM_WINDOW}")
            inputs = {code: scaled[code][::slice_stride] for code in modalities_in}
            truths = {code: scaled[code][::slice_stride] for code in modalities_out}
        imputed = impute(inputs, record.subject_id)
        copy_source = inputs[modalities_in[0]]
        lesion = _lesion_mask(record, slice_index) if mode == "2d" else None
        entry = {"subject_id": record.subject_id, "slice_index": int(slice_index) if mode == "2d" else None,
                 "imputed": {t: _image_scores(truths[t], imputed[t], lesion) for t in modalities_out},
                 "copy_input": {t: _image_scores(truths[t], copy_source, lesion) for t in modalities_out}}
        if mode == "2d" and calls.has_vae(pipe):
            entry["vae_ceiling"] = _ceiling_scores(pipe, truths)
        if out_dir is not None:
            _write_generation_files(out_dir, record, entry, mode, slice_index, slice_stride, inputs, truths, imputed)
        return entry

    def summarise(index, per_subject, skipped):
        metrics, baselines, comparisons = _image_results(per_subject, modalities_out, modalities_in[0])
        settings["cohort_dir"] = str(index.cohort_dir)
        return GenerationResult("generation", settings, metrics=metrics, baselines=baselines,
                                per_subject=per_subject, skipped=skipped, comparisons=comparisons,
                                notes=_generation_notes(mode, sample_time, slice_stride))

    task = Task("generation " + mode, modalities_in, score, summarise, modalities_out, settings=settings)
    return run_task_loop(task, cohort_dir, split, max_subjects, out_dir, progress, subjects)


def _generation_notes(mode: str, sample_time: int, slice_stride: int) -> list[str]:
    notes = ["PSNR/SSIM as the reference: uint8 images / 255, data_range 1, scikit-image defaults, whole image "
             "including background; means are over subjects.",
             "Copy-input baseline: the first input sequence's (rescaled) image scored as if it were the target.",
             "Δ columns: mean over subjects of (ours − copy) with a percentile-bootstrap 95 % interval "
             "(10,000 resamples of subjects)."]
    if mode == "2d":
        notes.append("2-D mode: the middle lesion slice of each subject (z // 2 without lesion). VAE ceiling: the "
                     "pipeline's VAE encoding and decoding the true target slice (posterior mean); no imputation "
                     "decoded by this VAE can be expected to score higher.")
    else:
        notes.append(f"3-D mode: every {slice_stride}-th axial slice imputed and scored as one volume (7x7x7 SSIM); "
                     "slices whose inputs are all constant are not generated and stay 0.")
    if sample_time > 1:
        notes.append(f"sample_time {sample_time}: the generations of a slice are averaged pixel-wise (uint8 mean), "
                     "an ensemble, as in the reference.")
    return notes


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


def replacement_images(directory: Path | None, subject_id: str, codes: list[str]) -> dict[str, np.ndarray]:
    """``{code: uint8 grayscale slice}`` of each ``<subject_id>-<code>.png`` in ``directory`` (absent: left out)."""
    if directory is None:
        return {}
    found = {}
    for code in codes:
        path = directory / f"{subject_id}-{code}.png"
        if path.is_file():
            with Image.open(path) as image:
                found[code] = np.asarray(image.convert("L"), dtype=np.uint8)  # grayscale, as the reference reads it
    return found


def _diagnosis_notes() -> list[str]:
    return ["Correct when the class named on the answer's final diagnosis line (\"Final Diagnosis: …\", else the "
            "last line) is the subject's class; the reference's rule (the class word anywhere in the text) is "
            "shown as 'reference substring rule' — it counts e.g. 'abnormal' as 'Normal'.",
            "Baselines: the best constant answer on these subjects (an oracle: no single answer scores higher) "
            "and the majority class of the train split. Intervals: percentile bootstrap over subjects, 95 %.",
            "Findings on normal subjects: the fraction of normal subjects whose final diagnosis names another "
            "class (hallucinated findings)."]


def evaluate_diagnosis(pipe, cohort_dir, modalities_in, split: str = "test", replaced_by=None, rules=None,
                       max_new_tokens: int | None = None, seed: int = 0, out_dir=None,
                       max_subjects: int | None = None, also_required=DIAGNOSIS_ALSO_REQUIRED, progress: bool = True,
                       subjects: list[str] | None = None, **pipeline_kwargs) -> DiagnosisResult:
    """Ask the diagnosis question on each eligible subject's middle lesion slice and score it.

    Args:
        pipe, cohort_dir, split, seed, out_dir, max_subjects, progress, subjects: as in :func:`evaluate_generation`.
        modalities_in: input sequences; a subject needs all of them and ``also_required`` (the
            reference also requires ``t1n``; pass ``()`` to drop that rule).
        replaced_by: a directory of ``<subject>-<modality>.png`` (or a 2-D generation run's output
            directory): an input whose PNG exists there replaces the real slice; the others stay real.
        rules: :class:`~unibrain_hf.evaluation.diagnosis.DiagnosisRules` (or a mapping) deciding each
            subject's class word from its id; default the reference's rules.
        max_new_tokens: text budget; ``None`` = the pipeline default, the reference's 512 tokens
            counting the start token.
        **pipeline_kwargs: other pipeline settings.

    Greedy decoding; the seed only drives the VAE posterior sample of the input images. Correct when
    the final diagnosis line names the subject's class (see :func:`~.diagnosis.parse_diagnosis_label`).
    """
    modalities_in = check_codes(modalities_in, "modalities_in")
    pipeline_kwargs = _check_pipeline_kwargs(pipeline_kwargs)
    rules = as_rules(rules)
    replacement_dir = None if replaced_by is None else resolve_replacement_dir(replaced_by)
    out_dir = None if out_dir is None else Path(out_dir)
    settings = {"task": "diagnosis", "cohort_dir": str(cohort_dir), "split": split,
                "modalities_in": modalities_in, "also_required": list(also_required),
                "replaced_by": None if replacement_dir is None else str(replacement_dir), "seed": seed,
                "max_new_tokens": max_new_tokens, "max_subjects": max_subjects, "pipeline_kwargs": pipeline_kwargs}

    def score(record):
        scaled = scaled_volumes(record, modalities_in)
        slice_index = evaluation_slice_index(record)
        inputs = {code: scaled[code][slice_index] for code in modalities_in}
        replacements = replacement_images(replacement_dir, record.subject_id, modalities_in)
        inputs.update(replacements)
        try:
            text = calls.diagnose(pipe, inputs, subject_generator(seed, record.subject_id), max_new_tokens,
                                  **pipeline_kwargs)
        except ValueError as error:
            if replacements:
                raise EvaluationInputError(f"subject {record.subject_id}: the images from {replacement_dir} do not "
                                           f"fit the real slices: {error}") from None
            raise
        entry = {**_score_diagnosis_text(record.subject_id, text, rules), "slice_index": int(slice_index),
                 "replaced": sorted(replacements), "diagnosis": text}
        if out_dir is not None:
            columns = [(f"{code}{' (replaced)' if code in replacements else ''}", image)
                       for code, image in inputs.items()]
            save_panel(out_dir / "panels" / f"{record.subject_id}.png", columns,
                       scale=_panel_scale(next(iter(inputs.values())).shape),
                       title=[record.subject_id, f"predicted {entry['parsed_label']} / true {entry['ground_truth']}"])
        return entry

    def summarise(index, per_subject, skipped):
        if replacement_dir is not None and not any(r["replaced"] for r in per_subject):
            raise EvaluationInputError(f"none of the evaluated subjects has a <subject>-<modality>.png for "
                                       f"{modalities_in} in {replacement_dir}")
        metrics, baselines, comparisons = accuracy_summary(per_subject, _majority_train_ids(index), rules)
        settings["cohort_dir"] = str(index.cohort_dir)
        return DiagnosisResult("diagnosis", settings, metrics=metrics, baselines=baselines, per_subject=per_subject,
                               skipped=skipped, comparisons=comparisons, notes=_diagnosis_notes())

    task = Task("diagnosis", modalities_in, score, summarise, also_required=tuple(also_required), settings=settings,
                write_extra=lambda out, result: write_predictions(out, result.per_subject))
    return run_task_loop(task, cohort_dir, split, max_subjects, out_dir, progress, subjects)


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
        return {"text": None, "rouge1": float("nan"), "rouge2": float("nan"), "rougeL": float("nan"),
                "per_subject_rougeL": None}
    if len(pool) == 1:
        chosen = pool[0]
    else:
        typicality = []
        for position, candidate in enumerate(pool):
            others = [text for other, text in enumerate(pool) if other != position]
            typicality.append(image_metrics.rouge_scores([candidate] * len(others), others)["rougeL"])
        chosen = pool[int(np.argmax(typicality))]
    scores = image_metrics.rouge_scores([chosen] * len(references), references)
    return {"text": chosen, **{k: scores[k] for k in ("rouge1", "rouge2", "rougeL")},
            "per_subject_rougeL": [item["rougeL"] for item in scores["per_item"]]}


def evaluate_unified(pipe, cohort_dir, modalities_in, modalities_out, split: str = "test", rules=None,
                     max_new_tokens: int | None = None, seed: int = 0, num_inference_steps: int = 10, out_dir=None,
                     max_subjects: int | None = None, progress: bool = True, subjects: list[str] | None = None,
                     target_names: dict | None = None, **pipeline_kwargs) -> UnifiedResult:
    """Impute ``modalities_out`` in order, then write an impression and a diagnosis, in one context (§8.3).

    Args as in :func:`evaluate_generation` (2-D, middle lesion slice, one sample) and
    :func:`evaluate_diagnosis`. ``max_new_tokens`` = ``None`` uses the reference's 800-token budget for
    the thinking, impression and diagnosis texts.

    Scores: diagnosis accuracy (final diagnosis line) with the best-constant and majority-class baselines;
    ROUGE-1/2/L of the generated impression against the subject's impression (ours) with a
    constant-impression baseline; PSNR/SSIM of the imputed images (ours; the reference does not score
    images in this task) with the copy-input baseline and the VAE ceiling. ``target_names`` maps a target
    code to the name the instructions use (default the code, as the reference: "… into its t2w image."),
    e.g. ``{"t2w": "T2w"}`` for a model trained only on the spellings of ``templates.MODALITY_SYNONYMS``,
    which do not include "t2w". ``out_dir`` gets
    ``predictions.jsonl`` (thinking, impression, diagnosis per subject), panels,
    ``images/<subject>-<target>.png``, ``metrics.json`` and ``summary.md``.
    """
    modalities_in = check_codes(modalities_in, "modalities_in")
    modalities_out = check_codes(modalities_out, "modalities_out")
    pipeline_kwargs = _check_pipeline_kwargs(pipeline_kwargs)
    rules = as_rules(rules)
    out_dir = None if out_dir is None else Path(out_dir)
    settings = {"task": "unified", "cohort_dir": str(cohort_dir), "split": split, "mode": "2d",
                "modalities_in": modalities_in, "modalities_out": modalities_out, "seed": seed,
                "num_inference_steps": num_inference_steps, "max_new_tokens": max_new_tokens,
                "max_subjects": max_subjects, "target_names": target_names, "pipeline_kwargs": pipeline_kwargs}

    def score(record):
        scaled = scaled_volumes(record, [*modalities_in, *modalities_out])
        slice_index = evaluation_slice_index(record)
        inputs = {code: scaled[code][slice_index] for code in modalities_in}
        truths = {code: scaled[code][slice_index] for code in modalities_out}
        lesion = _lesion_mask(record, slice_index)
        rgb, output = calls.impute_slice(pipe, inputs, modalities_out, subject_generator(seed, record.subject_id),
                                         num_inference_steps, task="unified", target_names=target_names,
                                         max_new_tokens=max_new_tokens, **pipeline_kwargs)
        imputed = {t: reference_ensemble([rgb[t]]) for t in modalities_out}
        rouge = image_metrics.rouge_scores([output.impression], [record.impression])
        copy_source = inputs[modalities_in[0]]
        entry = {
            **_score_diagnosis_text(record.subject_id, output.diagnosis, rules), "slice_index": int(slice_index),
            "diagnosis": output.diagnosis, "impression": output.impression,
            "reference_impression": record.impression, "thinking": output.thinking,
            "rouge": {k: rouge[k] for k in ("rouge1", "rouge2", "rougeL")},
            "imputed": {t: _image_scores(truths[t], imputed[t], lesion) for t in modalities_out},
            "copy_input": {t: _image_scores(truths[t], copy_source, lesion) for t in modalities_out}}
        if calls.has_vae(pipe):
            entry["vae_ceiling"] = _ceiling_scores(pipe, truths)
        if out_dir is not None:
            _write_generation_files(out_dir, record, entry, "2d", slice_index, 1, inputs, truths, imputed,
                                    f"diagnosis: predicted {entry['parsed_label']} / true {entry['ground_truth']}")
        return entry

    def summarise(index, per_subject, skipped):
        metrics, baselines, comparisons = accuracy_summary(per_subject, _majority_train_ids(index), rules)
        image_metrics_, image_baselines, image_comparisons_ = _image_results(per_subject, modalities_out,
                                                                             modalities_in[0])
        metrics.update({k: mean(r["rouge"][k] for r in per_subject) for k in ("rouge1", "rouge2", "rougeL")})
        findings = impression_findings_on_normal(per_subject, rules)
        if findings is not None:
            metrics["impression_findings_on_normal"] = findings
        metrics["images"] = image_metrics_
        constant = constant_impression_baseline(index, [r["reference_impression"] for r in per_subject])
        baselines.update(image_baselines)
        baselines["constant_impression"] = constant
        comparisons.update(image_comparisons_)
        if constant["per_subject_rougeL"] is not None:
            from .statistics import paired_difference

            comparisons["rougeL_vs_constant_impression"] = paired_difference(
                [r["rouge"]["rougeL"] for r in per_subject], constant["per_subject_rougeL"]).to_dict()
        settings["cohort_dir"] = str(index.cohort_dir)
        return UnifiedResult("unified", settings, metrics=metrics, baselines=baselines, per_subject=per_subject,
                             skipped=skipped, comparisons=comparisons, notes=_unified_notes())

    task = Task("unified", modalities_in, score, summarise, modalities_out, settings=settings,
                write_extra=lambda out, result: write_predictions(out, result.per_subject))
    return run_task_loop(task, cohort_dir, split, max_subjects, out_dir, progress, subjects)


def _unified_notes() -> list[str]:
    return [*_diagnosis_notes()[:1],
            "The unified diagnosis question offers Glioblastoma / Meningioma / Metastatic tumor, as in the "
            "reference, whatever the subject's class.",
            "ROUGE-1/2/L F-measures (rouge_score, Porter stemming) of the generated impression vs the subject's "
            "impression; the reference releases no ROUGE code, so these are ours.",
            "PSNR/SSIM of the images imputed inside the unified context are ours; the reference does not "
            "accumulate them in this task. Δ = ours − baseline per subject, bootstrap 95 % interval."]


def run_task(task: str, pipe, cohort_dir, **kwargs) -> EvaluationResult:
    """Dispatch to one of the three task functions by name."""
    functions: dict[str, Any] = {"generation": evaluate_generation, "diagnosis": evaluate_diagnosis,
                                 "unified": evaluate_unified}
    if task not in functions:
        raise EvaluationInputError(f"unknown task {task!r}; choose from {', '.join(TASK_NAMES)}")
    return functions[task](pipe, cohort_dir, **kwargs)


__all__ = ["CohortIndex", "DIAGNOSIS_ALSO_REQUIRED", "DiagnosisResult", "EvaluationInputError", "EvaluationResult",
           "GenerationResult", "UnifiedResult", "constant_impression_baseline", "evaluate_diagnosis",
           "evaluate_generation", "evaluate_unified", "index_cohort", "record_affine", "reference_ensemble",
           "replacement_images", "resolve_replacement_dir", "run_task", "select_subjects", "subject_seed"]
