"""The components of a saved UniBrain pipeline directory and how they are written.

A pipeline directory holds ``model_index.json`` plus one sub-folder per component
(``model``, ``vae``, ``scheduler``, ``tokenizer``, ``processor``). The scheduler is diffusers'
``FlowMatchEulerDiscreteScheduler``; UniBrain's sampler passes the reference time grid
(``linspace(1, 0, N)`` shifted) to it explicitly, so its own training-step settings are inert.
Writers that do not hold a pipeline object (the converter, the training export) end with
:func:`write_pipeline_index`, which writes ``model_index.json`` as diffusers would and then
completes the directory exactly as ``UniBrainPipeline.save_pretrained`` does (shipped code,
``auto_map``, model card: :func:`unibrain_hf.pipelines.hub.complete_pipeline_directory`).

    python -c "from unibrain_hf.pipelines.components import flow_match_scheduler; print(flow_match_scheduler())"
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_MODULE = "unibrain_hf.modeling.modeling_unibrain"
MODEL_CLASS = "UniBrainForConditionalGeneration"


def flow_match_scheduler(shift: float = 1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def save_pipeline_components(directory: str | Path, model, vae, tokenizer, processor) -> None:
    """Save every component of a pipeline into ``directory`` and write its ``model_index.json``."""
    directory = Path(directory)
    model.save_pretrained(str(directory / "model"))
    vae.save_pretrained(str(directory / "vae"))
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    processor.save_pretrained(directory / "processor", save_tokenizer=False)
    write_pipeline_index(directory)


def write_pipeline_index(directory: str | Path) -> None:
    """Write ``scheduler/`` and ``model_index.json`` next to already-saved model/vae/tokenizer/processor
    folders, then ship the pipeline's code and model card into the directory."""
    from .hub import complete_pipeline_directory

    directory = Path(directory)
    flow_match_scheduler().save_pretrained(str(directory / "scheduler"))
    tokenizer_class = "Qwen2Tokenizer"
    tokenizer_config = directory / "tokenizer" / "tokenizer_config.json"
    if tokenizer_config.exists():
        tokenizer_class = json.loads(tokenizer_config.read_text()).get("tokenizer_class", tokenizer_class)
    index = {
        "_class_name": "UniBrainPipeline",
        "_diffusers_version": _diffusers_version(),
        "model": [MODEL_MODULE, MODEL_CLASS],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "tokenizer": ["transformers", tokenizer_class],
        "processor": ["unibrain_hf.processing.processor", "UniBrainProcessor"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    complete_pipeline_directory(directory)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
