"""UniBrain (unified brain-MRI sequence imputation and reasoning, on BAGEL-7B-MoT) for Hugging Face.

    from unibrain_hf import UniBrainPipeline
    pipe = UniBrainPipeline.from_pretrained("path/to/converted")

Importing the package is cheap: torch, transformers and diffusers are imported only when a class
is first used (so ``unibrain --help`` answers at once). ``model_type="unibrain"`` is registered with
``AutoConfig`` as soon as transformers is imported (before or after this package), and with
``AutoModel`` as soon as a ``UniBrainConfig`` exists, so ``import unibrain_hf`` followed by
``AutoConfig.from_pretrained(dir)`` / ``AutoModel.from_pretrained(dir)`` just works.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "UniBrainConfig": "unibrain_hf.modeling.configuration_unibrain",
    "UniBrainForConditionalGeneration": "unibrain_hf.modeling.modeling_unibrain",
    "UniBrainOutput": "unibrain_hf.modeling.modeling_unibrain",
    "UniBrainProcessor": "unibrain_hf.processing.processor",
    "UniBrainPipeline": "unibrain_hf.pipelines.pipeline_unibrain",
    "UniBrainPipelineOutput": "unibrain_hf.pipelines.pipeline_output",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unibrain_hf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def _register_config(_transformers=None) -> None:
    """``AutoConfig.register("unibrain", UniBrainConfig)``; runs once transformers is imported."""
    import sys

    module = sys.modules.get(__name__ + ".modeling.configuration_unibrain")
    if module is not None and not hasattr(module, "register_auto_config"):
        return  # transformers is being imported by that very module; it registers itself when its body ends
    from .modeling.configuration_unibrain import register_auto_config

    register_auto_config()


def _register_model(_module=None) -> None:
    """``AutoModel.register(UniBrainConfig, UniBrainForConditionalGeneration)``; runs once the model module is imported."""
    from transformers import AutoModel

    from .modeling.configuration_unibrain import UniBrainConfig
    from .modeling.modeling_unibrain import UniBrainForConditionalGeneration

    AutoModel.register(UniBrainConfig, UniBrainForConditionalGeneration, exist_ok=True)


def _watch_for_transformers() -> None:
    # wrapt runs a hook right away when its module is already imported, else right after the import.
    import wrapt

    wrapt.register_post_import_hook(_register_config, "transformers")
    wrapt.register_post_import_hook(_register_model, "unibrain_hf.modeling.modeling_unibrain")


_watch_for_transformers()

__all__ = ["UniBrainConfig", "UniBrainForConditionalGeneration", "UniBrainOutput", "UniBrainProcessor",
           "UniBrainPipeline", "UniBrainPipelineOutput", "__version__"]
