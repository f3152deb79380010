"""``train.compile``: compiled decoder blocks give the eager numbers, keep parameter names, and fall back."""

from __future__ import annotations

import pytest
import torch

from unibrain_hf.modeling import UniBrainConfig, UniBrainForConditionalGeneration
from unibrain_hf.train import compile as train_compile


def _model():
    torch.manual_seed(0)
    return UniBrainForConditionalGeneration(UniBrainConfig.tiny())


def test_fallback_when_compile_is_unavailable(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    model = _model()
    with pytest.warns(RuntimeWarning, match="train.compile: torch.compile is unavailable.*no C\\+\\+ compiler"):
        assert train_compile.compile_decoder(model) == 0


def test_compiled_blocks_match_eager_and_keep_names():
    ok, reason = train_compile.compile_available()
    if not ok:
        pytest.skip(f"torch.compile unavailable here: {reason}")
    eager, compiled = _model(), _model()
    names = list(compiled.state_dict())
    assert train_compile.compile_decoder(compiled) == 2 * 2 * 5  # 2 layers × 2 experts × 5 blocks
    assert list(compiled.state_dict()) == names
    hidden = torch.randn(7, compiled.config.text_config.hidden_size, requires_grad=True)
    block = compiled.language_model.layers[0].und
    reference = eager.language_model.layers[0].und
    for name in ("mlp",):
        ours, theirs = getattr(block, name)(hidden), getattr(reference, name)(hidden)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        ours.sum().backward()
