"""Write a trained run as a pipeline (and a peft adapter for LoRA runs), from the EMA or the trained weights.

Every rank takes part in gathering the weights (one tensor at a time, to rank 0's CPU); only
rank 0 then holds a full copy — the one the export writes. The model is rebuilt from that state
dict with ``from_pretrained(None, config=..., state_dict=...)`` (no second copy, no random
init), LoRA adapters are merged by peft, the expert freeze flags are reset, and the pipeline
is written with the VAE, tokenizer and processor.

A LoRA run's ``lora_adapter`` comes from the same gathered state as ``pipeline`` (EMA or trained
adapter weights, per ``train.export_weights``), so the run's starting pipeline plus
``pipe.load_lora_weights(<output_dir>/lora_adapter)`` and ``pipe.fuse_lora()`` holds exactly the
exported pipeline's weights. Both folders are built under temporary names and renamed into place
one after the other once both are complete; a stale ``lora_adapter`` (from an earlier LoRA run
into the same folder) is removed when a full fine-tune is exported, so it never passes for the
adapter of ``pipeline``.

    python -c "from unibrain_hf.train.export import write_export; help(write_export)"
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from pathlib import Path

_PEFT_PREFIX = "base_model.model."


def _write_adapter(directory: Path, model, state: dict, config):
    """Save ``state``'s LoRA weights as a peft adapter in ``directory``; return the merged base model."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from .stages import unwrap_peft

    base = unwrap_peft(model)
    adapter = get_peft_model_state_dict(model, state_dict=state)
    base_state = {k.removeprefix(_PEFT_PREFIX).replace(".base_layer.", "."): v for k, v in state.items()
                  if "lora_" not in k}
    rebuilt = type(base).from_pretrained(None, config=config, state_dict=base_state)
    # The adapter records its base model (peft reads the model's name_or_path, set at construction).
    rebuilt.name_or_path = rebuilt.config.name_or_path = base.config.name_or_path
    wrapped = get_peft_model(rebuilt, copy.deepcopy(model.peft_config["default"]))
    set_peft_model_state_dict(wrapped, adapter)
    wrapped.save_pretrained(str(directory))
    return wrapped.merge_and_unload()


def write_export(state: dict, model, vae, tokenizer, processor, output_dir: Path) -> Path:
    """Rank 0: ``<output_dir>/pipeline`` from a full ``state`` of ``model``'s weights.

    ``model`` is the trained module, plain or peft-wrapped (only its configuration is read); a
    LoRA run's adapter also goes to ``<output_dir>/lora_adapter`` in peft format (what
    ``UniBrainPipeline.load_lora_weights`` and ``PeftModel.from_pretrained`` load).
    """
    from ..pipelines.components import save_pipeline_components
    from ..utils.atomic import atomic_directory
    from .stages import set_expert_freeze, unwrap_peft

    config = copy.deepcopy(unwrap_peft(model).config)
    output_dir = Path(output_dir)
    final, adapter_final = output_dir / "pipeline", output_dir / "lora_adapter"
    lora = hasattr(model, "peft_config")
    with contextlib.ExitStack() as commits:  # leaving it renames the adapter, then the pipeline, into place
        tmp = commits.enter_context(atomic_directory(final))
        if lora:
            export_model = _write_adapter(commits.enter_context(atomic_directory(adapter_final)), model, state,
                                          config)
        else:
            export_model = type(unwrap_peft(model)).from_pretrained(None, config=config, state_dict=dict(state))
        set_expert_freeze(export_model, und=False, gen=False)  # the flags are a training setting, never shipped
        save_pipeline_components(tmp, export_model, vae, tokenizer, processor)
    if not lora and adapter_final.exists():
        shutil.rmtree(adapter_final)
    return final
