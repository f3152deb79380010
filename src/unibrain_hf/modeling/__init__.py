"""The UniBrain model: configuration, MoT decoder, attention layouts, KV cache."""

from .cache import UniBrainKVCache
from .configuration_unibrain import UniBrainConfig
from .modeling_unibrain import UniBrainForConditionalGeneration, UniBrainOutput, UniBrainPreTrainedModel

__all__ = ["UniBrainConfig", "UniBrainForConditionalGeneration", "UniBrainKVCache", "UniBrainOutput",
           "UniBrainPreTrainedModel"]
