"""Tests of the synthetic phantom cohort (`unibrain phantom`): determinism, schema, physics,
classes, reports, CLI, cache and argument checking. Coarse 4 mm voxels keep them fast.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_phantom.py -q
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("nilearn", reason="the phantom reads nilearn's packaged MNI152 maps")

from PIL import Image  # noqa: E402

from unibrain_hf import cli  # noqa: E402
from unibrain_hf.data.phantom import (CLASS_ORDER, PHANTOM_CLASSES, default_cohort_dir,  # noqa: E402
                                      ensure_default_cohort, generate_cohort, generate_subject, simulate_subject,
                                      stratified_split)
from unibrain_hf.data.schema import SPLIT_FILE_NAME, row_to_record, write_cohort  # noqa: E402

VOXEL = 4.0
SIZE_PATTERN = re.compile(r"\d+(?:\.\d+)?\s*(?:\*|by|x|X)\s*\d+(?:\.\d+)?\s*(?:\*|by|x|X)\s*\d+(?:\.\d+)?\s*mm")


@lru_cache(maxsize=None)
def subject(index: int, seed: int = 0, lesion_class: str | None = None):
    return simulate_subject(index, seed, VOXEL, lesion_class=lesion_class)


def class_subject(key: str, seed: int = 0):
    return subject(CLASS_ORDER.index(key), seed)


def normal_white_matter(s) -> np.ndarray:
    return (s.anatomy.wm > 0.9) & (s.record.mask == 0)


# ---------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_subject_and_other_seed_differs():
    first = generate_subject(2, seed=7, voxel_size=VOXEL)
    again = generate_subject(2, seed=7, voxel_size=VOXEL)
    assert first.subject_id == again.subject_id == "PHANTOM-MET-00003"
    for code in first.volumes:
        assert first.volumes[code].tobytes() == again.volumes[code].tobytes()
    assert first.mask.tobytes() == again.mask.tobytes()
    assert (first.findings, first.impression, first.global_finding) == (again.findings, again.impression,
                                                                         again.global_finding)
    other = generate_subject(2, seed=8, voxel_size=VOXEL)
    assert not np.array_equal(first.volumes["t1n"], other.volumes["t1n"])
    assert first.findings != other.findings


def test_subjects_have_individual_anatomy():
    a, b = subject(5, 0), subject(5, 1)  # two normal subjects
    overlap = np.minimum(a.anatomy.gm, b.anatomy.gm).sum() / np.maximum(a.anatomy.gm, b.anatomy.gm).sum()
    assert 0.3 < overlap < 0.95  # the same template, but warped differently


# ---------------------------------------------------------------------------- schema
def test_schema_round_trip_through_parquet(tmp_path):
    records = [subject(i, 3).record for i in (0, 3)]
    write_cohort(records, tmp_path / "cohort", subjects_per_file=1)
    rows = [row for f in sorted((tmp_path / "cohort").glob("chunk_*.parquet")) for row in pq.read_table(f).to_pylist()]
    decoded = {r.subject_id: r for r in map(row_to_record, rows)}
    assert set(decoded) == {"PHANTOM-GLI-00001", "strokecase00004"}
    for original in records:
        back = decoded[original.subject_id]
        assert list(back.volumes) == list(original.volumes)
        for code, volume in original.volumes.items():
            assert back.volumes[code].dtype == np.float32
            np.testing.assert_array_equal(back.volumes[code], volume)
        np.testing.assert_array_equal(back.mask, original.mask)
        assert back.findings == original.findings and back.impression == original.impression
        assert back.disease == original.disease and back.global_finding == original.global_finding
        assert back.spacing == (VOXEL, VOXEL, VOXEL)
        assert back.direction == tuple(original.direction)


def test_volumes_are_float32_zyx_with_integer_label_mask():
    record = class_subject("glioma").record
    shape = record.shape_zyx
    assert all(v.dtype == np.float32 and v.shape == shape for v in record.volumes.values())
    assert shape[0] < shape[1] and 35 <= shape[2] <= 64  # (z, y, x): the head is longer than it is tall
    assert record.mask.dtype == np.float32
    assert set(np.unique(record.mask)) <= {0.0, 1.0, 2.0, 3.0}
    assert {1.0, 2.0, 3.0} <= set(np.unique(record.mask))  # necrosis, oedema, enhancing rim


# ---------------------------------------------------------------------------- physics
def test_csf_is_dark_on_flair_and_bright_on_t2w():
    s = class_subject("normal")
    csf = (s.anatomy.csf > 0.9) & (s.anatomy.brain > 0.99)
    wm = normal_white_matter(s)
    assert csf.sum() > 20 and wm.sum() > 200
    flair, t2w = s.record.volumes["t2f"], s.record.volumes["t2w"]
    assert flair[csf].mean() < 0.5 * flair[wm].mean()
    assert t2w[csf].mean() > 2.0 * t2w[wm].mean()


def test_enhancing_glioma_rim_is_bright_after_contrast_only():
    s = class_subject("glioma")
    rim, wm = s.record.mask == 3, normal_white_matter(s)
    t1n, t1c = s.record.volumes["t1n"], s.record.volumes["t1c"]
    assert rim.sum() > 10
    assert t1c[rim].mean() > 1.6 * t1c[wm].mean()
    assert t1n[rim].mean() < 1.15 * t1n[wm].mean()


def test_meningioma_enhances_and_metastases_enhance():
    for key in ("meningioma", "metastasis"):
        s = class_subject(key)
        enhancing, wm = s.record.mask == 3, normal_white_matter(s)
        assert enhancing.sum() > 0, key
        assert s.record.volumes["t1c"][enhancing].mean() > 1.4 * s.record.volumes["t1c"][wm].mean(), key


def lesion_fraction(s) -> np.ndarray:
    return sum(c.fraction for c in s.lesions.compartments)


def test_acute_stroke_is_bright_on_dwi_and_dark_on_adc():
    s = class_subject("stroke")
    # Voxels that are mostly infarct: at 4 mm, edge voxels also hold CSF, whose ADC is ~3e-3 mm^2/s.
    lesion = (s.record.mask == 1) & (lesion_fraction(s) > 0.8)
    healthy = ((s.anatomy.gm + s.anatomy.wm) > 0.9) & (s.record.mask == 0)
    assert lesion.sum() > 5
    dwi, adc = s.record.volumes["dwi"], s.record.volumes["adc"]
    assert dwi[lesion].mean() > 1.3 * dwi[healthy].mean()
    assert adc[lesion].mean() < 0.75 * adc[healthy].mean()
    assert 500 < np.median(adc[healthy]) < 1100  # 1e-6 mm^2/s, like clinical ADC maps


@pytest.mark.parametrize("seed", range(16))
def test_every_acute_infarct_is_dark_on_adc_over_its_whole_mask(seed):
    """The report calls every infarct restricted diffusion: over *all* labelled voxels (partial-volume edges
    included) and on the slice the evaluation scores, the lesion's ADC is well below normal parenchyma's."""
    from unibrain_hf.data.intensity import middle_lesion_slice

    s = subject(0, seed, lesion_class="stroke")
    adc, mask = s.record.volumes["adc"], s.record.mask > 0
    healthy = ((s.anatomy.gm + s.anatomy.wm) > 0.9) & ~mask
    assert mask.sum() > 20
    assert adc[mask].mean() < 0.8 * adc[healthy].mean(), f"lesion/tissue ADC {adc[mask].mean() / adc[healthy].mean():.2f}"
    z = middle_lesion_slice(s.record.mask, adc.shape[0])
    assert adc[z][mask[z]].mean() < 0.85 * adc[z][healthy[z]].mean()
    report = " ".join([s.record.impression, *s.record.findings.values()]).lower()
    assert "restricted diffusion" in report


def test_white_matter_hyperintensities_are_bright_on_flair():
    s = class_subject("wmh")
    lesion, wm = s.record.mask == 1, normal_white_matter(s)
    assert lesion.sum() > 5
    assert s.record.volumes["t2f"][lesion].mean() > 1.3 * s.record.volumes["t2f"][wm].mean()


def test_field_strength_changes_contrast():
    at3 = generate_subject(5, 0, VOXEL, field_strength=3)
    at15 = generate_subject(5, 0, VOXEL, field_strength=1.5)
    assert not np.array_equal(at3.volumes["t1n"], at15.volumes["t1n"])


# ---------------------------------------------------------------------------- classes and reports
@pytest.mark.parametrize("key, expected_id, sequences, disease", [
    ("glioma", "PHANTOM-GLI-00001", ["t1n", "t1c", "t2w", "t2f"], "Glioblastoma"),
    ("meningioma", "PHANTOM-MEN-00002", ["t1n", "t1c", "t2w", "t2f"], "Meningioma"),
    ("metastasis", "PHANTOM-MET-00003", ["t1n", "t1c", "t2w", "t2f"], "Metastatic tumor"),
    ("stroke", "strokecase00004", ["dwi", "adc", "t2f"], "Acute ischemic infarct"),
    ("wmh", "WMH-00005", ["t1n", "t2f"], "White matter degeneration"),
    ("normal", "PHANTOM-NOR-00006", ["t1n", "t1c", "t2w", "t2f"], "Normal"),
])
def test_each_class_has_its_sources_sequences_name_and_report(key, expected_id, sequences, disease):
    record = class_subject(key).record
    assert record.subject_id == expected_id
    assert list(record.volumes) == sequences == list(PHANTOM_CLASSES[key].sequences)
    assert record.disease == [disease]
    assert set(record.findings) == set(sequences)
    assert all(len(text.split()) >= 5 for text in record.findings.values())
    assert record.impression and record.global_finding
    if key == "normal":
        assert not (record.mask > 0).any()
        assert all(not SIZE_PATTERN.search(t) for t in record.findings.values())
    else:
        assert (record.mask > 0).any()
        assert any(SIZE_PATTERN.search(t) for t in record.findings.values())


def test_reports_name_location_and_sequence_signal():
    glioma = class_subject("glioma").record
    assert re.search(r"\b(right|left)\b", glioma.findings["t1c"])
    assert re.search(r"\b(frontal|parietal|temporal|occipital)\b|basal ganglia|thalamus", glioma.global_finding)
    assert "ring enhancement" in glioma.findings["t1c"]
    assert "FLAIR" in glioma.findings["t2f"] and "hyperintens" in glioma.findings["t2f"]
    stroke = class_subject("stroke").record
    assert "restricted diffusion" in stroke.global_finding
    assert "artery territory" in stroke.findings["dwi"]


def test_phrasing_varies_between_subjects_of_a_class():
    lesion_class = "glioma"
    texts = {re.sub(r"[\d.]+", "#", simulate_subject(0, seed, 8.0, lesion_class=lesion_class).record.findings["t1c"])
             for seed in range(6)}
    assert len(texts) >= 2


def test_lesion_class_override_keeps_the_subject_number():
    record = subject(0, 0, "wmh").record
    assert record.subject_id == "WMH-00001" and list(record.volumes) == ["t1n", "t2f"]


# ---------------------------------------------------------------------------- cohort, split, CLI
def test_stratified_split_is_deterministic_and_covers_every_subject():
    pairs = [(f"s{i}", CLASS_ORDER[i % 6]) for i in range(20)]
    split = stratified_split(pairs, seed=4)
    assert split == stratified_split(pairs, seed=4)
    assert sorted(sum(split.values(), [])) == sorted(s for s, _ in pairs)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (14, 3, 3)
    assert len({dict(pairs)[s] for s in split["test"]}) == 3  # one subject from each of three classes


def test_cli_writes_parquet_split_and_preview(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert cli.main(["phantom", str(out), "--subjects", "3", "--seed", "1", "--size", "4", "--preview"]) == 0
    assert str(out) in capsys.readouterr().out
    rows = [row for f in sorted(out.glob("chunk_*.parquet")) for row in pq.read_table(f).to_pylist()]
    assert [r["subject_id"] for r in rows] == ["PHANTOM-GLI-00001", "PHANTOM-MEN-00002", "PHANTOM-MET-00003"]
    split = json.loads((out / SPLIT_FILE_NAME).read_text())
    assert sorted(sum(split.values(), [])) == sorted(r["subject_id"] for r in rows)
    assert all(split[name] for name in ("train", "val", "test"))
    with Image.open(out / "preview.png") as preview:
        assert preview.format == "PNG" and preview.size[0] > 500 and preview.size[1] > 300
    # The cohort holds exactly what the Python API generates for the same seed.
    decoded = row_to_record(rows[1])
    direct = generate_subject(1, seed=1, voxel_size=4.0)
    np.testing.assert_array_equal(decoded.volumes["t1c"], direct.volumes["t1c"])
    assert decoded.findings == direct.findings


def test_cohort_refuses_to_overwrite_without_permission(tmp_path):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_cohort(out, 1, 0, voxel_size=8.0)
    assert cli.main(["phantom", str(out), "--subjects", "1", "--size", "8", "--quiet"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("kwargs, message", [
    ({"num_subjects": 0}, "positive integer"),
    ({"num_subjects": -3}, "positive integer"),
    ({"num_subjects": 2, "field_strength": 2.0}, "field strength"),
    ({"num_subjects": 2, "voxel_size": 0.0}, "voxel size"),
    ({"num_subjects": 2, "seed": -1}, "seed"),
])
def test_bad_cohort_arguments_raise_clear_errors_and_write_nothing(tmp_path, kwargs, message):
    params = {"seed": 0, "voxel_size": 8.0, **kwargs}
    out = tmp_path / "cohort"
    with pytest.raises(ValueError, match=message):
        generate_cohort(out, **params)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_subject_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="field strength"):
        generate_subject(0, 0, VOXEL, field_strength=7)
    with pytest.raises(ValueError, match="unknown lesion class"):
        generate_subject(0, 0, VOXEL, lesion_class="lymphoma")
    with pytest.raises(ValueError, match="subject index"):
        generate_subject(-1, 0, VOXEL)


@pytest.mark.parametrize("argv, message", [
    (["--subjects", "0"], "positive integer"),
    (["--field", "2"], "field strength must be 1.5 or 3"),
    (["--size", "-1"], "voxel size"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["phantom", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_default_cohort_is_generated_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIBRAIN_CACHE", str(tmp_path / "env-cache"))
    assert default_cohort_dir(num_subjects=2, voxel_size=8.0).is_relative_to(tmp_path / "env-cache" / "phantom")
    path = ensure_default_cohort(cache_dir=tmp_path / "cache", num_subjects=2, voxel_size=8.0)
    assert path == default_cohort_dir(tmp_path / "cache", num_subjects=2, voxel_size=8.0)
    assert path.is_relative_to(tmp_path / "cache" / "phantom")
    stamp = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert ensure_default_cohort(cache_dir=tmp_path / "cache", num_subjects=2, voxel_size=8.0) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamp
    assert default_cohort_dir(tmp_path / "cache", num_subjects=2, voxel_size=8.0, seed=1) != path
