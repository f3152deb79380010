"""Reading RadGenome parquet cohorts: datasets view, record iterator, split filter, bad input.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_radgenome.py -q
"""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unibrain_hf.data.radgenome import (
    RADGENOME_FEATURES,
    EmptyVolumeWarning,
    iter_subject_records,
    load_radgenome,
)
from unibrain_hf.data.schema import (
    RADGENOME_ARROW_SCHEMA,
    SPLIT_FILE_NAME,
    SchemaError,
    SubjectRecord,
    record_to_row,
    write_cohort,
)
from unibrain_hf.errors import CorruptFileError

SHAPE = (4, 6, 5)  # (z, y, x)
SPLIT = {"train": ["S-0", "S-1", "S-2"], "val": ["S-3"], "test": ["S-4"]}


def make_records(n: int = 5) -> list[SubjectRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        codes = ["t1n", "t2f", "t1c"][: 2 + i % 2]
        volumes = {c: rng.uniform(0.1, 1.0, SHAPE).astype(np.float32) for c in codes}
        mask = (volumes["t1n"] > 0.7).astype(np.float32) if i % 2 == 0 else None
        records.append(SubjectRecord(
            subject_id=f"S-{i}", volumes=volumes, findings={"t1n": f"finding {i}"}, impression=f"impression {i}",
            disease=["glioma"] if i % 2 else ["meningioma", "edema"], global_finding=f"global {i}",
            spacing=(1.0, 1.0, 3.0 + i), direction=(1, 0, 0, 0, 1, 0, 0, 0, -1), mask=mask))
    return records


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("radgenome")
    records = make_records()
    write_cohort(records, root / "cohort", split=SPLIT, subjects_per_file=2)
    return root / "cohort", {r.subject_id: r for r in records}, root / "hf-cache"


def assert_example_matches(example: dict, record: SubjectRecord) -> None:
    assert example["subject_id"] == record.subject_id
    assert example["modalities"] == list(record.volumes)
    for code, volume in zip(example["modalities"], example["volumes"]):
        assert volume.dtype == np.float32 and volume.shape == SHAPE
        np.testing.assert_array_equal(volume, record.volumes[code])
    if record.mask is None:
        assert example["mask"] is None
    else:
        np.testing.assert_array_equal(example["mask"], record.mask)
    assert example["findings"] == [record.findings.get(c, "") for c in record.volumes]
    assert example["impression"] == record.impression
    assert example["disease"] == record.disease
    assert example["global_finding"] == record.global_finding
    assert example["spacing"] == list(record.spacing)
    assert example["direction"] == [float(d) for d in record.direction]


def test_features_describe_the_arrow_schema():
    assert RADGENOME_FEATURES.arrow_schema.names == RADGENOME_ARROW_SCHEMA.names
    assert RADGENOME_FEATURES.arrow_schema.types == RADGENOME_ARROW_SCHEMA.types


def test_round_trip_through_datasets(cohort):
    path, records, cache = cohort
    dataset = load_radgenome(path, cache_dir=cache)
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 5
    seen = set()
    for i in range(len(dataset)):
        example = dataset[i]
        assert_example_matches(example, records[example["subject_id"]])
        seen.add(example["subject_id"])
    assert seen == set(records)


def test_raw_rows_are_typed_when_not_decoded(cohort):
    path, records, cache = cohort
    dataset = load_radgenome(sorted(path.glob("*.parquet")), decode=False, cache_dir=cache)
    assert dataset.features == RADGENOME_FEATURES
    row = dataset[0]
    assert isinstance(row["image_list"][0], bytes)
    assert json.loads(row["header_metadata"])["size"] == [SHAPE[2], SHAPE[1], SHAPE[0]]


def test_split_filter_keeps_only_that_split(cohort):
    path, records, cache = cohort
    for split, ids in SPLIT.items():
        dataset = load_radgenome(path, split=split, cache_dir=cache)
        assert sorted(dataset["subject_id"]) == sorted(ids)
        assert [r.subject_id for r in iter_subject_records(path, split=split)] == sorted(ids)
    # One file with an explicit split file.
    single = sorted(path.glob("*.parquet"))[0]
    dataset = load_radgenome(single, split="train", split_file=path / SPLIT_FILE_NAME, cache_dir=cache)
    assert sorted(dataset["subject_id"]) == ["S-0", "S-1"]


def test_empty_split_gives_an_empty_dataset(tmp_path):
    write_cohort(make_records(2), tmp_path / "c")  # default split: every subject in train, val empty
    assert len(load_radgenome(tmp_path / "c", split="val", cache_dir=tmp_path / "cache")) == 0
    assert list(load_radgenome(tmp_path / "c", split="val", streaming=True)) == []


def test_unknown_split_and_missing_split_file_are_explained(cohort, tmp_path):
    path, _, cache = cohort
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['test', 'train', 'val'\]"):
        load_radgenome(path, split="validation", cache_dir=cache)
    lone = tmp_path / "lone.parquet"
    lone.write_bytes(sorted(path.glob("*.parquet"))[0].read_bytes())
    with pytest.raises(FileNotFoundError, match="split file .* not found"):
        list(iter_subject_records(lone, split="train"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.parquet files"):
        load_radgenome(tmp_path / "empty", cache_dir=cache)


def test_streaming_decodes_lazily(cohort):
    path, records, _ = cohort
    dataset = load_radgenome(path, split="train", streaming=True)
    assert isinstance(dataset, datasets.IterableDataset)
    examples = list(dataset)
    assert sorted(e["subject_id"] for e in examples) == SPLIT["train"]
    for example in examples:
        assert_example_matches(example, records[example["subject_id"]])


def test_iter_subject_records_round_trip(cohort):
    path, records, _ = cohort
    read = list(iter_subject_records(path))
    assert [r.subject_id for r in read] == [f"S-{i}" for i in range(5)]
    for record in read:
        for code, volume in record.volumes.items():
            np.testing.assert_array_equal(volume, records[record.subject_id].volumes[code])
        assert record.spacing == records[record.subject_id].spacing


def write_raw_rows(path, rows, schema=RADGENOME_ARROW_SCHEMA):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=1)


def test_bytes_that_do_not_match_the_shape_name_subject_and_modality(tmp_path):
    row = record_to_row(make_records(1)[0])
    row["image_list"][1] = row["image_list"][1][:-8]  # t2f loses two voxels
    write_raw_rows(tmp_path / "chunk_0.parquet", [row])
    dataset = load_radgenome(tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(SchemaError, match=r"subject 'S-0' modality 't2f'.*do not match the declared shape"):
        dataset[0]
    with pytest.raises(SchemaError, match=r"subject 'S-0' modality 't2f'"):
        list(iter_subject_records(tmp_path))


def test_modality_listed_without_image_is_an_error(tmp_path):
    row = record_to_row(make_records(1)[0])
    row["image_list"][0] = None
    write_raw_rows(tmp_path / "chunk_0.parquet", [row])
    with pytest.raises(SchemaError, match=r"modality 't1n' is listed without an image"):
        list(iter_subject_records(tmp_path))


def test_corrupt_file_is_named(cohort, tmp_path):
    path, _, _ = cohort
    good = sorted(path.glob("*.parquet"))[0].read_bytes()
    broken = tmp_path / "chunk_9.parquet"
    broken.write_bytes(good[: len(good) // 2])  # truncated: no footer
    with pytest.raises(CorruptFileError, match=r"chunk_9\.parquet\) is not a readable parquet file"):
        load_radgenome(broken, cache_dir=tmp_path / "cache")
    with pytest.raises(CorruptFileError, match=r"chunk_9\.parquet"):
        iter_subject_records([broken])  # reported by the call, before any subject is read


def test_missing_columns_are_listed(tmp_path):
    row = record_to_row(make_records(1)[0])
    schema = pa.schema([f for f in RADGENOME_ARROW_SCHEMA if f.name not in ("disease", "mask")])
    write_raw_rows(tmp_path / "x.parquet", [{k: v for k, v in row.items() if k in schema.names}], schema)
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['disease', 'mask'\]"):
        load_radgenome(tmp_path / "x.parquet", cache_dir=tmp_path / "cache")
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['disease', 'mask'\]"):
        list(iter_subject_records(tmp_path / "x.parquet"))


def test_empty_volumes_are_skipped_with_a_counted_warning(tmp_path):
    records = make_records(3)
    records[0].volumes["t2f"][:] = 0.0              # one empty volume: subject kept without it
    for volume in records[2].volumes.values():     # every volume empty: subject dropped
        volume[:] = -1.0
    write_cohort(records, tmp_path / "c")
    with pytest.warns(EmptyVolumeWarning, match=r"skipped 3 empty volume\(s\).* and 1 subject\(s\)"):
        read = list(iter_subject_records(tmp_path / "c"))
    assert [r.subject_id for r in read] == ["S-0", "S-1"]
    assert read[0].modalities == ["t1n"] and list(read[0].findings) == ["t1n"]
    kept = list(iter_subject_records(tmp_path / "c", skip_empty=False))
    assert [r.modalities for r in kept][0] == ["t1n", "t2f"] and len(kept) == 3

    dataset = load_radgenome(tmp_path / "c", skip_empty=True, cache_dir=tmp_path / "cache")
    with pytest.warns(EmptyVolumeWarning, match=r"skipped 1 empty volume"):
        assert dataset[0]["modalities"] == ["t1n"]
