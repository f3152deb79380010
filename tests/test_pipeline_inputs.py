"""What the pipeline accepts as input: slices, NIfTI volumes in any orientation, whole volumes, and bad input.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_pipeline_inputs.py -q
"""

import gzip

import numpy as np
import pytest
import torch

from tiny_pipeline import mri_slice, mri_volume, tiny_pipeline
from unibrain_hf.errors import CorruptFileError, InputFileNotFoundError, InvalidInputError
from unibrain_hf.pipelines import mri_io
from unibrain_hf.protocol.orientation import from_training_frame, to_training_frame, training_frame_nifti

nib = pytest.importorskip("nibabel")
FAST = dict(num_inference_steps=1, max_new_tokens=3)


@pytest.fixture(scope="module")
def pipe(converted_fixture):
    return tiny_pipeline(converted_fixture / "tokenizer")


def stored_versions(volume_zyx):
    """One training-frame volume stored as RAS, LPS, (z, y, x) = IPL, and LPS under an oblique affine."""
    from nibabel.affines import from_matvec

    xyz = volume_zyx.transpose(2, 1, 0)
    angle = np.deg2rad(17.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    versions = {
        "RAS": (xyz[::-1, ::-1, ::-1], np.diag([1.0, 1.0, 2.0, 1.0])),
        "LPS": (xyz[:, :, ::-1], np.diag([-1.0, -1.0, 2.0, 1.0])),
        "IPL": (volume_zyx, from_matvec(np.array([[0, 0, -1.0], [0, -1.0, 0], [-2.0, 0, 0]]), [0, 0, 0])),
        "oblique": (xyz[:, :, ::-1], from_matvec(tilt @ np.diag([-1.0, -1.0, 2.0]), [9.0, -4.0, 2.0])),
    }
    return {name: nib.Nifti1Image(np.ascontiguousarray(data), affine) for name, (data, affine) in versions.items()}


# --------------------------------------------------------------------------- orientation
def test_a_standard_nifti_reaches_the_model_as_the_training_slice():
    """What ``unibrain prepare --nifti-out`` writes: (x, y, z) voxels; the model must see volume_zyx[k]."""
    from unibrain_hf.processing.image_transforms import StrideResize

    volume = mri_volume()
    written = training_frame_nifti(volume, (1.0, 1.0, 3.0))
    assert written.shape == (40, 30, 6)  # (x, y, z) on disk
    from_nifti = mri_io.load_slice(written, "t1n", StrideResize(64, 32, 16), slice_index=2)
    from_array = mri_io.load_slice(mri_io.load_volume(written, "t1n").plane(2, "axial"), "t1n",
                                   StrideResize(64, 32, 16))
    assert from_nifti.original_size == (30, 40)  # rows = y (anterior → posterior), columns = x
    assert np.array_equal(from_nifti.rgb, from_array.rgb)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_every_storage_order_gives_identical_model_inputs_and_outputs(pipe, monkeypatch, axis):
    volume = mri_volume(3)
    seen = {}
    original = pipe.encode_images

    def spy(rgb_images, *args, **kwargs):
        seen.setdefault(name, []).append(np.stack(rgb_images).copy())
        return original(rgb_images, *args, **kwargs)

    monkeypatch.setattr(pipe, "encode_images", spy)
    outputs = {}
    for name, image in stored_versions(volume).items():
        outputs[name] = pipe(images={"t1n": image}, target_modalities="t2w", slice_index=2, axis=axis,
                             output_type="np", generator=torch.Generator().manual_seed(0), **FAST).images
    expected = mri_io.load_slice(training_frame_nifti(volume), "x", pipe.processor.vae_resize, 2, axis).rgb
    for name in outputs:
        assert np.array_equal(seen[name][0][0], expected), name  # the training-frame plane, nothing else
        assert np.array_equal(seen[name][0], seen["RAS"][0]), name
        assert np.array_equal(outputs[name], outputs["RAS"]), name


def test_impute_volume_maps_results_back_onto_each_input_grid(pipe, tmp_path):
    volume = mri_volume(4, shape=(4, 30, 40))
    canonical = None
    for name, image in stored_versions(volume).items():
        path = tmp_path / f"{name}.nii.gz"
        nib.save(image, str(path))
        image = nib.load(str(path))  # the affine as stored (float32 in the header)
        out = pipe.impute_volume({"t1n": str(path)}, "t2w", batch_size=3, num_inference_steps=1,
                                 generator=torch.Generator().manual_seed(0))["t2w"]
        assert out.shape == image.shape and np.array_equal(out.affine, image.affine), name
        data = np.asarray(out.dataobj)
        assert data.dtype == np.uint8
        in_frame = to_training_frame(data, out.affine)
        assert in_frame[0].max() == 0  # the empty top slice is not generated
        if canonical is None:
            canonical = in_frame
        assert np.array_equal(in_frame, canonical), name  # same result in the training frame
        assert np.array_equal(data, from_training_frame(canonical, image.affine)), name  # exactly mapped back


def test_impute_volume_batches_slices_and_writes_atomically(pipe, tmp_path):
    volume = mri_volume(0, shape=(4, 30, 20))
    nib.save(training_frame_nifti(volume), str(tmp_path / "t1n.nii.gz"))
    calls = []
    original = pipe._run
    pipe._run = lambda prepared, *a, **k: calls.append(len(prepared)) or original(prepared, *a, **k)
    try:
        out = pipe.impute_volume({"t1n": str(tmp_path / "t1n.nii.gz")}, ["t2w"], batch_size=2,
                                 output_dir=tmp_path / "out", num_inference_steps=1,
                                 generator=torch.Generator().manual_seed(0))
    finally:
        del pipe._run
    assert calls == [2, 1]  # 3 non-empty slices in batches of 2
    written = nib.load(str(tmp_path / "out" / "t2w.nii.gz"))
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(out["t2w"].dataobj))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t2w.nii.gz"]  # no temporary left behind


def test_slice_index_is_checked_against_the_training_frame(pipe):
    image = training_frame_nifti(mri_volume())
    with pytest.raises(InvalidInputError, match=r"axial axis has 6 slices"):
        pipe(images={"t1n": image}, slice_index=6, target_modalities="t2w", **FAST)
    with pytest.raises(InvalidInputError, match="pass slice_index"):
        pipe(images={"t1n": image}, target_modalities="t2w", **FAST)
    with pytest.raises(InvalidInputError, match="axis must be one of"):
        pipe(images={"t1n": image}, slice_index=1, axis=2, target_modalities="t2w", **FAST)
    with pytest.raises(InvalidInputError, match="no input .* is a volume"):
        pipe(images={"t1n": mri_slice()}, slice_index=1, target_modalities="t2w", **FAST)
    # a row may mix a volume with a 2-D slice of the same plane: slice_index concerns the volume
    mixed = pipe(images={"t1n": image, "t2w": mri_slice()}, slice_index=1, target_modalities="t2f", **FAST)
    assert mixed.images[0].size == (40, 30)


# --------------------------------------------------------------------------- inputs that work
def test_a_bare_string_target_is_one_target(pipe):
    out = pipe(images={"t1n": mri_slice()}, target_modalities="t2w", output_type="np", **FAST)
    assert isinstance(out.images, np.ndarray) and out.images.shape == (1, 30, 40)
    assert out.thinking is None


@pytest.mark.parametrize("value", [np.arange(30 * 40).reshape(30, 40) % 7 > 2,
                                   torch.from_numpy(np.arange(30 * 40).reshape(30, 40) % 7 > 2)])
def test_a_bool_mask_is_a_0_255_image(value):
    from unibrain_hf.processing.image_transforms import StrideResize

    prepared = mri_io.load_slice(value, "images['t1n']", StrideResize(64, 32, 16))
    assert set(np.unique(prepared.rgb)) == {0, 255}


# --------------------------------------------------------------------------- bad input
def _corrupt(path):
    path.write_bytes(gzip.compress(b"\x00" * 64)[:-8] + b"garbage!")


def _truncated(path):
    nib.save(training_frame_nifti(mri_volume()), str(path))
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("value, error, message", [
    (np.array([["a", "b"], ["c", "d"]]), InvalidInputError, r"images\['t1n'\] has dtype <U1"),
    (np.array([[object(), 1], [2, 3]], dtype=object), InvalidInputError, r"images\['t1n'\] has dtype object"),
    (mri_slice().astype(np.complex64), InvalidInputError, r"images\['t1n'\] is complex"),
    (torch.from_numpy(mri_slice()).to(torch.complex64), InvalidInputError, "is complex"),
    (np.full((30, 40), np.nan, np.float32), InvalidInputError, "NaN"),
    (np.ones((30, 40), np.float32), InvalidInputError, "constant"),
    (np.ones((2, 30, 40, 5), np.float32), InvalidInputError, "2-D"),
    ("missing.nii.gz", InputFileNotFoundError, r"images\['t1n'\] \(missing.nii.gz\) does not exist"),
    ("slice.png", InvalidInputError, "not a NIfTI file"),
    ([1, 2, 3], InvalidInputError, "unsupported type list"),
])
def test_bad_inputs_are_refused_by_name_before_model_work(pipe, monkeypatch, value, error, message):
    monkeypatch.setattr(pipe, "new_context", lambda *a: pytest.fail("model work started"))
    with pytest.raises(error, match=message):
        pipe(images={"t1n": value}, target_modalities="t2w", slice_index=0 if isinstance(value, str) else None,
             **FAST)


@pytest.mark.parametrize("damage", [_corrupt, _truncated])
def test_damaged_nifti_names_the_file_and_the_key(pipe, monkeypatch, tmp_path, damage):
    monkeypatch.setattr(pipe, "new_context", lambda *a: pytest.fail("model work started"))
    path = tmp_path / "t1n.nii.gz"
    damage(path)
    with pytest.raises(CorruptFileError) as caught:
        pipe(images={"t1n": str(path)}, slice_index=0, target_modalities="t2w", **FAST)
    assert "images['t1n']" in str(caught.value) and str(path) in str(caught.value)
    with pytest.raises(CorruptFileError, match=r"nifti_in\['t1n'\]"):
        pipe.impute_volume({"t1n": str(path)}, "t2w", **FAST)


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="painting"), "task"),
    (dict(images={}), "images"),
    (dict(target_modalities=["t1n"]), "target_modalities"),
    (dict(target_modalities=["t2w", "t2w"]), "duplicates"),
    (dict(target_modalities=3), "target_modalities"),
    (dict(images={"t1n": mri_slice(), "t2f": mri_slice(shape=(32, 40))}), "shape"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=True), "num_inference_steps"),
    (dict(cfg_renorm_type="per_pixel"), "cfg_renorm_type"),
    (dict(cfg_interval=(0.9, 0.1)), "cfg_interval"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(task="answer", target_modalities=None), "prompt"),
    (dict(task="diagnosis", target_modalities=None, think=True), "think"),
    (dict(latents=torch.zeros(3, 64)), "latents"),
    (dict(posterior_eps={"t2w": torch.zeros(1)}), "posterior_eps"),
    (dict(generator=0), "generator"),
])
def test_bad_arguments_are_rejected_before_model_work(pipe, kwargs, message, monkeypatch):
    monkeypatch.setattr(pipe, "new_context", lambda *a: pytest.fail("model work started"))
    call = dict(images={"t1n": mri_slice()}, target_modalities="t2w", **FAST)
    call.update(kwargs)
    with pytest.raises(InvalidInputError, match=message):
        pipe(**call)


@pytest.mark.parametrize("kwargs, message", [
    (dict(nifti_in=[]), "nifti_in must be a dict"),
    (dict(batch_size=0), "batch_size"),
    (dict(output_type="pil"), "does not take 'output_type'"),
    (dict(task="diagnosis"), "impute_volume runs"),
    (dict(colour="red"), "unknown settings"),
    (dict(generator=[torch.Generator()]), "one torch.Generator"),
])
def test_bad_volume_arguments(pipe, kwargs, message):
    call = dict(nifti_in={"t1n": training_frame_nifti(mri_volume())}, target_modalities="t2w")
    call.update(kwargs)
    with pytest.raises(InvalidInputError, match=message):
        pipe.impute_volume(**call)
