"""Write a BAGEL-format checkpoint directory from one of our models (for converter tests).

The converter's job is BAGEL → this package; the inverse lets tests produce BAGEL directories
of any size (widths, depths, GQA ratios) from a random model and check that conversion gives
back the same weights and outputs. The VAE and tokenizer files are copied from a template
BAGEL directory (e.g. the shipped fixture).

    python -m unibrain_hf.testing.synthetic_bagel TEMPLATE_DIR OUT_DIR
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

_EXPERT = re.compile(r"^language_model\.layers\.(\d+)\.(und|gen)\.(.+)$")


def to_bagel_key(name: str) -> str:
    """Inverse of :func:`unibrain_hf.convert.bagel_keys.rename_bagel_key`."""
    if m := _EXPERT.match(name):
        layer, expert, rest = m.groups()
        suffix = "_moe_gen" if expert == "gen" else ""
        prefix = f"language_model.model.layers.{layer}"
        head, _, kind = rest.rpartition(".")
        if head in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            return f"{prefix}.self_attn.{head}{suffix}.{kind}"
        if head.startswith("mlp."):
            return f"{prefix}.mlp{suffix}.{head[4:]}.{kind}"
        return f"{prefix}.{head}{suffix}.{kind}"
    simple = {
        "language_model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
        "language_model.norm.weight": "language_model.model.norm.weight",
        "language_model.norm_gen.weight": "language_model.model.norm_moe_gen.weight",
        "lm_head.weight": "language_model.lm_head.weight",
    }
    if name in simple:
        return simple[name]
    if name.startswith("time_embedder.embedding.linear_"):
        index = {"1": "0", "2": "2"}[name.split("linear_")[1][0]]
        return f"time_embedder.mlp.{index}.{name.rsplit('.', 1)[1]}"
    if name.startswith("vision_model.layers."):
        return "vit_model.vision_model.encoder.layers." + name[len("vision_model.layers."):]
    if name.startswith("vision_model."):
        return "vit_model.vision_model." + name[len("vision_model."):]
    return name


def write_bagel_directory(model, template_dir: str | Path, out_dir: str | Path, drop: tuple[str, ...] = ()) -> Path:
    """Save ``model`` as ``ema.safetensors`` + BAGEL json configs; copy VAE/tokenizer from ``template_dir``."""
    from ..modeling.modeling_unibrain import sincos_2d_table

    template_dir, out_dir = Path(template_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {to_bagel_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors["latent_pos_embed.pos_embed"] = sincos_2d_table(config.max_latent_size, config.hidden_size)
    tensors["vit_pos_embed.pos_embed"] = sincos_2d_table(config.vit_max_num_patch_per_side, config.hidden_size)
    for key in drop:
        tensors.pop(key)
    save_file(tensors, str(out_dir / "ema.safetensors"))
    text, vision = config.text_config, config.vision_config
    llm = {"model_type": "qwen2", "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
           "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
           "num_key_value_heads": text.num_key_value_heads, "vocab_size": text.vocab_size,
           "rope_theta": text.rope_parameters["rope_theta"], "rms_norm_eps": text.rms_norm_eps,
           "max_position_embeddings": text.max_position_embeddings, "hidden_act": text.hidden_act,
           "tie_word_embeddings": False, "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer"}
    vit = {"model_type": "siglip_vision_model", "hidden_size": vision.hidden_size,
           "intermediate_size": vision.intermediate_size, "num_hidden_layers": vision.num_hidden_layers + 1,
           "num_attention_heads": vision.num_attention_heads, "patch_size": vision.patch_size,
           "image_size": vision.image_size, "hidden_act": vision.hidden_act, "layer_norm_eps": vision.layer_norm_eps,
           "num_channels": vision.num_channels, "rope": False}
    (out_dir / "llm_config.json").write_text(json.dumps(llm, indent=2))
    (out_dir / "vit_config.json").write_text(json.dumps(vit, indent=2))
    template_meta = json.loads((template_dir / "model_config.json").read_text()) \
        if (template_dir / "model_config.json").exists() else {}
    meta = {"latent_patch_size": config.latent_patch_size, "max_latent_size": config.max_latent_size,
            "vit_max_num_patch_per_side": config.vit_max_num_patch_per_side, "connector_act": config.connector_act,
            "timestep_shift": config.timestep_shift, "interpolate_pos": False,
            "vae": template_meta.get("vae", {"z_channels": 16, "downsample": 8}),
            "vae_transform": template_meta.get("vae_transform", {}),
            "vit_transform": template_meta.get("vit_transform", {})}
    (out_dir / "model_config.json").write_text(json.dumps(meta, indent=2))
    for name in ("ae.safetensors", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        if (template_dir / name).exists():
            shutil.copy(template_dir / name, out_dir / name)
    return out_dir


if __name__ == "__main__":
    from ..modeling import UniBrainConfig, UniBrainForConditionalGeneration

    write_bagel_directory(UniBrainForConditionalGeneration(UniBrainConfig.tiny(vocab_size=320)), sys.argv[1],
                          sys.argv[2])
    print(f"wrote {sys.argv[2]}")
