"""The RadGenome-Brain MRI parquet schema: one subject per row, volumes as float32 bytes.

This is the on-disk format UniBrain's data is published in, and the one ``unibrain
prepare`` and ``unibrain phantom`` write. Columns:

==================  ==================  ===============================================
column              arrow type          content
==================  ==================  ===============================================
subject_id          string
image_list          list<binary>        float32 (z, y, x) volume bytes, one per sequence
modality_names      list<string>        ``<subject>-<code>``; the code follows the last ``-``
modality_findings   list<string>        per-sequence findings ("" when none)
impression          string
disease             list<string>
global_finding      string
header_metadata     string (JSON)       ``{"spacing": [x,y,z], "direction": [9], "size": [x,y,z]}``
mask                binary (nullable)   float32 (z, y, x) lesion segmentation bytes
==================  ==================  ===============================================

:func:`write_cohort` writes ``chunk_<k>.parquet`` files (one subject per row group) plus a
subject split file ``train_val_test_split_subject.json``, atomically (temp dir, rename).

    python -c "from unibrain_hf.data.schema import RADGENOME_ARROW_SCHEMA as s; print(s)"
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InvalidInputError

SPLIT_FILE_NAME = "train_val_test_split_subject.json"

RADGENOME_ARROW_SCHEMA = pa.schema([
    ("subject_id", pa.string()),
    ("image_list", pa.list_(pa.binary())),
    ("modality_names", pa.list_(pa.string())),
    ("modality_findings", pa.list_(pa.string())),
    ("impression", pa.string()),
    ("disease", pa.list_(pa.string())),
    ("global_finding", pa.string()),
    ("header_metadata", pa.string()),
    ("mask", pa.binary()),
])
RADGENOME_COLUMNS = tuple(RADGENOME_ARROW_SCHEMA.names)


class SchemaError(InvalidInputError):
    """A row, record or file does not follow the RadGenome schema (the message names the file or subject)."""


def modality_code(modality_name: str) -> str:
    """``"BraTS-GLI-00001-000-t1n"`` -> ``"t1n"`` (the text after the last ``-``)."""
    return str(modality_name).rsplit("-", 1)[-1]


@dataclass
class SubjectRecord:
    """One subject, decoded: volumes are float32 arrays in (z, y, x) order."""

    subject_id: str
    volumes: dict[str, np.ndarray]
    findings: dict[str, str] = field(default_factory=dict)
    impression: str = ""
    disease: list[str] = field(default_factory=list)
    global_finding: str = ""
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (x, y, z) mm, SimpleITK order
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    mask: np.ndarray | None = None

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        first = next(iter(self.volumes.values()))
        return tuple(int(s) for s in first.shape)

    @property
    def modalities(self) -> list[str]:
        return list(self.volumes)

    def validate(self) -> None:
        if not self.subject_id:
            raise SchemaError("subject_id is empty")
        if not self.volumes:
            raise SchemaError(f"subject {self.subject_id!r} has no volumes")
        shape = None
        for code, vol in self.volumes.items():
            if vol is None:
                raise SchemaError(f"subject {self.subject_id!r}: modality {code!r} is listed without an image")
            if not isinstance(vol, np.ndarray) or not _is_real_number_dtype(vol.dtype):
                kind = f"dtype {vol.dtype}" if isinstance(vol, np.ndarray) else type(vol).__name__
                raise SchemaError(f"subject {self.subject_id!r}: modality {code!r} must be a numpy array of real "
                                  f"intensities, got {kind}")
            if vol.ndim != 3:
                raise SchemaError(f"subject {self.subject_id!r}: modality {code!r} must be 3-D (z, y, x), got {vol.shape}")
            if shape is None:
                shape = vol.shape
            elif vol.shape != shape:
                raise SchemaError(
                    f"subject {self.subject_id!r}: modality {code!r} has shape {vol.shape}, expected {shape} like the others")
            if not np.all(np.isfinite(vol)):
                raise SchemaError(f"subject {self.subject_id!r}: modality {code!r} contains NaN or Inf")
        if self.mask is not None and (not isinstance(self.mask, np.ndarray)
                                      or not _is_real_number_dtype(self.mask.dtype)):
            raise SchemaError(f"subject {self.subject_id!r}: mask must be a numpy array of real numbers")
        if self.mask is not None and self.mask.shape != shape:
            raise SchemaError(f"subject {self.subject_id!r}: mask shape {self.mask.shape} != volume shape {shape}")


def _is_real_number_dtype(dtype: np.dtype) -> bool:
    """Integers, floats and booleans; not complex, strings, objects or structured (RGB) types."""
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_


def record_to_row(record: SubjectRecord) -> dict:
    """Encode a :class:`SubjectRecord` as one parquet row (dict of column -> value)."""
    if not isinstance(record, SubjectRecord):
        raise InvalidInputError(f"expected a SubjectRecord, got {type(record).__name__}")
    record.validate()
    z, y, x = record.shape_zyx
    header = {"spacing": [float(s) for s in record.spacing], "direction": [float(d) for d in record.direction],
              "size": [int(x), int(y), int(z)]}
    return {
        "subject_id": record.subject_id,
        "image_list": [np.ascontiguousarray(v, dtype=np.float32).tobytes() for v in record.volumes.values()],
        "modality_names": [f"{record.subject_id}-{code}" for code in record.volumes],
        "modality_findings": [record.findings.get(code, "") or "" for code in record.volumes],
        "impression": record.impression or "",
        "disease": list(record.disease),
        "global_finding": record.global_finding or "",
        "header_metadata": json.dumps(header),
        "mask": None if record.mask is None else np.ascontiguousarray(record.mask, dtype=np.float32).tobytes(),
    }


def _volume_from_bytes(data: bytes, shape_zyx: tuple[int, int, int], what: str) -> np.ndarray:
    expected = int(np.prod(shape_zyx)) * 4
    if len(data) != expected:
        raise SchemaError(
            f"{what}: {len(data)} bytes do not match the declared shape (z, y, x)={tuple(shape_zyx)} "
            f"({expected} bytes of float32)")
    return np.frombuffer(data, dtype=np.float32).reshape(shape_zyx).copy()


def row_to_record(row: dict) -> SubjectRecord:
    """Decode one parquet row; raises :class:`SchemaError` naming the problem."""
    missing = [c for c in RADGENOME_COLUMNS if c not in row]
    if missing:
        raise SchemaError(f"row is missing column(s) {missing}; expected {list(RADGENOME_COLUMNS)}")
    subject = row["subject_id"]
    try:
        header = json.loads(row["header_metadata"])
        size = header["size"]
    except (TypeError, ValueError, KeyError) as exc:
        raise SchemaError(f"subject {subject!r}: header_metadata is not JSON with a 'size' entry ({exc})") from None
    shape = (int(size[2]), int(size[1]), int(size[0]))
    names, images = list(row["modality_names"] or []), list(row["image_list"] or [])
    if len(names) != len(images):
        raise SchemaError(f"subject {subject!r}: {len(names)} modality_names but {len(images)} images")
    findings = list(row["modality_findings"] or [])
    if findings and len(findings) != len(names):
        raise SchemaError(f"subject {subject!r}: {len(findings)} findings for {len(names)} modalities")
    volumes, finding_map = {}, {}
    for i, (name, data) in enumerate(zip(names, images)):
        code = modality_code(name)
        if data is None:
            raise SchemaError(f"subject {subject!r}: modality {code!r} is listed without an image")
        volumes[code] = _volume_from_bytes(data, shape, f"subject {subject!r} modality {code!r}")
        finding_map[code] = findings[i] if findings else ""
    mask = None
    if row["mask"] is not None:
        mask = _volume_from_bytes(row["mask"], shape, f"subject {subject!r} mask")
    return SubjectRecord(
        subject_id=subject, volumes=volumes, findings=finding_map, impression=row["impression"] or "",
        disease=list(row["disease"] or []), global_finding=row["global_finding"] or "",
        spacing=tuple(header.get("spacing", (1.0, 1.0, 1.0))),
        direction=tuple(header.get("direction", (1, 0, 0, 0, 1, 0, 0, 0, 1))), mask=mask)


def write_cohort(records, out_dir: str | os.PathLike, split: dict[str, list[str]] | None = None,
                 subjects_per_file: int = 5, overwrite: bool = False) -> Path:
    """Write records as ``chunk_<k>.parquet`` (one subject per row group) + the split file.

    Everything is written into a temporary sibling directory that is renamed into place at
    the end, so an interrupted run never leaves a half-written cohort.
    """
    from ..utils.atomic import atomic_directory, check_output_dir

    out_dir = check_output_dir(out_dir, "cohort directory", overwrite)

    with atomic_directory(out_dir) as tmp:
        rows, subjects, chunk = [], [], 0

        def flush():
            nonlocal rows, chunk
            if rows:
                table = pa.Table.from_pylist(rows, schema=RADGENOME_ARROW_SCHEMA)
                pq.write_table(table, tmp / f"chunk_{chunk}.parquet", row_group_size=1, compression="snappy")
                rows, chunk = [], chunk + 1

        for record in records:
            rows.append(record_to_row(record))
            subjects.append(record.subject_id)
            if len(rows) >= subjects_per_file:
                flush()
        flush()
        if not subjects:
            raise SchemaError("no subjects to write")
        if len(set(subjects)) != len(subjects):
            raise SchemaError("duplicate subject ids")
        if split is None:
            split = {"train": subjects, "val": [], "test": []}
        unknown = sorted(set(s for ids in split.values() for s in ids) - set(subjects))
        if unknown:
            raise SchemaError(f"split file names subjects that were not written: {unknown[:5]}")
        (tmp / SPLIT_FILE_NAME).write_text(json.dumps(split, indent=1))
    return out_dir
