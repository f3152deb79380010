"""Which mixed-precision modes this machine can train in, checked before anything is loaded.

``train.mixed_precision`` goes to accelerate, which autocasts the forward (bf16 or fp16) while the
weights, gradients and AdamW state stay fp32 (master weights); fp16 adds accelerate's dynamic loss
scaling. What can silently go wrong is refused here instead:

* ``bf16`` on a CPU without native bf16 (no AVX512-BF16 or AMX): autocast would run, emulated and
  slower than fp32 — refused; the safe fallback is ``train.mixed_precision=no`` (fp32);
* ``bf16`` on a GPU without bf16 (pre-Ampere): refused; use ``fp16`` there;
* ``fp16`` without a GPU: accelerate would quietly train in fp32 (it has no CPU fp16 autocast or
  loss scaler) — refused; use ``bf16`` on a bf16 CPU, or ``no``.

Measured drift against fp32 (losses, gradients) is in benchmarks/README.md.

    python -c "from unibrain_hf.train.precision import cpu_bf16_support; print(cpu_bf16_support())"
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..utils.precision import cpu_bf16_support


def check_mixed_precision(mode: str, device: torch.device | str, what: str = "train.mixed_precision") -> None:
    """Raise :class:`ConfigError` (with the fallback) if ``mode`` cannot run as asked on ``device``."""
    device = torch.device(device)
    if mode in (None, "no"):
        return
    if mode not in ("bf16", "fp16"):
        raise ConfigError(f"{what} must be 'no', 'bf16' or 'fp16', got {mode!r}")
    if device.type == "cpu":
        if mode == "fp16":
            raise ConfigError(f"{what}=fp16 needs a GPU: on the CPU there is no fp16 autocast or loss scaler, so "
                              f"the run would silently stay fp32. Use {what}=bf16 "
                              f"({'supported' if cpu_bf16_support() else 'not supported'} by this CPU) or {what}=no")
        if cpu_bf16_support() is None:
            raise ConfigError(f"{what}=bf16: this CPU has no native bf16 (no AVX512-BF16 or AMX; torch reports "
                              f"{torch.backends.cpu.get_cpu_capability()}), so bf16 would be emulated and slower than "
                              f"fp32. Set {what}=no to train in fp32")
    elif device.type == "cuda" and mode == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{what}=bf16: GPU {torch.cuda.get_device_name(device)} has no bf16; use {what}=fp16 "
                          "(loss-scaled) or no")


__all__ = ["cpu_bf16_support", "check_mixed_precision"]
