"""``unibrain prepare``: NIfTI folders + reports -> reoriented, 1 mm in-plane, de-identified parquet.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_prepare.py -q
"""

from __future__ import annotations

import gzip
import json
import re

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from unibrain_hf.cli import main as unibrain_main
from unibrain_hf.data.prepare import (
    PrepareError,
    Volume,
    VolumeError,
    load_reports,
    load_volume,
    prepare_cohort,
    pseudonymise,
    resample_in_plane,
    sitk_geometry,
    split_subjects,
)
from unibrain_hf.data.radgenome import iter_subject_records
from unibrain_hf.data.schema import SPLIT_FILE_NAME

SHAPE = (20, 24, 10)                  # (x, y, z) voxels as stored, RAS
ZOOMS = (1.2, 1.2, 3.0)               # mm
RESAMPLED_ZYX = (10, 29, 24)          # z kept; round(24 * 1.2) = 29 rows, round(20 * 1.2) = 24 columns
LPI_DIRECTION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # SimpleITK LPS convention
HEADER_SECRETS = {"descrip": "SECRET-DESCRIP-JaneDoe", "db_name": "SECRET-DBNAME",
                  "aux_file": "SECRET-AUXFILE", "intent_name": "SECRET-INTENT"}
MARKER = 1000.0

GLI, MEN, MET = "BraTS-GLI-00001-000", "BraTS-MEN-00002-000", "BraTS-MET-00003-000"
NO_REPORT, UNREADABLE, MISALIGNED = "BraTS-GLI-00004-000", "BraTS-GLI-00005-000", "BraTS-GLI-00006-000"
REPORTS = {
    GLI: {"findings": {"FLAIR": "hyperintense lesion 3 x 2 x 2 cm", "t1n": "hypointense"},
          "impression": "left frontal mass", "diagnosis": ["glioma", "edema"]},
    MEN: {"findings": {"t2": "extra-axial mass"}, "impression": "meningioma", "diagnosis": "meningioma"},
    MET: {"impression": "multiple lesions", "diagnosis": "metastasis"},
    UNREADABLE: {"impression": "x"},
    MISALIGNED: {"impression": "y"},
}


def phantom(seed: int, shape=SHAPE) -> np.ndarray:
    data = np.random.default_rng(seed).uniform(1.0, 100.0, shape).astype(np.float32)
    data[0, 0, -1] = MARKER  # RAS storage: first x = most Left, first y = most Posterior, last z = most Superior
    return data


def ras_image(data: np.ndarray) -> nib.Nifti1Image:
    affine = np.diag([*ZOOMS, 1.0])
    affine[:3, 3] = [-12.0, -14.0, -15.0]
    return nib.Nifti1Image(data, affine)


def save(image: nib.Nifti1Image, path) -> None:
    for name, value in HEADER_SECRETS.items():
        image.header[name] = value.encode()
    nib.save(image, path)


def stored_as(image: nib.Nifti1Image, axcodes) -> nib.Nifti1Image:
    """The same physical image with its voxel axes stored in another order/direction."""
    current = nib.orientations.io_orientation(image.affine)
    return image.as_reoriented(nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(axcodes)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    src = root / "nifti"
    for subject in (GLI, MEN, MET, NO_REPORT, UNREADABLE, MISALIGNED):
        (src / subject).mkdir(parents=True)
    save(ras_image(phantom(1)), src / GLI / f"{GLI}-t1n.nii.gz")
    save(ras_image(phantom(2)), src / GLI / f"{GLI}-flair.nii.gz")
    seg = np.zeros(SHAPE, np.float32)
    seg[5:9, 6:12, 3:6] = 2.0
    seg[6:8, 8:10, 4] = 1.0
    save(ras_image(seg), src / GLI / f"{GLI}-seg.nii.gz")
    # Same anatomy as GLI, stored posterior-right-inferior with x and y swapped, alias file names.
    save(stored_as(ras_image(phantom(1)), ("P", "R", "I")), src / MEN / "t1.nii")
    save(stored_as(ras_image(phantom(3)), ("P", "R", "I")), src / MEN / "T2.nii.gz")
    save(stored_as(ras_image(seg), ("P", "R", "I")), src / MEN / "lesion_mask.nii.gz")
    save(ras_image(phantom(4)), src / MET / f"{MET}-t1n.nii.gz")
    save(ras_image(phantom(5)), src / MET / f"{MET}-t1c.nii.gz")
    with_nan = phantom(6)
    with_nan[3, 3, 3] = np.nan
    save(ras_image(with_nan), src / MET / f"{MET}-t2w.nii.gz")
    save(ras_image(phantom(7)), src / MET / f"{MET}-swi.nii.gz")
    (src / MET / "notes.txt").write_text("ignored")
    save(ras_image(phantom(8)), src / NO_REPORT / "t1n.nii.gz")
    save(ras_image(phantom(9)), src / NO_REPORT / "t2w.nii.gz")
    save(ras_image(phantom(10)), src / UNREADABLE / "t1n.nii.gz")
    (src / UNREADABLE / "t2f.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    save(ras_image(phantom(11)), src / MISALIGNED / "t1n.nii.gz")
    save(ras_image(phantom(12, shape=(20, 24, 12))), src / MISALIGNED / "t2w.nii.gz")
    reports = root / "reports.json"
    reports.write_text(json.dumps(REPORTS))
    return root, src, reports


@pytest.fixture(scope="module")
def prepared(inputs):
    root, src, reports = inputs
    report = prepare_cohort(src, reports, root / "cohort", split_fractions=(1.0, 0.0, 0.0))
    return report, {r.subject_id: r for r in iter_subject_records(root / "cohort")}


def test_valid_subjects_are_written_on_one_lpi_1mm_grid(prepared):
    report, records = prepared
    assert sorted(report.written) == [GLI, MEN, MET] and set(records) == {GLI, MEN, MET}
    for record in records.values():
        assert record.shape_zyx == RESAMPLED_ZYX
        assert record.spacing == (1.0, 1.0, 3.0)
        assert list(record.direction) == LPI_DIRECTION
    assert records[GLI].modalities == ["t1n", "t2f"]          # flair -> t2f
    assert records[MEN].modalities == ["t1n", "t2w"]          # t1 -> t1n, T2 -> t2w
    assert records[MET].modalities == ["t1n", "t1c"]          # NaN t2w and unknown swi left out
    # Orientation: the same anatomy stored two ways ends up identical, and L-P-S lands where
    # LPI puts it: first slice (superior), last row (posterior), last column (left).
    np.testing.assert_array_equal(records[GLI].volumes["t1n"], records[MEN].volumes["t1n"])
    assert records[GLI].volumes["t1n"][0, -1, -1] == MARKER
    assert records[GLI].volumes["t1n"].dtype == np.float32


def test_mask_is_resampled_with_nearest_neighbour(prepared):
    _, records = prepared
    mask = records[GLI].mask
    assert mask.shape == RESAMPLED_ZYX and set(np.unique(mask)) == {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(records[MEN].mask, mask)  # same mask, stored in another orientation
    assert records[MET].mask is None


def test_reports_are_attached_per_sequence(prepared):
    _, records = prepared
    gli = records[GLI]
    assert gli.findings == {"t1n": "hypointense", "t2f": "hyperintense lesion 3 x 2 x 2 cm"}
    assert gli.impression == "left frontal mass" and gli.disease == ["glioma", "edema"]
    assert records[MEN].findings == {"t1n": "", "t2w": "extra-axial mass"}
    assert records[MEN].disease == ["meningioma"]


def test_every_problem_is_reported_with_its_reason(prepared, inputs):
    report, _ = prepared
    _, src, _ = inputs
    reasons = {path.replace(str(src) + "/", ""): reason for path, reason in report.problems}
    expected = {
        f"{MET}/{MET}-t2w.nii.gz": "NaN/Inf",
        f"{MET}/{MET}-swi.nii.gz": "unknown sequence code 'swi'",
        NO_REPORT: "no report for subject",
        f"{UNREADABLE}/t2f.nii.gz": "unreadable NIfTI",
        UNREADABLE: "1 usable sequence(s) ['t1n'], at least 2 needed",
        MISALIGNED: "not on the t1n grid",
    }
    assert set(reasons) == set(expected)
    for path, fragment in expected.items():
        assert fragment in reasons[path], (path, reasons[path])
    assert "problem(s)" in report.summary() and NO_REPORT in report.summary()


def test_hashed_ids_keep_the_class_marker_and_no_identifier_reaches_the_output(inputs):
    root, src, reports = inputs
    report = prepare_cohort(src, reports, root / "hashed", hash_subject_ids=True, salt="s3cret",
                            keep_pattern=r"-(GLI|MEN|MET)-", split_fractions=(0.34, 0.33, 0.33),
                            nifti_dir=root / "hashed-nifti")
    assert all(re.fullmatch(r"(GLI|MEN|MET)-[0-9a-f]{16}", i) for i in report.written)
    assert report.id_map[GLI] == pseudonymise(GLI, "s3cret", r"-(GLI|MEN|MET)-")
    assert report.id_map[GLI] != pseudonymise(GLI, "other-salt", r"-(GLI|MEN|MET)-")
    split = json.loads((root / "hashed" / SPLIT_FILE_NAME).read_text())
    assert sorted(sum(split.values(), [])) == sorted(report.written) and all(split.values())

    forbidden = [*HEADER_SECRETS.values(), GLI, MEN, MET, "00001"]
    written_files = [p for p in [*(root / "hashed").rglob("*"), *(root / "hashed-nifti").rglob("*")] if p.is_file()]
    for path in written_files:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        for text in forbidden:
            assert text.encode() not in raw, (text, path)
    for parquet in (root / "hashed").glob("*.parquet"):  # decompressed column values too
        table_text = json.dumps(pq.read_table(parquet).drop(["image_list", "mask"]).to_pylist())
        assert not any(text in table_text for text in forbidden)
        assert set(json.loads(pq.read_table(parquet)["header_metadata"][0].as_py())) == {"spacing", "direction", "size"}
    copy = nib.load(next((root / "hashed-nifti").rglob("*-t1n.nii.gz")))
    assert all(copy.header[name].item() in (b"", "") for name in HEADER_SECRETS)
    assert copy.shape == RESAMPLED_ZYX[::-1]


def test_no_usable_subject_raises_and_writes_nothing(inputs, tmp_path):
    _, src, _ = inputs
    reports = tmp_path / "reports.csv"
    reports.write_text("subject_id,impression\nsomeone-else,none\n")
    with pytest.raises(PrepareError, match="no usable subject") as error:
        prepare_cohort(src, reports, tmp_path / "out")
    assert len(error.value.problems) >= 6
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [reports]


def test_existing_output_is_not_replaced_without_overwrite(inputs, tmp_path):
    _, src, reports = inputs
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_cohort(src, reports, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()


def test_csv_reports_with_aliases_and_several_diagnoses(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_text("\ufeffsubject_id,impression,diagnosis,finding_flair,finding_t1c\n"
                    'S1,"mass, left",glioma; edema,bright,enhancing\nS2,,,,\n', encoding="utf-8")
    reports = load_reports(path)
    assert reports["S1"].findings == {"t2f": "bright", "t1c": "enhancing"}
    assert reports["S1"].disease == ["glioma", "edema"] and reports["S1"].impression == "mass, left"
    assert reports["S2"].findings == {} and reports["S2"].disease == []
    path.write_text("subject_id,finding_swi\nS1,x\n")
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['finding_swi'\]"):
        load_reports(path)
    bad_json = tmp_path / "reports.json"
    bad_json.write_text(json.dumps({"S1": {"impresion": "typo"}}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['impresion'\]"):
        load_reports(bad_json)


def test_volumes_that_are_not_3d_are_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 3), np.float32), np.eye(4)), tmp_path / "series.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 1), np.float32), np.eye(4)), tmp_path / "trailing.nii.gz")
    with pytest.raises(VolumeError, match="2-D image"):
        load_volume(tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeError, match="4-D image with 3 volumes"):
        load_volume(tmp_path / "series.nii.gz")
    assert load_volume(tmp_path / "trailing.nii.gz").data.shape == (8, 8, 4)


def test_in_plane_resampling_keeps_slices_and_origin():
    affine = np.diag([0.5, 2.0, 4.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    volume = Volume(np.full((10, 5, 3), 7.0, np.float32), affine)
    resampled = resample_in_plane(volume)
    assert resampled.data.shape == (5, 10, 3)
    # Output row 9 samples input row 4.5, half a voxel past the last one: outside for ITK, so 0.
    np.testing.assert_allclose(resampled.data[:, :9], 7.0)
    np.testing.assert_allclose(resampled.data[:, 9], 0.0)
    np.testing.assert_allclose(nib.affines.voxel_sizes(resampled.affine), [1.0, 1.0, 4.0])
    np.testing.assert_allclose(resampled.affine[:3, 3], affine[:3, 3])


def test_split_is_seeded_and_complete():
    ids = [f"s{i}" for i in range(10)]
    split = split_subjects(ids, (0.8, 0.1, 0.1), seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [8, 1, 1]
    assert sorted(sum(split.values(), [])) == sorted(ids)
    assert split == split_subjects(list(reversed(ids)), (0.8, 0.1, 0.1), seed=0)
    assert split != split_subjects(ids, (0.8, 0.1, 0.1), seed=1)


def test_command_line(inputs, tmp_path, capsys):
    _, src, reports = inputs
    code = unibrain_main(["prepare", str(src), "--reports", str(reports), str(tmp_path / "out"),
                          "--split", "0.5", "0.5", "0", "--seed", "3", "--hash-ids", "--salt", "k"])
    assert code == 0
    out = capsys.readouterr().out
    assert "wrote 3 subject(s)" in out and "unknown sequence code 'swi'" in out
    assert unibrain_main(["prepare", str(src), "--reports", str(reports), str(tmp_path / "out2"),
                          "--split", "0.5", "0.5", "0.5"]) == 2
    assert "--split must be three" in capsys.readouterr().err and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("zooms, axcodes, shape", [
    ((1.2, 1.2, 3.0), ("R", "A", "S"), (20, 24, 10)),
    ((0.9, 0.7, 5.0), ("P", "R", "I"), (23, 17, 9)),
    ((0.5, 0.5, 1.0), ("A", "S", "L"), (30, 28, 7)),
])
def test_matches_the_reference_simpleitk_preprocessing(tmp_path, zooms, axcodes, shape):
    """DICOMOrient('LPI') + in-plane 1 mm linear resampling, as the reference script does it."""
    sitk = pytest.importorskip("SimpleITK")  # optional: the package itself does not need it
    affine = np.zeros((4, 4))
    for axis, (world_axis, flip) in enumerate(nib.orientations.axcodes2ornt(axcodes)):
        affine[int(world_axis), axis] = flip * zooms[axis]
    affine[:, 3] = [12.5, -30.0, 7.25, 1.0]
    image = nib.Nifti1Image(np.random.default_rng(0).uniform(1, 100, shape).astype(np.float32), affine)
    image.set_qform(affine, code=1)
    nib.save(image, tmp_path / "v.nii.gz")

    oriented = sitk.DICOMOrient(sitk.ReadImage(str(tmp_path / "v.nii.gz")), "LPI")
    spacing, size = oriented.GetSpacing(), oriented.GetSize()
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputSpacing((1.0, 1.0, spacing[2]))
    resampler.SetSize([int(np.round(size[0] * spacing[0])), int(np.round(size[1] * spacing[1])), size[2]])
    resampler.SetOutputDirection(oriented.GetDirection())
    resampler.SetOutputOrigin(oriented.GetOrigin())
    resampler.SetInterpolator(sitk.sitkLinear)
    expected = resampler.Execute(oriented)

    ours = resample_in_plane(load_volume(tmp_path / "v.nii.gz"))
    np.testing.assert_allclose(ours.data.transpose(2, 1, 0), sitk.GetArrayFromImage(expected), atol=1e-3)
    spacing_ours, direction_ours = sitk_geometry(ours.affine)
    np.testing.assert_allclose(spacing_ours, expected.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(direction_ours, expected.GetDirection(), atol=1e-6)
