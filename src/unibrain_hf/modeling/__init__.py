"""The UniBrain model: configuration, MoT decoder, attention layouts, KV cache.

Names are imported on first access, so that importing the configuration alone stays light.
"""

import importlib

_LAZY = {
    "UniBrainKVCache": ".cache",
    "UniBrainConfig": ".configuration_unibrain",
    "UniBrainForConditionalGeneration": ".modeling_unibrain",
    "UniBrainOutput": ".modeling_unibrain",
    "UniBrainPreTrainedModel": ".modeling_unibrain",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["UniBrainConfig", "UniBrainForConditionalGeneration", "UniBrainKVCache", "UniBrainOutput",
           "UniBrainPreTrainedModel"]
