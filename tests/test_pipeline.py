"""UniBrainPipeline on tiny random components: tasks, output shapes, determinism, save/load, the scheduler.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_pipeline.py -q
"""

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_pipeline import mri_slice, tiny_pipeline
from unibrain_hf import UniBrainPipeline, UniBrainPipelineOutput
from unibrain_hf.pipelines.sampler import combine_guidance, flow_sigmas

FAST = dict(num_inference_steps=1, max_new_tokens=3)


@pytest.fixture(scope="module")
def pipe(converted_fixture):
    return tiny_pipeline(converted_fixture / "tokenizer")


def test_generation_outputs_align_with_input(pipe):
    out = pipe(images={"t1n": mri_slice()}, target_modalities=["t2w", "SWI"], task="generation",
               generator=torch.Generator().manual_seed(0), **FAST)
    assert isinstance(out, UniBrainPipelineOutput)
    assert list(out.images) == ["t2w", "SWI"]
    (image,) = out.images["t2w"]  # a batch of one row
    assert image.mode == "L" and image.size == (40, 30)


@pytest.mark.parametrize("output_type, shape", [("np", (1, 30, 40)), ("pt", (1, 1, 30, 40)),
                                                ("latent", (1, 16, 4, 6)), ("pil", None)])
def test_output_types_are_diffusers_batches(pipe, output_type, shape):
    images = pipe(images={"t1n": mri_slice()}, target_modalities="t2w", output_type=output_type,
                  generator=torch.Generator().manual_seed(0), **FAST).images
    if output_type == "pil":
        assert isinstance(images, list) and len(images) == 1 and images[0].size == (40, 30)
    else:  # latent: the grid at the padded model size 32×48 → 16 × 4 × 6
        assert tuple(images.shape) == shape
    if output_type == "np":
        assert images.dtype == np.float32 and 0 <= images.min() <= images.max() <= 1


def test_rgb_input_gives_rgb_output(pipe):
    rgb = np.random.default_rng(1).integers(0, 255, size=(32, 48, 3), dtype=np.uint8)
    out = pipe(images={"t1n": Image.fromarray(rgb)}, target_modalities="t2w", output_type="np", **FAST)
    assert out.images.shape == (1, 32, 48, 3)
    assert pipe(images={"t1n": rgb}, target_modalities="t2w", output_type="pt", **FAST).images.shape == (1, 3, 32, 48)


def test_same_seed_same_output_and_tuple_return(pipe):
    kwargs = dict(images={"t1n": torch.from_numpy(mri_slice())}, target_modalities=["t2f"], output_type="np", **FAST)
    first = pipe(generator=torch.Generator().manual_seed(3), **kwargs).images["t2f"]
    second = pipe(generator=torch.Generator().manual_seed(3), return_dict=False, **kwargs)[0]["t2f"]
    other = pipe(generator=torch.Generator().manual_seed(4), **kwargs).images["t2f"]
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_text_tasks(pipe):
    images = {"t1n": mri_slice(0), "t2w": mri_slice(1)}
    diagnosis = pipe(images=images, task="diagnosis", **FAST)
    assert isinstance(diagnosis.diagnosis[0], str) and diagnosis.images == {}
    assert len(diagnosis.diagnosis_label) == 1
    assert isinstance(pipe(images=images, task="report", **FAST).impression[0], str)
    assert isinstance(pipe(images=images, task="answer", prompt="Is there a lesion?", **FAST).answer[0], str)


def test_unified_task_thinks_and_chains(pipe):
    steps = []
    out = pipe(images={"t1n": mri_slice()}, target_modalities=["t2w", "t2f"], task="unified",
               callback_on_step_end=lambda p, i, t, kw: steps.append(
                   (kw["target_modality"], kw["context"].gen.rope, kw["context"].cfg_img.kv_len)) or {},
               callback_on_step_end_tensor_inputs=["target_modality", "context"], **FAST)
    assert set(out.thinking) == {"t2w", "t2f"} and isinstance(out.impression[0], str)
    assert isinstance(out.diagnosis[0], str)
    # the second target sees the first generated image (VAE + ViT blocks, 2 RoPE positions more)
    (first, rope_1, cfg_img_1), (second, rope_2, cfg_img_2) = steps
    assert (first, second) == ("t2w", "t2f")
    assert rope_2 > rope_1 + 2 and cfg_img_2 > cfg_img_1


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = UniBrainPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(images={"t1n": mri_slice()}, target_modalities=["t2w"], output_type="latent", **FAST)
    a = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images["t2w"]
    b = loaded(generator=torch.Generator().manual_seed(0), **kwargs).images["t2w"]
    assert torch.allclose(a, b, atol=1e-5)
    assert loaded.processor.vae_resize == pipe.processor.vae_resize


def test_pickle_only_component_is_refused_before_loading(pipe, tmp_path, monkeypatch):
    from unibrain_hf.errors import InvalidInputError, UnsafeFileError

    pipe.save_pretrained(tmp_path / "pipe")
    weights = tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # what a pickle-only folder looks like
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    with pytest.raises(UnsafeFileError, match="vae"):
        UniBrainPipeline.from_pretrained(tmp_path / "pipe")
    with pytest.raises(InvalidInputError, match="safetensors"):
        UniBrainPipeline.from_pretrained(tmp_path / "pipe", use_safetensors=False)


def test_converter_output_loads_in_bf16(converted_fixture):
    pipe = UniBrainPipeline.from_pretrained(converted_fixture, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model.dtype == torch.bfloat16
    out = pipe(images={"t1n": mri_slice()}, target_modalities="t2w", **FAST)
    assert out.images[0].size == (40, 30)


def test_model_cpu_offload(converted_fixture):
    # diffusers 0.42 refuses offload without an accelerator unless a device is named; with
    # device="cpu" the offload hooks are installed and the pipeline must still run through them.
    pipe = UniBrainPipeline.from_pretrained(converted_fixture)
    pipe.set_progress_bar_config(disable=True)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="accelerator"):
            pipe.enable_model_cpu_offload()
    pipe.enable_model_cpu_offload(device="cuda" if torch.cuda.is_available() else "cpu")
    out = pipe(images={"t1n": mri_slice()}, target_modalities="t2w", **FAST)
    assert out.images[0].size == (40, 30)


def test_flow_grid():
    grid = flow_sigmas(4, 3.0)
    assert grid[0] == 1 and grid[-1] == 0 and len(grid) == 5  # 4 steps = 5 grid points
    reference = torch.linspace(1, 0, 5)
    assert torch.equal(grid, 3.0 * reference / (1 + 2.0 * reference))
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_sigmas(0, 1.0)


def test_guidance_combination():
    v = torch.randn(1, 4, 8)
    assert torch.equal(combine_guidance(v, None, None, 1.0, 2.0, "global", 0.0), v)
    guided = combine_guidance(v, torch.zeros_like(v), torch.zeros_like(v), 3.0, 1.0, "channel", 0.0)
    assert torch.allclose(guided, v, atol=1e-6)  # renormalised back to the conditional norm
