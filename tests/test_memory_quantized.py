"""Quantized loading (bitsandbytes 8-/4-bit, which run on the CPU) and named errors for memory options.

The fp32/bf16-only modules stay out of quantization because the model declares them
(``_keep_in_fp32_modules``), not because of special cases; the drift against fp32 is measured
(docs/MEMORY.md) and bounded here.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_memory_quantized.py -q
"""

import numpy as np
import pytest
import torch
from torch import nn

from test_memory import CALL, mri_slice
from unibrain_hf import UniBrainForConditionalGeneration, UniBrainPipeline
from unibrain_hf.errors import InvalidInputError

DECLARED = ("time_embedder.embedding.linear_1", "time_embedder.embedding.linear_2", "vae2llm", "llm2vae",
            "vision_model.embeddings.patch_embedding")


def _velocity_and_logits(model):
    config = model.config
    ids = torch.tensor([[config.bos_token_id, 5, 6, 7, config.eos_token_id]])
    cache = model.prefill_text_cached(model.new_cache(), ids, 0)
    latents = torch.randn(1, 6, config.patch_latent_dim, generator=torch.Generator().manual_seed(0))
    velocity = model.velocity_cached(cache, latents, 0.5, torch.arange(6), 5)
    logits, _ = model.next_token_logits_cached(cache, torch.tensor([9]), 5)
    return velocity, logits


@pytest.mark.parametrize("bits, layer_class, tolerance", [(8, "Linear8bitLt", 0.05), (4, "Linear4bit", 0.4)])
def test_bitsandbytes_quantized_pipeline(converted_fixture, bits, layer_class, tolerance):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    # bitsandbytes' CPU 4-bit kernel needs in_features divisible by its block size (64), which the tiny ViT
    # and connector (32 wide) are not; on a GPU every layer is quantized. The decoder is quantized either way.
    quantization = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["vision_model", "connector", "lm_head"])
    model = UniBrainForConditionalGeneration.from_pretrained(converted_fixture / "model",
                                                             quantization_config=quantization).eval()
    modules = dict(model.named_modules())
    assert type(modules["language_model.layers.0.gen.mlp.down_proj"]).__name__ == layer_class
    if bits == 8:
        assert type(modules["vision_model.layers.0.mlp.fc1"]).__name__ == layer_class
    for name in DECLARED:  # kept out of quantization by _keep_in_fp32_modules
        assert type(modules[name]) is nn.Linear and modules[name].weight.dtype == torch.float32, name

    plain = UniBrainForConditionalGeneration.from_pretrained(converted_fixture / "model").eval()
    for ours, theirs in zip(_velocity_and_logits(model), _velocity_and_logits(plain)):
        relative = float((ours.float() - theirs).norm() / theirs.norm())
        assert 0 < relative < tolerance  # quantized, and close to fp32

    pipe = UniBrainPipeline.from_pretrained(converted_fixture, model=model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(images={"t1n": mri_slice()}, generator=torch.Generator().manual_seed(0), **CALL)
    for batch in out.images.values():
        assert batch.shape == (1, 30, 40) and np.isfinite(batch).all()
    assert isinstance(out.diagnosis[0], str)


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_map="auto", max_memory={0: "8GiB", "cpu": "1GiB"}), r"max_memory\[0\]"),
    (dict(device_map="auto", max_memory={"cuda:0": "8GiB"}), r"max_memory\['cuda:0'\]"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), r"max_memory\['cpu'\] = 'lots'"),
    (dict(max_memory={"cpu": "1GiB"}), "device_map"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config uses 'fp8'"),
])
def test_memory_options_are_checked_by_name(converted_fixture, kwargs, message):
    if torch.cuda.is_available() and 0 in kwargs.get("max_memory", {}):
        pytest.skip("this machine has an accelerator")
    if torch.cuda.is_available() and "quantization_config" in kwargs:
        pytest.skip("this machine has an accelerator")
    with pytest.raises(InvalidInputError, match=message):
        UniBrainForConditionalGeneration.from_pretrained(converted_fixture / "model", **kwargs)


def test_quantizer_package_missing_is_named(converted_fixture, monkeypatch):
    import importlib.util

    from unibrain_hf.modeling import memory_options

    real = importlib.util.find_spec
    monkeypatch.setattr(memory_options.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(InvalidInputError, match="pip install bitsandbytes"):
        UniBrainForConditionalGeneration.from_pretrained(
            converted_fixture / "model", quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})


def test_layerwise_fp8_casting_with_declared_skips(converted_fixture):
    """diffusers' apply_layerwise_casting (fp8 storage) with the model's declared skip patterns."""
    from diffusers.hooks import apply_layerwise_casting

    model = UniBrainForConditionalGeneration.from_pretrained(converted_fixture / "model").eval()
    plain = UniBrainForConditionalGeneration.from_pretrained(converted_fixture / "model").eval()
    apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32,
                            skip_modules_pattern=tuple(model._skip_layerwise_casting_patterns))
    assert model.language_model.layers[0].gen.q_proj.weight.dtype == torch.float8_e4m3fn
    assert model.dtype == torch.float32  # read from the token embedding, which is skipped
    for ours, theirs in zip(_velocity_and_logits(model), _velocity_and_logits(plain)):
        assert 0 < float((ours - theirs).norm() / theirs.norm()) < 0.1
