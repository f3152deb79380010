"""What an evaluation task measured: result objects, their aggregates, intervals and Markdown tables.

A result holds one record per scored subject (``per_subject``) and everything derived from it:
``metrics`` (the model), ``baselines`` (context) and, for every "ours vs baseline" pair, the
mean per-subject difference with a bootstrap 95 % interval (``comparisons``, see
:mod:`.statistics`). ``write(out_dir)`` writes ``metrics.json`` and ``summary.md``.

Per-subject records, by task:

* image tasks: ``imputed`` / ``copy_input`` / ``vae_ceiling`` → ``{target: {"psnr", "ssim"}}``;
* text tasks: ``ground_truth``, ``parsed_label`` (the class read from the final diagnosis line),
  ``correct`` (parsed label = truth) and ``reference_correct`` (the reference's substring rule).

    python -c "from unibrain_hf.evaluation.results import EvaluationResult; help(EvaluationResult)"
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..protocol.diagnosis import find_class_word
from ..utils.atomic import atomic_file
from .report import markdown_table, write_metrics_json, write_summary_markdown
from .statistics import Interval, best_constant_answer, bootstrap_mean, confusion_matrix, paired_difference

#: PSNR of identical images is infinite; for averaging and intervals it is capped here (dB).
PSNR_CAP = 100.0
#: The class a "no finding" answer must name; any other class on such a subject is a hallucinated finding.
NORMAL_CLASS = "Normal"


def mean(values) -> float:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else float("nan")


def cap_psnr(value: float) -> float:
    """A PSNR value capped at :data:`PSNR_CAP`, as every averaged or compared PSNR is."""
    return min(float(value), PSNR_CAP)


def image_series(per_subject: list[dict], key: str, target: str, metric: str) -> list[float]:
    """One value per subject of ``record[key][target][metric]`` (PSNR capped at :data:`PSNR_CAP`)."""
    values = [float(record[key][target][metric]) for record in per_subject]
    return [cap_psnr(v) for v in values] if metric == "psnr" else values


def image_means(per_subject: list[dict], targets: list[str], key: str) -> dict:
    """Means over subjects of ``record[key][target]`` PSNR/SSIM, per target and over targets."""
    per_target = {target: {"psnr": mean(image_series(per_subject, key, target, "psnr")),
                           "ssim": mean(image_series(per_subject, key, target, "ssim"))} for target in targets}
    # Each subject counts once: its mean over targets, then the mean over subjects (= reference for one target).
    overall_psnr = mean(mean(cap_psnr(r[key][t]["psnr"]) for t in targets) for r in per_subject)
    overall_ssim = mean(mean(r[key][t]["ssim"] for t in targets) for r in per_subject)
    return {"psnr": overall_psnr, "ssim": overall_ssim, "num_subjects": len(per_subject), "per_target": per_target}


def image_comparisons(per_subject: list[dict], targets: list[str], ours: str = "imputed",
                      baseline: str = "copy_input") -> dict:
    """``{target: {"psnr": Interval-dict, "ssim": Interval-dict}}`` of the paired differences ours − baseline."""
    return {target: {metric: paired_difference(image_series(per_subject, ours, target, metric),
                                               image_series(per_subject, baseline, target, metric)).to_dict()
                     for metric in ("psnr", "ssim")} for target in targets}


def lesion_comparisons(per_subject: list[dict], targets: list[str], ours: str = "imputed",
                       baseline: str = "copy_input") -> dict:
    """``{target: Interval-dict}`` of ours − baseline lesion-region PSNR over the subjects that have a lesion."""
    comparisons = {}
    for target in targets:
        pairs = [(cap_psnr(r[ours][target]["lesion_psnr"]), cap_psnr(r[baseline][target]["lesion_psnr"]))
                 for r in per_subject if "lesion_psnr" in r[ours][target] and "lesion_psnr" in r[baseline][target]]
        if pairs:
            comparisons[target] = paired_difference([a for a, _ in pairs], [b for _, b in pairs]).to_dict()
    return comparisons


def names_a_lesion(text: str | None, rules) -> bool:
    """Whether ``text`` names any class other than normal, anywhere (word start, case-insensitive).

    Applied to the impression of a normal subject, this is a hallucinated finding: "ring-enhancing
    mass ... glioblastoma" names ``Gli``. Negation is not understood ("no infarct" counts).
    """
    if not text:
        return False
    return any(find_class_word(text, word) for word in rules.class_words if word != NORMAL_CLASS)


def impression_findings_on_normal(per_subject: list[dict], rules) -> dict | None:
    """Bootstrap mean, over normal subjects, of "the impression names a lesion" (None without normals)."""
    normals = [r for r in per_subject if r["ground_truth"] == NORMAL_CLASS]
    if not normals:
        return None
    return bootstrap_mean([float(names_a_lesion(r.get("impression"), rules)) for r in normals]).to_dict()


def accuracy_summary(per_subject: list[dict], index_train_ids: list[str] | None, rules) -> tuple[dict, dict, dict]:
    """(metrics, baselines, comparisons) of a text task's per-subject diagnosis records.

    Accuracy is the fraction of subjects whose final diagnosis line names their class; the
    reference's substring rule is reported beside it. Baselines: the majority class of the train
    split and the best constant answer *on these subjects* (an oracle: no constant answer does
    better). Comparisons: ours − best constant (paired per subject), and the rate of findings on
    normal subjects (a normal subject whose answer names any other class) when there are any.
    """
    from .diagnosis import as_rules, majority_class

    rules = as_rules(rules)
    truths = [r["ground_truth"] for r in per_subject]
    correct = [float(r["correct"]) for r in per_subject]
    metrics = {"accuracy": mean(correct), "correct": int(sum(correct)), "num_subjects": len(per_subject),
               "accuracy_interval": bootstrap_mean(correct).to_dict(),
               "reference_rule_accuracy": mean(float(r["reference_correct"]) for r in per_subject),
               "confusion": confusion_matrix(truths, [r["parsed_label"] for r in per_subject],
                                             [w for w in rules.class_words if w in set(truths)],
                                             [w for w in rules.class_words
                                              if w in set(truths) | {r["parsed_label"] for r in per_subject}])}
    normals = [r for r in per_subject if r["ground_truth"] == NORMAL_CLASS]
    if normals:
        findings = [float(r["parsed_label"] not in (NORMAL_CLASS, None)) for r in normals]
        metrics["findings_on_normal"] = bootstrap_mean(findings).to_dict()
    constant, constant_accuracy = best_constant_answer(truths)
    baselines = {"best_constant": {"class": constant, "accuracy": constant_accuracy}}
    if index_train_ids:
        answer = majority_class(index_train_ids, rules)
        baselines["majority_class"] = {"class": answer, "accuracy": mean(t == answer for t in truths),
                                       "correct": int(sum(t == answer for t in truths)),
                                       "train_subjects": len(index_train_ids)}
    else:
        baselines["majority_class"] = {"class": None, "accuracy": float("nan"), "correct": None, "train_subjects": 0}
    comparisons = {"accuracy_vs_best_constant": paired_difference(
        correct, [float(t == constant) for t in truths]).to_dict()}
    return metrics, baselines, comparisons


def interval_text(interval: dict | Interval | None, digits: int = 2) -> str:
    """``+1.23 [+0.80, +1.70]`` with a ✓ when the interval excludes zero in the positive direction."""
    if interval is None:
        return ""
    if isinstance(interval, dict):
        interval = Interval(interval["mean"], interval["low"], interval["high"], interval["n"])
    mark = " ✓" if interval.low > 0 else (" ✗" if interval.high < 0 else "")
    return interval.format(digits) + mark


def confusion_table(confusion: dict) -> str:
    """Rows = true class, columns = the class read from the answer's final diagnosis line."""
    columns = ["true \\ predicted", *confusion["columns"]]
    rows = [{"true \\ predicted": truth, **dict(zip(confusion["columns"], counts))}
            for truth, counts in zip(confusion["classes"], confusion["counts"])]
    return markdown_table(rows, columns)


# --------------------------------------------------------------------------- result objects


@dataclass
class EvaluationResult:
    """What a task measured: ``metrics`` (the model), ``baselines`` (context), one record per subject.

    ``comparisons`` holds the paired ours − baseline differences with bootstrap intervals;
    ``settings`` every argument that shapes the numbers; ``skipped`` the eligible subjects that
    could not be scored and why; ``notes`` how to read the numbers.
    """

    task: str
    settings: dict
    metrics: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    per_subject: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    comparisons: dict = field(default_factory=dict)
    out_dir: Path | None = None

    def to_dict(self) -> dict:
        return {"task": self.task, "settings": self.settings, "metrics": self.metrics, "baselines": self.baselines,
                "comparisons": self.comparisons, "per_subject": self.per_subject, "skipped": self.skipped,
                "notes": self.notes}

    def summary_tables(self) -> list[tuple[str, str]]:  # pragma: no cover - each task overrides it
        return []

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Write ``metrics.json`` and ``summary.md`` into ``out_dir``."""
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


def image_table(result: EvaluationResult, metrics: dict, model_label: str) -> str:
    """Per target: ours, copy-input, the VAE ceiling, and ours − copy with its interval."""
    copy = result.baselines["copy_input"]
    ceiling = result.baselines.get("vae_ceiling")
    copy_label = f"copy input ({copy.get('modality', '?')})"
    rows = []
    for target, ours in metrics["per_target"].items():
        difference = result.comparisons.get("imputed_vs_copy_input", {}).get(target, {})
        rows.append({"target": target, "subjects": metrics["num_subjects"],
                     f"{model_label} PSNR": ours["psnr"], "copy PSNR": copy["per_target"][target]["psnr"],
                     "Δ PSNR [95% CI]": interval_text(difference.get("psnr")),
                     f"{model_label} SSIM": ours["ssim"], "copy SSIM": copy["per_target"][target]["ssim"],
                     "Δ SSIM [95% CI]": interval_text(difference.get("ssim"), 3),
                     "VAE ceiling PSNR / SSIM": "" if ceiling is None else
                     f"{ceiling['per_target'][target]['psnr']:.2f} / {ceiling['per_target'][target]['ssim']:.3f}",
                     "lesion-region Δ PSNR [95% CI]": interval_text(
                         result.comparisons.get("lesion_psnr_vs_copy_input", {}).get(target))})
    columns = ["target", "subjects", f"{model_label} PSNR", "copy PSNR", "Δ PSNR [95% CI]", f"{model_label} SSIM",
               "copy SSIM", "Δ SSIM [95% CI]", "VAE ceiling PSNR / SSIM", "lesion-region Δ PSNR [95% CI]"]
    return markdown_table(rows, columns, float_format="{:.3f}") + f"\n\n(copy = {copy_label}; Δ = ours − copy, " \
        "per-subject paired, bootstrap 95 % interval; ✓ = interval above zero)"


def per_subject_image_table(per_subject: list[dict], targets: list[str]) -> str:
    rows = []
    for record in per_subject:
        for target in targets:
            rows.append({"subject": record["subject_id"], "target": target,
                         "PSNR (dB)": record["imputed"][target]["psnr"], "SSIM": record["imputed"][target]["ssim"],
                         "copy-input PSNR": record["copy_input"][target]["psnr"],
                         "copy-input SSIM": record["copy_input"][target]["ssim"],
                         "VAE ceiling PSNR": record.get("vae_ceiling", {}).get(target, {}).get("psnr")})
    return markdown_table(rows, ["subject", "target", "PSNR (dB)", "SSIM", "copy-input PSNR", "copy-input SSIM",
                                 "VAE ceiling PSNR"])


def accuracy_table(metrics: dict, baselines: dict, comparisons: dict, model_label: str = "UniBrain") -> str:
    majority, constant = baselines["majority_class"], baselines["best_constant"]
    rows = [
        {"method": model_label, "accuracy": metrics["accuracy"], "subjects": metrics["num_subjects"],
         "95% CI": interval_text(metrics["accuracy_interval"], 3).replace("+", "").replace(" ✓", ""),
         "vs best constant [95% CI]": interval_text(comparisons["accuracy_vs_best_constant"], 3)},
        {"method": f"best constant answer ({constant['class']!r})", "accuracy": constant["accuracy"],
         "subjects": metrics["num_subjects"]},
        {"method": f"majority class of train ({majority['class']!r}, {majority['train_subjects']} subjects)",
         "accuracy": majority["accuracy"], "subjects": metrics["num_subjects"]},
        {"method": f"{model_label}, reference substring rule", "accuracy": metrics["reference_rule_accuracy"],
         "subjects": metrics["num_subjects"]},
    ]
    table = markdown_table(rows, ["method", "accuracy", "95% CI", "vs best constant [95% CI]", "subjects"],
                           float_format="{:.3f}")
    if "findings_on_normal" in metrics:
        rate = metrics["findings_on_normal"]
        table += (f"\n\nFindings on normal subjects (a class other than Normal named): {rate['mean']:.3f} "
                  f"[{rate['low']:.3f}, {rate['high']:.3f}] of {rate['n']} normal subjects.")
    return table


def _diagnosis_rows(per_subject: list[dict], extra: tuple[str, ...] = ()) -> list[dict]:
    return [{"subject": r["subject_id"], "truth": r["ground_truth"], "parsed": r["parsed_label"],
             "correct": r["correct"], **{k: r.get(k) for k in extra},
             "diagnosis": r["diagnosis"][-120:]} for r in per_subject]


@dataclass
class GenerationResult(EvaluationResult):
    """Result of ``evaluate_generation``: imputed vs truth, the copy-input baseline and the VAE ceiling."""

    def summary_tables(self):
        targets = self.settings["modalities_out"]
        return [("PSNR / SSIM (mean over subjects)", image_table(self, self.metrics, "UniBrain")),
                ("Per subject", per_subject_image_table(self.per_subject, targets))]


@dataclass
class DiagnosisResult(EvaluationResult):
    """Result of ``evaluate_diagnosis``: accuracy (final diagnosis line), confusion, baselines."""

    def summary_tables(self):
        return [("Diagnosis accuracy", accuracy_table(self.metrics, self.baselines, self.comparisons)),
                ("Confusion (rows: truth, columns: final diagnosis line)", confusion_table(self.metrics["confusion"])),
                ("Per subject", markdown_table(_diagnosis_rows(self.per_subject, ("replaced",)),
                                               ["subject", "truth", "parsed", "correct", "replaced", "diagnosis"]))]


@dataclass
class UnifiedResult(EvaluationResult):
    """Result of ``evaluate_unified``: accuracy, impression ROUGE and imputed-image PSNR/SSIM, with baselines."""

    def summary_tables(self):
        constant = self.baselines["constant_impression"]
        rouge = self.comparisons.get("rougeL_vs_constant_impression")
        rouge_rows = [
            {"method": "UniBrain impression", **{k: self.metrics[k] for k in ("rouge1", "rouge2", "rougeL")},
             "Δ ROUGE-L [95% CI]": interval_text(rouge, 3)},
            {"method": "constant training impression", **{k: constant[k] for k in ("rouge1", "rouge2", "rougeL")}},
        ]
        rows = _diagnosis_rows(self.per_subject)
        for row, record in zip(rows, self.per_subject):
            row["rougeL"] = record["rouge"]["rougeL"]
        return [("Diagnosis accuracy", accuracy_table(self.metrics, self.baselines, self.comparisons)),
                ("Confusion (rows: truth, columns: final diagnosis line)", confusion_table(self.metrics["confusion"])),
                ("Impression ROUGE F-measure (ours: the reference has no ROUGE code)",
                 markdown_table(rouge_rows, ["method", "rouge1", "rouge2", "rougeL", "Δ ROUGE-L [95% CI]"])),
                ("Imputed images, PSNR / SSIM (ours: the reference does not score them in this task)",
                 image_table(self, self.metrics["images"], "UniBrain")),
                ("Per subject", markdown_table(rows, ["subject", "truth", "parsed", "correct", "rougeL",
                                                      "diagnosis"]))]


def write_predictions(out_dir: Path, per_subject: list[dict]) -> Path:
    lines = [json.dumps(record, ensure_ascii=False, default=str) for record in per_subject]
    path = out_dir / "predictions.jsonl"
    with atomic_file(path) as temporary:
        temporary.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


__all__ = ["DiagnosisResult", "EvaluationResult", "GenerationResult", "NORMAL_CLASS", "PSNR_CAP", "UnifiedResult",
           "accuracy_summary", "accuracy_table", "cap_psnr", "confusion_table", "image_comparisons", "image_means",
           "image_series", "image_table", "impression_findings_on_normal", "interval_text", "lesion_comparisons",
           "mean", "names_a_lesion", "per_subject_image_table", "write_predictions"]
