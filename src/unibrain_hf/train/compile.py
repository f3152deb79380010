"""``train.compile``: ``torch.compile`` of the decoder's dense per-expert blocks, with a fallback.

What is compiled: each decoder layer's per-expert MLP and RMSNorms (input, post-attention, q/k) —
the parts whose shapes change only with the number of tokens (``dynamic=True``, so packs of new
lengths do not recompile) and that contain the fusable element-wise work (SiLU·gate, norms). The
MoT routing and the packed attention stay eager: their index lists and per-sample masks change
with every pack and would recompile or break the graph every step.

Measured on the CPU (bench preset, fp32, 1 thread): 1.535 s vs 1.550 s CPU per forward + backward
(1 %, within noise) after 45 s of compilation, so it is off by default; on GPUs the element-wise
fusion matters more (``benchmarks/bench_train_mfu.py --compile`` measures it).

Fallback: :func:`compile_available` compiles and runs a two-line function first. When that fails
(no C++ compiler for the CPU inductor backend, an unsupported platform, ...) training continues
eagerly with a warning naming ``train.compile``; it never stops a run.

    python -c "from unibrain_hf.train.compile import compile_available; print(compile_available())"
"""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger(__name__)
_COMPILED_BLOCKS = ("mlp", "input_layernorm", "post_attention_layernorm", "q_norm", "k_norm")


def compile_available(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether ``torch.compile`` works here: (ok, why not)."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False, "torch.compile is not supported on this Python / platform"
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * x + 1, dynamic=True)
        probe(torch.ones(3, device=device))
        return True, ""
    except Exception as exc:  # any failure means: run eagerly
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def compile_decoder(model, device: str | torch.device = "cpu", what: str = "train.compile") -> int:
    """Compile the per-expert dense blocks of every decoder layer in place; returns how many were compiled.

    Returns 0 (and warns) when ``torch.compile`` is unavailable here.
    """
    ok, reason = compile_available(device)
    if not ok:
        warnings.warn(f"{what}: torch.compile is unavailable ({reason}); training continues without it",
                      RuntimeWarning, stacklevel=2)
        return 0
    count = 0
    for layer in getattr(model.language_model, "layers", []):
        for expert in (getattr(layer, "und", None), getattr(layer, "gen", None)):
            if expert is None:
                continue
            for name in _COMPILED_BLOCKS:
                block = getattr(expert, name, None)
                if isinstance(block, torch.nn.Module):
                    block.compile(dynamic=True)  # in place: parameter names (checkpoints, export) unchanged
                    count += 1
    logger.info("%s: compiled %d decoder blocks", what, count)
    return count


__all__ = ["compile_available", "compile_decoder"]
