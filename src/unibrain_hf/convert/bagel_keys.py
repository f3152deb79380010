"""Parameter-name mapping from BAGEL / UniBrain checkpoints to this package's model.

BAGEL stores the two experts as ``<name>`` / ``<name>_moe_gen`` twins under
``language_model.model.layers.N``; this package groups each expert's weights of a layer into
``language_model.layers.N.und`` / ``.gen``. The ViT, connector and adapters keep their names
up to their prefix. The two fixed sin-cos tables are not stored: the model computes them.

    python -c "from unibrain_hf.convert.bagel_keys import rename_bagel_key as r; \
print(r('language_model.model.layers.3.self_attn.q_proj_moe_gen.weight'))"
"""

from __future__ import annotations

import re

# Keys the model recomputes from a formula; their stored values are checked, then dropped.
FIXED_TABLE_KEYS = {
    "latent_pos_embed.pos_embed": "latent_pos_embed",
    "vit_pos_embed.pos_embed": "vit_pos_embed",
}

_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
_ATTN = re.compile(r"^self_attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)(_moe_gen)?\.(weight|bias)$")
_MLP = re.compile(r"^(mlp|mlp_moe_gen)\.(gate_proj|up_proj|down_proj)\.weight$")
_NORM = re.compile(r"^(input_layernorm|post_attention_layernorm)(_moe_gen)?\.weight$")
_VIT_LAYER = re.compile(r"^vit_model\.vision_model\.encoder\.layers\.(\d+)\.(.+)$")


class UnknownKeyError(KeyError):
    pass


def rename_bagel_key(key: str) -> str | None:
    """Return this package's name for a BAGEL key, ``None`` for keys to drop, or raise for unknown keys."""
    if key in FIXED_TABLE_KEYS:
        return None
    match = _LAYER.match(key)
    if match:
        index, rest = match.groups()
        prefix = f"language_model.layers.{index}"
        if m := _ATTN.match(rest):
            name, gen, kind = m.groups()
            return f"{prefix}.{'gen' if gen else 'und'}.{name}.{kind}"
        if m := _MLP.match(rest):
            block, proj = m.groups()
            return f"{prefix}.{'gen' if block.endswith('_moe_gen') else 'und'}.mlp.{proj}.weight"
        if m := _NORM.match(rest):
            name, gen = m.groups()
            return f"{prefix}.{'gen' if gen else 'und'}.{name}.weight"
        raise UnknownKeyError(key)
    simple = {
        "language_model.model.embed_tokens.weight": "language_model.embed_tokens.weight",
        "language_model.model.norm.weight": "language_model.norm.weight",
        "language_model.model.norm_moe_gen.weight": "language_model.norm_gen.weight",
        "language_model.lm_head.weight": "lm_head.weight",
        "time_embedder.mlp.0.weight": "time_embedder.embedding.linear_1.weight",
        "time_embedder.mlp.0.bias": "time_embedder.embedding.linear_1.bias",
        "time_embedder.mlp.2.weight": "time_embedder.embedding.linear_2.weight",
        "time_embedder.mlp.2.bias": "time_embedder.embedding.linear_2.bias",
        "vit_model.vision_model.embeddings.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
        "vit_model.vision_model.embeddings.patch_embedding.bias": "vision_model.embeddings.patch_embedding.bias",
        "vit_model.vision_model.embeddings.position_embedding.weight":
            "vision_model.embeddings.position_embedding.weight",
        "vit_model.vision_model.post_layernorm.weight": "vision_model.post_layernorm.weight",
        "vit_model.vision_model.post_layernorm.bias": "vision_model.post_layernorm.bias",
    }
    if key in simple:
        return simple[key]
    if m := _VIT_LAYER.match(key):
        return f"vision_model.layers.{m.group(1)}.{m.group(2)}"
    for prefix in ("connector.fc1.", "connector.fc2.", "vae2llm.", "llm2vae."):
        if key.startswith(prefix) and key.rsplit(".", 1)[-1] in ("weight", "bias"):
            return key
    raise UnknownKeyError(key)


def vit_layer_index(key: str) -> int | None:
    m = _VIT_LAYER.match(key)
    return int(m.group(1)) if m else None
