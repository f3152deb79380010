"""The KV cache of the MoT decoder during interleaved inference.

Per layer one key and one value tensor of shape (batch, kv_heads, length, head_dim). Tensors
are never modified in place — appending creates new tensors — so a *snapshot* of a context
(the classifier-free-guidance contexts are snapshots taken before the last prompt) is a
shallow copy that costs nothing. transformers' ``DynamicCache`` always appends on update; the
denoising loop needs read-only queries against a fixed context, hence this small class.

    python -c "from unibrain_hf.modeling.cache import UniBrainKVCache as C; print(C(2).length)"
"""

from __future__ import annotations

import torch


class UniBrainKVCache:
    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        """Number of cached tokens (per batch row)."""
        return 0 if self.keys[0] is None else int(self.keys[0].shape[2])

    @property
    def batch_size(self) -> int:
        return 0 if self.keys[0] is None else int(self.keys[0].shape[0])

    def layer(self, index: int):
        return self.keys[index], self.values[index]

    def set_layer(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[index], self.values[index] = keys, values

    def copy(self) -> "UniBrainKVCache":
        clone = UniBrainKVCache(self.num_layers)
        clone.keys, clone.values = list(self.keys), list(self.values)
        return clone

    def to(self, *args, **kwargs) -> "UniBrainKVCache":
        clone = UniBrainKVCache(self.num_layers)
        clone.keys = [None if k is None else k.to(*args, **kwargs) for k in self.keys]
        clone.values = [None if v is None else v.to(*args, **kwargs) for v in self.values]
        return clone

    def expand_batch(self, batch_size: int) -> "UniBrainKVCache":
        """Repeat a batch-1 context for ``batch_size`` rows (shared prompt, several images)."""
        if self.batch_size not in (0, 1):
            raise ValueError("only a batch-1 cache can be expanded")
        clone = UniBrainKVCache(self.num_layers)
        clone.keys = [None if k is None else k.expand(batch_size, -1, -1, -1) for k in self.keys]
        clone.values = [None if v is None else v.expand(batch_size, -1, -1, -1) for v in self.values]
        return clone

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
