"""The diagnosability classifier: it reads a class that one sequence shows and another hides, and tells
whether replacement images carry it.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_diagnosability.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unibrain_hf.data.schema import SubjectRecord, write_cohort
from unibrain_hf.evaluation.diagnosability import classifier_baseline

DEPTH, SIDE = 6, 32


def _subject(subject_id: str, lesion: bool, rng) -> SubjectRecord:
    # t1n: the same texture statistics in both classes (it carries no class); t1c: a bright block on the
    # lesion slices of lesion subjects only.
    t1n = rng.uniform(0.2, 1.0, (DEPTH, SIDE, SIDE)).astype(np.float32)
    t1c = rng.uniform(0.2, 0.6, (DEPTH, SIDE, SIDE)).astype(np.float32)
    mask = np.zeros((DEPTH, SIDE, SIDE), np.float32)
    if lesion:
        y, x = rng.integers(4, SIDE - 12, size=2)
        mask[2:5, y:y + 8, x:x + 8] = 1
        t1c[mask > 0] = 3.0
    return SubjectRecord(subject_id, {"t1n": t1n, "t1c": t1c}, mask=mask if lesion else None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    rng = np.random.default_rng(0)
    records, split = [], {"train": [], "val": [], "test": []}
    for i in range(28):
        kind = "GLI" if i % 2 else "NOR"
        records.append(_subject(f"PHANTOM-{kind}-{i:05d}", kind == "GLI", rng))
        split["train" if i < 20 else "test"].append(records[-1].subject_id)
    return write_cohort(records, tmp_path_factory.mktemp("diag") / "cohort", split=split)


def test_the_classifier_reads_the_class_where_a_sequence_shows_it_and_not_where_none_does(cohort, tmp_path):
    fit = dict(eval_split="test", steps=150, width=8, batch_size=16)
    shown = classifier_baseline(cohort, ["t1c"], **fit)
    assert shown["settings"]["classes"] == ["Gli", "Normal"] and len(shown["per_subject"]) == 8
    assert shown["summary"]["accuracy"] == 1.0
    assert shown["summary"]["best_constant"]["accuracy"] == 0.5
    assert shown["summary"]["vs_best_constant"]["low"] > 0
    hidden = classifier_baseline(cohort, ["t1n"], **fit)
    assert hidden["summary"]["accuracy"] < shown["summary"]["accuracy"]
    assert classifier_baseline(cohort, ["t1c"], **fit)["summary"] == shown["summary"]  # seeded

    # Replacement images without the block (an "imputation" that carries no lesion): the classifier fitted on
    # the real t1c no longer tells the classes apart; replacements equal to the real slices change nothing.
    from unibrain_hf.evaluation.cohort import evaluation_slices

    slices = evaluation_slices(cohort, "test", [r["subject_id"] for r in shown["per_subject"]], ["t1n", "t1c"])
    blank, same = tmp_path / "blank" / "images", tmp_path / "same"
    blank.mkdir(parents=True), same.mkdir()
    for subject, images in slices.items():
        Image.fromarray(np.full_like(images["t1c"], 90)).save(blank / f"{subject}-t1c.png")
        Image.fromarray(images["t1c"]).save(same / f"{subject}-t1c.png")
    swapped = classifier_baseline(cohort, ["t1n", "t1c"], replaced_by=blank.parent, **fit)
    summary = swapped["summary"]
    assert summary["accuracy"] == 1.0 and summary["replaced_accuracy"] <= 0.5
    assert summary["replaced_vs_real"]["high"] < 0
    assert all(row["replaced"] == ["t1c"] for row in swapped["per_subject"])
    unchanged = classifier_baseline(cohort, ["t1n", "t1c"], replaced_by=same, **fit)["summary"]
    assert unchanged["replaced_accuracy"] == unchanged["accuracy"]


def test_the_classifier_refuses_bad_inputs_by_name(cohort, tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        classifier_baseline(cohort, ["t1c"], eval_split="test", steps=0)
    with pytest.raises(Exception, match="sources is empty"):
        classifier_baseline(cohort, [], eval_split="test")
    with pytest.raises(Exception, match="dwi"):
        classifier_baseline(cohort, ["t1n", "dwi"], eval_split="test", steps=1)
    with pytest.raises(ValueError, match=r"subjects \['nobody'\] of 'test' do not have every one of \['t1c'\]"):
        classifier_baseline(cohort, ["t1c"], eval_split="test", steps=1, subjects=["nobody"])
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(empty / "someone-else-t1c.png")
    with pytest.raises(ValueError, match="no <subject>-<code>.png for any scored subject"):
        classifier_baseline(cohort, ["t1c"], eval_split="test", steps=1, replaced_by=empty)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    Image.fromarray(np.zeros((SIDE + 2, SIDE), np.uint8)).save(wrong / "PHANTOM-GLI-00021-t1c.png")
    with pytest.raises(ValueError, match="PHANTOM-GLI-00021-t1c.png is .* but the scored slice"):
        classifier_baseline(cohort, ["t1c"], eval_split="test", steps=1, replaced_by=wrong)
