"""Packed-sequence attention for the MoT decoder: who may see whom, and the backends.

A training batch is one packed sequence of several samples; each sample is a list of
*splits* (a text segment, an image block) with a mode:

* ``causal`` (text): causal inside the split, sees everything earlier in its sample;
* ``full`` (ViT image, clean VAE image): bidirectional inside, sees everything earlier;
* ``noise`` (noisy VAE target): bidirectional inside, sees everything earlier — and no token
  outside the split may see it, so later text and images never peek at a noisy target.

Samples never see each other. :class:`PackedAttentionLayout` turns split lengths/modes into
either dense float masks (one per sample, for SDPA / eager — the CPU training path) or a flex
``BlockMask`` (GPU), and :func:`packed_attention` runs one of the transformers attention
interfaces over it. :func:`cached_attention` is the inference case: new query tokens against a
KV cache (bottom-right aligned causal for text, full for image blocks). :func:`recording_attention`
lets a diagnostic see the attention probabilities of packed forwards (no backend returns them).

    python -c "from unibrain_hf.modeling.attention import PackedAttentionLayout as L; \
print(L([5], [2, 3], ['causal', 'noise']).dense_masks()[0])"
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

ATTN_MODES = ("causal", "full", "noise")


@dataclass
class PackedAttentionLayout:
    """Split structure of one packed sequence (lengths in tokens)."""

    sample_lens: list[int]
    split_lens: list[int]
    attn_modes: list[str]
    _dense_cache: dict = field(default_factory=dict, repr=False)
    _block_mask_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.sample_lens = [int(s) for s in self.sample_lens]
        self.split_lens = [int(s) for s in self.split_lens]
        self.attn_modes = list(self.attn_modes)
        if len(self.split_lens) != len(self.attn_modes):
            raise ValueError(f"{len(self.split_lens)} split_lens but {len(self.attn_modes)} attn_modes")
        bad = sorted(set(self.attn_modes) - set(ATTN_MODES))
        if bad:
            raise ValueError(f"unknown attention mode(s) {bad}; expected {ATTN_MODES}")
        if sum(self.split_lens) != sum(self.sample_lens):
            raise ValueError(f"splits cover {sum(self.split_lens)} tokens but samples cover {sum(self.sample_lens)}")
        # every sample must consist of whole splits
        self.splits_per_sample = []
        split_iter = iter(self.split_lens)
        for sample_len in self.sample_lens:
            covered, count = 0, 0
            while covered < sample_len:
                covered += next(split_iter)
                count += 1
            if covered != sample_len:
                raise ValueError("split boundaries do not line up with sample boundaries")
            self.splits_per_sample.append(count)

    @property
    def total_len(self) -> int:
        return sum(self.sample_lens)

    def sample_splits(self):
        """Yield (sample_len, split_lens, modes) per sample."""
        start = 0
        for sample_len, count in zip(self.sample_lens, self.splits_per_sample):
            yield sample_len, self.split_lens[start:start + count], self.attn_modes[start:start + count]
            start += count

    # ------------------------------------------------------------------ dense masks
    @staticmethod
    def allowed_for_sample(split_lens: list[int], modes: list[str], device=None) -> torch.Tensor:
        """Boolean (L, L) matrix, True where query row may attend to key column."""
        split_id = torch.repeat_interleave(torch.arange(len(split_lens), device=device),
                                           torch.tensor(split_lens, device=device))
        mode_is_bidirectional = torch.tensor([m != "causal" for m in modes], device=device)
        mode_is_noise = torch.tensor([m == "noise" for m in modes], device=device)
        length = int(sum(split_lens))
        q = torch.arange(length, device=device)[:, None]
        k = torch.arange(length, device=device)[None, :]
        same_split = split_id[:, None] == split_id[None, :]
        allowed = (k <= q) | (same_split & mode_is_bidirectional[split_id][:, None])
        key_is_noise = mode_is_noise[split_id][None, :]
        allowed &= ~key_is_noise | same_split
        return allowed

    def dense_masks(self, dtype=torch.float32, device=None) -> list[torch.Tensor]:
        """One additive float mask (0 / -inf) of shape (L_s, L_s) per sample (cached)."""
        key = (dtype, str(device))
        if key not in self._dense_cache:
            masks = []
            for _, splits, modes in self.sample_splits():
                allowed = self.allowed_for_sample(splits, modes, device)
                mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
                masks.append(mask.masked_fill_(~allowed, float("-inf")))
            self._dense_cache[key] = masks
        return self._dense_cache[key]

    # ------------------------------------------------------------------ flex attention
    def block_mask(self, num_heads: int, device, padded_len: int | None = None):
        """A flex-attention ``BlockMask`` over the whole pack (padding tokens see only themselves)."""
        key = (num_heads, str(device), padded_len)
        if key in self._block_mask_cache:
            return self._block_mask_cache[key]
        from torch.nn.attention.flex_attention import create_block_mask

        total = self.total_len
        padded_len = padded_len or total
        split_id = torch.repeat_interleave(torch.arange(len(self.split_lens), device=device),
                                           torch.tensor(self.split_lens, device=device))
        sample_id = torch.repeat_interleave(torch.arange(len(self.sample_lens), device=device),
                                            torch.tensor(self.sample_lens, device=device))
        if padded_len > total:
            pad = padded_len - total
            split_id = torch.cat([split_id, torch.full((pad,), len(self.split_lens), device=device)])
            sample_id = torch.cat([sample_id, torch.full((pad,), len(self.sample_lens), device=device)])
        bidirectional = torch.tensor([m != "causal" for m in self.attn_modes] + [False], device=device)
        noise = torch.tensor([m == "noise" for m in self.attn_modes] + [False], device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            same_split = split_id[q_idx] == split_id[kv_idx]
            visible = (kv_idx <= q_idx) | (same_split & bidirectional[split_id[q_idx]])
            not_foreign_noise = ~noise[split_id[kv_idx]] | same_split
            return visible & not_foreign_noise & (sample_id[q_idx] == sample_id[kv_idx])

        block = create_block_mask(mask_mod, B=1, H=num_heads, Q_LEN=padded_len, KV_LEN=padded_len, device=device,
                                  BLOCK_SIZE=128)
        self._block_mask_cache[key] = block
        return block


def _interface(module):
    implementation = module.config._attn_implementation or "sdpa"
    if implementation == "eager":
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


#: Open :func:`recording_attention` blocks; packed_attention checks this list only (empty: no cost).
_RECORDERS: list[list] = []


@contextmanager
def recording_attention():
    """Record the attention probabilities of every :func:`packed_attention` call inside the block.

    Yields a list that receives, per call (one per decoder layer, in order), a list with one
    ``(H, L, L)`` float32 tensor per sample of the pack: softmax of the scaled query·key logits
    under that sample's mask (rows: queries, columns: keys; masked keys get 0). SDPA and flash
    kernels never materialise these, so they are recomputed here in the matmul form from the same
    query, key and mask; the layer's output is unchanged. For diagnostics on small inputs
    (:mod:`unibrain_hf.evaluation.copy_attention`): the tensors are dense.
    """
    record: list = []
    _RECORDERS.append(record)
    try:
        yield record
    finally:
        _RECORDERS.remove(record)


def _attention_probabilities(module, query: torch.Tensor, key: torch.Tensor,
                             layout: PackedAttentionLayout) -> list[torch.Tensor]:
    num_heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(num_heads // kv_heads, dim=1)  # query head h reads key head h // groups
    probabilities, start = [], 0
    for sample_len, mask in zip(layout.sample_lens, layout.dense_masks(dtype=torch.float32, device=query.device)):
        end = start + sample_len
        logits = torch.einsum("qhd,khd->hqk", query[start:end].float(), key[start:end].float()) * module.scaling
        probabilities.append((logits + mask[None]).softmax(-1).detach())
        start = end
    return probabilities


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     layout: PackedAttentionLayout) -> torch.Tensor:
    """Attention over a packed training sequence.

    ``query`` is (L, H, d), ``key``/``value`` are (L, H_kv, d); returns (L, H·d).
    SDPA / eager run one call per sample with that sample's dense mask; flex attention runs once
    over the whole pack with a ``BlockMask``. Backend per device and precision, by measurement
    (benchmarks/README.md, bench preset, per layer forward + backward at 1 thread): on the CPU in
    fp32 the fused SDPA kernel and the eager matmul + softmax form cost the same (65 vs 66 ms) and
    the configured one runs; under bf16 autocast the eager form is twice as fast (30 vs 61 ms: the
    CPU flash kernel gains nothing from bf16 with a float mask), so ``sdpa`` runs it there. Same
    mask, same result within rounding; GPUs keep SDPA (or flex when configured).
    """
    if _RECORDERS:
        probabilities = _attention_probabilities(module, query, key, layout)
        for record in _RECORDERS:
            record.append(probabilities)
    implementation = module.config._attn_implementation or "sdpa"
    length, num_heads, head_dim = query.shape
    if implementation == "flex_attention":
        from transformers.integrations.flex_attention import flex_attention_forward

        block = layout.block_mask(num_heads, query.device)
        out, _ = flex_attention_forward(module, query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                        value.transpose(0, 1)[None], block, scaling=module.scaling)
        return out.reshape(length, num_heads * head_dim)
    attention = _interface(module)
    if implementation == "sdpa" and query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
        attention = eager_attention_forward
    masks = layout.dense_masks(dtype=query.dtype, device=query.device)
    outputs, start = [], 0
    for sample_len, mask in zip(layout.sample_lens, masks):
        end = start + sample_len
        q = query[start:end].transpose(0, 1)[None]
        k = key[start:end].transpose(0, 1)[None]
        v = value[start:end].transpose(0, 1)[None]
        out, _ = attention(module, q, k, v, mask[None, None], dropout=0.0, scaling=module.scaling, is_causal=False)
        outputs.append(out.reshape(sample_len, num_heads * head_dim))
        start = end
    return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]


def cached_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     causal: bool) -> torch.Tensor:
    """Attention of new query tokens over ``[cache, new]`` keys, batched.

    ``query`` is (B, H, Lq, d), ``key``/``value`` are (B, H_kv, Lk, d) with the new tokens
    last. ``causal`` aligns bottom-right: query i sees the whole cache and new tokens ≤ i (text);
    otherwise every query sees every key (image blocks). Returns (B, Lq, H·d).
    """
    batch, num_heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    mask = None
    if causal and q_len > 1:
        q_pos = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        allowed = torch.arange(k_len, device=query.device)[None, :] <= q_pos
        mask = torch.zeros((q_len, k_len), dtype=query.dtype, device=query.device)
        mask = mask.masked_fill_(~allowed, float("-inf"))[None, None]
    implementation = module.config._attn_implementation or "sdpa"
    if implementation == "flex_attention":
        implementation = "sdpa"  # decoding/prefill has no structure flex would exploit
    if implementation == "sdpa":
        return _grouped_sdpa(module, query, key, value, mask)
    attention = eager_attention_forward if implementation == "eager" else \
        ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    if implementation.startswith("flash_attention"):
        out, _ = attention(module, query, key, value, None, dropout=0.0, scaling=module.scaling,
                           is_causal=causal and q_len > 1)
    else:
        out, _ = attention(module, query, key, value, mask, dropout=0.0, scaling=module.scaling, is_causal=False)
    return out.reshape(batch, q_len, num_heads * head_dim)


def _grouped_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of (B, H, Lq, d) queries over (B, H_kv, Lk, d) keys without repeating the keys per head.

    The G = H / H_kv query heads sharing a key head are stacked as G·Lq rows of that head, so the
    cache is read as it is (no ``repeat_kv`` copy of the whole cache per layer per step, which is
    what transformers' SDPA path does when a mask is given); the (Lq, Lk) mask is tiled G times.
    Every query row is independent, so the result is the per-head attention.
    """
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = num_heads // kv_heads
    rows = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    if mask is not None and groups > 1:
        mask = mask.expand(*mask.shape[:-2], q_len, mask.shape[-1]).repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=module.scaling)
    return out.reshape(batch, num_heads, q_len, head_dim).transpose(1, 2).reshape(batch, q_len, num_heads * head_dim)
