"""Turn a folder of NIfTI volumes plus radiology reports into a RadGenome parquet cohort.

    unibrain prepare INPUT_DIR --reports reports.csv OUT_DIR --hash-ids --salt S --split 0.8 0.1 0.1

Input layout: one folder per subject (the folder name is the subject id), holding one
NIfTI file (``.nii`` or ``.nii.gz``) per MRI sequence and optionally one lesion mask::

    INPUT_DIR/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz   # <anything>-<code>.nii.gz
    INPUT_DIR/BraTS-GLI-00001-000/flair.nii.gz                     # or just <code>.nii.gz
    INPUT_DIR/BraTS-GLI-00001-000/BraTS-GLI-00001-000-seg.nii.gz   # mask: name contains seg or mask

Sequence codes are ``t1n t1c t2w t2f dwi adc``; the aliases ``flair`` (-> t2f), ``t1``
(-> t1n) and ``t2`` (-> t2w) are accepted, in any letter case. Other files are ignored.

Reports, one entry per subject, in either format:

* CSV with a ``subject_id`` column and optional ``impression``, ``diagnosis``,
  ``global_finding`` and ``finding_<code>`` columns (one per sequence, aliases allowed).
  Several diagnoses in one cell are separated by ``;``.
* JSON ``{subject_id: {"findings": {code: text}, "impression": text,
  "diagnosis": text or [texts], "global_finding": text}}``; every key is optional.

Every volume is brought to the geometry UniBrain was trained on (UniBrain's ``scripts/prepare_parquet_subjectwise.py``):

1. reoriented to the axis codes L, P, I (the reference's SimpleITK ``DICOMOrient('LPI')``);
2. resampled in plane to 1.0 x 1.0 mm (linear for images, nearest for the mask), keeping
   the slice spacing, slice count, origin and direction;
3. stored as float32 (z, y, x), with ``header_metadata`` = spacing, direction (SimpleITK's
   LPS convention) and size. Nothing else from the NIfTI header is kept.

All sequences (and the mask) of a subject must share one voxel grid (shape and affine),
i.e. be co-registered; otherwise the subject is skipped. Files that cannot be used
(unreadable, not 3-D, NaN/Inf, no voxel > 0, unknown code) are reported and left out;
subjects without a report, with a broken mask, or with fewer than two usable sequences are
skipped. Every problem is listed in the returned :class:`PrepareReport` with its path
and reason. If no subject is usable, :class:`PrepareError` is raised and nothing is written.

De-identification: ``hash_subject_ids`` replaces each id by the first 16 hex digits of
HMAC-SHA-256(salt, id). Without a salt a random one is drawn and never stored, so the ids
differ on every run; pass the same salt to get the same ids. ``keep_pattern`` is a regular
expression searched in the original id whose match (its first group if it has one) is kept
as a readable prefix, e.g. ``--keep-pattern '(GLI|MEN|MET)'`` turns ``BraTS-GLI-00001-000``
into ``GLI-3f0c...``. When preprocessed NIfTI copies are requested (``nifti_dir``), they get
a fresh header with ``descrip``, ``db_name``, ``aux_file`` and ``intent_name`` blank.

The cohort is written through :func:`~unibrain_hf.data.schema.write_cohort` (atomic), with a
seeded subject-level train/val/test split.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
import random
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..errors import CorruptFileError, InvalidInputError
from ..utils.atomic import check_output_dir
from ..utils.readers import existing_path, read_json, read_nifti
from .schema import SubjectRecord, write_cohort

CANONICAL_CODES = ("t1n", "t1c", "t2w", "t2f", "dwi", "adc")
CODE_ALIASES = {**{c: c for c in CANONICAL_CODES}, "flair": "t2f", "t1": "t1n", "t2": "t2w"}
# SimpleITK's DICOMOrient('LPI') names the direction each voxel axis *increases towards* in
# patient space: x towards the patient's Left, y towards Posterior, z towards Inferior.
# nibabel axis codes use the same "towards" convention, so the equivalent target is
# ("L", "P", "I"). In the (z, y, x) array, slice 0 is therefore the most superior one.
TARGET_AXCODES = ("L", "P", "I")
IN_PLANE_SPACING_MM = 1.0
IDENTIFYING_NIFTI_FIELDS = ("descrip", "db_name", "aux_file", "intent_name")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MIN_SEQUENCES = 2
HASH_HEX_DIGITS = 16
# Shape/affine agreement tolerance between sequences of one subject (mm and direction cosines).
GRID_ATOL = 1e-3


#: How error messages name :func:`prepare_cohort`'s arguments; ``unibrain prepare`` passes its flags instead.
ARGUMENT_NAMES = {"input_dir": "input_dir", "reports": "reports", "out_dir": "out_dir",
                  "split_fractions": "split_fractions", "keep_pattern": "keep_pattern",
                  "hash_subject_ids": "hash_subject_ids=True", "subjects_per_file": "subjects_per_file",
                  "nifti_dir": "nifti_dir", "overwrite": "overwrite=True"}


class PrepareError(InvalidInputError):
    """No usable subject: carries the full problem list."""

    def __init__(self, message: str, problems: list[tuple[str, str]]):
        super().__init__(message + "".join(f"\n  {path}: {reason}" for path, reason in problems))
        self.problems = problems


class VolumeError(InvalidInputError):
    """A NIfTI file is readable but cannot be used (not 3-D, NaN/Inf, ...); names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # keep the arguments through pickling (multiprocessing workers)
        return type(self), (self.path, self.reason)


@dataclass
class PrepareReport:
    """What :func:`prepare_cohort` wrote and every input it had to leave out."""

    out_dir: Path
    written: list[str]
    problems: list[tuple[str, str]]
    split: dict[str, list[str]]
    # original id -> written id; identifying, so it is only returned, never written to disk.
    id_map: dict[str, str] = field(default_factory=dict, repr=False)
    random_salt: bool = False

    def summary(self) -> str:
        counts = ", ".join(f"{name} {len(ids)}" for name, ids in self.split.items())
        lines = [f"wrote {len(self.written)} subject(s) to {self.out_dir} ({counts})"]
        if self.random_salt:
            lines.append("subject ids were hashed with a random salt; pass --salt to make them reproducible")
        lines.append(f"{len(self.problems)} problem(s)" + (":" if self.problems else ""))
        lines += [f"  {path}: {reason}" for path, reason in self.problems]
        return "\n".join(lines)


# --------------------------------------------------------------------------- reports


@dataclass
class SubjectReport:
    findings: dict[str, str] = field(default_factory=dict)
    impression: str = ""
    disease: list[str] = field(default_factory=list)
    global_finding: str = ""


def normalise_code(code: str) -> str | None:
    """``"FLAIR"`` -> ``"t2f"``; ``None`` when the code is not a known sequence."""
    return CODE_ALIASES.get(code.strip().lower())


def _diagnosis_list(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise InvalidInputError(f"{where}: diagnosis must be a string or a list of strings, got {value!r}")


def _load_csv_reports(path: Path, what: str) -> dict[str, SubjectReport]:
    label = f"{what} ({path})"
    try:
        return _parse_csv_reports(path, label)
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{label} is not UTF-8 text; save the spreadsheet as CSV UTF-8 ({exc})") from exc
    except csv.Error as exc:
        raise CorruptFileError(f"{label} is not a readable CSV file ({exc})") from exc


def _parse_csv_reports(path: Path, label: str) -> dict[str, SubjectReport]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often add a BOM
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "subject_id" not in columns:
            raise InvalidInputError(f"{label}: no 'subject_id' column (columns: {columns})")
        finding_columns, unknown = {}, []
        for column in columns:
            if column.startswith("finding_") and normalise_code(column[len("finding_"):]):
                finding_columns[column] = normalise_code(column[len("finding_"):])
            elif column not in ("subject_id", "impression", "diagnosis", "global_finding"):
                unknown.append(column)
        if unknown:
            raise InvalidInputError(f"{label}: unknown column(s) {unknown}; expected subject_id, impression, "
                                    f"diagnosis, global_finding and finding_<code> with code in "
                                    f"{sorted(CODE_ALIASES)}")
        reports = {}
        for line, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            subject = row["subject_id"]
            if not subject:
                raise InvalidInputError(f"{label} line {line}: empty subject_id")
            if subject in reports:
                raise InvalidInputError(f"{label} line {line}: subject {subject!r} appears twice")
            reports[subject] = SubjectReport(
                findings={code: row[col] for col, code in finding_columns.items() if row.get(col)},
                impression=row.get("impression", ""),
                disease=[d.strip() for d in row.get("diagnosis", "").split(";") if d.strip()],
                global_finding=row.get("global_finding", ""))
    return reports


def _load_json_reports(path: Path, what: str) -> dict[str, SubjectReport]:
    label = f"{what} ({path})"
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise InvalidInputError(f"{label}: expected an object {{subject_id: report}}, got {type(data).__name__}")
    allowed = {"findings", "impression", "diagnosis", "global_finding"}
    reports = {}
    for subject, entry in data.items():
        where = f"{label}: subject {subject!r}"
        if not isinstance(entry, dict):
            raise InvalidInputError(f"{where}: report must be an object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise InvalidInputError(f"{where}: unknown key(s) {unknown}; allowed {sorted(allowed)}")
        findings = entry.get("findings") or {}
        if not isinstance(findings, dict):
            raise InvalidInputError(f"{where}: 'findings' must map sequence codes to text")
        normalised = {}
        for code, text in findings.items():
            canonical = normalise_code(code)
            if canonical is None:
                raise InvalidInputError(f"{where}: unknown sequence code {code!r} in findings; "
                                        f"known {sorted(CODE_ALIASES)}")
            if not isinstance(text, str):
                raise InvalidInputError(f"{where}: finding for {code!r} must be text")
            normalised[canonical] = text.strip()
        for key in ("impression", "global_finding"):
            if not isinstance(entry.get(key, ""), str):
                raise InvalidInputError(f"{where}: {key!r} must be text")
        reports[str(subject)] = SubjectReport(
            findings=normalised, impression=entry.get("impression", "").strip(),
            disease=_diagnosis_list(entry.get("diagnosis"), where),
            global_finding=entry.get("global_finding", "").strip())
    return reports


def load_reports(path: str | os.PathLike, what: str = "reports") -> dict[str, SubjectReport]:
    """Read a CSV or JSON report file (formats in the module docstring); ``what`` names it in errors."""
    path = existing_path(path, what)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _load_csv_reports(path, what)
    if suffix == ".json":
        return _load_json_reports(path, what)
    raise InvalidInputError(f"{what} ({path}) must be a .csv or .json file")


# --------------------------------------------------------------------------- volumes


@dataclass
class Volume:
    """One preprocessed volume: (x, y, z) voxels in LPI order and its voxel->RAS affine."""

    data: np.ndarray
    affine: np.ndarray


def load_volume(path: str | os.PathLike) -> Volume:
    """Read one NIfTI file as float32 and reorient it to :data:`TARGET_AXCODES`.

    Raises :class:`~unibrain_hf.errors.CorruptFileError` for a damaged or truncated file and
    :class:`VolumeError` for one that cannot be used, both naming the file.
    """
    image = nib.funcs.squeeze_image(read_nifti(path))  # drops trailing length-1 axes (x, y, z, 1)
    raw = np.asanyarray(image.dataobj)
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        # Casting would drop an imaginary part or mix RGB channels without a word.
        raise VolumeError(path, f"voxel type {raw.dtype} is not real-valued intensities (complex or RGB images "
                                f"cannot be used)")
    data = raw.astype(np.float32)
    if data.ndim == 4:
        raise VolumeError(path, f"4-D image with {data.shape[3]} volumes; one 3-D volume per sequence is expected")
    if data.ndim != 3 or min(data.shape) < 2:
        raise VolumeError(path, f"2-D image (shape {data.shape}); a 3-D volume is expected")
    if not np.all(np.isfinite(data)):
        raise VolumeError(path, f"contains {int(np.size(data) - np.isfinite(data).sum())} NaN/Inf voxel(s)")
    current = nib.orientations.io_orientation(image.affine)
    transform = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(TARGET_AXCODES))
    data = nib.orientations.apply_orientation(data, transform)
    affine = image.affine @ nib.orientations.inv_ornt_aff(transform, image.shape[:3])
    return Volume(np.ascontiguousarray(data, dtype=np.float32), affine)


def resample_in_plane(volume: Volume, is_mask: bool = False) -> Volume:
    """Resample x and y to 1 mm, keeping z, origin and direction (linear; nearest for masks).

    Output voxel i sits at input index ``i / spacing_x``, as in SimpleITK's resampler with
    the origin kept; beyond half a voxel past the last input voxel the value is 0.
    """
    spacing = nib.affines.voxel_sizes(volume.affine)
    zoom = spacing[:2] / IN_PLANE_SPACING_MM
    nx, ny, nz = volume.data.shape
    shape = (max(1, int(np.round(nx * zoom[0]))), max(1, int(np.round(ny * zoom[1]))), nz)
    step = np.array([1.0 / zoom[0], 1.0 / zoom[1], 1.0])
    data = ndimage.affine_transform(volume.data, step, output_shape=shape, order=0 if is_mask else 1,
                                    mode="nearest")
    # mode="nearest" clamps at the border like ITK's interpolators; ITK treats points more than
    # half a voxel outside the image as outside and writes 0 there.
    data[np.arange(shape[0]) * step[0] >= nx - 0.5, :, :] = 0
    data[:, np.arange(shape[1]) * step[1] >= ny - 0.5, :] = 0
    affine = volume.affine @ np.diag([step[0], step[1], 1.0, 1.0])
    return Volume(data.astype(np.float32, copy=False), affine)


def sitk_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(spacing (x, y, z), row-major direction in SimpleITK's LPS convention) of a RAS affine."""
    spacing = nib.affines.voxel_sizes(affine)
    direction_ras = affine[:3, :3] / spacing
    direction_lps = np.diag([-1.0, -1.0, 1.0]) @ direction_ras  # RAS -> LPS flips x and y
    return _plain_floats(spacing), _plain_floats(direction_lps.ravel())


def _plain_floats(values: np.ndarray) -> tuple[float, ...]:
    # Rounding hides float noise from the affine products; "+ 0.0" turns -0.0 into 0.0.
    return tuple(float(v) + 0.0 for v in np.round(values, 10))


def strip_identifying_fields(header: nib.Nifti1Header) -> nib.Nifti1Header:
    """Blank the free-text NIfTI header fields that may carry names, ids or site details."""
    for name in IDENTIFYING_NIFTI_FIELDS:
        header[name] = b""
    return header


def deidentified_nifti(volume_zyx: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image with a fresh header (nothing copied from the input) and blank text fields."""
    image = nib.Nifti1Image(np.ascontiguousarray(volume_zyx.transpose(2, 1, 0)), affine)
    strip_identifying_fields(image.header)
    return image


# --------------------------------------------------------------------------- ids and split


def pseudonymise(subject_id: str, salt: str, keep_pattern: str | None = None) -> str:
    """HMAC-SHA-256(salt, id) prefix, optionally led by the class marker ``keep_pattern`` finds."""
    digest = hmac.new(salt.encode(), subject_id.encode(), hashlib.sha256).hexdigest()[:HASH_HEX_DIGITS]
    if keep_pattern:
        match = re.search(keep_pattern, subject_id)
        if match:
            marker = (match.group(1) if match.re.groups else match.group(0)).strip("-_ ")
            if marker:
                return f"{marker}-{digest}"
    return digest


def split_subjects(subject_ids: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Seeded shuffle, then cut at the rounded cumulative fractions into train / val / test."""
    order = sorted(subject_ids)
    random.Random(seed).shuffle(order)
    bounds = [int(np.round(b * len(order))) for b in np.cumsum(fractions)]
    bounds[-1] = len(order)
    return {"train": order[:bounds[0]], "val": order[bounds[0]:bounds[1]], "test": order[bounds[1]:]}


def _check_fractions(fractions, name: str = "split_fractions") -> tuple[float, float, float]:
    try:
        fractions = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be three numbers (train, val, test), got {fractions!r}") from None
    if (len(fractions) != 3 or not all(np.isfinite(fractions)) or any(f < 0 for f in fractions)
            or not np.isclose(sum(fractions), 1.0, atol=1e-6)):
        raise InvalidInputError(f"{name} must be three non-negative numbers (train, val, test) summing to 1, "
                                f"got {fractions}")
    return fractions


# --------------------------------------------------------------------------- one subject


def _nifti_stem(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


@dataclass
class _Subject:
    """A subject that passed every check: its staged arrays and geometry."""

    source_id: str
    codes: list[str]
    has_mask: bool
    spacing: tuple[float, ...]
    direction: tuple[float, ...]
    affine: np.ndarray
    report: SubjectReport


def _discover(subject_dir: Path, problems: list) -> tuple[dict[str, Path], list[Path]] | None:
    """Sequence files by canonical code and mask files; ``None`` when the folder is ambiguous."""
    sequences, masks = {}, []
    for path in sorted(p for p in subject_dir.iterdir() if p.is_file()):
        stem = _nifti_stem(path)
        if stem is None:
            continue
        raw = stem.rsplit("-", 1)[-1]
        code = normalise_code(raw)
        # The code is tried first so that an id which happens to contain "seg" or "mask"
        # (e.g. "Seg-0001-t1n") still names a sequence.
        if code is None and ("seg" in stem.lower() or "mask" in stem.lower()):
            masks.append(path)
        elif code is None:
            problems.append((str(path), f"unknown sequence code {raw!r}; known {sorted(CODE_ALIASES)}"))
        elif code in sequences:
            problems.append((str(subject_dir), f"two files for sequence {code!r} ({sequences[code].name}, "
                                               f"{path.name}); subject skipped"))
            return None
        else:
            sequences[code] = path
    if len(masks) > 1:
        problems.append((str(subject_dir), f"several mask files {[m.name for m in masks]}; subject skipped"))
        return None
    return sequences, masks


def _reason(exc: Exception) -> str:
    """What is wrong with a volume, for the problem list (which names the file itself)."""
    if isinstance(exc, VolumeError):
        return exc.reason
    cause = exc.__cause__ or exc
    return f"unreadable NIfTI, damaged or truncated ({type(cause).__name__}: {cause})"


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.data.shape == b.data.shape and np.allclose(a.affine, b.affine, atol=GRID_ATOL)


def _prepare_subject(subject_dir: Path, report: SubjectReport | None, stage: Path, index: int,
                     problems: list) -> _Subject | None:
    found = _discover(subject_dir, problems)
    if found is None:
        return None
    sequence_paths, mask_paths = found
    if report is None:
        problems.append((str(subject_dir), f"no report for subject {subject_dir.name!r}; subject skipped"))
        return None
    volumes = {}
    for code in CANONICAL_CODES:
        if code not in sequence_paths:
            continue
        try:
            volume = load_volume(sequence_paths[code])
        except (VolumeError, CorruptFileError) as exc:
            problems.append((str(sequence_paths[code]), _reason(exc)))
            continue
        if not np.any(volume.data > 0):
            problems.append((str(sequence_paths[code]), "no voxel > 0 (empty image)"))
            continue
        volumes[code] = volume
    mask = None
    if mask_paths:
        try:
            mask = load_volume(mask_paths[0])
        except (VolumeError, CorruptFileError) as exc:
            # Writing the subject without its mask would silently change how its slices are sampled.
            problems.append((str(mask_paths[0]), f"{_reason(exc)}; subject skipped"))
            return None
    if len(volumes) < MIN_SEQUENCES:
        problems.append((str(subject_dir), f"{len(volumes)} usable sequence(s) {sorted(volumes)}, "
                                           f"at least {MIN_SEQUENCES} needed; subject skipped"))
        return None
    # The mask defines the grid when present (the reference takes its header from the mask).
    reference_name, reference = ("mask", mask) if mask is not None else next(iter(volumes.items()))
    mismatched = [f"{sequence_paths[code].name} {v.data.shape}" for code, v in volumes.items()
                  if not _same_grid(v, reference)]
    if mismatched:
        problems.append((str(subject_dir), f"sequences not on the {reference_name} grid {reference.data.shape} "
                                           f"(shape or affine differ): {mismatched}; subject skipped"))
        return None
    affine = None
    for name, volume in [*volumes.items(), *([("mask", mask)] if mask is not None else [])]:
        resampled = resample_in_plane(volume, is_mask=name == "mask")
        affine = resampled.affine
        np.save(stage / f"{index}-{name}.npy", np.ascontiguousarray(resampled.data.transpose(2, 1, 0)))
    spacing, direction = sitk_geometry(affine)
    return _Subject(subject_dir.name, list(volumes), mask is not None, spacing, direction, affine, report)


def _records(subjects: list[_Subject], id_map: dict[str, str], stage: Path, indices: dict[str, int]):
    for subject in subjects:
        index = indices[subject.source_id]
        yield SubjectRecord(
            subject_id=id_map[subject.source_id],
            volumes={code: np.load(stage / f"{index}-{code}.npy") for code in subject.codes},
            findings={code: subject.report.findings.get(code, "") for code in subject.codes},
            impression=subject.report.impression, disease=list(subject.report.disease),
            global_finding=subject.report.global_finding, spacing=subject.spacing, direction=subject.direction,
            mask=np.load(stage / f"{index}-mask.npy") if subject.has_mask else None)


def _write_nifti_copies(subjects: list[_Subject], id_map: dict[str, str], stage: Path, indices: dict[str, int],
                        nifti_dir: Path, overwrite: bool) -> None:
    """Preprocessed, de-identified NIfTI copies, written to a temp dir renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{nifti_dir.name}.tmp-", dir=nifti_dir.parent))
    try:
        for subject in subjects:
            new_id, index = id_map[subject.source_id], indices[subject.source_id]
            (tmp / new_id).mkdir()
            for name in [*subject.codes, *(["seg"] if subject.has_mask else [])]:
                data = np.load(stage / f"{index}-{'mask' if name == 'seg' else name}.npy")
                nib.save(deidentified_nifti(data, subject.affine), tmp / new_id / f"{new_id}-{name}.nii.gz")
        if nifti_dir.exists() and overwrite:
            shutil.rmtree(nifti_dir)
        os.replace(tmp, nifti_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_arguments(input_dir: Path, reports, out_dir: Path, split_fractions, hash_subject_ids: bool,
                     keep_pattern: str | None, subjects_per_file, nifti_dir, overwrite: bool, names: dict):
    """Every argument of :func:`prepare_cohort` checked before any file is read; errors use ``names``."""
    fractions = _check_fractions(split_fractions, names["split_fractions"])
    existing_path(input_dir, names["input_dir"], kind="directory")
    existing_path(reports, names["reports"])
    if keep_pattern is not None:
        if not hash_subject_ids:
            raise InvalidInputError(f"{names['keep_pattern']} only applies with {names['hash_subject_ids']}")
        try:
            re.compile(keep_pattern)
        except re.error as exc:
            raise InvalidInputError(f"{names['keep_pattern']} {keep_pattern!r} is not a valid regular expression "
                                    f"({exc})") from None
    if isinstance(subjects_per_file, bool) or not isinstance(subjects_per_file, (int, np.integer)) \
            or subjects_per_file < 1:
        raise InvalidInputError(f"{names['subjects_per_file']} must be a positive integer, got {subjects_per_file!r}")
    outputs = [("out_dir", out_dir)] + ([("nifti_dir", Path(nifti_dir))] if nifti_dir is not None else [])
    for key, path in outputs:
        # An output inside the input would be read back as a subject folder by the next run.
        if path.resolve().is_relative_to(input_dir.resolve()):
            raise InvalidInputError(f"{names[key]} {path} lies inside {names['input_dir']} {input_dir}; write the "
                                    f"output elsewhere")
        check_output_dir(path, names[key], overwrite, names["overwrite"])
    return fractions


# --------------------------------------------------------------------------- entry point


def prepare_cohort(input_dir: str | os.PathLike, reports: str | os.PathLike, out_dir: str | os.PathLike,
                   split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0,
                   hash_subject_ids: bool = False, salt: str | None = None, overwrite: bool = False,
                   keep_pattern: str | None = None, subjects_per_file: int = 5,
                   nifti_dir: str | os.PathLike | None = None, argument_names: dict | None = None) -> PrepareReport:
    """Preprocess every subject folder of ``input_dir`` and write a RadGenome cohort to ``out_dir``.

    Args:
        input_dir: one folder per subject (layout in the module docstring).
        reports: a ``.csv`` or ``.json`` report file (formats in the module docstring).
        out_dir: the cohort directory (``chunk_<k>.parquet`` + split file), written atomically.
        split_fractions: train / val / test fractions of the written subjects.
        seed: seeds the subject shuffle behind the split (chunks are written in split order).
        hash_subject_ids: replace subject ids by a salted hash.
        salt: the hash key; random (and forgotten) when ``None``.
        overwrite: replace a non-empty ``out_dir`` (and ``nifti_dir``).
        keep_pattern: regex whose match in the original id is kept as a prefix of the hashed id.
        subjects_per_file: subjects per parquet chunk.
        nifti_dir: also write the preprocessed volumes as de-identified NIfTI here (for review).
        argument_names: how error messages name these arguments (default :data:`ARGUMENT_NAMES`;
            ``unibrain prepare`` passes its flags).

    Every argument, the reports file and the output locations are checked before any volume is
    read; errors are :mod:`unibrain_hf.errors` types naming the argument and the file.
    """
    names = {**ARGUMENT_NAMES, **(argument_names or {})}
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    fractions = _check_arguments(input_dir, reports, out_dir, split_fractions, hash_subject_ids, keep_pattern,
                                 subjects_per_file, nifti_dir, overwrite, names)
    if nifti_dir is not None:
        nifti_dir = Path(nifti_dir)
        nifti_dir.parent.mkdir(parents=True, exist_ok=True)
    report_table = load_reports(reports, names["reports"])
    random_salt = hash_subject_ids and salt is None
    if random_salt:
        salt = secrets.token_hex(16)

    # Hidden folders are skipped: they include this function's own temporary directories.
    subject_dirs = sorted(p for p in input_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subject_dirs:
        raise PrepareError(f"no subject folders in {input_dir}", [])
    problems: list[tuple[str, str]] = []
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Preprocessed arrays wait on disk, not in memory, until the split (which needs the final
    # list of valid subjects) is known and write_cohort streams them into parquet.
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stage-", dir=out_dir.parent))
    try:
        subjects, indices = [], {}
        for index, subject_dir in enumerate(subject_dirs):
            subject = _prepare_subject(subject_dir, report_table.get(subject_dir.name), stage, index, problems)
            if subject is not None:
                subjects.append(subject)
                indices[subject.source_id] = index
        if not subjects:
            raise PrepareError(f"no usable subject in {input_dir}; nothing written. Problems:", problems)
        id_map = {s.source_id: (pseudonymise(s.source_id, salt, keep_pattern) if hash_subject_ids else s.source_id)
                  for s in subjects}
        if len(set(id_map.values())) != len(id_map):
            raise PrepareError("two subjects map to the same id; choose another salt", problems)
        split = split_subjects(list(id_map.values()), fractions, seed)
        # Chunks follow the split (each shuffled), so subject classes mix within a chunk.
        written_order = [*split["train"], *split["val"], *split["test"]]
        by_new_id = {id_map[s.source_id]: s for s in subjects}
        ordered = [by_new_id[i] for i in written_order]
        write_cohort(_records(ordered, id_map, stage, indices), out_dir, split=split,
                     subjects_per_file=subjects_per_file, overwrite=overwrite)
        if nifti_dir is not None:
            _write_nifti_copies(ordered, id_map, stage, indices, nifti_dir, overwrite)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return PrepareReport(out_dir=out_dir, written=written_order, problems=problems, split=split,
                         id_map=id_map, random_salt=random_salt)
