"""diffusers' call contract on UniBrainPipeline: batches, steps, callbacks, properties, schedulers, saving.

Includes, as our own tests, every check of diffusers' ``PipelineTesterMixin`` that failed when it
was run against this pipeline (see docs/PIPELINE.md): those tests save with
``safe_serialization=False``, which this package refuses to load, so they are repeated here with
safetensors, and the refusal itself is tested.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_pipeline_contract.py -q
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from tiny_pipeline import mri_slice, tiny_components, tiny_pipeline
from unibrain_hf import UniBrainPipeline
from unibrain_hf.errors import InvalidInputError, UnsafeFileError
from unibrain_hf.pipelines.callbacks import UniBrainCFGCutoffCallback
from unibrain_hf.pipelines.sampler import flow_sigmas

FAST = dict(num_inference_steps=2, max_new_tokens=3)


@pytest.fixture(scope="module")
def pipe(converted_fixture):
    return tiny_pipeline(converted_fixture / "tokenizer")


def generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


# --------------------------------------------------------------------------- batches
def test_a_list_of_image_dicts_is_a_batch_and_each_row_equals_its_single_call(pipe):
    rows = [{"t1n": mri_slice(0)}, {"t1n": mri_slice(1)}, {"t1n": mri_slice(2)}]
    batch = pipe(images=rows, target_modalities=["t2w", "t2f"], generator=generators(0, 1, 2), output_type="np",
                 **FAST)
    assert batch.images["t2w"].shape == (3, 30, 40) and batch.images["t2f"].shape == (3, 30, 40)
    for index, row in enumerate(rows):
        single = pipe(images=row, target_modalities=["t2w", "t2f"], generator=generators(index)[0],
                      output_type="np", **FAST)
        for code in ("t2w", "t2f"):
            assert np.abs(single.images[code][0] - batch.images[code][index]).max() < 1e-4


def test_num_images_per_prompt_repeats_rows_in_diffusers_order(pipe):
    rows = [{"t1n": mri_slice(0)}, {"t1n": mri_slice(1)}]
    out = pipe(images=rows, target_modalities="t2w", num_images_per_prompt=2, generator=generators(5, 6, 7, 8),
               output_type="latent", **FAST)
    assert tuple(out.images.shape) == (4, 16, 4, 6)
    # row 1 = input 0 with the second generator; row 2 = input 1 with the third
    again = pipe(images=rows[1], target_modalities="t2w", generator=generators(7)[0], output_type="latent", **FAST)
    assert torch.allclose(again.images[0], out.images[2], atol=1e-5)
    assert not torch.allclose(out.images[0], out.images[1])  # every copy draws its own noise


def test_text_outputs_are_lists_per_row(pipe):
    out = pipe(images=[{"t1n": mri_slice(0)}, {"t1n": mri_slice(1)}], task="answer", prompt=["Lesion?", "Side?"],
               **FAST)
    assert isinstance(out.answer, list) and len(out.answer) == 2 and out.images == {}
    unified = pipe(images={"t1n": mri_slice()}, target_modalities=["t2w"], task="unified", num_images_per_prompt=2,
                   **FAST)
    assert len(unified.thinking["t2w"]) == 2 and len(unified.diagnosis) == 2 and len(unified.diagnosis_label) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=[{"t1n": mri_slice()}, {"t2w": mri_slice()}]), "same modalities"),
    (dict(images=[{"t1n": mri_slice()}, {"t1n": mri_slice(shape=(32, 40))}]), "slice shapes"),
    (dict(images=[{"t1n": mri_slice()}] * 2, generator=generators(0)), "list of 1 generators"),
    (dict(prompt=["a", "b"]), "prompt has 2 entries"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(images=[]), "empty list"),
])
def test_bad_batches_are_refused_before_model_work(pipe, monkeypatch, kwargs, message):
    monkeypatch.setattr(pipe, "new_context", lambda *a: pytest.fail("model work started"))
    call = dict(images={"t1n": mri_slice()}, target_modalities="t2w", **FAST)
    call.update(kwargs)
    with pytest.raises(InvalidInputError, match=message):
        pipe(**call)


# --------------------------------------------------------------------------- steps and the scheduler
def test_num_inference_steps_counts_denoising_steps(pipe):
    steps = []
    pipe(images={"t1n": mri_slice()}, target_modalities="t2w", num_inference_steps=4, max_new_tokens=3,
         callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == [0, 1, 2, 3] and pipe.num_timesteps == 4
    # The scheduler got UniBrain's grid through its own API: timesteps = sigmas × 1000, last sigma 0.
    grid = flow_sigmas(4, 3.0)
    assert torch.equal(pipe.scheduler.sigmas, grid)
    assert torch.allclose(pipe.scheduler.timesteps, grid[:-1] * 1000)


def test_num_grid_points_is_the_reference_count(pipe):
    call = dict(images={"t1n": mri_slice()}, target_modalities="t2w", output_type="latent", max_new_tokens=3)
    a = pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(0), **call).images
    b = pipe(num_grid_points=4, generator=torch.Generator().manual_seed(0), **call).images
    assert torch.equal(a, b)
    with pytest.raises(InvalidInputError, match="disagree"):
        pipe(num_inference_steps=4, num_grid_points=4, **call)


def test_another_flow_matching_scheduler_can_be_swapped_in(converted_fixture):
    from diffusers import FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler

    components = tiny_components(converted_fixture / "tokenizer")
    seen = []
    components["scheduler"] = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                      flow_shift=1.0)
    pipe = UniBrainPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(images={"t1n": mri_slice()}, target_modalities="t2w", output_type="np", num_inference_steps=3,
               callback_on_step_end=lambda p, i, t, kw: seen.append(int(t)) or kw)
    assert out.images.shape == (1, 30, 40) and len(seen) == 3
    assert seen == pipe.scheduler.timesteps.tolist() and np.isclose(float(pipe.scheduler.sigmas[1]),
                                                                     float(flow_sigmas(3, 3.0)[1]))
    # A scheduler that cannot take UniBrain's grid is named before any model work.
    pipe.scheduler = FlowMatchHeunDiscreteScheduler()
    with pytest.raises(InvalidInputError, match="FlowMatchHeunDiscreteScheduler"):
        pipe(images={"t1n": mri_slice()}, target_modalities="t2w", num_inference_steps=3)


def test_sampler_source_drives_the_scheduler_only_through_its_api():
    import unibrain_hf.pipelines.pipeline_unibrain as module
    import unibrain_hf.pipelines.sampler as sampler

    for path in (Path(module.__file__), Path(sampler.__file__)):
        assert not re.search(r"scheduler\.(sigmas|timesteps)\s*=[^=]", path.read_text()), path.name


# --------------------------------------------------------------------------- callbacks and properties
def test_properties_and_a_callback_that_raises_guidance_each_step(pipe):
    def more_guidance(pipeline, step, timestep, kwargs):
        pipeline._guidance_scale += 1.0
        return kwargs

    pipe(images={"t1n": mri_slice()}, target_modalities="t2w", guidance_scale=2.0, num_inference_steps=3,
         callback_on_step_end=more_guidance, max_new_tokens=3)
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps and pipe.do_classifier_free_guidance
    assert pipe.image_guidance_scale == 1.2 and pipe.interrupt is False


class _Recorder(PipelineCallback):
    """Records what each step evaluated; asks for the unconditional text velocity only."""

    tensor_inputs = ["v_uncond_text"]

    def __init__(self):
        super().__init__()
        self.keys, self.branches = [], []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.keys.append(sorted(callback_kwargs))
        self.branches.append(callback_kwargs["v_uncond_text"] is not None)
        return callback_kwargs


def test_cfg_cutoff_callback_in_multipipeline_callbacks(pipe):
    recorder = _Recorder()
    callbacks = MultiPipelineCallbacks([UniBrainCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1), recorder])
    pipe(images={"t1n": mri_slice()}, target_modalities=["t2w", "t2f"], num_inference_steps=4, cfg_interval=(0, 1),
         callback_on_step_end=callbacks, max_new_tokens=3)
    assert recorder.keys == [["v_uncond_text"]] * 8  # the callbacks' own tensor_inputs, not the argument's default
    # guidance off after step 1 of each image; every image starts with the call's scale again
    assert recorder.branches == [True, True, False, False] * 2
    assert pipe.guidance_scale == 0.0 and not pipe.do_classifier_free_guidance


def test_interrupt_skips_the_remaining_steps(pipe):
    steps = []

    def stop(pipeline, step, timestep, kwargs):
        steps.append(step)
        pipeline._interrupt = True
        return kwargs

    out = pipe(images={"t1n": mri_slice()}, target_modalities="t2w", num_inference_steps=4, output_type="latent",
               callback_on_step_end=stop, max_new_tokens=3)
    assert steps == [0] and pipe.interrupt and out.images.shape[0] == 1


def test_callback_can_replace_latents(pipe):
    def zero(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = pipe(images={"t1n": mri_slice()}, target_modalities=["t2w"], output_type="latent",
               callback_on_step_end=zero, **FAST)
    assert torch.count_nonzero(out.images["t2w"]) == 0


def test_unknown_callback_tensor_inputs_are_refused(pipe):
    with pytest.raises(InvalidInputError, match="prompt_embeds"):
        pipe(images={"t1n": mri_slice()}, target_modalities="t2w", callback_on_step_end=lambda *a: {},
             callback_on_step_end_tensor_inputs=["prompt_embeds"], **FAST)


# --------------------------------------------------------------------------- device placement
def test_pipeline_tensors_go_to_the_execution_device(converted_fixture):
    pipe = UniBrainPipeline.from_pretrained(converted_fixture)
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe.model.device.type == "meta"  # weights rest off the execution device
    assert pipe._execution_device.type == "cpu"
    assert pipe.prepare_latents(2, 32, 48, None).device.type == "cpu"
    assert pipe.new_context(2).device.type == "cpu"


def test_pipeline_source_never_places_tensors_by_a_weight():
    import unibrain_hf.pipelines as package

    for path in Path(package.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"(model|vae)\.device\b|weight\.device|parameters\(\)\)\.device", text), path.name


# --------------------------------------------------------------------------- saving and loading (mixin failures)
def test_pickle_save_request_still_writes_loadable_safetensors(pipe, tmp_path):
    """diffusers' suites save with ``safe_serialization=False``; the result must still load (no pickles)."""
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=False)
    assert not list((tmp_path / "saved").rglob("*.bin")) and list((tmp_path / "saved").rglob("*.safetensors"))
    loaded = UniBrainPipeline.from_pretrained(tmp_path / "saved")
    for name in ("model", "vae"):
        original = dict(getattr(pipe, name).named_parameters())
        for key, value in getattr(loaded, name).named_parameters():
            assert torch.equal(value, original[key]), (name, key)


def test_pickle_only_component_is_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pickled")
    vae_dir = tmp_path / "pickled" / "vae"
    for weights in vae_dir.glob("*.safetensors"):
        weights.unlink()
    torch.save(pipe.vae.state_dict(), vae_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="pickle"):
        UniBrainPipeline.from_pretrained(tmp_path / "pickled")


def test_variants_save_and_load(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "variant", variant="fp16")
    loaded = UniBrainPipeline.from_pretrained(tmp_path / "variant", variant="fp16")
    for name in ("model", "vae"):
        original = dict(getattr(pipe, name).named_parameters())
        for key, value in getattr(loaded, name).named_parameters():
            assert torch.equal(value, original[key]), (name, key)
    pipe.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="variant=fp16"):
        UniBrainPipeline.from_pretrained(tmp_path / "plain", variant="fp16")


def test_dtype_dict_and_alias(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = UniBrainPipeline.from_pretrained(tmp_path / "pipe", dtype={"model": torch.bfloat16,
                                                                       "default": torch.float16})
    assert loaded.model.dtype == torch.bfloat16 and loaded.vae.dtype == torch.float16
    assert UniBrainPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.float16).model.dtype == torch.float16
