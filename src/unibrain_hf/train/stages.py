"""What each UniBrain training stage trains.

* ``align`` (stage 1, self-alignment): only the generation expert (``.gen.`` weights, ``norm_gen``)
  and the timestep embedder learn; the understanding expert is gradient-stopped (``freeze_und``)
  and the ViT, connector and ``vae2llm`` / ``llm2vae`` adapters are frozen, as in UniBrain.
* ``unified`` (stage 2): everything except the VAE (which is never part of the model) learns.
* ``dhs`` (stage 3, dynamic hidden states / self-forcing): the LLM (both experts, embeddings,
  lm_head) and the timestep embedder learn; ViT, connector and the latent adapters are frozen.

    python -c "from unibrain_hf.train.stages import trainable_parameter_names; help(trainable_parameter_names)"
"""

from __future__ import annotations

import re

_ALIGN = re.compile(r"^(language_model\.layers\.\d+\.gen\.|language_model\.norm_gen\.|time_embedder\.)")
_FROZEN_IN_DHS = re.compile(r"^(vision_model\.|connector\.|vae2llm\.|llm2vae\.)")


def is_trainable(stage: str, name: str) -> bool:
    name = name.removeprefix("base_model.model.")
    if stage == "align":
        return bool(_ALIGN.match(name))
    if stage == "unified":
        return True
    if stage == "dhs":
        return not _FROZEN_IN_DHS.match(name)
    raise ValueError(f"unknown stage {stage!r}")


def configure_stage(model, stage: str) -> list[str]:
    """Set ``requires_grad`` and the model's gradient-stopping flags for ``stage``; return trainable names."""
    model.freeze_experts(und=stage == "align", gen=False)
    names = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_trainable(stage, name))
        if parameter.requires_grad:
            names.append(name)
    return names


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
