"""Expert-aware offload: the accelerator holds UniBrain's shared parts plus one expert.

In the mixture-of-transformer-experts decoder each phase of inference needs essentially one
expert: text prefill, ViT prefill and text decoding run the understanding expert only; a velocity
evaluation (3×N per image) runs the generation expert for the latent tokens. So instead of
27 GiB of bf16 weights (BAGEL-7B-MoT) the accelerator holds the embeddings, ``lm_head``, the
ViT, the adapters and **one** expert (≈ 15 GiB), and swaps the experts once per phase — not per
step — when the model's top-level hook sees the phase change (the model runs every phase through
``forward(phase=...)``).

The other expert is *streamed* layer by layer (each of its weight matrices is copied to the
accelerator for its own call and dropped right after) whenever a phase gives it rows:

* a clean latent prefill puts the two image markers on the understanding expert and the latents on
  the generation expert (both are needed; one of them streams);
* a velocity evaluation's block ``[<|vision_start|>, latents, <|vision_end|>]`` routes its two
  marker tokens to the understanding expert. Their keys/values depend on the noisy latents at every
  layer (the block attends bidirectionally), so they cannot be cached: an exact velocity needs the
  understanding expert's weights for these two rows in every call, and they stream. This keeps the
  output bit-identical to the plain run; the price is one pass of understanding weights over the
  host link per velocity call — one per denoising step, its guidance branches batched (see docs/MEMORY.md).

Weights not on the accelerator live in host memory (pinned when the accelerator is CUDA); while
off the accelerator a parameter holds a ``meta`` tensor, so where every weight is at any moment
is visible (the accounting test reads it). Built from accelerate's hook API (``ModelHook``,
``add_hook_to_module``): accelerate and diffusers offer model-, leaf- and group-level offload but
nothing that keeps one of two weight sets per phase, hence this module.

    python -m pytest tests/test_memory_expert_offload.py -q
"""

from __future__ import annotations

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import send_to_device

from ..errors import InvalidInputError
from ..modeling.modeling_unibrain import INFERENCE_PHASES

EXPERTS = ("und", "gen")

#: The expert kept on the accelerator during each phase; ``None`` keeps the current one (a clean
#: latent prefill needs both experts for a single pass, so swapping would not save a transfer).
RESIDENT_EXPERT = {
    "prefill_text": "und",
    "prefill_vit": "und",
    "decode": "und",
    "velocity": "gen",
    "prefill_latents": None,
}
assert set(RESIDENT_EXPERT) == set(INFERENCE_PHASES)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _StreamedLeaf(ModelHook):
    """On an expert's weight-holding leaf: fetch its weights for the call if its expert is not resident."""

    def __init__(self, offload: "ExpertOffload", expert: str):
        self.offload, self.expert = offload, expert
        self.execution_device = offload.execution_device
        self.streamed = False

    def pre_forward(self, module, *args, **kwargs):
        if self.offload.resident != self.expert:
            self.offload._onload(module)
            self.streamed = True
            self.offload.streamed_calls += 1
        return args, kwargs

    def post_forward(self, module, output):
        if self.streamed:
            self.offload._offload(module)
            self.streamed = False
        return output


class _PhaseHook(ModelHook):
    """On the whole model: put the phase's expert on the accelerator, and the inputs with it."""

    def __init__(self, offload: "ExpertOffload"):
        self.offload = offload
        self.execution_device = offload.execution_device

    def pre_forward(self, module, *args, **kwargs):
        phase = kwargs.get("phase")
        self.offload.phase = phase
        wanted = RESIDENT_EXPERT.get(phase)
        if wanted is not None:
            self.offload.make_resident(wanted)
        device = self.execution_device
        return send_to_device(args, device), send_to_device(kwargs, device, skip_keys=["cache"])


class ExpertOffload:
    """Keeps a UniBrain model's shared weights and one expert on ``execution_device``.

    Args:
        model: a ``UniBrainForConditionalGeneration`` whose weights are ordinary tensors (not
            quantized, not already offloaded or dispatched).
        execution_device: where the model computes (``"cuda"``; ``"cpu"`` for a dry run / tests).
        offload_device: where off-accelerator weights live (host memory).

    Attributes (for accounting): ``resident`` (``"und"``/``"gen"``), ``phase`` (the last phase seen),
    ``swaps`` (expert swaps so far), ``streamed_calls`` (leaf calls whose weights were streamed),
    :meth:`resident_bytes`, :meth:`expected_bytes`.
    """

    def __init__(self, model, execution_device, offload_device="cpu"):
        self.model = model
        self.execution_device = torch.device(execution_device)
        if self.execution_device.type == "cpu":
            self.execution_device = torch.device("cpu")  # "cpu:0" would copy tensors on every .to()
        self.offload_device = torch.device(offload_device)
        self.resident: str | None = None
        self.phase: str | None = None
        self.swaps = 0
        self.streamed_calls = 0
        self.leaves: dict[str, list[torch.nn.Module]] = {kind: [] for kind in EXPERTS}
        self._stored: dict[int, dict[str, torch.Tensor]] = {}
        pin = self.execution_device.type == "cuda" and self.offload_device.type == "cpu"
        expert_modules = set()
        for layer in model.language_model.layers:
            for kind in EXPERTS:
                for leaf in getattr(layer, kind).modules():
                    expert_modules.add(leaf)
                    params = {name: p for name, p in leaf._parameters.items() if p is not None}
                    if params:
                        self.leaves[kind].append(leaf)
                        stored = {}
                        for name, param in params.items():
                            host = param.data.to(self.offload_device)
                            stored[name] = host.pin_memory() if pin else host
                        self._stored[id(leaf)] = stored
                        self._offload(leaf)
        # Everything else (embeddings, lm_head, ViT, connector, adapters, norms, tables) stays resident.
        for module in model.modules():
            if module not in expert_modules:
                module._apply(lambda t: t.to(self.execution_device), recurse=False)
        for kind in EXPERTS:
            for leaf in self.leaves[kind]:
                add_hook_to_module(leaf, _StreamedLeaf(self, kind))
        add_hook_to_module(model, _PhaseHook(self))
        self.make_resident("und")
        self.swaps = 0

    # ------------------------------------------------------------------ moving weights
    # Inference weights: fresh parameters without gradients (a meta tensor cannot be swapped in by ``.data``).
    def _onload(self, leaf) -> None:
        for name, host in self._stored[id(leaf)].items():
            leaf._parameters[name] = torch.nn.Parameter(host.to(self.execution_device, non_blocking=True),
                                                        requires_grad=False)

    def _offload(self, leaf) -> None:
        for name, host in self._stored[id(leaf)].items():
            leaf._parameters[name] = torch.nn.Parameter(torch.empty_like(host, device="meta"), requires_grad=False)

    def make_resident(self, expert: str) -> None:
        """Swap ``expert`` onto the accelerator (the other one leaves it); a no-op if it is there."""
        if expert not in EXPERTS:
            raise InvalidInputError(f"expert must be one of {EXPERTS}; got {expert!r}")
        if self.resident == expert:
            return
        if self.resident is not None:
            for leaf in self.leaves[self.resident]:
                self._offload(leaf)
        for leaf in self.leaves[expert]:
            self._onload(leaf)
        self.resident = expert
        self.swaps += 1

    def remove(self) -> None:
        """Take the hooks off and put every weight back on the offload device (host memory)."""
        remove_hook_from_module(self.model, recurse=True)
        for kind in EXPERTS:
            for leaf in self.leaves[kind]:
                for name, host in self._stored[id(leaf)].items():
                    leaf._parameters[name] = torch.nn.Parameter(host, requires_grad=False)
        self.model.to(self.offload_device)
        self.resident = None

    # ------------------------------------------------------------------ accounting
    def expert_bytes(self, expert: str) -> int:
        return _tensor_bytes(t for leaf in self.leaves[expert] for t in self._stored[id(leaf)].values())

    def largest_leaf_bytes(self, expert: str) -> int:
        return max(_tensor_bytes(self._stored[id(leaf)].values()) for leaf in self.leaves[expert])

    def shared_bytes(self) -> int:
        return _tensor_bytes(self.model.parameters()) - self.expert_bytes("und") - self.expert_bytes("gen")

    def resident_bytes(self) -> int:
        """Bytes of model parameters on the execution device right now."""
        device = self.execution_device
        return _tensor_bytes(p for p in self.model.parameters()
                             if p.device.type == device.type and (p.device.index or 0) == (device.index or 0))

    def expected_bytes(self, expert: str | None = None) -> int:
        """The design's bound: shared parts + the resident expert + one streamed leaf of the other."""
        expert = expert or self.resident
        other = "gen" if expert == "und" else "und"
        return self.shared_bytes() + self.expert_bytes(expert) + self.largest_leaf_bytes(other)


def _check_device_exists(device, option: str) -> None:
    device = torch.device(device)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InvalidInputError(
            f"{option}: {str(device)!r} is not available on this machine ({torch.cuda.device_count()} CUDA "
            f"device(s)); name an existing GPU, or 'cpu' to run the same offload on the CPU (a dry run: it saves "
            f"no memory)")


def enable_expert_offload(pipeline, device: str | torch.device | None = None) -> ExpertOffload:
    """Run ``pipeline`` with the shared parts and one expert of its model on the accelerator.

    ``device`` defaults to the available accelerator; without one it must be given explicitly
    (``device="cpu"`` runs the same mechanism on the CPU, for tests and dry runs). The VAE is moved
    to ``device`` too. Returns the :class:`ExpertOffload` (``.remove()`` undoes it). A pipeline method
    ``pipe.enable_expert_offload(device=None)`` calls this.
    """
    if device is None:
        if not torch.cuda.is_available():
            raise InvalidInputError(
                "enable_expert_offload() needs an accelerator and none was found (torch.cuda.is_available() is "
                "False); pass device='cuda:N' on a GPU machine, or device='cpu' to run the same offload on the "
                "CPU (a dry run: it saves no memory)")
        device = "cuda"
    _check_device_exists(device, "enable_expert_offload(device=...)")
    model = pipeline.model
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise InvalidInputError(
            "enable_expert_offload() moves plain weight tensors; this model is quantized (quantization_config). "
            "A quantized model already fits: load it without enable_expert_offload(), or load bf16 weights "
            "(dtype=torch.bfloat16) to use the expert offload")
    hooked = [name for name, module in model.named_modules()
              if hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook")]
    if hooked or getattr(model, "hf_device_map", None):
        raise InvalidInputError(
            "enable_expert_offload() needs a model without other offload hooks or a device_map; call "
            "pipe.remove_all_hooks() (or load the model without device_map=...) first")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise InvalidInputError("enable_expert_offload() needs the model's weights materialised (some are on meta)")
    offload = ExpertOffload(model, device)
    if getattr(pipeline, "vae", None) is not None:
        pipeline.vae.to(offload.execution_device)
    pipeline._expert_offload = offload
    return offload


def _unindex_cpu_execution_devices(pipeline) -> None:
    """Make accelerate's hooks execute on ``cpu``, not ``cpu:0``.

    diffusers formats the offload device as ``f"{type}:{index}"``; for a CPU dry run that is ``cpu:0``,
    and a tensor moved to ``cpu:0`` is a copy, which makes accelerate store plain tensors in place of
    parameters and fail on the next call. A GPU device is unaffected.
    """
    from accelerate.hooks import SequentialHook

    cpu = torch.device("cpu")
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            hook = getattr(module, "_hf_hook", None)
            for single in (hook.hooks if isinstance(hook, SequentialHook) else [hook]):
                device = getattr(single, "execution_device", None)
                if device is not None and torch.device(device).type == "cpu":
                    single.execution_device = cpu


class ExpertOffloadMixin:
    """Memory modes for a pipeline with a UniBrain ``model`` and a ``vae`` (put it before ``DiffusionPipeline``).

    Adds :meth:`enable_expert_offload` and lets diffusers' ``enable_sequential_cpu_offload(device="cpu")``
    run on a CPU (tests, dry runs).
    """

    def enable_expert_offload(self, device: str | torch.device | None = None) -> ExpertOffload:
        """Keep the shared parts and one expert of the model on ``device`` (see :func:`enable_expert_offload`)."""
        return enable_expert_offload(self, device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        _unindex_cpu_execution_devices(self)

    def enable_group_offload(self, onload_device, *args, **kwargs):
        _check_device_exists(onload_device, "enable_group_offload(onload_device=...)")
        return super().enable_group_offload(onload_device, *args, **kwargs)


__all__ = ["ExpertOffload", "ExpertOffloadMixin", "RESIDENT_EXPERT", "enable_expert_offload"]
