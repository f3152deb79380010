"""What each UniBrain training stage trains, and how it runs a pack: one small :class:`Stage` spec each.

* ``align`` (stage 1, self-alignment): only the generation expert (``.gen.`` weights, ``norm_gen``)
  and the timestep embedder learn; the understanding expert is gradient-stopped (``freeze_und``)
  and the ViT, connector and ``vae2llm`` / ``llm2vae`` adapters are frozen, as in UniBrain.
  Data: reconstruct a slice from its ViT tokens.
* ``unified`` (stage 2): everything except the VAE (which is never part of the model) learns.
* ``dhs`` (stage 3, dynamic hidden states / self-forcing): the LLM (both experts, embeddings,
  lm_head) and the timestep embedder learn; ViT, connector and the latent adapters are frozen.
  Its forward is the self-forcing rollout (:mod:`.self_forcing`).

A stage is a trainable-parameter predicate, the expert freeze flags and a forward. The flags are
set in exactly one place, :func:`set_expert_freeze`. :class:`StageModule` is what the
distributed wrappers (DDP, FSDP2, DeepSpeed) wrap: calling it runs the stage's forward, so the
wrappers' hooks see one call per pack whatever the stage does inside.

    python -c "from unibrain_hf.train.stages import STAGES; print({n: s.data_task for n, s in STAGES.items()})"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

_ALIGN = re.compile(r"^(language_model\.layers\.\d+\.gen\.|language_model\.norm_gen\.|time_embedder\.)")
_FROZEN_IN_DHS = re.compile(r"^(vision_model\.|connector\.|vae2llm\.|llm2vae\.)")
_PEFT_PREFIX = "base_model.model."


def unwrap_peft(model):
    """The ``UniBrainForConditionalGeneration`` inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_expert_freeze(model, und: bool = False, gen: bool = False) -> None:
    """Gradient-stop the understanding / generation expert's hidden states during training.

    The one place the flags are set (on the model's decoder, through ``freeze_experts``); an
    exported model gets both reset here before it is saved, so the flags never ship.
    """
    unwrap_peft(model).freeze_experts(und=und, gen=gen)


def _packed_forward(model, batch, padded_latents, lockstep: bool = False):
    return model(**batch.model_inputs(padded_latents))  # one decoder call per pack: the same on every rank


def _self_forcing_forward(model, batch, padded_latents, lockstep: bool = False):
    from .self_forcing import self_forcing_forward

    return self_forcing_forward(unwrap_peft(model), batch, padded_latents, lockstep=lockstep)


@dataclass(frozen=True)
class Stage:
    name: str
    data_task: str  # "recon" (stage 1) or "unified" (stages 2/3): which sample builder feeds it
    trainable: Callable[[str], bool]  # parameter name (without a peft prefix) → learns in this stage
    freeze_und: bool
    freeze_gen: bool
    forward: Callable  # (model, PackedBatch, padded_latents, lockstep=False) → UniBrainOutput
    # The forward calls the decoder layers a data-dependent number of times per pack. Parameter
    # sharding (FSDP2, ZeRO-3) gathers layer weights with one collective per call, so under
    # sharding such a forward runs with lockstep=True: the ranks agree on one sequence of calls
    # and pad theirs with calls that add exactly zero (see .self_forcing).
    data_dependent_calls: bool = False

    def is_trainable(self, name: str) -> bool:
        return self.trainable(name.removeprefix(_PEFT_PREFIX))

    def apply(self, model) -> list[str]:
        """Set ``requires_grad`` and the expert freeze flags on ``model``; return the trainable names."""
        set_expert_freeze(model, und=self.freeze_und, gen=self.freeze_gen)
        names = []
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self.is_trainable(name))
            if parameter.requires_grad:
                names.append(name)
        return names


STAGES: dict[str, Stage] = {
    "align": Stage("align", "recon", lambda name: bool(_ALIGN.match(name)), freeze_und=True, freeze_gen=False,
                   forward=_packed_forward),
    "unified": Stage("unified", "unified", lambda name: True, freeze_und=False, freeze_gen=False,
                     forward=_packed_forward),
    "dhs": Stage("dhs", "unified", lambda name: not _FROZEN_IN_DHS.match(name), freeze_und=False, freeze_gen=False,
                 forward=_self_forcing_forward, data_dependent_calls=True),
}


class StageModule(nn.Module):
    """The model plus its stage's forward, as one module for DDP / FSDP2 / DeepSpeed to wrap.

    ``lockstep`` is set by :func:`~unibrain_hf.train.parallel.prepare` when the parameters are
    sharded: every rank must then make the same sequence of decoder calls.
    """

    def __init__(self, model: nn.Module, stage: Stage):
        super().__init__()
        self.model = model
        self.stage = stage
        self.lockstep = False

    def forward(self, batch, padded_latents):
        return self.stage.forward(self.model, batch, padded_latents, lockstep=self.lockstep)


def configure_stage(model, stage: str) -> list[str]:
    """Apply stage ``stage`` to ``model`` (``requires_grad`` and freeze flags); return trainable names."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGES)}")
    return STAGES[stage].apply(model)


def is_trainable(stage: str, name: str) -> bool:
    return STAGES[stage].is_trainable(name)


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


__all__ = ["Stage", "STAGES", "StageModule", "configure_stage", "set_expert_freeze", "unwrap_peft",
           "is_trainable", "trainable_parameter_names"]
