"""Turn on activation (gradient) checkpointing of the decoder and ViT layers, non-reentrant.

transformers renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
during the 5.x series; this picks whichever the installed version has.

    python -c "from unibrain_hf.modeling.checkpointing import enable_activation_checkpointing"
"""

from __future__ import annotations


def enable_activation_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
