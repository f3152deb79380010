"""The KV cache of the MoT decoder during interleaved inference: growable buffers shared by snapshots.

Per layer the keys and values live in a preallocated buffer of shape (batch, kv_heads, capacity,
head_dim). A :class:`UniBrainKVCache` is a *view*: for each layer a buffer and the number of valid
tokens in it. Appending n tokens writes them into the buffer right after the view's end — one copy
of the new tokens, instead of a copy of the whole cache per layer per step as appending by
``torch.cat`` does (quadratic in the decode length) — and the buffer grows geometrically (×2)
when full, so growth costs O(1) amortised per token.

Several contexts share prefixes (the pipeline's ``cfg_text`` / ``cfg_img`` guidance contexts are
snapshots of ``gen``; a text is decoded on a copy of ``gen`` that is then thrown away), so a
snapshot (:meth:`copy`) is a new view on the same buffers and costs nothing. A view writes in place
only where no other *live* view of that buffer extends past its end; otherwise its write would
overwrite tokens another context still reads, so it first copies its own prefix into a buffer of
its own (copy-on-write). Views are tracked by weak references: a view that nobody holds any more
(a finished decoding's copy) no longer blocks writes. Tokens past every live view's end are
scratch space, which is where a read-only query block (a denoising step) is written, so that
attention reads one contiguous key range without concatenating.

With grad enabled (training's self-forcing rollout queries with gradients) nothing is written in
place: the cache then appends and queries by concatenation, so no tensor saved for backward is ever
modified; the inference primitives run under ``torch.no_grad``. transformers' ``StaticCache``
preallocates too, but for one sequence per cache without shared prefixes; ``DynamicCache``
appends by concatenation — hence this small class.

    python -c "from unibrain_hf.modeling.cache import UniBrainKVCache as C; print(C(2).length)"
"""

from __future__ import annotations

import weakref

import torch

#: Buffers hold at least this many tokens and grow in multiples of it (a 1,000-token context
#: then grows twice or three times).
CAPACITY_QUANTUM = 256


def _round_up(length: int, quantum: int = CAPACITY_QUANTUM) -> int:
    return max(quantum, -(-int(length) // quantum) * quantum)


class _Buffer:
    """Keys and values of one layer, (B, H_kv, capacity, d) each, and the views that read them."""

    __slots__ = ("keys", "values", "views", "__weakref__")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values
        self.views = weakref.WeakSet()

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[2])

    @classmethod
    def allocate(cls, like_keys: torch.Tensor, like_values: torch.Tensor, capacity: int) -> "_Buffer":
        batch, heads, _, key_dim = like_keys.shape
        keys = torch.empty((batch, heads, capacity, key_dim), dtype=like_keys.dtype, device=like_keys.device)
        values = torch.empty((batch, heads, capacity, like_values.shape[-1]), dtype=like_values.dtype,
                             device=like_values.device)
        return cls(keys, values)

    def writable(self) -> bool:
        # A buffer made under torch.inference_mode() can only be written in place inside it.
        return not self.keys.is_inference() or torch.is_inference_mode_enabled()


def _tracks_gradient() -> bool:
    # With grad enabled, attention may save a view of the buffer for backward (queries that require
    # grad against keys that do not, e.g. an adapter on q_proj only); a later in-place append would
    # then invalidate it. So under grad mode nothing is written in place.
    return torch.is_grad_enabled()


class UniBrainKVCache:
    """Per-layer keys/values (B, H_kv, L, d) of a context; a view on buffers that snapshots share.

    Args:
        num_layers: decoder layers.
        capacity: tokens to reserve on the first append (a hint; buffers grow as needed).

    ``bytes_copied`` counts the bytes this view and the views copied from it moved for growth,
    copy-on-write and concatenation (the new tokens themselves not included): a measure of the
    cache's overhead that the tests read.
    """

    def __init__(self, num_layers: int, capacity: int = 0):
        self._buffers: list[_Buffer | None] = [None] * num_layers
        self._lengths: list[int] = [0] * num_layers
        self.capacity_hint = int(capacity)
        self._stats = {"bytes_copied": 0, "allocations": 0}

    # ------------------------------------------------------------------ reading
    @property
    def num_layers(self) -> int:
        return len(self._buffers)

    @property
    def length(self) -> int:
        """Number of cached tokens (per batch row)."""
        return self._lengths[0]

    @property
    def batch_size(self) -> int:
        buffer = self._buffers[0]
        return 0 if buffer is None else int(buffer.keys.shape[0])

    @property
    def bytes_copied(self) -> int:
        return self._stats["bytes_copied"]

    @property
    def allocations(self) -> int:
        return self._stats["allocations"]

    def layer(self, index: int):
        """(keys, values) of a layer, each (B, H_kv, L, d) — views into the buffer — or (None, None)."""
        buffer, length = self._buffers[index], self._lengths[index]
        if buffer is None:
            return None, None
        return buffer.keys[:, :, :length], buffer.values[:, :, :length]

    @property
    def keys(self) -> list[torch.Tensor | None]:
        return [self.layer(i)[0] for i in range(self.num_layers)]

    @property
    def values(self) -> list[torch.Tensor | None]:
        return [self.layer(i)[1] for i in range(self.num_layers)]

    def nbytes(self) -> int:
        """Bytes of the valid tokens of this view (not of the buffers' spare capacity)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def reserved_bytes(self) -> int:
        """Bytes of the distinct buffers this view reads (capacity included)."""
        seen = {id(b): b for b in self._buffers if b is not None}
        return sum(b.keys.numel() * b.keys.element_size() + b.values.numel() * b.values.element_size()
                   for b in seen.values())

    # ------------------------------------------------------------------ views
    def _adopt(self, index: int, buffer: _Buffer | None, length: int) -> None:
        self._buffers[index], self._lengths[index] = buffer, int(length)
        if buffer is not None:
            buffer.views.add(self)

    def copy(self) -> "UniBrainKVCache":
        """A snapshot: a new view on the same buffers (no tensor is copied)."""
        clone = UniBrainKVCache(self.num_layers, self.capacity_hint)
        clone._stats = self._stats  # one account per family of views
        for index, (buffer, length) in enumerate(zip(self._buffers, self._lengths)):
            clone._adopt(index, buffer, length)
        return clone

    def _may_write_after_end(self, index: int) -> bool:
        """True when no other live view of this layer's buffer reads tokens past this view's end."""
        buffer, length = self._buffers[index], self._lengths[index]
        if not buffer.writable():
            return False
        return all(view._lengths[index] <= length for view in buffer.views
                   if view is not self and view._buffers[index] is buffer)

    def _count_copy(self, tensors) -> None:
        self._stats["bytes_copied"] += sum(t.numel() * t.element_size() for t in tensors)

    def _own_buffer(self, index: int, capacity: int, like_keys, like_values) -> None:
        """Move this view's layer to a fresh buffer of ``capacity`` tokens, copying its valid prefix."""
        fresh = _Buffer.allocate(like_keys, like_values, capacity)
        self._stats["allocations"] += 1
        keys, values = self.layer(index)
        if keys is not None and keys.shape[2]:
            fresh.keys[:, :, :keys.shape[2]].copy_(keys)
            fresh.values[:, :, :values.shape[2]].copy_(values)
            self._count_copy((keys, values))
        self._adopt(index, fresh, self._lengths[index])

    def _reserve_after_end(self, index: int, count: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Make positions [end, end + count) of this view's buffer writable without disturbing other views."""
        buffer, length = self._buffers[index], self._lengths[index]
        needed = length + count
        if buffer is None:
            self._own_buffer(index, _round_up(max(needed, self.capacity_hint)), keys, values)
        elif needed > buffer.capacity:
            self._own_buffer(index, _round_up(max(needed, 2 * buffer.capacity)), buffer.keys, buffer.values)
        elif not self._may_write_after_end(index):
            self._own_buffer(index, buffer.capacity, buffer.keys, buffer.values)

    def _check_block(self, keys: torch.Tensor) -> None:
        buffer = self._buffers[0]
        if buffer is not None and self.length and int(keys.shape[0]) != int(buffer.keys.shape[0]):
            raise ValueError(f"cache holds batch size {buffer.keys.shape[0]} but the block has {keys.shape[0]}")

    # ------------------------------------------------------------------ writing
    def append(self, index: int, keys: torch.Tensor, values: torch.Tensor):
        """Append a block (B, H_kv, n, d) to one layer; returns that layer's keys/values, the block included.

        The block is cast to the cache's dtype and device (a cache keeps the dtype and device of its
        first block). Under autograd the layer becomes the concatenation (a new tensor; nothing is
        written in place).
        """
        self._check_block(keys)
        buffer = self._buffers[index]
        if buffer is not None:
            keys, values = keys.to(buffer.keys), values.to(buffer.values)
        if _tracks_gradient():
            past_keys, past_values = self.layer(index)
            if past_keys is not None:
                self._count_copy((past_keys, past_values))
                keys, values = torch.cat([past_keys, keys], dim=2), torch.cat([past_values, values], dim=2)
            self.set_layer(index, keys, values)
            return keys, values
        count = keys.shape[2]
        self._reserve_after_end(index, count, keys, values)
        buffer, start = self._buffers[index], self._lengths[index]
        buffer.keys[:, :, start:start + count].copy_(keys)
        buffer.values[:, :, start:start + count].copy_(values)
        self._lengths[index] = start + count
        return self.layer(index)

    def extended(self, index: int, keys: torch.Tensor, values: torch.Tensor):
        """One layer's keys/values with a block appended, leaving this view unchanged (a read-only query).

        The block goes to the buffer's scratch space past the view's end when no other live view
        reads there, else (a shorter snapshot of a longer context) the result is a concatenation.
        """
        self._check_block(keys)
        buffer, length = self._buffers[index], self._lengths[index]
        if buffer is None:
            return keys, values
        keys, values = keys.to(buffer.keys), values.to(buffer.values)
        count = keys.shape[2]
        if (_tracks_gradient() or length + count > buffer.capacity
                or not self._may_write_after_end(index)):
            past_keys, past_values = self.layer(index)
            self._count_copy((past_keys, past_values))
            return torch.cat([past_keys, keys], dim=2), torch.cat([past_values, values], dim=2)
        buffer.keys[:, :, length:length + count].copy_(keys)
        buffer.values[:, :, length:length + count].copy_(values)
        return buffer.keys[:, :, :length + count], buffer.values[:, :, :length + count]

    def set_layer(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Make a layer's content exactly ``keys``/``values`` (B, H_kv, L, d), held as they are (no copy)."""
        self._adopt(index, _Buffer(keys, values), keys.shape[2])

    def reserve(self, capacity: int) -> "UniBrainKVCache":
        """Give every filled layer room for ``capacity`` tokens now (transformers' static-cache idea)."""
        for index, buffer in enumerate(self._buffers):
            if buffer is not None and buffer.capacity < capacity:
                self._own_buffer(index, _round_up(capacity), buffer.keys, buffer.values)
        self.capacity_hint = max(self.capacity_hint, int(capacity))
        return self

    # ------------------------------------------------------------------ conversions
    def to(self, *args, **kwargs) -> "UniBrainKVCache":
        clone = UniBrainKVCache(self.num_layers, self.capacity_hint)
        for index in range(self.num_layers):
            keys, values = self.layer(index)
            if keys is not None:
                clone.set_layer(index, keys.to(*args, **kwargs), values.to(*args, **kwargs))
        return clone

    def expand_batch(self, batch_size: int) -> "UniBrainKVCache":
        """Repeat a batch-1 context for ``batch_size`` rows (shared prompt, several images)."""
        if self.batch_size not in (0, 1):
            raise ValueError("only a batch-1 cache can be expanded")
        clone = UniBrainKVCache(self.num_layers, self.capacity_hint)
        for index in range(self.num_layers):
            keys, values = self.layer(index)
            if keys is not None:  # materialised: rows are written independently from now on
                clone.set_layer(index, keys.expand(batch_size, -1, -1, -1).contiguous(),
                                values.expand(batch_size, -1, -1, -1).contiguous())
        return clone
