"""Start a from-scratch model with one attention head that reads the same grid position of earlier images.

To carry an input's anatomy into an imputed image, the generation expert needs a head whose query at
latent grid position p matches the keys at position p of the images before it. A BAGEL checkpoint,
which UniBrain fine-tunes, has learnt such heads on image editing; a small model trained from scratch
finds one only late, and when it does varies from run to run (docs/DEMO_RUN.md, "Why T2-FLAIR stays
below the copy"). :func:`seed_copy_head` writes one into a fresh model instead, from quantities the
model already has (no new parameter, nothing the reference lacks):

* every VAE token carries the fixed 2-D sin-cos position table (columns in the first half of the
  hidden channels, rows in the second, ``[sin(p·ω_k), cos(p·ω_k)]`` each). Query and key of one head of
  the generation expert read the same (sin, cos) channels for two frequencies per axis, so their dot
  product is ``Σ cos(ω·Δ)`` over the axes and frequencies: largest at Δ = 0. ω_0 = 1 and ω_2 (≈ 0.56)
  together keep every other offset of a 16-token grid well below the peak (ω_0 alone aliases at 2π);
* those channels go to the last rotary pairs of the head, whose rotary frequencies are the lowest
  (θ ≤ 10000^(-12/16) = 1e-3 per position here), so the text between two images barely rotates them;
* QK-norm bounds the logits; the head's channels get ``gain`` in ``q_norm``/``k_norm`` so that the
  exact position outweighs its neighbours (gain 2: a logit gap of about 3.4 to a direct neighbour).

Only that head's query rows and its KV head's key rows are rewritten (the other query head sharing the
KV head keeps its own queries); training is free to change all of it.

    python -c "from unibrain_hf.train.copy_head import seed_copy_head; help(seed_copy_head)"
"""

from __future__ import annotations

import torch

#: Indices k of the sin-cos frequencies ω_k = 10000^(-k/(D/4)) the head reads, per axis.
FREQUENCIES = (0, 2)


def copy_head_channels(hidden_size: int, heads: int, head_dim: int | None = None) -> tuple[list[int], list[int]]:
    """(head channels, hidden channels) the head's query/key rows read, or ``ValueError`` if the sizes leave no room."""
    head_dim = head_dim or hidden_size // heads
    quarter, half = hidden_size // 4, head_dim // 2
    pairs = 2 * len(FREQUENCIES)  # rotary pairs used: (sin, cos) of columns and rows per frequency → 8 channels
    # The pairs used must be the slow quarter of the head's rotary pairs: with 16 pairs the fastest of the
    # last 4 turns by base^(-12/16) per position (1e-3 at base 10000); with fewer pairs text between two
    # images would rotate the position match away.
    if hidden_size % 4 or half < 4 * pairs or max(FREQUENCIES) >= quarter:
        raise ValueError(f"a copy head needs hidden_size divisible by 4 and heads of at least {8 * pairs} "
                         f"channels; got hidden_size {hidden_size}, head_dim {head_dim}")
    hidden_channels = []
    for k in FREQUENCIES:  # [sin col, cos col, sin row, cos row] of frequency k
        hidden_channels += [k, quarter + k, 2 * quarter + k, 3 * quarter + k]
    first = list(range(half - pairs, half))  # the last `pairs` rotary pairs (d, d + half): the slowest
    return first + [d + half for d in first], hidden_channels


def check_copy_head(hidden_size: int, heads: int, gain: float, head_dim: int | None = None) -> tuple[list, list]:
    """:func:`copy_head_channels` for a model of these sizes, and ``ValueError`` unless ``gain`` > 0."""
    channels = copy_head_channels(hidden_size, heads, head_dim)
    if not gain > 0:
        raise ValueError(f"the copy head's gain must be > 0; got {gain}")
    return channels


@torch.no_grad()
def seed_copy_head(model, layer: int = 0, head: int = 0, gain: float = 2.0) -> dict:
    """Rewrite query ``head`` of ``layer``'s generation expert (and its KV head) into a same-position reader.

    Returns what was written: ``{"layer", "head", "kv_head", "head_channels", "hidden_channels", "gain"}``.
    Raises ``ValueError`` where the model's sizes leave no room (a head narrower than 32 channels, a
    hidden size not divisible by 4, a layer or head that does not exist, a gain ≤ 0).
    """
    text = model.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    head_channels, hidden_channels = check_copy_head(text.hidden_size, heads, gain, head_dim)
    if not 0 <= layer < text.num_hidden_layers:
        raise ValueError(f"layer must be in 0..{text.num_hidden_layers - 1}; got {layer}")
    if not 0 <= head < heads:
        raise ValueError(f"head must be in 0..{heads - 1}; got {head}")
    kv_head = head // (heads // kv_heads)

    expert = model.language_model.layers[layer].gen
    attention = getattr(expert, "self_attn", expert)
    for projection, index in ((attention.q_proj, head), (attention.k_proj, kv_head)):
        rows = slice(index * head_dim, (index + 1) * head_dim)
        projection.weight[rows] = 0.0
        if projection.bias is not None:
            projection.bias[rows] = 0.0
        for channel, source in zip(head_channels, hidden_channels):
            projection.weight[index * head_dim + channel, source] = 1.0
    for norm in (attention.q_norm, attention.k_norm):  # shared by the heads of the expert
        norm.weight[head_channels] = gain
    return {"layer": layer, "head": head, "kv_head": kv_head, "head_channels": head_channels,
            "hidden_channels": hidden_channels, "gain": gain}


__all__ = ["FREQUENCIES", "check_copy_head", "copy_head_channels", "seed_copy_head"]
