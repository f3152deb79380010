"""Tests for the evaluation report writers (panels, JSON, Markdown, NIfTI).

    python -m pytest tests/test_report.py -q
"""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from unibrain_hf.evaluation.report import (
    difference_map,
    markdown_table,
    save_nifti_like,
    save_panel,
    to_display_uint8,
    write_metrics_json,
    write_summary_markdown,
)


def _leftovers(folder):
    """Temporary files an atomic writer would leave behind on failure."""
    return [path.name for path in folder.iterdir() if path.name.startswith(".")]


def test_difference_map_does_not_wrap_uint8():
    gt = np.array([[10, 250]], np.uint8)
    pred = np.array([[250, 10]], np.uint8)
    difference = difference_map(gt, pred)
    assert difference.dtype == np.uint8
    assert difference.tolist() == [[240, 240]]
    assert difference_map(np.array([0.25]), np.array([1.0])).tolist() == [0.75]
    with pytest.raises(ValueError, match="shapes differ"):
        difference_map(gt, pred[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        difference_map(np.array([np.nan]), np.array([0.0]))


def test_save_panel_layout_pixels_and_labels(tmp_path):
    first = np.full((8, 10), 50, np.uint8)
    second = np.linspace(0, 1, 12 * 20).reshape(12, 20)  # float in [0, 1]
    third = np.full((16, 30), 255, np.uint8)
    path = save_panel(tmp_path / "out" / "panel.png", [("inputs", first), ("imputed", second), ("|difference|", third)], gap=4, label_height=16)
    with Image.open(path) as panel:
        assert panel.format == "PNG"
        assert panel.size == (10 + 20 + 30 + 2 * 4, 16 + 16)
        pixels = np.asarray(panel)
    assert (pixels[16:24, 0:10] == 50).all()
    assert (pixels[24:, 0:10] == 0).all()  # shorter column padded with black below
    assert np.array_equal(pixels[16:28, 14:34], to_display_uint8(second))
    assert (pixels[16:32, 38:68] == 255).all()
    assert pixels[:16, 38:68].max() > 0  # the label was drawn
    assert (pixels[:, 10:14] == 0).all()  # the gap stays black
    assert _leftovers(tmp_path / "out") == []


def test_save_panel_scale_and_bad_columns(tmp_path):
    path = save_panel(tmp_path / "scaled.png", [("a", np.zeros((4, 5), np.uint8)), ("b", np.zeros((4, 5), np.uint8))], gap=2, scale=3)
    with Image.open(path) as panel:
        assert panel.size == (3 * 10 + 2, 16 + 12)
    with pytest.raises(ValueError, match="non-empty list"):
        save_panel(tmp_path / "x.png", [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_panel(tmp_path / "x.png", [("raw", np.full((4, 4), 200.0))])
    with pytest.raises(ValueError, match="2-D"):
        save_panel(tmp_path / "x.png", [("rgb", np.zeros((4, 4, 3), np.uint8))])
    with pytest.raises(ValueError, match="pair"):
        save_panel(tmp_path / "x.png", [np.zeros((4, 4), np.uint8)])
    assert not (tmp_path / "x.png").exists()


def test_write_metrics_json_is_strict_and_atomic(tmp_path):
    path = tmp_path / "metrics.json"
    metrics = {"psnr": np.float32(27.5), "psnr_identical": float("inf"), "per_subject": np.array([1.0, 2.0]), "n": np.int64(3)}
    write_metrics_json(path, metrics)

    def reject_constant(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    loaded = json.loads(path.read_text(), parse_constant=reject_constant)
    assert loaded == {"psnr": 27.5, "psnr_identical": "inf", "per_subject": [1.0, 2.0], "n": 3}
    assert float(loaded["psnr_identical"]) == float("inf")

    with pytest.raises(ValueError, match="JSON cannot represent"):
        write_metrics_json(path, {"bad": object()})
    assert json.loads(path.read_text())["n"] == 3  # the earlier file survives a failed write
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="mapping"):
        write_metrics_json(path, [1, 2])


def test_markdown_table_and_summary(tmp_path):
    rows = [
        {"setting": "t1n,t2w -> t2f", "PSNR": 24.123456, "SSIM": 0.81},
        {"setting": "a|b", "PSNR": float("inf")},
    ]
    table = markdown_table(rows, ["setting", "PSNR", "SSIM"])
    lines = table.splitlines()
    assert lines[0] == "| setting | PSNR | SSIM |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| t1n,t2w -> t2f | 24.1235 | 0.8100 |"
    assert lines[3] == "| a\\|b | inf |  |"  # pipe escaped, missing key left empty
    with pytest.raises(ValueError, match="columns"):
        markdown_table(rows, [])
    with pytest.raises(ValueError, match="dict"):
        markdown_table([["x"]], ["a"])

    path = write_summary_markdown(tmp_path / "summary.md", "Generation results", {"Phantom test split": table}, ["Means over subjects."])
    text = path.read_text()
    assert text.startswith("# Generation results\n")
    assert "## Phantom test split" in text
    assert "| setting | PSNR | SSIM |" in text
    assert "- Means over subjects." in text
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="title"):
        write_summary_markdown(tmp_path / "bad.md", "", {})


def test_save_nifti_like_keeps_reference_geometry(tmp_path):
    affine = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
    reference = nib.Nifti1Image(np.zeros((6, 7, 8), np.float32), affine)
    reference.header.set_xyzt_units("mm", "sec")
    reference.header.set_slope_inter(2.0, 5.0)  # must not rescale the values we write
    nib.save(reference, tmp_path / "reference.nii.gz")

    volume_xyz = np.random.default_rng(0).integers(0, 256, (6, 7, 8)).astype(np.uint8)
    path = save_nifti_like(tmp_path / "gen.nii.gz", volume_xyz, tmp_path / "reference.nii.gz")
    written = nib.load(path)
    assert np.allclose(written.affine, affine)
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), volume_xyz)

    # (z, y, x) arrays, as in our parquet data, are transposed like SimpleITK does.
    volume_zyx = volume_xyz.transpose(2, 1, 0)
    from_zyx = nib.load(save_nifti_like(tmp_path / "zyx.nii", volume_zyx, reference, array_order="zyx"))
    assert np.array_equal(np.asarray(from_zyx.dataobj), volume_xyz)

    from_affine = nib.load(save_nifti_like(tmp_path / "affine.nii.gz", volume_xyz, affine))
    assert np.allclose(from_affine.affine, affine)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "name, array, reference_kind, kwargs, message",
    [
        ("bad.nii.gz", np.zeros((6, 7, 9), np.uint8), "image", {}, "does not match"),
        ("bad.nii.gz", np.zeros((6, 7, 8), np.uint8), "image", {"array_order": "yxz"}, "array_order"),
        ("bad.png", np.zeros((6, 7, 8), np.uint8), "affine", {}, ".nii"),
        ("bad.nii", np.zeros((6, 7, 8), np.uint8), "bad_affine", {}, "4x4"),
        ("bad.nii", np.full((6, 7, 8), np.nan), "affine", {}, "NaN"),
    ],
)
def test_save_nifti_like_rejects_bad_input(tmp_path, name, array, reference_kind, kwargs, message):
    reference = {
        "image": nib.Nifti1Image(np.zeros((6, 7, 8), np.float32), np.eye(4)),
        "affine": np.eye(4),
        "bad_affine": np.eye(3),
    }[reference_kind]
    with pytest.raises(ValueError, match=message):
        save_nifti_like(tmp_path / name, array, reference, **kwargs)
    assert not (tmp_path / name).exists()
