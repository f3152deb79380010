"""Which subjects an evaluation scores: the cohort index, subject selection, per-subject seeds and slices.

The index is read from the parquet metadata columns only (no volumes), so a wrong split, an
unknown modality or a cohort without the requested sequences is reported before any model is
loaded. Volumes are then read one subject at a time, in file order.

    python -c "from unibrain_hf.evaluation.cohort import index_cohort; print(index_cohort('runs/demo/cohort', 'val').modality_sets())"
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ..data.intensity import middle_lesion_slice, rescale_intensity
from ..data.radgenome import iter_subject_records, load_split, open_parquet, resolve_parquet_files
from ..data.schema import SPLIT_FILE_NAME, modality_code
from ..data.templates import CANONICAL_MODALITIES
from ..errors import EvaluationInputError

#: The reference also requires this sequence for a subject to enter the diagnosis task (§8.2).
DIAGNOSIS_ALSO_REQUIRED = ("t1n",)


class SkipSubject(Exception):
    """A subject that cannot be scored; the reason goes into the result's ``skipped`` list."""


# --------------------------------------------------------------------------- seeds


def subject_seed(seed: int, subject_id: str, sample: int = 0) -> int:
    """A 63-bit seed for sample ``sample`` of ``subject_id``, stable across runs, platforms and subject order."""
    digest = hashlib.sha256(f"{int(seed)}/{subject_id}/{int(sample)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def subject_generator(seed: int, subject_id: str, sample: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(subject_seed(seed, subject_id, sample))


# --------------------------------------------------------------------------- argument checks


def check_codes(codes, name: str, allow_empty: bool = False) -> list[str]:
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


def check_positive_int(value, name: str) -> int:
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
        eligible = eligible[:check_positive_int(max_subjects, "max_subjects")]
    return eligible


def iter_records(index: CohortIndex, subject_ids: list[str]):
    """The :class:`SubjectRecord` of each wanted subject, read one at a time in file order."""
    wanted = set(subject_ids)
    for record in iter_subject_records(index.cohort_dir, split=index.split):
        if record.subject_id in wanted:
            yield record


# --------------------------------------------------------------------------- what is scored of a subject


def scaled_volumes(record, codes) -> dict[str, np.ndarray]:
    """uint8 volumes (whole-volume percentile scaling) of ``codes``, or :class:`SkipSubject` saying why not."""
    volumes = {}
    for code in codes:
        if code not in record.volumes:
            raise SkipSubject(f"{code} is empty (no voxel > 0) and was dropped when reading")
        try:
            volumes[code] = rescale_intensity(record.volumes[code])
        except ValueError as error:
            raise SkipSubject(f"{code}: {error}") from None
    return volumes


def evaluation_slice_index(record) -> int:
    """The scored slice: the middle lesion slice, or the middle slice without a lesion."""
    return middle_lesion_slice(record.mask, record.shape_zyx[0])


def evaluation_slices(cohort_dir, split: str, subject_ids: list[str], codes: list[str]) -> dict[str, dict]:
    """``{subject: {code: scored uint8 slice}}`` for the wanted subjects of a split, in ``subject_ids`` order.

    Subjects absent from the split are left out; a subject without one of ``codes`` raises
    :class:`SkipSubject` (as :func:`scaled_volumes`).
    """
    wanted, found = set(subject_ids), {}
    for record in iter_subject_records(cohort_dir, split=split):
        if record.subject_id in wanted:
            volumes, index = scaled_volumes(record, codes), evaluation_slice_index(record)
            found[record.subject_id] = {code: volumes[code][index] for code in codes}
    return {subject: found[subject] for subject in subject_ids if subject in found}


def evaluation_lesion_masks(cohort_dir, split: str, subject_ids: list[str]) -> dict[str, np.ndarray | None]:
    """``{subject: boolean lesion mask of the scored slice, or None without a mask}``, as :func:`evaluation_slices`."""
    wanted, found = set(subject_ids), {}
    for record in iter_subject_records(cohort_dir, split=split):
        if record.subject_id in wanted:
            found[record.subject_id] = (None if record.mask is None
                                        else np.asarray(record.mask[evaluation_slice_index(record)]) > 0)
    return {subject: found[subject] for subject in subject_ids if subject in found}


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


__all__ = ["CohortIndex", "DIAGNOSIS_ALSO_REQUIRED", "SkipSubject", "check_codes", "check_positive_int",
           "evaluation_lesion_masks", "evaluation_slice_index", "evaluation_slices", "index_cohort", "iter_records",
           "record_affine", "scaled_volumes", "select_subjects", "subject_generator", "subject_seed"]
