"""The one per-subject scoring loop every evaluation task runs.

A task is described by a :class:`Task`: which sequences a subject needs, how one subject is
scored (``score(record) -> dict``, raising :class:`~.cohort.SkipSubject` for a subject that
cannot be scored), and how the records become a result (``summarise``). :func:`run_task_loop`
does the rest, identically for every task: index the split, select the eligible subjects
(errors name what the cohort has), read and score them one at a time under a progress bar,
collect the skipped ones with their reasons, then summarise and write.

    python -c "from unibrain_hf.evaluation.scoring import run_task_loop; help(run_task_loop)"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import EvaluationInputError
from .cohort import CohortIndex, SkipSubject, index_cohort, iter_records, select_subjects


@dataclass
class Task:
    """One evaluation task, parameterising :func:`run_task_loop`.

    Attributes:
        name: the task's name (progress bar, result).
        modalities_in / modalities_out / also_required: what an eligible subject must have.
        score: ``(record) -> per-subject dict`` (must contain ``subject_id``).
        summarise: ``(index, per_subject, skipped) -> EvaluationResult`` (without writing).
        settings: the arguments that shape the numbers, stored in the result.
        write_extra: ``(out_dir, result)`` for task-specific files (e.g. ``predictions.jsonl``).
    """

    name: str
    modalities_in: list[str]
    score: Callable
    summarise: Callable
    modalities_out: list[str] = field(default_factory=list)
    also_required: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)
    write_extra: Callable | None = None


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


def no_subject_scored(skipped: list[dict]) -> EvaluationInputError:
    reasons = "; ".join(f"{item['subject_id']}: {item['reason']}" for item in skipped)
    return EvaluationInputError(f"no eligible subject could be scored ({reasons})")


def eligible_subjects(task: Task, cohort_dir, split: str, max_subjects: int | None) -> tuple[CohortIndex, list[str]]:
    index = index_cohort(cohort_dir, split)
    subjects = select_subjects(index, task.modalities_in, task.modalities_out, also_required=task.also_required,
                               max_subjects=max_subjects)
    return index, subjects


def run_task_loop(task: Task, cohort_dir, split: str = "test", max_subjects: int | None = None, out_dir=None,
                  progress: bool = True, subjects: list[str] | None = None):
    """Score every eligible subject of ``split`` with ``task`` and return its result (written to ``out_dir``).

    ``subjects`` restricts the run to these ids (each must be eligible), e.g. to score two tasks on
    exactly the same subjects.
    """
    index, eligible = eligible_subjects(task, cohort_dir, split, None if subjects else max_subjects)
    if subjects is not None:
        missing = [s for s in subjects if s not in eligible]
        if missing:
            raise EvaluationInputError(f"subjects {missing[:5]} are not eligible for the {task.name} task on split "
                                       f"{split!r} (they lack one of {task.modalities_in + task.modalities_out})")
        eligible = [s for s in eligible if s in set(subjects)]
    per_subject, skipped = [], []
    for record in _progress(iter_records(index, eligible), len(eligible), task.name, progress):
        try:
            per_subject.append(task.score(record))
        except SkipSubject as reason:
            skipped.append({"subject_id": record.subject_id, "reason": str(reason)})
    if not per_subject:
        raise no_subject_scored(skipped)
    result = task.summarise(index, per_subject, skipped)
    if out_dir is not None:
        out_dir = Path(out_dir)
        if task.write_extra is not None:
            task.write_extra(out_dir, result)
        result.write(out_dir)
    return result


__all__ = ["Task", "eligible_subjects", "no_subject_scored", "run_task_loop"]
