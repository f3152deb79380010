"""Read a RadGenome-Brain MRI parquet cohort as a ``datasets.Dataset`` or as ``SubjectRecord``s.

The on-disk format (one subject per row, float32 (z, y, x) volumes stored as bytes) is
defined in :mod:`unibrain_hf.data.schema`. Two readers are offered:

* :func:`load_radgenome` returns a Hugging Face ``Dataset`` (``IterableDataset`` with
  ``streaming=True``) with typed :data:`RADGENOME_FEATURES`. With ``decode=True`` (default)
  rows are decoded lazily, when they are accessed, into::

      {"subject_id": str, "modalities": ["t1n", "t2f", ...],
       "volumes": [float32 (z, y, x) array per modality], "mask": float32 array or None,
       "findings": [text per modality], "impression": str, "disease": [str, ...],
       "global_finding": str, "spacing": [x, y, z] mm, "direction": [9 floats]}

* :func:`iter_subject_records` yields :class:`~unibrain_hf.data.schema.SubjectRecord`s with
  plain pyarrow, reading one row group (= one subject) at a time, so memory stays at one
  subject whatever the cohort size.

Both accept a directory (every ``*.parquet`` in it, sorted by name), one file, or a list of
files, and can keep only the subjects of one split of ``train_val_test_split_subject.json``.

Empty volumes (no voxel > 0) cannot be intensity-normalised (the percentiles are taken over
foreground voxels), so with ``skip_empty=True`` they are dropped from their subject and an
:class:`EmptyVolumeWarning` reports how many were skipped; :func:`iter_subject_records` (where
this is the default) also drops a subject left without any volume.

    python -c "from unibrain_hf.data.radgenome import load_radgenome as load; print(load('out/cohort', split='val')[0])"
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..errors import CorruptFileError, InputFileNotFoundError, InvalidInputError
from ..utils.readers import existing_path, open_parquet_file, read_json, read_parquet_table
from .schema import (
    RADGENOME_ARROW_SCHEMA,
    RADGENOME_COLUMNS,
    SPLIT_FILE_NAME,
    SchemaError,
    SubjectRecord,
    row_to_record,
)

RADGENOME_FEATURES = datasets.Features({
    "subject_id": datasets.Value("string"),
    "image_list": datasets.List(datasets.Value("binary")),
    "modality_names": datasets.List(datasets.Value("string")),
    "modality_findings": datasets.List(datasets.Value("string")),
    "impression": datasets.Value("string"),
    "disease": datasets.List(datasets.Value("string")),
    "global_finding": datasets.Value("string"),
    "header_metadata": datasets.Value("string"),
    "mask": datasets.Value("binary"),
})

DECODED_COLUMNS = ("subject_id", "modalities", "volumes", "mask", "findings", "impression", "disease",
                   "global_finding", "spacing", "direction")

PathLike = str | os.PathLike


class EmptyVolumeWarning(UserWarning):
    """Volumes without foreground were skipped while reading a cohort."""


# --------------------------------------------------------------------------- files and split


def resolve_parquet_files(data_files_or_dir: PathLike | Sequence[PathLike]) -> list[Path]:
    """A directory (its ``*.parquet``, sorted), one file, or a list of files -> checked file paths."""
    what = "data_files_or_dir"
    if isinstance(data_files_or_dir, (str, os.PathLike)):
        path = existing_path(data_files_or_dir, "cohort directory or parquet file", kind="any")
        if path.is_dir():
            files = sorted(path.glob("*.parquet"))
            if not files:
                present = sorted(p.name for p in path.iterdir())[:8]
                raise InputFileNotFoundError(f"cohort directory {path} holds no *.parquet files (it holds "
                                             f"{present or 'nothing'}); point at the folder `unibrain prepare` or "
                                             f"`unibrain phantom` wrote")
            return files
        candidates = [path]
    elif isinstance(data_files_or_dir, Sequence) and not isinstance(data_files_or_dir, bytes):
        candidates = [existing_path(p, what) for p in data_files_or_dir]
        if not candidates:
            raise InvalidInputError(f"{what} is an empty list; name a cohort directory or parquet files")
    else:
        raise InvalidInputError(f"{what} must be a cohort directory, a .parquet file or a list of them, got "
                                f"{type(data_files_or_dir).__name__}")
    for path in candidates:
        existing_path(path, "parquet file")
        if path.suffix.lower() != ".parquet":
            raise InvalidInputError(f"{path} is not a .parquet file; pass a cohort directory or its *.parquet files")
    return candidates


def _default_split_file(files: list[Path]) -> Path:
    parents = {f.resolve().parent for f in files}
    if len(parents) != 1:
        raise InvalidInputError(f"the parquet files lie in several directories {sorted(map(str, parents))}; "
                                "pass split_file= to say which split file to use")
    return parents.pop() / SPLIT_FILE_NAME


def load_split(split_file: PathLike) -> dict[str, list[str]]:
    """Read a ``{"train": [ids], "val": [...], "test": [...]}`` split file."""
    split_file = Path(split_file)
    if not split_file.is_file():
        present = sorted(p.name for p in split_file.parent.glob("*.json")) if split_file.parent.is_dir() else []
        raise InputFileNotFoundError(f"split file {split_file} not found (JSON files in that directory: {present}); "
                                     "pass split_file= or split=None to read every subject")
    split = read_json(split_file, "split file")
    if not isinstance(split, dict) or not all(
            isinstance(ids, list) and all(isinstance(s, str) for s in ids) for ids in split.values()):
        raise SchemaError(f"split file {split_file} must map split names to lists of subject ids, e.g. "
                          '{"train": ["id-1", ...], "val": [...], "test": [...]}')
    return split


def split_subjects(files: list[Path], split: str, split_file: PathLike | None = None) -> list[str]:
    """Subject ids of ``split``, from ``split_file`` or the split file next to the parquet files."""
    if not isinstance(split, str):
        raise InvalidInputError(f"split must be a split name such as 'train' (or None), got {type(split).__name__} "
                                f"{split!r}")
    path = Path(split_file) if split_file is not None else _default_split_file(files)
    table = load_split(path)
    if split not in table:
        raise InvalidInputError(f"unknown split {split!r}; {path} has {sorted(table)}")
    return list(table[split])


# --------------------------------------------------------------------------- file checks


def open_parquet(path: PathLike) -> pq.ParquetFile:
    """Open one parquet file and check it has the RadGenome columns with compatible types."""
    parquet_file = open_parquet_file(path, "RadGenome parquet file")
    schema = parquet_file.schema_arrow
    missing = [c for c in RADGENOME_COLUMNS if c not in schema.names]
    if missing:
        raise SchemaError(f"{path}: missing column(s) {missing}; a RadGenome file has {list(RADGENOME_COLUMNS)}")
    for field in RADGENOME_ARROW_SCHEMA:
        actual = schema.field(field.name).type
        if actual == field.type:
            continue
        # Accept types arrow can cast losslessly (large_binary, large_list, ...), reject the rest.
        try:
            pa.array([], type=actual).cast(field.type)
        except (pa.ArrowException, NotImplementedError):
            raise SchemaError(f"{path}: column {field.name!r} has type {actual}, expected {field.type}") from None
    return parquet_file


# --------------------------------------------------------------------------- decoding


def is_empty_volume(volume: np.ndarray) -> bool:
    """True when no voxel is > 0: nothing for the foreground-percentile normalisation to use."""
    return not bool(np.any(volume > 0))


def drop_empty_volumes(record: SubjectRecord) -> int:
    """Remove empty volumes from ``record`` in place; return how many were removed."""
    empty = [code for code, vol in record.volumes.items() if is_empty_volume(vol)]
    for code in empty:
        del record.volumes[code]
        record.findings.pop(code, None)
    return len(empty)


def record_to_example(record: SubjectRecord) -> dict:
    """A decoded :class:`SubjectRecord` -> the row layout of a decoded dataset (``DECODED_COLUMNS``)."""
    codes = list(record.volumes)
    return {
        "subject_id": record.subject_id,
        "modalities": codes,
        "volumes": [record.volumes[c] for c in codes],
        "mask": record.mask,
        "findings": [record.findings.get(c, "") for c in codes],
        "impression": record.impression,
        "disease": list(record.disease),
        "global_finding": record.global_finding,
        "spacing": [float(s) for s in record.spacing],
        "direction": [float(d) for d in record.direction],
    }


def _warn_empty(volumes: int, subjects: int, where: str) -> None:
    warnings.warn(f"skipped {volumes} empty volume(s) (no voxel > 0) and {subjects} subject(s) left without "
                  f"any volume while reading {where}", EmptyVolumeWarning, stacklevel=3)


def decode_example(row: dict, skip_empty: bool = False) -> dict:
    """Decode one raw row (RadGenome columns) into the ``DECODED_COLUMNS`` layout."""
    record = row_to_record(row)
    if skip_empty:
        dropped = drop_empty_volumes(record)
        if dropped:
            _warn_empty(dropped, 0 if record.volumes else 1, f"subject {record.subject_id!r}")
    return record_to_example(record)


def _decode_batch(batch: dict, skip_empty: bool) -> dict:
    out = {name: [] for name in DECODED_COLUMNS}
    for i in range(len(batch["subject_id"])):
        example = decode_example({c: batch[c][i] for c in RADGENOME_COLUMNS}, skip_empty=skip_empty)
        for name in DECODED_COLUMNS:
            out[name].append(example[name])
    return out


# --------------------------------------------------------------------------- public readers


def load_radgenome(data_files_or_dir: PathLike | Sequence[PathLike], split: str | None = None,
                   split_file: PathLike | None = None, streaming: bool = False, decode: bool = True,
                   skip_empty: bool = False, cache_dir: PathLike | None = None):
    """Load a RadGenome parquet cohort with ``datasets``.

    Args:
        data_files_or_dir: a directory (all ``*.parquet`` in it), one file, or a list of files.
        split: ``"train"`` / ``"val"`` / ``"test"`` (any key of the split file) to keep only
            those subjects; ``None`` keeps every row.
        split_file: the split JSON; default ``train_val_test_split_subject.json`` next to the files.
        streaming: return an ``IterableDataset`` that reads the files while iterating.
        decode: decode rows lazily into arrays (layout in the module docstring); ``False``
            returns the raw columns typed by :data:`RADGENOME_FEATURES`.
        skip_empty: with ``decode``, drop volumes without foreground from each row, with an
            :class:`EmptyVolumeWarning` (rows are kept; one may end with no volume).
        cache_dir: where ``datasets`` keeps its Arrow copy (non-streaming); default HF cache.

    A row whose bytes do not match its declared shape raises :class:`SchemaError` naming
    the subject and modality when it is accessed. Decoding runs on whatever is read, so a
    whole-column read of a decoded dataset (``ds["subject_id"]``) decodes every volume: use
    ``decode=False`` for metadata-only queries.
    """
    files = resolve_parquet_files(data_files_or_dir)
    for path in files:
        open_parquet(path)  # fail early, naming the file, before datasets builds anything
    filters = None
    if split is not None:
        # An expression rather than [("subject_id", "in", ids)]: it stays typed when the split is empty,
        # and pyarrow pushes it down to skip row groups by their statistics.
        ids = pa.array(split_subjects(files, split, split_file), type=pa.string())
        filters = pads.field("subject_id").isin(ids)
    if filters is not None and not _any_subject_in(files, ids):
        # datasets refuses to build a split with no rows; an empty split is legitimate (e.g. no val set).
        if streaming:
            dataset = datasets.IterableDataset.from_generator(_no_rows, features=RADGENOME_FEATURES)
        else:
            dataset = datasets.Dataset.from_dict({c: [] for c in RADGENOME_COLUMNS}, features=RADGENOME_FEATURES)
        return _finish(dataset, streaming, decode, skip_empty)
    try:
        dataset = datasets.load_dataset(
            "parquet", data_files=[str(f.resolve()) for f in files], split="train", features=RADGENOME_FEATURES,
            columns=list(RADGENOME_COLUMNS), filters=filters, streaming=streaming,
            cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as exc:  # datasets wraps reader errors in a generic message; surface the cause
        cause = exc.__cause__ or exc
        raise CorruptFileError(f"could not read RadGenome parquet files {[str(f) for f in files]}: "
                               f"{type(cause).__name__}: {cause}") from exc
    return _finish(dataset, streaming, decode, skip_empty)


def _no_rows():
    yield from ()


def _any_subject_in(files: list[Path], ids: pa.Array) -> bool:
    for path in files:
        subjects = read_parquet_table(path, ["subject_id"], "RadGenome parquet file").column(0)
        if pc.any(pc.is_in(subjects, value_set=ids)).as_py():
            return True
    return False


def _finish(dataset, streaming: bool, decode: bool, skip_empty: bool):
    if not decode:
        return dataset
    if streaming:
        return dataset.map(lambda row: decode_example(row, skip_empty=skip_empty), remove_columns=[
            c for c in RADGENOME_COLUMNS if c not in DECODED_COLUMNS])
    return dataset.with_transform(lambda batch: _decode_batch(batch, skip_empty))


def iter_subject_records(data_files_or_dir: PathLike | Sequence[PathLike], split: str | None = None,
                         split_file: PathLike | None = None, skip_empty: bool = True) -> Iterator[SubjectRecord]:
    """Yield one :class:`SubjectRecord` per subject, reading one row group at a time.

    With ``skip_empty`` (default) volumes without foreground are dropped, subjects left
    with none are not yielded, and one :class:`EmptyVolumeWarning` gives the counts.
    Missing or damaged files, and a bad split, are reported by this call, before any
    subject is read.
    """
    files = resolve_parquet_files(data_files_or_dir)
    wanted = None if split is None else set(split_subjects(files, split, split_file))
    for path in files:
        open_parquet(path)  # a damaged last file fails now, not after the first subjects were used
    return _iter_records(files, wanted, skip_empty)


def _iter_records(files: list[Path], wanted: set[str] | None, skip_empty: bool) -> Iterator[SubjectRecord]:
    empty_volumes = empty_subjects = 0
    try:
        for path in files:
            parquet_file = open_parquet(path)
            for group in range(parquet_file.num_row_groups):
                try:
                    if wanted is not None:
                        ids = parquet_file.read_row_group(group, columns=["subject_id"]).column(0).to_pylist()
                        if not wanted.intersection(ids):
                            continue
                    rows = parquet_file.read_row_group(group, columns=list(RADGENOME_COLUMNS)).to_pylist()
                except (pa.ArrowException, OSError) as exc:
                    raise CorruptFileError(f"{path}: row group {group} cannot be read; the file is damaged "
                                           f"({exc})") from exc
                for row in rows:
                    if wanted is not None and row["subject_id"] not in wanted:
                        continue
                    record = row_to_record(row)
                    if skip_empty:
                        empty_volumes += drop_empty_volumes(record)
                        if not record.volumes:
                            empty_subjects += 1
                            continue
                    yield record
    finally:
        # Also runs when the caller stops early, so the count covers what was read.
        if empty_volumes:
            _warn_empty(empty_volumes, empty_subjects, f"{len(files)} parquet file(s)")
