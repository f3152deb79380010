"""The special tokens every UniBrain sequence is built from, shared by training, inference and conversion.

* ``<|im_start|>`` / ``<|im_end|>`` wrap every text segment (BAGEL's Qwen2 chat markers; the
  model config calls their ids ``bos_token_id`` / ``eos_token_id``);
* ``<|vision_start|>`` / ``<|vision_end|>`` wrap every image block (VAE latents or ViT patches);
* ``<think>`` / ``</think>`` enclose a reasoning text (plain text, not added tokens).

    python -c "from unibrain_hf.protocol.tokens import SPECIAL_TOKENS; print(SPECIAL_TOKENS)"
"""

from __future__ import annotations

from types import MappingProxyType

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
START_OF_IMAGE_TOKEN = "<|vision_start|>"
END_OF_IMAGE_TOKEN = "<|vision_end|>"

#: The four added tokens a UniBrain tokenizer must hold, in the order the processor reports them.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, START_OF_IMAGE_TOKEN, END_OF_IMAGE_TOKEN)

#: Model-config id field -> the token whose id it holds.
CONFIG_TOKEN_FIELDS = MappingProxyType({
    "bos_token_id": BOS_TOKEN,
    "eos_token_id": EOS_TOKEN,
    "start_of_image_token_id": START_OF_IMAGE_TOKEN,
    "end_of_image_token_id": END_OF_IMAGE_TOKEN,
})

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "START_OF_IMAGE_TOKEN", "END_OF_IMAGE_TOKEN", "SPECIAL_TOKENS",
           "CONFIG_TOKEN_FIELDS", "THINK_OPEN", "THINK_CLOSE"]
