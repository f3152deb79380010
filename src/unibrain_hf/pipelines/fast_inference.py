"""Opt-in inference speed-ups for ``UniBrainPipeline``, each checked on this machine with a safe fallback.

* **bf16 weights** (``dtype=torch.bfloat16``): the MoT decoder, ViT and adapters run in bf16 (the
  latents and the Euler update stay float32; the VAE too unless ``vae_dtype=torch.bfloat16``). On a CPU this pays only with native bf16 matmuls
  (AVX512-BF16 or AMX); without them bf16 is emulated and slower than float32, so the request falls
  back to float32 with a warning that says why. On a GPU without bf16 (pre-Ampere) likewise.
  Outputs drift from float32; the measured drift is in docs/PIPELINE.md ("bf16 inference").
* **torch.compile** of the decoder experts (``compile=True``): each expert's two uses per layer
  (projections + QK-norm + RoPE; ``o_proj`` + MLP) are compiled with dynamic shapes, so decoding
  (1 token), denoising (a latent block) and prefills share graphs; attention and the KV cache stay
  eager (their shapes change every step). A probe compiles and runs a tiny function first: where
  torch.compile cannot run (no C++ compiler for CPU inductor, an unsupported Python), or where
  offload hooks sit on the model, the experts stay eager and a warning says why. Measured on the
  CPU bench (benchmarks/PIPELINE.md) compile does not pay back its compile time there; it is meant
  for GPUs.

    pipe.enable_fast_inference(dtype=torch.bfloat16)            # returns what is in effect
    python -m pytest tests/test_inference_speed.py -q
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import InvalidInputError
from ..utils.precision import cpu_bf16_support

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def bf16_fallback_reason(device) -> str | None:
    """Why bf16 inference should not run on ``device`` (None where it should)."""
    device = torch.device(device)
    if device.type == "cpu" and cpu_bf16_support() is None:
        return (f"this CPU has no native bf16 matmuls (no AVX512-BF16 or AMX; torch reports "
                f"{torch.backends.cpu.get_cpu_capability()}), so bf16 would be emulated and slower than float32")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"GPU {torch.cuda.get_device_name(device)} has no bf16"
    return None


def compile_unavailable_reason() -> str | None:
    """Why torch.compile cannot run here (None where a probe compiles and runs)."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python version"
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1, dynamic=False)
        result = probe(torch.ones(4))
        if not torch.allclose(result, torch.nn.functional.silu(torch.ones(4)) * 2 + 1):
            return "torch.compile gave a wrong result in a probe"
    except Exception as exc:  # any failure of the toolchain (no C++ compiler, a broken triton, ...)
        return f"torch.compile failed in a probe ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None


def _checked_dtype(name: str, value) -> torch.dtype:
    if isinstance(value, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
        if value not in names:
            raise InvalidInputError(f"{name} must be one of {sorted(names)} or a torch dtype; got {value!r}")
        value = names[value]
    if value not in _SUPPORTED_DTYPES:
        raise InvalidInputError(f"{name} must be torch.float32 or torch.bfloat16 for fast inference; got {value} "
                                f"(fp16 inference: load with from_pretrained(dtype=torch.float16) on a GPU)")
    return value


def _has_offload_hooks(model) -> bool:
    return any(hasattr(module, "_hf_hook") or getattr(module, "_diffusers_hook", None) is not None
               for module in model.modules())


def _experts(model):
    from ..modeling.modeling_unibrain import UniBrainExpert

    return [module for module in model.modules() if isinstance(module, UniBrainExpert)]


@dataclass
class FastInferenceState:
    """What :meth:`FastInferenceMixin.enable_fast_inference` put in effect, and why anything fell back."""

    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32
    compiled: bool = False
    notes: list[str] = field(default_factory=list)


class FastInferenceMixin:
    """``enable_fast_inference`` / ``disable_compile`` for a pipeline holding ``model`` (a UniBrain model)."""

    def enable_fast_inference(self, dtype: torch.dtype | str | None = None, compile: bool = False,
                              vae_dtype: torch.dtype | str | None = None, device=None) -> FastInferenceState:
        """Run the model in ``dtype`` (float32 or bfloat16) and/or compile its experts; never silently wrong.

        ``vae_dtype`` also switches the VAE (default: left as it is, float32 after a float32 load; a
        bf16 VAE roughly halves its CPU time and adds drift, see docs/PIPELINE.md). ``device`` is where
        inference will run (default: the pipeline's execution device). A request this machine cannot
        serve well falls back (float32, eager) with a logged warning; the returned
        :class:`FastInferenceState` says what is in effect and why.
        """
        state = FastInferenceState(dtype=self.model.dtype, vae_dtype=self.vae.dtype)
        device = torch.device(device) if device is not None else self._execution_device
        for name, requested in (("dtype", dtype), ("vae_dtype", vae_dtype)):
            if requested is None:
                continue
            requested = _checked_dtype(name, requested)
            reason = bf16_fallback_reason(device) if requested == torch.bfloat16 else None
            if reason is not None:
                requested = torch.float32
                state.notes.append(f"{name}=bf16 requested but {reason}: running in float32")
                logger.warning(state.notes[-1])
            module = self.model if name == "dtype" else self.vae
            if module.dtype != requested:
                module.to(requested)
                if module is self.model:  # as from_pretrained(dtype=...) does: these stay float32
                    for kept in getattr(module, "_keep_in_fp32_modules_strict", None) or ():
                        getattr(module, kept).to(torch.float32)
        state.dtype, state.vae_dtype = self.model.dtype, self.vae.dtype
        if compile:
            reason = ("offload hooks are attached to the model (compile before enabling offload)"
                      if _has_offload_hooks(self.model) else compile_unavailable_reason())
            if reason is None:
                for expert in _experts(self.model):
                    expert.compile(dynamic=True)
                state.compiled = True
            else:
                state.notes.append(f"compile requested but {reason}: the experts stay eager")
                logger.warning(state.notes[-1])
        else:
            state.compiled = any(getattr(e, "_compiled_call_impl", None) is not None for e in _experts(self.model))
        return state

    def disable_compile(self) -> None:
        """Back to eager experts (e.g. before enabling offload)."""
        for expert in _experts(self.model):
            expert._compiled_call_impl = None


__all__ = ["FastInferenceMixin", "FastInferenceState", "cpu_bf16_support", "bf16_fallback_reason",
           "compile_unavailable_reason"]
