"""How the model is spread over processes: one process, DDP, FSDP2 or DeepSpeed ZeRO-3 — chosen by the launch.

``accelerate launch --config_file configs/accelerate/<x>.yaml`` decides the layout; this module
reads it (:func:`plan_parallelism`), refuses combinations that cannot work before anything is
loaded, wraps the model (:func:`prepare`) and provides the few operations whose correct form
depends on the layout: gradient clipping on the global norm, gradient-sync control for
accumulation, the full state dict for export, and the (sharded) state dicts for checkpoints.

FSDP2 on CPU: accelerate 1.x turns an FSDP launch into FSDP only on CUDA-like devices
(``AcceleratorState`` enables it for MULTI_GPU/NPU/XPU/... distributed types, never MULTI_CPU), so
two CPU processes launched with ``fsdp2.yaml`` would each train an unsharded, unsynchronised copy.
Where accelerate's FSDP plugin is not active but the launch asked for FSDP
(``ACCELERATE_USE_FSDP=true``), this module applies torch's ``fully_shard`` itself, with the same
settings (``FSDP_TRANSFORMER_CLS_TO_WRAP``, ``FSDP_RESHARD_AFTER_FORWARD``) on a one-dimensional
device mesh over gloo. On GPUs accelerate's plugin path is used unchanged.

DeepSpeed ZeRO-3 is written by construction and has not been run (DeepSpeed is not installable
on the CPU machine this package is tested on).

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 -m unibrain_hf.train --config configs/tiny_unified.yaml
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

REPLICATED, FSDP2, ZERO3 = "replicated", "fsdp2", "zero3"


@dataclass(frozen=True)
class Parallelism:
    sharding: str  # REPLICATED (one process or DDP) | FSDP2 | ZERO3
    world_size: int
    rank: int
    via_accelerate: bool = True  # False: FSDP2 applied here with fully_shard (accelerate cannot on CPU)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if self.sharding == REPLICATED:
            return "DDP" if self.distributed else "one process"
        if self.sharding == FSDP2:
            return "FSDP2 (accelerate plugin)" if self.via_accelerate else "FSDP2 (torch fully_shard on gloo)"
        return "DeepSpeed ZeRO-3"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def plan_parallelism(accelerator, stage, config) -> Parallelism:
    """The layout this launch asked for; a :class:`ConfigError` for combinations that cannot train."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    world, rank = accelerator.num_processes, accelerator.process_index
    if kind == DistributedType.FSDP or _env_flag("ACCELERATE_USE_FSDP"):
        version = accelerator.state.fsdp_plugin.fsdp_version if kind == DistributedType.FSDP \
            else int(os.environ.get("FSDP_VERSION", "1"))
        if version != 2:
            raise ConfigError(f"the accelerate config asks for FSDP version {version}; this trainer shards with "
                              "FSDP2 (set fsdp_version: 2, as in configs/accelerate/fsdp2.yaml)")
        if world < 2:
            raise ConfigError("the accelerate config asks for FSDP but the launch has 1 process: sharding needs at "
                              "least 2 (launch with --num_processes N, or use configs/accelerate/cpu_2proc.yaml / no "
                              "accelerate config for one process)")
        return Parallelism(FSDP2, world, rank, via_accelerate=kind == DistributedType.FSDP)
    if kind == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.zero_stage
        if zero != 3:
            raise ConfigError(f"the accelerate config asks for DeepSpeed ZeRO-{zero}; this trainer supports ZeRO-3 "
                              "(configs/accelerate/deepspeed_zero3.yaml) or FSDP2")
        if config.train.save_every:
            raise ConfigError("DeepSpeed writes its checkpoints with torch.save (pickles), which this package neither "
                              "writes nor reads: set train.save_every: 0 (the final export is still written) or "
                              "launch with configs/accelerate/fsdp2.yaml for resumable runs")
        if config.train.packs_per_step != 1:
            raise ConfigError("train.packs_per_step > 1 is not supported under DeepSpeed (its engine counts "
                              "accumulation steps itself); use gradient_accumulation_steps in the DeepSpeed config")
        return Parallelism(ZERO3, world, rank)
    return Parallelism(REPLICATED, world, rank)


# ------------------------------------------------------------------------------------- wrapping
def _fully_shard_here(module, accelerator) -> None:
    """FSDP2 by hand (CPU/gloo): each configured layer class is a unit, the root holds the rest.

    Every rank must call the same units the same number of times per step (each call all-gathers
    the unit's weights); the decoder layers do (once per pack, or in stage 3 the rollout schedule
    all ranks agree on, see .lockstep), whereas a rank whose packs lost every ViT image to
    condition dropout never calls the vision tower, so the SigLIP layers belong in the root unit
    (configs/accelerate/fsdp2.yaml wraps only UniBrainDecoderLayer).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = {n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()}
    names = names or {"UniBrainDecoderLayer"}
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() in ("1", "true")
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    units = [m for m in module.modules() if type(m).__name__ in names]
    if not units:
        raise ConfigError(f"FSDP_TRANSFORMER_CLS_TO_WRAP names {sorted(names)}, which match no layer of the model")
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard)


def prepare(accelerator, plan: Parallelism, module, make_optimizer, max_grad_norm: float = 1.0):
    """Wrap ``module`` for ``plan`` and build its optimizer on the *prepared* parameters.

    ``make_optimizer(parameters)`` builds the torch optimizer. Returns ``(prepared, optimizer)``;
    ``optimizer`` may be accelerate's wrapper (use :func:`torch_optimizer` for the inner one).
    Under ZeRO-3 the engine clips, with ``max_grad_norm``.
    """
    def trainable(m):
        return [p for p in m.parameters() if p.requires_grad]

    from torch.distributed.fsdp import FSDPModule

    from .stages import StageModule

    if plan.sharding != REPLICATED and isinstance(module, StageModule):
        # Each call of a sharded unit is a collective every rank must join: a stage whose decoder
        # calls depend on the pack (self-forcing) must make the same calls on every rank (.lockstep).
        module.lockstep = module.stage.data_dependent_calls
    if plan.sharding == REPLICATED:
        prepared = accelerator.prepare_model(module)
        return prepared, accelerator.prepare_optimizer(make_optimizer(trainable(module)))
    if plan.sharding == FSDP2 and not plan.via_accelerate:
        _fully_shard_here(module, accelerator)
        prepared, optimizer = module, make_optimizer(trainable(module))
    else:
        if plan.sharding == ZERO3:
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = 1  # one pack per process and step
            ds_config["gradient_clipping"] = max_grad_norm
        # FSDP2 via accelerate and ZeRO-3 swap the parameters while preparing: the optimizer must be
        # prepared together with the model (accelerate re-points it at the sharded parameters).
        prepared, optimizer = accelerator.prepare(module, make_optimizer(trainable(module)))
    if isinstance(prepared, FSDPModule):
        # A rank whose packs use no ViT image (condition dropout) or no generation token leaves some
        # parameters without a gradient; reduce-scattering zeros for them keeps the ranks' collectives
        # the same size (FSDP2's counterpart of DDP's find_unused_parameters).
        prepared.set_reduce_scatter_unused_params(True)
    return prepared, optimizer


def torch_optimizer(optimizer):
    """The torch optimizer whose param_groups the LR schedule drives and whose state is checkpointed.

    Inside accelerate's wrapper, and under ZeRO-3 inside DeepSpeed's partitioning optimizer too.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer  # DeepSpeed's ZeRO optimizer wraps the torch one
    return inner


def unwrap(accelerator, prepared):
    """The :class:`~unibrain_hf.train.stages.StageModule` inside DDP / DeepSpeed (FSDP2 keeps the module)."""
    return accelerator.unwrap_model(prepared, keep_fp32_wrapper=True)


def clean_name(name: str) -> str:
    """Parameter names without wrapper segments (activation-checkpoint / compile wrappers)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


# ------------------------------------------------------------------------------------- per step
@contextlib.contextmanager
def gradient_sync(prepared, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-batches (``enabled=False``)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(prepared, DistributedDataParallel):
        with prepared.no_sync():
            yield
    elif isinstance(prepared, FSDPModule):
        prepared.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            prepared.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(accelerator, plan: Parallelism, prepared, parameters, max_norm: float) -> float | None:
    """Clip on the global gradient norm (over all shards and ranks) and return it."""
    from torch.distributed.tensor import DTensor

    if plan.sharding == ZERO3:
        return None  # the DeepSpeed engine clips (gradient_clipping) and reports the norm after its step
    if plan.sharding == FSDP2 and not plan.via_accelerate:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)  # DTensor-aware: a Partial norm, reduced
    else:
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def deepspeed_grad_norm(prepared) -> float | None:
    norm = prepared.get_global_grad_norm() if hasattr(prepared, "get_global_grad_norm") else None
    return None if norm is None else float(norm)


# ------------------------------------------------------------------------------------- state
def checkpoint_state(model, optimizer) -> tuple[dict, dict]:
    """This rank's (model, optimizer) state dicts of the trainable weights, sharded as they are trained."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, torch_optimizer(optimizer), options=StateDictOptions(ignore_frozen_params=True))


def load_checkpoint_state(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, torch_optimizer(optimizer), model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def full_state_dict(model, plan: Parallelism) -> dict[str, torch.Tensor]:
    """A copy of every weight of ``model`` at full size on rank 0's CPU (other ranks: {}).

    Sharded layouts gather one tensor at a time (only rank 0 keeps it); the copies never alias
    the live parameters, so the caller may swap weights back or merge adapters into the result.
    """
    if plan.sharding == ZERO3:
        import deepspeed

        gathered = {}
        for name, parameter in model.named_parameters():
            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
                if plan.rank == 0:
                    gathered[clean_name(name)] = parameter.detach().to("cpu", copy=True)
        if plan.rank == 0:
            gathered.update({clean_name(n): b.detach().to("cpu", copy=True) for n, b in model.named_buffers()
                             if n in model.state_dict()})
        return gathered
    if plan.sharding == FSDP2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v if v.device.type != "cpu" or not _aliases_parameter(v, model) else v.clone()
                for k, v in state.items()} if plan.rank == 0 else {}
    if plan.rank != 0:
        return {}
    return {clean_name(k): v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _aliases_parameter(tensor: torch.Tensor, model) -> bool:
    """True when ``tensor`` shares storage with a live parameter or buffer of ``model`` (unsharded leftovers)."""
    pointer = tensor.untyped_storage().data_ptr()
    return any(not hasattr(t, "to_local") and t.untyped_storage().data_ptr() == pointer
               for t in list(model.parameters()) + list(model.buffers()))


__all__ = ["Parallelism", "plan_parallelism", "prepare", "torch_optimizer", "unwrap", "gradient_sync",
           "clip_grad_norm", "deepspeed_grad_norm", "checkpoint_state",
           "load_checkpoint_state", "full_state_dict", "clean_name", "REPLICATED", "FSDP2", "ZERO3"]
