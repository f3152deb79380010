"""Inference speed switches: bf16 within the documented drift, and safe fallbacks for bf16 and compile."""

import logging

import numpy as np
import pytest
import torch

from tiny_pipeline import mri_slice, tiny_pipeline
from unibrain_hf.errors import InvalidInputError
from unibrain_hf.pipelines import fast_inference

#: docs/PIPELINE.md, "bf16 inference": generated uint8 images within this many grey levels of fp32
#: (the largest drift measured by benchmarks/bench_bf16_drift.py).
BF16_MAX_GREY_LEVELS = 5
BF16_VAE_MAX_GREY_LEVELS = 7


@pytest.fixture
def pipe(converted_fixture):
    return tiny_pipeline(converted_fixture / "tokenizer")


def _unified(pipe):
    return pipe(images={"t1n": mri_slice()}, target_modalities=["t2w", "t1c"], task="unified", num_grid_points=4,
                max_new_tokens=6, generator=torch.Generator().manual_seed(0))


def test_bf16_stays_within_the_documented_drift(pipe, monkeypatch):
    monkeypatch.setattr(fast_inference, "cpu_bf16_support", lambda: "avx512_bf16")
    reference = _unified(pipe)
    state = pipe.enable_fast_inference(dtype=torch.bfloat16, device="cpu")
    assert state.dtype == torch.bfloat16 and pipe.model.dtype == torch.bfloat16 and not state.notes
    assert pipe.vae.dtype == torch.float32  # the VAE is not part of the switch
    fast = _unified(pipe)
    for code in ("t2w", "t1c"):
        ours, theirs = (np.asarray(o.images[code][0], dtype=np.int16) for o in (fast, reference))
        assert np.abs(ours - theirs).max() <= BF16_MAX_GREY_LEVELS
    assert fast.thinking == reference.thinking and fast.diagnosis == reference.diagnosis
    state = pipe.enable_fast_inference(vae_dtype=torch.bfloat16, device="cpu")  # the VAE too: more drift
    assert state.vae_dtype == torch.bfloat16
    both = _unified(pipe)
    for code in ("t2w", "t1c"):
        ours, theirs = (np.asarray(o.images[code][0], dtype=np.int16) for o in (both, reference))
        assert np.abs(ours - theirs).max() <= BF16_VAE_MAX_GREY_LEVELS


def test_bf16_without_native_support_falls_back_to_fp32(pipe, monkeypatch, caplog):
    monkeypatch.setattr(fast_inference, "cpu_bf16_support", lambda: None)
    with caplog.at_level(logging.WARNING, logger=fast_inference.__name__):
        state = pipe.enable_fast_inference(dtype="bf16", vae_dtype=torch.bfloat16, device="cpu")
    assert state.dtype == torch.float32 and pipe.model.dtype == torch.float32
    assert state.vae_dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert "dtype=bf16" in state.notes[0] and "no native bf16" in state.notes[0] and "float32" in state.notes[0]
    assert state.notes[1].startswith("vae_dtype=bf16") and "no native bf16" in caplog.text


def test_unsupported_dtype_is_refused_by_name(pipe):
    with pytest.raises(InvalidInputError, match="dtype"):
        pipe.enable_fast_inference(dtype=torch.float16)
    with pytest.raises(InvalidInputError, match="dtype"):
        pipe.enable_fast_inference(dtype="half")
    with pytest.raises(InvalidInputError, match="vae_dtype"):
        pipe.enable_fast_inference(vae_dtype=torch.float64)


def test_compile_unavailable_falls_back_to_eager(pipe, monkeypatch, caplog):
    reference = _unified(pipe)

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger=fast_inference.__name__):
        state = pipe.enable_fast_inference(compile=True)
    assert not state.compiled and "no working C++ compiler" in state.notes[0] and "eager" in caplog.text
    assert all(getattr(e, "_compiled_call_impl", None) is None for e in fast_inference._experts(pipe.model))
    again = _unified(pipe)
    assert np.array_equal(np.asarray(again.images["t2w"][0]), np.asarray(reference.images["t2w"][0]))


def test_compile_is_refused_under_offload_hooks(pipe):
    pipe.enable_model_cpu_offload(device="cpu")
    state = pipe.enable_fast_inference(compile=True)
    assert not state.compiled and "offload hooks" in state.notes[0]


def test_compile_marks_every_expert(pipe, monkeypatch):
    monkeypatch.setattr(fast_inference, "compile_unavailable_reason", lambda: None)
    state = pipe.enable_fast_inference(compile=True)
    experts = fast_inference._experts(pipe.model)
    assert state.compiled and len(experts) == 2 * pipe.model.config.text_config.num_hidden_layers
    assert all(e._compiled_call_impl is not None for e in experts)
    pipe.disable_compile()
    assert all(e._compiled_call_impl is None for e in experts)
