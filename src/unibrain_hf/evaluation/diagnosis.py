"""Diagnosis scoring: accuracy of generated diagnoses against each subject's ground-truth class.

A subject's true class comes from its id through the class rules, and a prediction is scored
with the reference's substring rule (UniBrain's ``evaluate_metrics.py``). The rules, the substring test and the
label parser live in :mod:`unibrain_hf.protocol.diagnosis` — one table shared with training
and the pipeline — and are re-exported here, so ``unibrain_hf.evaluation.diagnosis`` keeps
working for callers of ``DiagnosisRules``, ``ground_truth_class``, ``is_correct`` and
``parse_diagnosis_label``.

    python -c "from unibrain_hf.evaluation.diagnosis import diagnosis_accuracy as a; print(a(['BraTS-GLI-1'], ['glioma']))"
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..protocol.diagnosis import (DEFAULT_CLASS_RULES, DEFAULT_FALLBACK_CLASS, DEFAULT_RULES, DiagnosisRules,
                                  RulesLike, SubjectMatcher, as_rules, final_diagnosis_line, ground_truth_class,
                                  is_correct, parse_diagnosis_label)


def _check_pairs(subject_ids: Sequence[str], predictions: Sequence[str]) -> None:
    if isinstance(subject_ids, str) or isinstance(predictions, str):
        raise ValueError("subject_ids and predictions must be lists, not single strings")
    if len(subject_ids) == 0:
        raise ValueError("subject_ids is empty")
    if len(subject_ids) != len(predictions):
        raise ValueError(f"{len(subject_ids)} subject ids but {len(predictions)} predictions")


def score_diagnoses(
    subject_ids: Sequence[str], predictions: Sequence[str], rules: RulesLike = None
) -> list[dict]:
    """One record per subject: ``subject_id``, ``ground_truth``, ``parsed_label``, ``correct``.

    ``correct`` follows the reference's substring rule; ``parsed_label`` is informative only.
    """
    _check_pairs(subject_ids, predictions)
    resolved = as_rules(rules)
    records = []
    for subject_id, prediction in zip(subject_ids, predictions):
        truth = resolved.classify(subject_id)
        records.append({
            "subject_id": subject_id,
            "ground_truth": truth,
            "parsed_label": parse_diagnosis_label(prediction, resolved.class_words),
            "correct": is_correct(truth, prediction),
        })
    return records


def diagnosis_accuracy(subject_ids: Sequence[str], predictions: Sequence[str], rules: RulesLike = None) -> float:
    """Fraction of predictions that contain their subject's class word (reference §8.2)."""
    records = score_diagnoses(subject_ids, predictions, rules)
    return sum(record["correct"] for record in records) / len(records)


def majority_class(train_subject_ids: Sequence[str], rules: RulesLike = None) -> str:
    """Most frequent class among the training subjects; ties go to the earlier class in rule order."""
    if isinstance(train_subject_ids, str) or len(train_subject_ids) == 0:
        raise ValueError("train_subject_ids must be a non-empty list of subject ids")
    resolved = as_rules(rules)
    counts = Counter(resolved.classify(subject_id) for subject_id in train_subject_ids)
    order = {word: position for position, word in enumerate(resolved.class_words)}
    return min(counts, key=lambda word: (-counts[word], order.get(word, len(order))))


def majority_class_baseline(
    train_subject_ids: Sequence[str], test_subject_ids: Sequence[str], rules: RulesLike = None
) -> float:
    """Test accuracy of always answering the majority training class, scored by the same rule."""
    if isinstance(test_subject_ids, str) or len(test_subject_ids) == 0:
        raise ValueError("test_subject_ids must be a non-empty list of subject ids")
    answer = majority_class(train_subject_ids, rules)
    return diagnosis_accuracy(test_subject_ids, [answer] * len(test_subject_ids), rules)


__all__ = ["DEFAULT_CLASS_RULES", "DEFAULT_FALLBACK_CLASS", "DEFAULT_RULES", "DiagnosisRules", "RulesLike",
           "SubjectMatcher", "as_rules", "final_diagnosis_line", "ground_truth_class", "is_correct",
           "parse_diagnosis_label",
           "score_diagnoses", "diagnosis_accuracy", "majority_class", "majority_class_baseline"]
