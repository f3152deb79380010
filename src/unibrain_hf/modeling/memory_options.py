"""Early, named errors for ``from_pretrained``'s memory options (device_map, max_memory, quantization).

transformers and accelerate reject some of these late or in their own words (``Cannot access
accelerator device when none is available.``); this checks them before any weight is read and
says which option is wrong and what to use instead. Ships with the model code (Hub remote code):
only third-party imports, the package's error type when it is installed.

    python -c "from unibrain_hf.modeling.memory_options import check_memory_options as c; c(max_memory={0: '8GiB'})"
"""

from __future__ import annotations

import importlib.util

import torch

try:  # the package's error type when the package is installed; a plain ValueError for Hub remote code
    from unibrain_hf.errors import InvalidInputError
except ImportError:  # pragma: no cover - exercised only without the package
    InvalidInputError = ValueError

#: Quantization backends that run without a CUDA GPU (bitsandbytes ≥ 0.48 has CPU 8-/4-bit kernels).
CPU_QUANTIZERS = {"bitsandbytes", "torchao", "quanto"}
#: The package each quantization method needs (``quant_method`` → importable module, pip name).
QUANTIZER_PACKAGES = {"bitsandbytes": ("bitsandbytes", "bitsandbytes"), "torchao": ("torchao", "torchao"),
                      "quanto": ("optimum.quanto", "optimum-quanto"), "gptq": ("gptqmodel", "gptqmodel"),
                      "awq": ("awq", "autoawq"), "hqq": ("hqq", "hqq")}
GPU_ONLY_QUANTIZERS = {"gptq", "awq", "eetq", "fp8", "fbgemm_fp8", "aqlm", "vptq", "spqr", "higgs", "exl2"}


def _accelerator_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_max_memory(max_memory, device_map) -> None:
    from accelerate.utils import convert_file_size_to_int

    if not isinstance(max_memory, dict) or not max_memory:
        raise InvalidInputError(f"max_memory must be a dict like {{0: '20GiB', 'cpu': '60GiB'}}; got {max_memory!r}")
    if device_map is None:
        raise InvalidInputError("max_memory only takes effect with device_map (e.g. device_map='auto'); pass both, "
                                "or neither to load the whole model on one device")
    count = _accelerator_count()
    for key, size in max_memory.items():
        label = f"max_memory[{key!r}]"
        if isinstance(key, str) and key.startswith("cuda:") and key[5:].isdigit():
            raise InvalidInputError(f"{label}: accelerators are named by index in max_memory; use {int(key[5:])} "
                                    f"instead of {key!r}")
        index = key if isinstance(key, int) and not isinstance(key, bool) else None
        if index is None and key not in ("cpu", "disk", "mps"):
            raise InvalidInputError(f"{label}: unknown device; use accelerator indices (0, 1, …), 'cpu' or 'disk'")
        if index is not None and index >= count:
            raise InvalidInputError(
                f"{label}: this machine has {count} CUDA device(s), so device {index} does not exist; give only "
                f"{{'cpu': ...}} (with offload_folder=... to spill the rest to disk) or run where the GPU is")
        try:
            parsed = convert_file_size_to_int(size) if isinstance(size, str) else int(size)
        except (ValueError, TypeError):
            parsed = -1
        if parsed < 0:
            raise InvalidInputError(f"{label} = {size!r} is not a size; use bytes (an int) or a string such as '20GiB'")


def _check_quantization(quantization_config) -> None:
    method = quantization_config.get("quant_method") if isinstance(quantization_config, dict) \
        else getattr(quantization_config, "quant_method", None)
    method = getattr(method, "value", method)
    if method is None:
        return
    method = str(method)
    if method in GPU_ONLY_QUANTIZERS and _accelerator_count() == 0:
        raise InvalidInputError(
            f"quantization_config uses {method!r}, which runs only on a CUDA GPU and none is available; on a CPU use "
            f"BitsAndBytesConfig(load_in_8bit=True) (bitsandbytes) or TorchAoConfig, or load dtype=torch.bfloat16")
    module, pip_name = QUANTIZER_PACKAGES.get(method, (None, None))
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        raise InvalidInputError(f"quantization_config uses {method!r}, which needs the {pip_name!r} package: "
                                f"pip install {pip_name} (or load without quantization_config)")


def check_memory_options(device_map=None, max_memory=None, quantization_config=None, **_) -> None:
    """Raise ``InvalidInputError`` naming the option when a memory option cannot work on this machine."""
    if max_memory is not None:
        _check_max_memory(max_memory, device_map)
    if quantization_config is not None:
        _check_quantization(quantization_config)
