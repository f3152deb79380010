"""Every memory mode gives the plain run's output, and the hooks of each mode see every model phase.

Tested on CPU the way diffusers tests offload (the execution device is ``cpu``): outputs are compared
with the plain, non-offloaded pipeline, and where weights were during the run is read from the
modes' own hooks (``meta`` placeholders, onload calls, disk files).

    HF_HUB_OFFLINE=1 python -m pytest tests/test_memory.py -q
"""

import numpy as np
import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module

from unibrain_hf import UniBrainForConditionalGeneration, UniBrainPipeline
from unibrain_hf.modeling.modeling_unibrain import INFERENCE_PHASES

CPU = torch.device("cpu")
CALL = dict(target_modalities=["t2w"], task="unified", num_inference_steps=3, max_new_tokens=3,
            output_type="np")


def mri_slice(seed=0, shape=(30, 40)):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 30, size=shape).astype(np.float32)
    image[:3] = 0
    return image


def load(path, **kwargs):
    pipe = UniBrainPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe):
    """The unified task runs every phase: text/ViT/latent prefill, decoding, velocity."""
    out = pipe(images={"t1n": mri_slice()}, generator=torch.Generator().manual_seed(0), **CALL)
    return {"images": out.images, "thinking": out.thinking, "impression": out.impression,
            "diagnosis": out.diagnosis}


def assert_same(result, reference):
    assert result["thinking"] == reference["thinking"] and result["diagnosis"] == reference["diagnosis"]
    for code, image in reference["images"].items():
        np.testing.assert_array_equal(result["images"][code], image)


@pytest.fixture(scope="module")
def reference(converted_fixture):
    return run(load(converted_fixture))


class PhaseRecorder(ModelHook):
    """Appended to the model's top-level hook: records each phase the model is called with."""

    def __init__(self):
        self.phases = []

    def pre_forward(self, module, *args, **kwargs):
        self.phases.append(kwargs.get("phase"))
        return args, kwargs


def test_model_cpu_offload_hook_sees_every_phase(converted_fixture, reference):
    pipe = load(converted_fixture)
    pipe.enable_model_cpu_offload(device="cpu")
    offload_hook = pipe.model._hf_hook
    calls = []
    original = offload_hook.pre_forward
    offload_hook.pre_forward = lambda module, *a, **k: calls.append(k.get("phase")) or original(module, *a, **k)
    assert_same(run(pipe), reference)
    # On a GPU this hook moves the model to the device: it must fire for every phase, not only the VAE's.
    assert set(calls) == set(INFERENCE_PHASES)


def test_sequential_offload_streams_every_weight(converted_fixture, reference):
    pipe = load(converted_fixture)
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe._execution_device == CPU
    model = pipe.model
    assert all(p.device.type == "meta" for p in model.parameters())
    seen = []

    class WhereAreTheWeights(ModelHook):
        def pre_forward(self, module, *args, **kwargs):  # runs after the offload hook fetched this leaf
            materialised = [p for p in model.parameters() if p.device.type != "meta"]
            own = {id(p) for p in module.parameters(recurse=False)}
            seen.append(all(id(p) in own for p in materialised) and bool(own))
            return args, kwargs

    for module in model.modules():
        if any(p is not None for p in module._parameters.values()):
            add_hook_to_module(module, WhereAreTheWeights(), append=True)
    assert_same(run(pipe), reference)
    # During every leaf call only that leaf's weights were off the meta device; afterwards none are.
    assert seen and all(seen)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("to_disk", [False, True])
def test_group_offload(converted_fixture, reference, tmp_path, offload_type, to_disk):
    from diffusers.hooks.group_offloading import ModuleGroup

    pipe = load(converted_fixture)
    disk = str(tmp_path / "groups") if to_disk else None
    pipe.enable_group_offload(onload_device=CPU, offload_type=offload_type, num_blocks_per_group=1,
                              offload_to_disk_path=disk)
    onloaded = []
    original = ModuleGroup.onload_

    def spy(group):
        onloaded.append(group)
        return original(group)

    ModuleGroup.onload_ = spy
    try:
        result = run(pipe)
    finally:
        ModuleGroup.onload_ = original
    # With disk offload an offloaded group's tensors are uninitialised memory until its hook onloads it,
    # so equal outputs mean every weight was onloaded before use.
    assert_same(result, reference)
    assert onloaded
    if offload_type == "block_level":
        # The model declares its decoder and ViT layer lists as blocks: each layer is its own group.
        leaders = {type(g.onload_leader).__name__ for g in onloaded}
        assert {"UniBrainForConditionalGeneration", "UniBrainTextModel", "UniBrainDecoderLayer",
                "UniBrainVisionModel", "SiglipEncoderLayer"} <= leaders
    if to_disk:
        assert list((tmp_path / "groups").glob("*.safetensors"))


def _phase_outputs(model, config):
    """Logits and a velocity from the cached phases of a model (inputs on the CPU)."""
    ids = torch.tensor([[config.bos_token_id, 5, 6, 7, config.eos_token_id]])
    cache = model.prefill_text_cached(model.new_cache(), ids, 0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 6, config.patch_latent_dim, generator=generator)
    positions = torch.arange(6)
    cache = model.prefill_latents_cached(cache, latents, positions, 5)
    patches = torch.randn(4, config.vit_patch_size ** 2 * 3, generator=generator)
    cache = model.prefill_vit_cached(cache, patches, torch.arange(4), [4], 6)
    logits, cache = model.next_token_logits_cached(cache, torch.tensor([9]), 7)
    velocity = model.velocity_cached(cache, torch.randn(1, 6, config.patch_latent_dim, generator=generator), 0.5,
                                     positions, 8)
    return logits, velocity


def test_device_map_with_disk_offload_matches(converted_fixture, reference, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # The model of correctness: a stock transformers model in the same set-up matches exactly.
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    qwen.save_pretrained(tmp_path / "qwen")
    half = sum(p.numel() * p.element_size() for p in qwen.parameters()) // 2
    mapped_qwen = Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen", device_map="auto", max_memory={"cpu": half},
                                                   offload_folder=tmp_path / "qwen_offload")
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(mapped_qwen(ids).logits, qwen(ids).logits)

    plain = UniBrainForConditionalGeneration.from_pretrained(converted_fixture / "model").eval()
    half = sum(p.numel() * p.element_size() for p in plain.parameters()) * 2 // 3
    mapped = UniBrainForConditionalGeneration.from_pretrained(
        converted_fixture / "model", device_map="auto", max_memory={"cpu": half},
        offload_folder=tmp_path / "offload").eval()
    placed = set(mapped.hf_device_map.values())
    assert {"cpu", "disk"} <= placed, mapped.hf_device_map
    assert any(p.device.type == "meta" for p in mapped.parameters())  # disk-offloaded weights
    for ours, theirs in zip(_phase_outputs(mapped, mapped.config), _phase_outputs(plain, plain.config)):
        assert torch.equal(ours, theirs)

    pipe = load(converted_fixture)
    pipe.register_modules(model=mapped)
    assert_same(run(pipe), reference)


def test_bf16_loading_keeps_declared_modules_fp32(converted_fixture, reference):
    pipe = load(converted_fixture, dtype=torch.bfloat16)
    model = pipe.model
    assert model.dtype == torch.bfloat16
    assert model.time_embedder.embedding.linear_1.weight.dtype == torch.float32  # _keep_in_fp32_modules_strict
    assert model.language_model.layers[0].gen.q_proj.weight.dtype == torch.bfloat16
    result = run(pipe)
    for code, image in result["images"].items():
        assert image.shape == reference["images"][code].shape and np.isfinite(image).all()
    # A whole-pipeline cast after loading keeps working (the fp32 modules take their own dtype's input).
    cast = load(converted_fixture).to(torch.bfloat16)
    assert run(cast)["images"]["t2w"].shape == reference["images"]["t2w"].shape


def test_freeze_experts_holds_flags_on_the_decoder(converted_fixture):
    model = UniBrainForConditionalGeneration.from_pretrained(converted_fixture / "model")
    assert model.frozen_experts == {"und": False, "gen": False}
    model.freeze_experts(und=True)
    assert model.frozen_experts == {"und": True, "gen": False}
    assert model.language_model.stop_und_gradients and model.config.freeze_und


def test_offload_onto_a_missing_accelerator_is_named(converted_fixture):
    from unibrain_hf.errors import InvalidInputError

    if torch.cuda.is_available():
        pytest.skip("this machine has an accelerator")
    pipe = load(converted_fixture)
    with pytest.raises(InvalidInputError, match=r"onload_device.*'cuda' is not available"):
        pipe.enable_group_offload(onload_device="cuda", offload_type="leaf_level")
    with pytest.raises(InvalidInputError, match=r"enable_expert_offload\(device=...\)"):
        pipe.enable_expert_offload(device="cuda:1")
    with pytest.raises(RuntimeError, match="accelerator"):  # diffusers' own check, which names the method
        pipe.enable_sequential_cpu_offload()
