"""Whether this machine computes bf16 natively (one probe shared by training and inference).

    python -c "from unibrain_hf.utils.precision import cpu_bf16_support; print(cpu_bf16_support())"
"""

from __future__ import annotations

import torch


def cpu_bf16_support() -> str | None:
    """The CPU feature that gives native bf16 matmuls (``"amx_bf16"``, ``"avx512_bf16"``, ...), or None.

    Without one, torch emulates bf16 on the CPU: correct, but slower than float32.
    """
    cpu = getattr(torch, "cpu", None)
    for name, probe in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return name
        except RuntimeError:
            continue
    try:  # older torch: oneDNN's own verdict
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "mkldnn_bf16"
    except (AttributeError, RuntimeError):
        pass
    return None


__all__ = ["cpu_bf16_support"]
