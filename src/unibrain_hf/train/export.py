"""Write a trained run as a pipeline (and a peft adapter for LoRA runs), from the EMA or the trained weights.

Every rank takes part in gathering the weights (one tensor at a time, to rank 0's CPU); only
rank 0 then holds a full copy — the one the export writes. The model is rebuilt from that state
dict with ``from_pretrained(None, config=..., state_dict=...)`` (no second copy, no random
init), LoRA adapters are merged by peft, the expert freeze flags are reset, and the pipeline
is written atomically with the VAE, tokenizer and processor.

    python -c "from unibrain_hf.train.export import write_export; help(write_export)"
"""

from __future__ import annotations

import copy
from pathlib import Path

_PEFT_PREFIX = "base_model.model."


def write_export(state: dict, model, vae, tokenizer, processor, output_dir: Path) -> Path:
    """Rank 0: ``<output_dir>/pipeline`` from a full ``state`` of ``model``'s weights.

    ``model`` is the trained module, plain or peft-wrapped (only its configuration is read); a
    LoRA run's adapter also goes to ``<output_dir>/lora_adapter`` in peft format.
    """
    from ..pipelines.components import save_pipeline_components
    from ..utils.atomic import atomic_directory
    from .stages import set_expert_freeze, unwrap_peft

    base = unwrap_peft(model)
    config = copy.deepcopy(base.config)
    final = Path(output_dir) / "pipeline"
    with atomic_directory(final) as tmp:
        if hasattr(model, "peft_config"):
            from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

            adapter = get_peft_model_state_dict(model, state_dict=state)
            base_state = {k.removeprefix(_PEFT_PREFIX).replace(".base_layer.", "."): v for k, v in state.items()
                          if "lora_" not in k}
            rebuilt = type(base).from_pretrained(None, config=config, state_dict=base_state)
            rebuilt.config.name_or_path = base.config.name_or_path  # the adapter records its base model
            wrapped = get_peft_model(rebuilt, copy.deepcopy(model.peft_config["default"]))
            set_peft_model_state_dict(wrapped, adapter)
            with atomic_directory(Path(output_dir) / "lora_adapter") as adapter_dir:
                wrapped.save_pretrained(str(adapter_dir))
            export_model = wrapped.merge_and_unload()
        else:
            export_model = type(base).from_pretrained(None, config=config, state_dict=dict(state))
        set_expert_freeze(export_model, und=False, gen=False)  # the flags are a training setting, never shipped
        save_pipeline_components(tmp, export_model, vae, tokenizer, processor)
    return final
