"""The main job's held-out evaluation and its report: every claim as a paired difference with an interval.

:func:`evaluate_demo` scores, on one set of subjects (every subject of the split that has T1n and
the target sequences):

* unified imputation T1n → targets in order, then impression and diagnosis, with the stage-3 (DHS)
  model and with the stage-2 model (claim c: DHS ≥ stage 2, per target position);
* diagnosis from T1n alone (the diagnosis task) and from all real sequences (the upper bound);
* how predictable each target is from T1n at all: a conditional-mean CNN fitted on the training
  split (:mod:`unibrain_hf.evaluation.predictability`), and where a perfect sampler would land;
* where each model's imputed image looks: attention from the target's tokens to the input's
  (:mod:`unibrain_hf.evaluation.copy_attention`), on the first subjects;
* how diagnosable the subjects are from the images at all: a classifier fitted on the training split
  from T1n alone, from T1n and the real targets (that classifier also read with the stage-3 imputations
  in place of the real targets), and from all real sequences (:mod:`unibrain_hf.evaluation.diagnosability`);

and :func:`write_demo_report` writes ``summary.md`` (tables with the VAE ceiling, per-subject paired
differences and bootstrap 95 % intervals, confusion matrices, the rate of findings on normal
subjects), ``demo.json``, ``loss_curves.png`` and ``imputation_examples.png``.

    unibrain demo --out runs/demo      # calls both
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .evaluation.results import NORMAL_CLASS, image_series, interval_text, lesion_comparisons
from .evaluation.statistics import paired_difference
from .protocol.templates import CANONICAL_MODALITIES

#: Subjects the attention measurement reads (its spread across subjects is small; each costs a few forwards).
COPY_ATTENTION_SUBJECTS = 8

#: Channels of the conditional-mean CNN (16: about 20 s per target on 2 cores at 600 steps).
PREDICTABILITY_WIDTH = 16

#: Channels of the diagnosability classifier (16: about 45-50 s per classifier on 2 cores at 3,000 steps).
DIAGNOSABILITY_WIDTH = 16

#: Names of the diagnosis rows the report compares (the keys of ``comparisons(...)["diagnosis"]``).
T1N_ROW = "T1n alone (diagnosis task)"
IMPUTED_ROW = "after unified imputation (stage 3)"
ALL_REAL_ROW_PREFIX = "all real sequences"

#: Sequences a phantom tumour/normal subject can have, in the order the upper-bound diagnosis gets them.
ALL_SEQUENCES = CANONICAL_MODALITIES  # every sequence the protocol names, in its order


def evaluate_demo(dhs_dir: Path, stage2_dir: Path, cohort: Path, report: Path, plan, split: str = "test",
                  seed: int = 0) -> dict:
    """Score the stage-3 and stage-2 pipelines on the same held-out subjects (see the module docstring)."""
    from .evaluation.cohort import index_cohort, select_subjects
    from .evaluation.copy_attention import copy_attention
    from .evaluation.diagnosability import classifier_baseline
    from .evaluation.predictability import conditional_mean_baseline, latent_mean_baseline
    from .evaluation.specificity import input_specificity
    from .evaluation.tasks import evaluate_diagnosis, evaluate_unified
    from .pipelines.pipeline_unibrain import UniBrainPipeline

    targets = plan.target_list
    index = index_cohort(cohort, split)
    subjects = select_subjects(index, ["t1n"], targets, max_subjects=plan.eval_subjects or None)
    # The upper bound gets every sequence all of these subjects have.
    everything = [code for code in ALL_SEQUENCES if all(code in index.subjects[s] for s in subjects)]
    common = dict(split=split, seed=seed, subjects=subjects)
    guidance = dict(guidance_scale=plan.guidance_scale, image_guidance_scale=plan.image_guidance_scale)
    if plan.timestep_shift > 0:
        guidance["timestep_shift"] = plan.timestep_shift
    if plan.think != "auto":
        guidance["think"] = plan.think == "on"
    names = dict(item.split("=", 1) for item in plan.target_names.split(",") if "=" in item)
    unified = dict(modalities_in=["t1n"], modalities_out=targets, num_inference_steps=plan.inference_steps,
                   max_new_tokens=plan.max_new_tokens, target_names=names or None, **guidance)
    results = {"split": split, "subjects": subjects, "targets": targets, "all_sequences": everything,
               "copy_attention": {}}
    first = subjects[:COPY_ATTENTION_SUBJECTS]
    pipe = _load(UniBrainPipeline, dhs_dir)
    results["unified"] = evaluate_unified(pipe, cohort, out_dir=report / "unified_dhs", **unified, **common)
    # The same noise for every subject: does the imputation carry the input's anatomy at all?
    sampler = {k: v for k, v in guidance.items() if k != "think"}
    if len(subjects) >= 2:
        results["specificity"] = input_specificity(pipe, cohort, split, subjects, "t1n", targets,
                                                   plan.inference_steps, seed=seed, **sampler)
    results["diagnosis_t1n"] = evaluate_diagnosis(pipe, cohort, ["t1n"], out_dir=report / "diagnosis_t1n",
                                                  max_new_tokens=plan.max_new_tokens, also_required=(), **common)
    results["diagnosis_all"] = evaluate_diagnosis(pipe, cohort, everything, out_dir=report / "diagnosis_all",
                                                  max_new_tokens=plan.max_new_tokens, also_required=(), **common)
    results["copy_attention"]["stage 3"] = {t: copy_attention(pipe, cohort, split, first, "t1n", t, seed=seed)
                                            for t in targets}
    del pipe
    stage2 = _load(UniBrainPipeline, stage2_dir)
    results["unified_stage2"] = evaluate_unified(stage2, cohort, out_dir=report / "unified_stage2", **unified,
                                                 **common)
    results["copy_attention"]["stage 2"] = {t: copy_attention(stage2, cohort, split, first, "t1n", t, seed=seed)
                                            for t in targets}
    if plan.predictability_steps and plan.latent_predictability_steps:  # a column of the predictability table
        results["latent_predictability"] = {
            target: latent_mean_baseline(stage2, cohort, "t1n", target, eval_split=split, subjects=subjects,
                                         steps=plan.latent_predictability_steps, seed=seed)
            for target in targets}
    results["lookup_table"] = lookup_table_baseline(cohort, split, subjects, "t1n", targets)
    if plan.predictability_steps:
        results["predictability"] = {
            target: conditional_mean_baseline(cohort, "t1n", target, eval_split=split, subjects=subjects,
                                              steps=plan.predictability_steps, width=PREDICTABILITY_WIDTH, seed=seed)
            for target in targets}
    if plan.diagnosability_steps:
        fit = dict(eval_split=split, subjects=subjects, steps=plan.diagnosability_steps, width=DIAGNOSABILITY_WIDTH,
                   seed=seed)
        results["diagnosability"] = {
            "t1n": classifier_baseline(cohort, ["t1n"], **fit),
            # fitted on the real targets, then also read with the stage-3 imputations in their place
            "t1n+targets": classifier_baseline(cohort, ["t1n", *targets], replaced_by=report / "unified_dhs" / "images",
                                               **fit),
            "all": classifier_baseline(cohort, everything, **fit)}
    return results


def lookup_table_baseline(cohort: Path, split: str, subjects: list[str], source: str, targets: list[str]) -> dict:
    """A non-learned-but-fitted reference: map each source intensity to the mean target intensity.

    The table (256 entries per target) is fitted on every voxel of the training split's subjects that
    have the source and the target, and applied pixel by pixel to the scored slice. It preserves the
    anatomy exactly and only changes contrast, so it shows what a purely local contrast mapping can
    score. ``sampler_ssim`` is the SSIM one sample around the table's mean is expected to score
    (:func:`~.evaluation.metrics.sampler_ssim`). Returns ``{"per_subject": {subject: {target: {"psnr", "ssim",
    "sampler_ssim"[, "lesion_psnr"]}}}, "per_target": means}``.
    """
    from .data.radgenome import iter_subject_records
    from .evaluation.cohort import evaluation_lesion_masks, evaluation_slices, scaled_volumes
    from .evaluation.metrics import lesion_psnr, psnr, sampler_ssim, ssim

    sums = {t: np.zeros(256) for t in targets}
    counts = {t: np.zeros(256) for t in targets}
    for record in iter_subject_records(cohort, split="train"):
        available = [t for t in targets if t in record.volumes]
        if source not in record.volumes or not available:
            continue
        volumes = scaled_volumes(record, [source, *available])
        values = volumes[source].ravel()
        for target in available:
            counts[target] += np.bincount(values, minlength=256)
            sums[target] += np.bincount(values, weights=volumes[target].ravel(), minlength=256)
    tables = {t: np.round(sums[t] / np.maximum(counts[t], 1)).astype(np.uint8) for t in targets}
    per_subject = {}
    masks = evaluation_lesion_masks(cohort, split, subjects)
    for subject, slices in evaluation_slices(cohort, split, subjects, [source, *targets]).items():
        # the table's unrounded means (its uint8 copy is the image scored as a prediction)
        means = {t: (sums[t] / np.maximum(counts[t], 1))[slices[source]] / 255.0 for t in targets}
        predicted = {t: tables[t][slices[source]] for t in targets}
        per_subject[subject] = {t: {"psnr": psnr(slices[t], predicted[t]), "ssim": ssim(slices[t], predicted[t]),
                                    "sampler_ssim": sampler_ssim(slices[t], means[t])} for t in targets}
        if masks.get(subject) is not None and masks[subject].any():
            for t in targets:
                per_subject[subject][t]["lesion_psnr"] = lesion_psnr(slices[t], predicted[t], masks[subject])
    per_target = {t: {m: float(np.mean([per_subject[s][t][m] for s in subjects]))
                      for m in ("psnr", "ssim", "sampler_ssim")} for t in targets}
    return {"per_subject": per_subject, "per_target": per_target}


def _load(cls, directory):
    pipe = cls.from_pretrained(str(directory))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- comparisons


def _correct(result) -> list[float]:
    return [float(r["correct"]) for r in result.per_subject]


def _check_same_subjects(*results) -> list[str]:
    order = [r["subject_id"] for r in results[0].per_subject]
    for result in results[1:]:
        if [r["subject_id"] for r in result.per_subject] != order:
            raise RuntimeError("the compared evaluations scored different subjects; paired differences need the same")
    return order


def comparisons(results: dict) -> dict:
    """Every "ours vs baseline" of the report as a paired interval, plus the claims' verdicts."""
    unified, stage2 = results["unified"], results["unified_stage2"]
    t1n, everything = results["diagnosis_t1n"], results["diagnosis_all"]
    _check_same_subjects(unified, stage2, t1n, everything)
    targets = results["targets"]
    out: dict = {"imputation": {}, "dhs_vs_stage2": {}, "diagnosis": {}}
    lookup = results.get("lookup_table")
    out["vs_lookup_table"] = {}
    for target in targets:
        out["imputation"][target] = unified.comparisons["imputed_vs_copy_input"][target]
        if lookup is not None:
            out["vs_lookup_table"][target] = {
                metric: paired_difference(image_series(unified.per_subject, "imputed", target, metric),
                                          [lookup["per_subject"][s][target][metric]
                                           for s in [r["subject_id"] for r in unified.per_subject]]).to_dict()
                for metric in ("psnr", "ssim")}
        out["dhs_vs_stage2"][target] = {
            metric: paired_difference(image_series(unified.per_subject, "imputed", target, metric),
                                      image_series(stage2.per_subject, "imputed", target, metric)).to_dict()
            for metric in ("psnr", "ssim")}
    out["lesion_vs_copy"] = _lesion_comparisons(results)
    truths = [r["ground_truth"] for r in unified.per_subject]
    constant = unified.baselines["best_constant"]
    constant_correct = [float(t == constant["class"]) for t in truths]
    rows = {T1N_ROW: t1n, IMPUTED_ROW: unified,
            "after unified imputation (stage 2)": stage2,
            f"{ALL_REAL_ROW_PREFIX} ({', '.join(results['all_sequences'])}), upper bound": everything}
    for name, result in rows.items():
        out["diagnosis"][name] = {
            "accuracy": result.metrics["accuracy"], "interval": result.metrics["accuracy_interval"],
            "vs_best_constant": paired_difference(_correct(result), constant_correct).to_dict(),
            "vs_t1n_alone": None if result is t1n else paired_difference(_correct(result), _correct(t1n)).to_dict(),
            "findings_on_normal": result.metrics.get("findings_on_normal"),
            "reference_rule_accuracy": result.metrics["reference_rule_accuracy"]}
    last = targets[-1]
    imputation_claim = "imputation beats copy-input on every target (PSNR and SSIM intervals above 0)"
    imputed_claim = "diagnosis after imputation above the best constant answer (interval above 0)"
    t1n_claim = "diagnosis from T1n alone above the best constant answer (interval above 0)"
    verdicts = {
        imputation_claim: all(out["imputation"][t][m]["low"] > 0 for t in targets for m in ("psnr", "ssim")),
        "diagnosis after imputation >= diagnosis from T1n alone (mean difference >= 0)":
            out["diagnosis"][IMPUTED_ROW]["vs_t1n_alone"]["mean"] >= 0,
        imputed_claim: out["diagnosis"][IMPUTED_ROW]["vs_best_constant"]["low"] > 0,
        t1n_claim: out["diagnosis"][T1N_ROW]["vs_best_constant"]["low"] > 0,
        f"DHS >= stage 2 on the last target ({last}, PSNR mean difference >= 0)":
            out["dhs_vs_stage2"][last]["psnr"]["mean"] >= 0,
    }
    out["verdicts"] = verdicts
    # Beside each claim, what a supervised estimate on the same subjects says the data allow at all.
    allowed = {claim: "" for claim in verdicts}
    sampler = {t: expected_sampler_delta(results, t) for t in targets}
    if all(value is not None for value in sampler.values()):
        allowed[imputation_claim] = "a perfect one-sample imputation is expected at Δ PSNR " + ", ".join(
            f"{t} {value:+.2f} dB" for t, value in sampler.items())
        sampler_ssim = {t: expected_sampler_delta(results, t, "ssim") for t in targets}
        if all(value is not None for value in sampler_ssim.values()):
            allowed[imputation_claim] += "; Δ SSIM " + ", ".join(f"{t} {value:+.3f}" for t, value in sampler_ssim.items())
        latent = results.get("latent_predictability") or {}
        if all(t in latent for t in targets):
            # the model denoises VAE latents: its own mean is a decoded latent, which this regression estimates
            allowed[imputation_claim] += "; the conditional mean regressed in the VAE's latent space (the model's " \
                "own): Δ SSIM " + ", ".join(f"{t} {latent[t]['summary']['delta_ssim_vs_copy_interval']['mean']:+.3f}"
                                            for t in targets)
    if results.get("diagnosability"):
        interval = results["diagnosability"]["t1n"]["summary"]["vs_best_constant"]
        # an imputation is computed from T1n: a diagnosis after it cannot know more about the class than T1n
        allowed[imputed_claim] = allowed[t1n_claim] = (f"a classifier fitted on T1n: Δ vs best constant "
                                                       f"{interval_text(interval, 3)}")
    out["data_allow"] = allowed
    out["best_constant"] = constant
    return out


def expected_sampler_delta(results: dict, target: str, metric: str = "psnr") -> float | None:
    """What a perfect one-sample imputation is expected to score, minus the copy's, from the better estimate of
    the conditional mean (CNN or intensity lookup). ``psnr``: the estimate's PSNR less 10·log10(2) (exact for a
    perfect sampler); ``ssim``: the plug-in estimate of :func:`~.evaluation.metrics.sampler_ssim` (good to a few
    hundredths). None without the predictability measurement (or a results file that predates the SSIM one)."""
    from .evaluation.predictability import SAMPLING_PENALTY_DB

    if metric not in ("psnr", "ssim"):
        raise ValueError(f"metric must be 'psnr' or 'ssim'; got {metric!r}")
    fitted = (results.get("predictability") or {}).get(target)
    if fitted is None:
        return None
    key = {"psnr": "psnr", "ssim": "sampler_ssim_estimate"}[metric]
    estimates = [fitted["summary"].get(key)]
    lookup = (results.get("lookup_table") or {}).get("per_target", {})
    if target in lookup:
        estimates.append(lookup[target].get({"psnr": "psnr", "ssim": "sampler_ssim"}[metric]))
    estimates = [value for value in estimates if value is not None]
    if not estimates:
        return None
    copy = results["unified"].baselines["copy_input"]["per_target"][target][metric]
    return max(estimates) - (SAMPLING_PENALTY_DB if metric == "psnr" else 0.0) - copy


def _lesion_comparisons(results: dict) -> dict:
    """``{target: {estimate: Interval-dict}}``: lesion-region PSNR minus the copy's, for ours and the two estimates
    of the conditional mean (subjects with a lesion on the scored slice)."""
    unified = results["unified"]
    out = {}
    for target in results["targets"]:
        found = {"ours": unified.comparisons.get("lesion_psnr_vs_copy_input", {}).get(target)}
        fitted = (results.get("predictability") or {}).get(target)
        if fitted is not None:
            found["conditional-mean CNN"] = fitted["summary"].get("lesion_delta_psnr_vs_copy_interval")
        lookup = results.get("lookup_table")
        if lookup is not None:
            # the lookup's scores beside the copy's, in the per-subject layout lesion_comparisons pairs
            records = [{"lookup": lookup["per_subject"][r["subject_id"]], "copy_input": r["copy_input"]}
                       for r in unified.per_subject if target in lookup["per_subject"].get(r["subject_id"], {})]
            found["intensity lookup"] = lesion_comparisons(records, [target], ours="lookup").get(target)
        out[target] = found
    return out


# --------------------------------------------------------------------------- tables


def _fmt(value, digits=3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def imputation_table(results: dict, compared: dict) -> str:
    from .evaluation.report import markdown_table

    unified = results["unified"]
    ceiling = unified.baselines.get("vae_ceiling", {}).get("per_target", {})
    copy = unified.baselines["copy_input"]["per_target"]
    lesion = unified.comparisons.get("lesion_psnr_vs_copy_input", {})
    rows = []
    for position, target in enumerate(results["targets"], start=1):
        ours = unified.metrics["images"]["per_target"][target]
        rows.append({"target (order)": f"{target} ({position})",
                     "ours PSNR / SSIM": f"{ours['psnr']:.2f} / {ours['ssim']:.3f}",
                     "copy T1n PSNR / SSIM": f"{copy[target]['psnr']:.2f} / {copy[target]['ssim']:.3f}",
                     "Δ PSNR dB [95% CI]": interval_text(compared["imputation"][target]["psnr"]),
                     "Δ SSIM [95% CI]": interval_text(compared["imputation"][target]["ssim"], 3),
                     "VAE ceiling PSNR / SSIM": f"{ceiling[target]['psnr']:.2f} / {ceiling[target]['ssim']:.3f}"
                     if target in ceiling else "",
                     "lesion-region Δ PSNR [95% CI]": interval_text(lesion.get(target))})
        lookup = results.get("lookup_table")
        if lookup is not None:
            versus = compared["vs_lookup_table"][target]
            rows[-1]["intensity lookup PSNR / SSIM"] = (f"{lookup['per_target'][target]['psnr']:.2f} / "
                                                        f"{lookup['per_target'][target]['ssim']:.3f}")
            rows[-1]["ours − lookup Δ PSNR / Δ SSIM"] = (f"{interval_text(versus['psnr'])}; "
                                                        f"{interval_text(versus['ssim'], 3)}")
    return markdown_table(rows, list(rows[0]))


def specificity_table(results: dict) -> str:
    from .evaluation.report import markdown_table

    found = results["specificity"]
    rows = []
    for target in results["targets"]:
        row = found[target]
        rows.append({"target": target,
                     "PSNR to own truth": f"{row['own_truth_psnr']:.2f}",
                     "mean PSNR to other subjects' truths": f"{row['other_truths_psnr']:.2f}",
                     "Δ own − other [95% CI]": interval_text(row["own_vs_other_truths"]),
                     "PSNR between two subjects' imputations": f"{row['imputations_similarity']:.2f}",
                     "PSNR between two subjects' truths": f"{row['truths_similarity']:.2f}"})
    return markdown_table(rows, list(rows[0]))


def dhs_table(results: dict, compared: dict) -> str:
    from .evaluation.report import markdown_table

    rows = []
    for position, target in enumerate(results["targets"], start=1):
        two = results["unified_stage2"].metrics["images"]["per_target"][target]
        three = results["unified"].metrics["images"]["per_target"][target]
        rows.append({"target (order)": f"{target} ({position})",
                     "stage 2 PSNR / SSIM": f"{two['psnr']:.2f} / {two['ssim']:.3f}",
                     "stage 3 (DHS) PSNR / SSIM": f"{three['psnr']:.2f} / {three['ssim']:.3f}",
                     "Δ PSNR dB [95% CI]": interval_text(compared["dhs_vs_stage2"][target]["psnr"]),
                     "Δ SSIM [95% CI]": interval_text(compared["dhs_vs_stage2"][target]["ssim"], 3)})
    return markdown_table(rows, list(rows[0]))


def predictability_table(results: dict, compared: dict) -> str:
    """Per target: how far above copying the input the best estimates of the conditional mean are, and a sampler."""
    from .evaluation.report import markdown_table

    copy = results["unified"].baselines["copy_input"]["per_target"]
    lookup = results.get("lookup_table") or {"per_target": {}}
    rows = []
    for target in results["targets"]:
        fitted = results["predictability"][target]["summary"]
        row = {"target": target, "copy T1n PSNR": f"{copy[target]['psnr']:.2f}",
               "conditional-mean CNN PSNR / SSIM": f"{fitted['psnr']:.2f} / {fitted['ssim']:.3f}",
               "CNN Δ PSNR vs copy [95% CI]": interval_text(fitted["delta_psnr_vs_copy_interval"])}
        if target in lookup["per_target"]:
            lookup_delta = lookup["per_target"][target]["psnr"] - copy[target]["psnr"]
            row["intensity lookup Δ PSNR vs copy"] = f"{lookup_delta:+.2f}"
        latent = (results.get("latent_predictability") or {}).get(target)
        if latent is not None:
            # the same regression through the VAE, in the space the model denoises: what the model's mean could reach
            row["regression in the VAE's latent space: Δ PSNR / Δ SSIM vs copy"] = (
                f"{interval_text(latent['summary']['delta_psnr_vs_copy_interval'])} / "
                f"{interval_text(latent['summary']['delta_ssim_vs_copy_interval'], 3)}")
        row["a perfect sampler, expected Δ PSNR vs copy"] = f"{expected_sampler_delta(results, target):+.2f}"
        row["ours (one sample) Δ PSNR vs copy"] = interval_text(compared["imputation"][target]["psnr"])
        sampler_ssim = expected_sampler_delta(results, target, "ssim")
        if sampler_ssim is not None:
            row["a perfect sampler, expected Δ SSIM vs copy"] = f"{sampler_ssim:+.3f}"
            row["ours (one sample) Δ SSIM vs copy"] = interval_text(compared["imputation"][target]["ssim"], 3)
        lesion = compared.get("lesion_vs_copy", {}).get(target, {})
        row["lesion region Δ PSNR vs copy: CNN / lookup / ours"] = " / ".join(
            interval_text(lesion.get(name)) for name in ("conditional-mean CNN", "intensity lookup", "ours"))
        rows.append(row)
    return markdown_table(rows, list(rows[0]))


def diagnosability_table(results: dict, compared: dict) -> str:
    """Per set of images: a supervised classifier's accuracy against the best constant answer, beside the model's."""
    from .evaluation.report import markdown_table

    found = results["diagnosability"]
    names = {"t1n": "T1n alone",
             "imputed": f"T1n + the stage-3 imputations of {', '.join(results['targets'])} (the classifier fitted "
                        "on the real ones)",
             "t1n+targets": f"T1n + the real {', '.join(results['targets'])}",
             "all": f"all real sequences ({', '.join(found['all']['settings']['sources'])})"}
    # the model's diagnosis row that reads the same images as each classifier row (None: no such row)
    model_rows = {"t1n": T1N_ROW, "imputed": IMPUTED_ROW, "t1n+targets": None,
                  "all": next((k for k in compared["diagnosis"] if k.startswith(ALL_REAL_ROW_PREFIX)), None)}
    rows = []
    for key in ("t1n", "imputed", "t1n+targets", "all"):
        summary = found["t1n+targets" if key == "imputed" else key]["summary"]
        prefix = "replaced_" if key == "imputed" else ""
        if f"{prefix}accuracy" not in summary:
            continue
        interval = summary[f"{prefix}accuracy_interval"]
        model = compared["diagnosis"].get(model_rows[key]) if model_rows[key] else None
        rows.append({"images": names[key],
                     "classifier accuracy [95% CI]": f"{summary[f'{prefix}accuracy']:.3f} "
                                                     f"[{interval['low']:.3f}, {interval['high']:.3f}]",
                     "Δ vs best constant [95% CI]": interval_text(summary[f"{prefix}vs_best_constant"], 3),
                     "the model's diagnosis from the same images": "" if model is None else f"{model['accuracy']:.3f}"})
    return markdown_table(rows, list(rows[0]))


def copy_attention_table(results: dict) -> str:
    """Per model and target: the sharpest copy head and how its reading of the input image is spread."""
    from .evaluation.report import markdown_table

    rows = []
    for model, per_target in results["copy_attention"].items():
        for target, measured in per_target.items():
            best = measured["sharpest"]
            rows.append({"model": model, "target": target, "head (layer.head)": f"{best['layer']}.{best['head']}",
                         "attention on the input image": best["on_input"],
                         "on the same position": best["same_position"],
                         "on its 8 neighbours": best["neighbours"],
                         "exact share of the input read (uniform)": f"{best['exact_share']:.2f} "
                                                                    f"({best['uniform_share']:.3f})"})
    return markdown_table(rows, ["model", "target", "head (layer.head)", "attention on the input image",
                                 "on the same position", "on its 8 neighbours",
                                 "exact share of the input read (uniform)"], float_format="{:.2f}")


def diagnosis_table(compared: dict) -> str:
    from .evaluation.report import markdown_table

    rows = []
    for name, row in compared["diagnosis"].items():
        interval = row["interval"]
        normal = row["findings_on_normal"]
        rows.append({"diagnosis": name, "accuracy [95% CI]":
                     f"{row['accuracy']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]",
                     "Δ vs best constant [95% CI]": interval_text(row["vs_best_constant"], 3),
                     "Δ vs T1n alone [95% CI]": interval_text(row["vs_t1n_alone"], 3),
                     "findings on normal subjects": "" if normal is None else
                     f"{normal['mean']:.2f} [{normal['low']:.2f}, {normal['high']:.2f}] (n={normal['n']})",
                     "reference substring rule": _fmt(row["reference_rule_accuracy"])})
    constant = compared["best_constant"]
    rows.append({"diagnosis": f"best constant answer ({constant['class']!r})",
                 "accuracy [95% CI]": f"{constant['accuracy']:.3f}"})
    return markdown_table(rows, ["diagnosis", "accuracy [95% CI]", "Δ vs best constant [95% CI]",
                                 "Δ vs T1n alone [95% CI]", "findings on normal subjects",
                                 "reference substring rule"])


# --------------------------------------------------------------------------- figures


def loss_trend(records: list[dict], key: str = "loss") -> dict | None:
    """Mean of the first and last 10 % of a loss series and the relative change (a flat curve is ~0)."""
    values = [r[key] for r in records if r.get(key) is not None]
    if len(values) < 10:
        return None
    tenth = max(1, len(values) // 10)
    first, last = float(np.mean(values[:tenth])), float(np.mean(values[-tenth:]))
    return {"first_10pct": first, "last_10pct": last, "relative_change": (last - first) / first if first else 0.0,
            "steps": len(values)}


def plot_loss_curves(path: Path, curves: dict[str, list[dict]]) -> Path:
    """One panel per stage: the per-step loss (faint), its moving average, and the CE / MSE parts when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.8), squeeze=False)
    for axis, (name, records) in zip(axes[0], curves.items()):
        steps = np.array([r["step"] for r in records])
        for key, colour, label in (("loss", "tab:blue", "total"), ("mse", "tab:orange", "flow MSE"),
                                   ("ce", "tab:green", "text CE")):
            values = np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)
            if np.all(np.isnan(values)) or (key != "loss" and np.allclose(
                    np.nan_to_num(values), np.nan_to_num([r.get("loss") or 0 for r in records]))):
                continue
            if key == "loss":
                axis.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            axis.plot(steps, _moving_average(values, max(1, len(values) // 25)), color=colour, linewidth=1.6,
                      label=f"{label} (moving average)")
        trend = loss_trend(records)
        title = name if trend is None else f"{name}\nfirst 10 %: {trend['first_10pct']:.3f} → last 10 %: " \
                                           f"{trend['last_10pct']:.3f} ({100 * trend['relative_change']:+.0f} %)"
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("optimiser step")
        # Log scale: stage 2 falls by an order of magnitude early, then keeps falling slowly; on a linear
        # axis that late fall (what longer training would still buy) is invisible.
        axis.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.4, not 4 × 10⁻¹
        axis.yaxis.set_major_formatter(plain)
        low, high = axis.get_ylim()
        # Minor ticks are labelled only where the axis spans about a decade or less (else they overlap).
        axis.yaxis.set_minor_formatter(plain if high <= 15 * low else NullFormatter())
        axis.set_ylabel("training loss (log scale)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Training losses per stage (per-step values faint, moving averages solid)", fontsize=11)
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return path


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    out = np.full_like(values, np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        chunk = chunk[~np.isnan(chunk)]
        if chunk.size:
            out[i] = chunk.mean()
    return out


def _save_figure(figure, path: Path) -> None:
    from .utils.atomic import atomic_file

    with atomic_file(path, ".png") as temporary:
        figure.savefig(temporary, format="png", dpi=110)


def plot_examples(path: Path, results: dict, cohort: Path, per_class: int = 1) -> Path | None:
    """Rows of held-out subjects (one per class): T1n | imputed and true targets with the lesion outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from .data.radgenome import iter_subject_records
    from .evaluation.cohort import evaluation_slice_index, scaled_volumes

    unified = results["unified"]
    images_dir = unified.out_dir / "images" if unified.out_dir else None
    if images_dir is None or not images_dir.is_dir():
        return None
    chosen, seen = [], {}
    for record in unified.per_subject:
        if seen.get(record["ground_truth"], 0) < per_class:
            seen[record["ground_truth"]] = seen.get(record["ground_truth"], 0) + 1
            chosen.append(record)
    by_id = {r["subject_id"]: r for r in chosen}
    targets = results["targets"]
    figure, axes = plt.subplots(len(chosen), 1 + 2 * len(targets), figsize=(2.1 * (1 + 2 * len(targets)),
                                                                            2.5 * len(chosen)), squeeze=False)
    rows = {}
    for subject in iter_subject_records(cohort, split=results["split"]):
        if subject.subject_id in by_id:
            rows[subject.subject_id] = subject
    for row, record in enumerate(chosen):
        subject = rows[record["subject_id"]]
        index = evaluation_slice_index(subject)
        volumes = scaled_volumes(subject, ["t1n", *targets])
        mask = None if subject.mask is None else np.asarray(subject.mask[index]) > 0
        panels = [("T1n (input)", volumes["t1n"][index])]
        for target in targets:
            with Image.open(images_dir / f"{record['subject_id']}-{target}.png") as image:
                imputed = np.asarray(image.convert("L"))
            scores = record["imputed"][target]
            panels.append((f"imputed {target}\n{scores['psnr']:.1f} dB / SSIM {scores['ssim']:.2f}", imputed))
            panels.append((f"true {target}", volumes[target][index]))
        for column, (label, image) in enumerate(panels):
            axis = axes[row][column]
            axis.imshow(image, cmap="gray", vmin=0, vmax=255)
            if mask is not None and mask.any() and column > 0:
                axis.contour(mask, levels=[0.5], colors="red", linewidths=0.6)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(label, fontsize=8)
        axes[row][0].set_ylabel(f"{record['subject_id']}\npredicted {record['parsed_label']}\n"
                                f"true {record['ground_truth']}", fontsize=8)
    figure.suptitle("Held-out subjects: unified imputation from T1n (stage 3); red = ground-truth lesion outline",
                    fontsize=10)
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------- the report


def write_demo_report(report: Path, results: dict, plan, losses: dict, init: Path, clock, args: dict) -> dict:
    """``summary.md``, ``demo.json`` and the figures; returns the JSON summary."""
    from .evaluation.report import markdown_table, write_metrics_json, write_summary_markdown
    from .evaluation.results import confusion_table
    from .train.bootstrap import VAE_FIT_FILE

    compared = comparisons(results)
    plot_loss_curves(report / "loss_curves.png", losses)
    plot_examples(report / "imputation_examples.png", results, Path(results["unified"].settings["cohort_dir"]))
    vae_fit = json.loads((init / VAE_FIT_FILE).read_text()) if (init / VAE_FIT_FILE).exists() else {}
    trends = {name: {"total": loss_trend(records), "mse": loss_trend(records, "mse"), "ce": loss_trend(records, "ce")}
              for name, records in losses.items()}
    n = len(results["subjects"])
    unified = results["unified"]
    verdict_rows = [{"claim": claim, "reached": "yes" if ok else "no",
                     "what the data allow (a supervised estimate on the same subjects)": compared["data_allow"][claim]}
                    for claim, ok in compared["verdicts"].items()]
    phase_rows = [{"phase": name, **times} for name, times in clock.phases.items()]
    phase_rows.append({"phase": "total", **clock.totals()})
    trend_rows = []
    for name, parts in trends.items():
        for part, trend in parts.items():
            if trend is not None:
                trend_rows.append({"stage": name, "series": part, "first 10 %": trend["first_10pct"],
                                   "last 10 %": trend["last_10pct"],
                                   "change": f"{100 * trend['relative_change']:+.1f} %"})
    named = unified.metrics.get("impression_findings_on_normal")
    text_rows = [{"method": "UniBrain impression (stage 3)", "ROUGE-L": unified.metrics["rougeL"],
                  "Δ vs constant [95% CI]": interval_text(unified.comparisons.get("rougeL_vs_constant_impression"),
                                                          3),
                  "normal subjects whose impression names a lesion": "" if named is None else
                  f"{named['mean']:.2f} [{named['low']:.2f}, {named['high']:.2f}] (n={named['n']})"},
                 {"method": "constant training impression",
                  "ROUGE-L": unified.baselines["constant_impression"]["rougeL"]}]
    ceiling = vae_fit.get("val_reconstruction")
    tables = [
        ("Claims", markdown_table(verdict_rows, list(verdict_rows[0]))),
        (f"Imputation: unified task, T1n → {' → '.join(results['targets'])} (stage 3 model, {n} {results['split']} "
         "subjects)", imputation_table(results, compared)),
        ("Stage 3 (DHS self-forcing) vs stage 2, unified imputation of every target in order",
         dhs_table(results, compared)),
        (f"Diagnosis on the same {n} subjects", diagnosis_table(compared)),
        ("Confusion: T1n alone (rows: truth, columns: final diagnosis line)",
         confusion_table(results["diagnosis_t1n"].metrics["confusion"])),
        ("Confusion: after unified imputation (stage 3)", confusion_table(unified.metrics["confusion"])),
        ("Confusion: all real sequences", confusion_table(results["diagnosis_all"].metrics["confusion"])),
        ("Impression text", markdown_table(text_rows, ["method", "ROUGE-L", "Δ vs constant [95% CI]",
                                                       "normal subjects whose impression names a lesion"],
                                           float_format="{:.3f}")),
        ("Training losses (first vs last 10 % of steps)", markdown_table(trend_rows, ["stage", "series", "first 10 %",
                                                                                       "last 10 %", "change"])),
        ("Time per phase (CPU = user + system seconds; on an idle 2-core machine wall ≈ CPU / 2 for the "
         "two-threaded phases)", markdown_table(phase_rows, ["phase", "wall_s", "cpu_s"], float_format="{:.1f}")),
    ]
    if results.get("predictability"):
        settings = next(iter(results["predictability"].values()))["settings"]
        tables.insert(2, ("How predictable is each target from T1n at all? A conditional-mean estimate fitted on the "
                          f"training split ({settings['training_slices']} slices, {settings['steps']} steps) and the "
                          "expected score of a perfect one-sample imputation", predictability_table(results, compared)))
    if results.get("copy_attention"):
        measured = next(iter(next(iter(results["copy_attention"].values())).values()))
        tables.insert(3, (f"Where the imputed image looks: attention from the target's noisy tokens to the input "
                          f"T1n's tokens, the sharpest head of each model (first {measured['subjects']} subjects, "
                          f"noise levels {', '.join(f'{t:g}' for t in measured['noise_levels'])}; "
                          f"{measured['tokens']} tokens per image)", copy_attention_table(results)))
    if results.get("diagnosability"):
        settings = results["diagnosability"]["t1n+targets"]["settings"]
        position = next(i for i, (title, _) in enumerate(tables) if title.startswith("Diagnosis on")) + 1
        tables.insert(position, ("How diagnosable are these subjects from the images at all? A classifier fitted "
                                 f"on the training split's slices ({settings['training_slices']} slices with T1n and "
                                 f"{', '.join(results['targets'])}, {settings['steps']} steps) and scored on the same "
                                 "slices as the model", diagnosability_table(results, compared)))
    if results.get("specificity"):
        tables.insert(3, (f"Does the imputation follow its input? Generation from T1n with the same flow noise for "
                          f"all {results['specificity']['subjects']} subjects (stage 3 model)",
                          specificity_table(results)))
    sample = next((r for r in unified.per_subject if r["ground_truth"] == NORMAL_CLASS), unified.per_subject[0])
    notes = [
        "What this is: a small UniBrain model (a few million parameters) trained for minutes on CPU on a synthetic "
        "phantom cohort, through the three UniBrain stages (self-alignment, unified, self-forcing). It demonstrates "
        "the whole system end to end; it says nothing about the 14B model on real data.",
        f"Subjects: every {results['split']} subject with T1n and {', '.join(results['targets'])} ({n}); every "
        "comparison is paired on these subjects. Δ = mean over subjects of (row − baseline); [95% CI] = percentile "
        "bootstrap over subjects (10,000 resamples); ✓ = interval above zero, ✗ = below zero.",
        "Diagnosis is scored by the class on the answer's final diagnosis line; 'reference substring rule' is the "
        "reference's looser rule (class word anywhere in the text). Best constant answer = the single class that "
        "would score best on these subjects (an oracle baseline).",
        "VAE ceiling: the pipeline's VAE encoding and decoding the true target slice; imputations are decoded by "
        "the same VAE." + ("" if not ceiling else
                           f" On the validation split's evaluation slices (all sequences) the fitted VAE reaches "
                           f"{ceiling['psnr']:.2f} dB / SSIM {ceiling['ssim']:.3f}."),
        "Intensity lookup: each T1n intensity mapped to the mean target intensity at that T1n intensity over the "
        "training split's voxels (no learning of anatomy: it keeps the input's anatomy exactly and only remaps "
        "contrast). Input-following check: an imputation that carries the subject's anatomy matches its own "
        "truth better than other subjects' truths (Δ own − other > 0); imputations of different subjects that "
        "are much more alike than their truths mean the image is set by the noise, not by the input.",
        "Impression findings on normal subjects: the impression names a lesion class (word start, anywhere; "
        "negation not understood); 'findings on normal subjects' in the diagnosis table reads the final "
        "diagnosis line only.",
        "Predictability: the CNN (pixel space, squared error, fitted on the training split's T1n → target slice "
        "pairs) and the intensity lookup each estimate the conditional mean E[target | T1n], the image of least "
        "expected squared error. A sample drawn from the exact posterior p(target | T1n) has twice the conditional "
        "mean's expected squared error, 3.01 dB less PSNR; 'a perfect sampler' is the better estimate minus 3.01 dB "
        "(where the estimate is not the exact mean, a perfect sampler does somewhat better). Averaging K samples "
        "(the reference's sample_time) recovers 10·log10(2K/(K+1)) dB of the 3.01. SSIM has no exact penalty: its "
        "'perfect sampler' is the better of the two plug-in estimates (the mean plus an independent residual with "
        "the observed residual's local size, each SSIM window at the expected moments; within a few hundredths "
        "of a Monte Carlo value in simulations). 'Regression in the VAE's latent space': a small CNN fitted with "
        "squared error from T1n's VAE latents to the target's (the space the model denoises), decoded by the VAE "
        "and scored as an imputation: an estimate of the best mean the model itself can form through this VAE.",
        "Where the imputed image looks: to carry the input's anatomy, a head must read, for each target token, the "
        "input token at the same grid position (one token covers a patch of the slice). Mass on the 8 neighbours "
        "blurs the anatomy by a token's width; a read spread over the whole image carries only contrast and outline.",
        "Lesion-region Δ PSNR: PSNR over the ground-truth lesion's pixels only, imputed minus copy-input, on the "
        "subjects with a lesion on the scored slice. In the predictability table the same for the two estimates "
        "of the conditional mean: where they too are below the copy, the lesion is not predictable from T1n.",
        "Diagnosability: a small CNN classifier (cross-entropy, every lesion slice of each training subject, "
        "left-right flips) fitted on the training split and scored on the same slices as the model. An "
        "imputation is a function of T1n and noise, so no diagnosis after imputing from T1n can know more about "
        "the class than T1n carries: the T1n row bounds what imputation can add on these subjects. The "
        "imputation row feeds the stage-3 imputations to the classifier fitted on the real sequences: whether "
        "they carry the class information of the real ones.",
        f"Recipe: {plan}.",
        "Figures: loss_curves.png; imputation_examples.png; per-subject panels in unified_dhs/panels/ (subject id, "
        "PSNR/SSIM, predicted vs true diagnosis).",
        f"Sample ({sample['subject_id']}, true {sample['ground_truth']}): impression {sample['impression']!r}; "
        f"diagnosis {sample['diagnosis']!r}; reference impression {sample['reference_impression']!r}.",
    ]
    write_summary_markdown(report / "summary.md", "UniBrain demo on a synthetic phantom cohort", tables, notes)
    summary = {"headline": {"split": results["split"], "subjects": n, "verdicts": compared["verdicts"],
                            "imputation": compared["imputation"], "dhs_vs_stage2": compared["dhs_vs_stage2"],
                            "diagnosis": {k: {"accuracy": v["accuracy"], "vs_t1n_alone": v["vs_t1n_alone"],
                                              "vs_best_constant": v["vs_best_constant"]}
                                          for k, v in compared["diagnosis"].items()}},
               "comparisons": compared, "phases": clock.phases, "totals": clock.totals(), "plan": plan.__dict__,
               "arguments": args, "loss_trends": trends, "vae_fit": {k: v for k, v in vae_fit.items() if k != "losses"},
               "metrics": {name: {"metrics": results[name].metrics, "baselines": results[name].baselines}
                           for name in ("unified", "unified_stage2", "diagnosis_t1n", "diagnosis_all")},
               "specificity": results.get("specificity"),
               "predictability": {target: {"summary": found["summary"], "settings": found["settings"]}
                                  for target, found in (results.get("predictability") or {}).items()},
               "latent_predictability": {target: {"summary": found["summary"], "settings": found["settings"]}
                                         for target, found in (results.get("latent_predictability") or {}).items()},
               "copy_attention": {model: {target: measured["sharpest"] for target, measured in per_target.items()}
                                  for model, per_target in results.get("copy_attention", {}).items()},
               "diagnosability": {name: {"summary": found["summary"], "settings": found["settings"],
                                         "per_subject": found["per_subject"]}
                                  for name, found in (results.get("diagnosability") or {}).items()}}
    write_metrics_json(report / "demo.json", summary)
    return summary
