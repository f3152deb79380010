"""UniBrain / BAGEL-MoT as a transformers ``PreTrainedModel``.

One Qwen2-style decoder whose every layer holds two *experts* — an understanding expert
(text, ViT tokens, image marker tokens) and a generation expert (VAE latent tokens) — with
hard routing by token type and one joint attention over the packed sequence. Around it:

* a SigLIP NaViT encoder (linear patch embedding, learned positions indexed ``row·G + col``,
  per-image bidirectional attention) + a 2-layer MLP connector + a fixed 2-D sin-cos table;
* the generation adapters: ``vae2llm`` / ``llm2vae`` linear maps between 2×2-patchified VAE
  latents and the hidden size, a DiT timestep embedder on flow time t ∈ [0, 1] and a fixed
  2-D sin-cos table for latent positions.

:meth:`UniBrainForConditionalGeneration.forward` is the packed training forward (rectified
flow MSE + next-token CE); the ``*_cached`` methods are the KV-cache inference primitives the
pipeline is built from. The VAE is not part of this model (see :mod:`unibrain_hf.modeling.vae`).

    python -c "from unibrain_hf import UniBrainConfig, UniBrainForConditionalGeneration as M; \
print(M(UniBrainConfig.tiny()).num_parameters())"

Design notes. The residual stream is kept as two tensors (understanding rows, generation rows)
through the whole decoder; only queries/keys/values are merged into sequence order for the
joint attention, so routing costs one gather per layer instead of scatters of every activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer
from transformers.utils import ModelOutput

from .attention import PackedAttentionLayout, cached_attention, packed_attention
from .cache import UniBrainKVCache
from .configuration_unibrain import UniBrainConfig


# ---------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position tables
# ---------------------------------------------------------------------------------------------
def sincos_2d_table(grid_size: int, dim: int) -> torch.Tensor:
    """Row ``r·G + c`` = ``[E(c), E(r)]`` with ``E(p) = [sin(p·ω), cos(p·ω)]``, ``ω_k = 10000^(-k/(D/4))``.

    The first half of the channels encodes the column and the second half the row, as in the
    BAGEL checkpoints (computed in float64, stored float32).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos tables need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")

    def encode(positions):
        angles = positions.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    return torch.from_numpy(table).float()


class SinCosPositionTable(nn.Module):
    """A fixed (not trained, not saved) 2-D sin-cos table looked up by flattened position id."""

    def __init__(self, grid_size: int, dim: int):
        super().__init__()
        self.grid_size, self.dim = grid_size, dim
        self.register_buffer("table", sincos_2d_table(grid_size, dim), persistent=False)

    def reset_table(self) -> None:
        self.table = sincos_2d_table(self.grid_size, self.dim).to(self.table.device)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]


def flattened_position_ids(height: int, width: int, patch: int, grid_size: int) -> torch.Tensor:
    """Ids ``row·grid_size + col`` of the patches of an (height, width) image, raster order."""
    rows, cols = height // patch, width // patch
    if rows > grid_size or cols > grid_size:
        raise ValueError(f"an image of {height}×{width} px has {rows}×{cols} patches of {patch} px, more than the "
                         f"model's {grid_size}×{grid_size} position grid")
    return (torch.arange(rows)[:, None] * grid_size + torch.arange(cols)[None, :]).flatten()


# ---------------------------------------------------------------------------------------------
# Understanding encoder: SigLIP NaViT
# ---------------------------------------------------------------------------------------------
class UniBrainVisionEmbeddings(nn.Module):
    """Linear patch embedding of pre-patchified pixels + learned position embedding."""

    def __init__(self, config):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size ** 2, config.hidden_size)
        num_positions = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)

    def forward(self, pixel_patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(pixel_patches) + self.position_embedding(position_ids)


class UniBrainVisionModel(nn.Module):
    """SigLIP encoder over a pack of variable-size images (attention stays inside each image)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = UniBrainVisionEmbeddings(config)
        self.layers = nn.ModuleList([SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_patches: torch.Tensor, position_ids: torch.Tensor,
                seqlens: list[int] | torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_patches, position_ids)
        seqlens = [int(s) for s in seqlens]
        pieces = list(hidden.split(seqlens, dim=0))
        # Images of equal token count run as one batch; different sizes run separately. Either way
        # no token attends outside its own image, like the reference's varlen attention.
        by_length: dict[int, list[int]] = {}
        for index, length in enumerate(seqlens):
            by_length.setdefault(length, []).append(index)
        outputs: list[torch.Tensor | None] = [None] * len(pieces)
        for length, indexes in by_length.items():
            batch = torch.stack([pieces[i] for i in indexes], dim=0)
            for layer in self.layers:
                batch = layer(batch, None)
            batch = self.post_layernorm(batch)
            for row, index in enumerate(indexes):
                outputs[index] = batch[row]
        return torch.cat(outputs, dim=0)


class UniBrainConnector(nn.Module):
    """ViT features → LLM hidden size: Linear → activation → Linear."""

    def __init__(self, in_dim: int, out_dim: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[activation]
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden)))


class UniBrainTimestepEmbedder(nn.Module):
    """DiT-style embedding of flow time t ∈ [0, 1]: 256 [cos, sin] frequencies → Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequencies = Timesteps(frequency_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embedding = TimestepEmbedding(frequency_size, hidden_size, act_fn="silu")

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        frequencies = self.frequencies(t.reshape(-1).float())
        return self.embedding(frequencies.to(self.embedding.linear_1.weight.dtype))


# ---------------------------------------------------------------------------------------------
# Token routing between the two experts
# ---------------------------------------------------------------------------------------------
class TokenRouting:
    """Which positions of a (B, L) block go to the understanding / generation expert.

    ``merge`` interleaves per-expert tensors (B, L_und, …) and (B, L_gen, …) back into sequence
    order; ``split`` does the opposite. An expert with no tokens costs nothing.
    """

    def __init__(self, total_len: int, und_index: torch.Tensor | None, gen_index: torch.Tensor | None, device):
        empty = torch.empty(0, dtype=torch.long, device=device)
        self.total_len = int(total_len)
        self.und_index = empty if und_index is None else und_index.to(device=device, dtype=torch.long)
        self.gen_index = empty if gen_index is None else gen_index.to(device=device, dtype=torch.long)
        if self.und_index.numel() + self.gen_index.numel() != self.total_len:
            raise ValueError(f"routing covers {self.und_index.numel() + self.gen_index.numel()} of "
                             f"{self.total_len} tokens")
        self.has_und = self.und_index.numel() > 0
        self.has_gen = self.gen_index.numel() > 0
        order = torch.cat([self.und_index, self.gen_index])
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.numel(), device=device)
        self.identity_und = self.has_und and not self.has_gen and bool(
            torch.equal(self.und_index, torch.arange(self.total_len, device=device)))
        self.identity_gen = self.has_gen and not self.has_und and bool(
            torch.equal(self.gen_index, torch.arange(self.total_len, device=device)))

    def merge(self, und: torch.Tensor | None, gen: torch.Tensor | None) -> torch.Tensor:
        if self.identity_und:
            return und
        if self.identity_gen:
            return gen
        parts = [t for t in (und if self.has_und else None, gen if self.has_gen else None) if t is not None]
        return torch.cat(parts, dim=1)[:, self.inverse]

    def split(self, merged: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.identity_und:
            return merged, None
        if self.identity_gen:
            return None, merged
        und = merged[:, self.und_index] if self.has_und else None
        gen = merged[:, self.gen_index] if self.has_gen else None
        return und, gen


# ---------------------------------------------------------------------------------------------
# The MoT decoder
# ---------------------------------------------------------------------------------------------
class UniBrainExpert(nn.Module):
    """One expert's copy of a decoder layer's weights (attention projections, QK-norm, MLP, norms)."""

    def __init__(self, config):
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * head_dim, config.hidden_size, bias=False)
        self.q_norm = Qwen2RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen2RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def project(self, hidden, cos, sin, num_heads, num_kv_heads, head_dim, qk_norm, frozen):
        """Pre-norm → q/k/v (B, L, heads, d), QK-norm, RoPE."""
        batch, length, _ = hidden.shape
        x = self.input_layernorm(hidden)
        q = self.q_proj(x).view(batch, length, num_heads, head_dim)
        k = self.k_proj(x).view(batch, length, num_kv_heads, head_dim)
        v = self.v_proj(x).view(batch, length, num_kv_heads, head_dim)
        if qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if frozen:
            q, k, v = q.detach(), k.detach(), v.detach()
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        return q, k, v


def _maybe_detach(tensor, frozen: bool):
    return tensor.detach() if frozen else tensor


class UniBrainDecoderLayer(GradientCheckpointingLayer):
    """A mixture-of-transformer-experts decoder layer: per-expert weights, one joint attention."""

    def __init__(self, config: UniBrainConfig, layer_idx: int):
        super().__init__()
        text = config.text_config
        self.config = config  # read by the attention interface (``config._attn_implementation``)
        self.layer_idx = layer_idx
        self.num_heads = text.num_attention_heads
        self.num_key_value_heads = text.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = text.hidden_size // text.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = False
        self.und = UniBrainExpert(text)
        self.gen = UniBrainExpert(text)

    def forward(self, und_hidden, gen_hidden, routing: TokenRouting, rope, attend):
        """``rope`` = (cos_und, sin_und, cos_gen, sin_gen); ``attend(layer, q, k, v) -> (B, L, H·d)``."""
        cfg = self.config
        frozen_und, frozen_gen = cfg.freeze_und and self.training, cfg.freeze_gen and self.training
        args = (self.num_heads, self.num_key_value_heads, self.head_dim, cfg.qk_norm)
        q_u = k_u = v_u = q_g = k_g = v_g = None
        if routing.has_und:
            q_u, k_u, v_u = self.und.project(und_hidden, rope[0], rope[1], *args, frozen_und)
        if routing.has_gen:
            q_g, k_g, v_g = self.gen.project(gen_hidden, rope[2], rope[3], *args, frozen_gen)
        attn = attend(self, routing.merge(q_u, q_g), routing.merge(k_u, k_g), routing.merge(v_u, v_g))
        attn_und, attn_gen = routing.split(attn)
        if routing.has_und:
            und_hidden = und_hidden + _maybe_detach(self.und.o_proj(attn_und), frozen_und)
            mlp_out = self.und.mlp(self.und.post_attention_layernorm(und_hidden))
            und_hidden = und_hidden + _maybe_detach(mlp_out, frozen_und)
        if routing.has_gen:
            gen_hidden = gen_hidden + _maybe_detach(self.gen.o_proj(attn_gen), frozen_gen)
            mlp_out = self.gen.mlp(self.gen.post_attention_layernorm(gen_hidden))
            gen_hidden = gen_hidden + _maybe_detach(mlp_out, frozen_gen)
        return und_hidden, gen_hidden


class UniBrainTextModel(nn.Module):
    """Token embedding, the MoT layers, a final RMSNorm per expert and the 1-D RoPE table."""

    def __init__(self, config: UniBrainConfig):
        super().__init__()
        text = config.text_config
        self.config = config
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList([UniBrainDecoderLayer(config, i) for i in range(text.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.norm_gen = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(text)

    def run(self, und_hidden, gen_hidden, routing: TokenRouting, position_ids: torch.Tensor, attend,
            collect_layers: bool = False):
        """Run every layer; ``position_ids`` is (B, L) in sequence order."""
        reference = und_hidden if und_hidden is not None else gen_hidden
        cos, sin = self.rotary_emb(reference, position_ids)
        cos_u, cos_g = routing.split(cos)
        sin_u, sin_g = routing.split(sin)
        rope = (cos_u, sin_u, cos_g, sin_g)
        layer_outputs = []
        for layer in self.layers:
            und_hidden, gen_hidden = layer(und_hidden, gen_hidden, routing, rope, attend)
            if collect_layers:
                layer_outputs.append(routing.merge(und_hidden, gen_hidden))
        frozen_und = self.config.freeze_und and self.training
        frozen_gen = self.config.freeze_gen and self.training
        if routing.has_und:
            und_hidden = _maybe_detach(self.norm(und_hidden), frozen_und)
        if routing.has_gen:
            gen_hidden = _maybe_detach(self.norm_gen(gen_hidden), frozen_gen)
        return und_hidden, gen_hidden, layer_outputs


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
@dataclass
class UniBrainOutput(ModelOutput):
    """Result of the packed training forward.

    ``loss = ce_loss + mse_loss`` (each a token-level mean over this pack; ``None`` when the pack
    has no such tokens). ``ce_per_token`` and ``mse_per_element`` are the unreduced values, so a
    distributed trainer can normalise by the global token count. ``logits`` are at the CE
    positions only and ``velocity`` at the noisy-latent positions only.
    """

    loss: torch.FloatTensor | None = None
    ce_loss: torch.FloatTensor | None = None
    mse_loss: torch.FloatTensor | None = None
    ce_per_token: torch.FloatTensor | None = None
    mse_per_element: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    velocity: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    inputs_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_hidden_state: torch.FloatTensor | None = None
    connector_output: torch.FloatTensor | None = None
    flow_timesteps: torch.FloatTensor | None = None
    flow_inputs: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class UniBrainPreTrainedModel(PreTrainedModel):
    config_class = UniBrainConfig
    base_model_prefix = "unibrain"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UniBrainDecoderLayer", "SiglipEncoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, SinCosPositionTable):
            module.reset_table()
        elif isinstance(module, Qwen2RotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config) if module.rope_type == "default" \
                else (module.inv_freq, None)
            module.inv_freq.copy_(inv_freq)
            module.original_inv_freq.copy_(inv_freq)
        elif isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):
                # A fresh velocity head predicts zero, as in BAGEL, so training starts from a calm state.
                module.weight.zero_()
            else:
                module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, Qwen2RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


class UniBrainForConditionalGeneration(UniBrainPreTrainedModel):
    """The UniBrain mixture-of-transformer-experts model (understanding + flow-matching generation)."""

    def __init__(self, config: UniBrainConfig):
        super().__init__(config)
        config.validate_sizes()
        # Sub-modules built from the sub-configs (SigLIP layers) read the attention backend there.
        for sub_config in (config.text_config, config.vision_config):
            sub_config._attn_implementation = config._attn_implementation
        hidden = config.hidden_size
        self.language_model = UniBrainTextModel(config)
        self.lm_head = nn.Linear(hidden, config.text_config.vocab_size, bias=False)
        self.vision_model = UniBrainVisionModel(config.vision_config)
        self.connector = UniBrainConnector(config.vision_config.hidden_size, hidden, config.connector_act)
        self.vit_pos_embed = SinCosPositionTable(config.vit_max_num_patch_per_side, hidden)
        self.time_embedder = UniBrainTimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(config.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, config.patch_latent_dim)
        self.llm2vae.zero_init = True
        self.latent_pos_embed = SinCosPositionTable(config.max_latent_size, hidden)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Like ``PreTrainedModel.from_pretrained``, from safetensors only; a pipeline directory loads its ``model/``.

        ``use_safetensors`` defaults to True and False is refused: a folder holding only pickles
        (``pytorch_model.bin``) is refused by name without being opened. A local folder is checked
        before the model is built (``config.json`` readable, every ``*.safetensors`` file or shard
        present and complete), so a half-copied checkpoint is reported with the damaged file's path.
        """
        import os
        import re

        try:  # this file also ships as Hub remote code, where the package may not be installed
            from unibrain_hf.errors import CorruptFileError, InputFileNotFoundError, InvalidInputError
            from unibrain_hf.utils.readers import check_pretrained_weights
        except ImportError:
            CorruptFileError, InputFileNotFoundError, InvalidInputError = OSError, FileNotFoundError, ValueError
            check_pretrained_weights = None

        if kwargs.get("use_safetensors") is False:
            raise InvalidInputError("use_safetensors=False is not supported: UniBrain weights load only from "
                                    "safetensors, because pickle files (pytorch_model.bin) can run code when opened")
        kwargs["use_safetensors"] = True
        if pretrained_model_name_or_path is None:  # config= and state_dict= given directly
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        path = os.path.expanduser(str(pretrained_model_name_or_path))
        if os.path.isdir(path):
            pretrained_model_name_or_path = path
            if ("subfolder" not in kwargs and not os.path.exists(os.path.join(path, "config.json"))
                    and os.path.exists(os.path.join(path, "model", "config.json"))):
                kwargs["subfolder"] = "model"
            if check_pretrained_weights is not None and kwargs.get("state_dict") is None:
                check_pretrained_weights(os.path.join(path, kwargs.get("subfolder") or ""))
        elif (not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) or os.path.isdir(path.split("/")[0])
              or os.path.exists(path)):
            # Not a Hub repo id ("owner/name"), or it starts at a local folder: a local path, missing or a file.
            error, state = ((InvalidInputError, "is a file, not a directory") if os.path.exists(path)
                            else (InputFileNotFoundError, "does not exist"))
            raise error(f"model directory {path} {state} (a saved model folder, a pipeline directory or a Hub repo "
                        f"id 'owner/name' is expected)")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as exc:
            if type(exc).__name__ == "SafetensorError":  # a damaged Hub download; local folders were checked
                raise CorruptFileError(f"a safetensors file of {path} is damaged or truncated ({exc}); delete it "
                                       f"from the Hugging Face cache and download it again") from exc
            if isinstance(exc, OSError) and not os.path.isdir(path) and not isinstance(exc, CorruptFileError):
                raise InputFileNotFoundError(f"{path} is not a local folder, and loading it as a Hub repo id failed "
                                             f"(safetensors weights only): {exc}") from exc
            raise

    # ------------------------------------------------------------------ helpers
    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @torch.no_grad()
    def init_generation_expert_from_understanding(self) -> None:
        """Copy every understanding-expert weight into its generation twin (BAGEL's ``init_moe``)."""
        for layer in self.language_model.layers:
            layer.gen.load_state_dict(layer.und.state_dict())
        self.language_model.norm_gen.load_state_dict(self.language_model.norm.state_dict())

    def flow_time(self, raw_timesteps: torch.Tensor, shift: float | None = None) -> torch.Tensor:
        """Training flow time: ``t = sigmoid(raw)`` then ``s·t / (1 + (s−1)·t)``; raw −inf → 0."""
        shift = self.config.timestep_shift if shift is None else shift
        t = torch.sigmoid(raw_timesteps.float())
        return shift * t / (1 + (shift - 1) * t)

    def embed_vit(self, pixel_patches, position_ids, seqlens, return_parts: bool = False):
        """ViT patches (N, p·p·3) → LLM-width embeddings (N, D) (+ the encoder/connector outputs)."""
        vision = self.vision_model(pixel_patches, position_ids, seqlens)
        connected = self.connector(vision)
        embeds = connected + self.vit_pos_embed(position_ids).to(connected.dtype)
        return (embeds, vision, connected) if return_parts else embeds

    def embed_latents(self, latent_tokens, timesteps, position_ids):
        """Patchified latents (…, p·p·C) at flow time t → LLM-width embeddings."""
        time_embeds = self.time_embedder(timesteps).to(latent_tokens.dtype)
        pos = self.latent_pos_embed(position_ids).to(latent_tokens.dtype)
        return self.vae2llm(latent_tokens) + time_embeds + pos

    @staticmethod
    def patchify_latents(padded_latents, latent_shapes, patch: int) -> torch.Tensor:
        """(N, C, H', W') padded latents + (h, w) token grids → (Σ h·w, p·p·C) tokens, raster order."""
        tokens = []
        for latent, (h, w) in zip(padded_latents, latent_shapes):
            h, w = int(h), int(w)
            channels = latent.shape[0]
            grid = latent[:, :h * patch, :w * patch].reshape(channels, h, patch, w, patch)
            tokens.append(torch.einsum("chpwq->hwpqc", grid).reshape(h * w, patch * patch * channels))
        return torch.cat(tokens, dim=0)

    @staticmethod
    def unpatchify_latents(tokens, height_tokens: int, width_tokens: int, patch: int, channels: int):
        """(B, h·w, p·p·C) tokens → (B, C, h·p, w·p) latents."""
        batch = tokens.shape[0]
        grid = tokens.reshape(batch, height_tokens, width_tokens, patch, patch, channels)
        return torch.einsum("nhwpqc->nchpwq", grid).reshape(batch, channels, height_tokens * patch,
                                                             width_tokens * patch)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        input_ids: torch.LongTensor,
        text_indexes: torch.LongTensor,
        position_ids: torch.LongTensor,
        sample_lens: list[int] | torch.Tensor,
        split_lens: list[int] | torch.Tensor,
        attn_modes: list[str],
        sequence_length: int | None = None,
        vit_pixel_patches: torch.Tensor | None = None,
        vit_position_ids: torch.LongTensor | None = None,
        vit_token_indexes: torch.LongTensor | None = None,
        vit_seqlens: torch.Tensor | None = None,
        padded_latents: torch.Tensor | None = None,
        latent_tokens: torch.Tensor | None = None,
        latent_shapes: list | torch.Tensor | None = None,
        latent_position_ids: torch.LongTensor | None = None,
        vae_token_indexes: torch.LongTensor | None = None,
        timesteps: torch.Tensor | None = None,
        mse_loss_indexes: torch.LongTensor | None = None,
        ce_loss_indexes: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        flow_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **unused,
    ) -> UniBrainOutput:
        """Packed training forward (see :mod:`unibrain_hf.processing.packing` for the batch format).

        Text (and image marker) tokens and ViT tokens use the understanding expert, VAE latent
        tokens the generation expert. Noisy latents (``timesteps`` finite) are mixed with
        ``flow_noise`` (drawn with ``generator`` when not given) as ``x_t = (1−t)·x0 + t·ε`` and
        the velocity target is ``ε − x0``. ``latent_tokens`` may replace ``padded_latents`` with
        already patchified clean latents (Σ h·w, p·p·C).
        """
        device = self.lm_head.weight.device
        dtype = self.lm_head.weight.dtype
        sample_lens = [int(s) for s in (sample_lens.tolist() if torch.is_tensor(sample_lens) else sample_lens)]
        split_lens = [int(s) for s in (split_lens.tolist() if torch.is_tensor(split_lens) else split_lens)]
        total = int(sequence_length) if sequence_length is not None else sum(sample_lens)
        if sum(sample_lens) != total:
            raise ValueError(f"sample_lens sum to {sum(sample_lens)} but sequence_length is {total}")
        layout = PackedAttentionLayout(sample_lens, split_lens, attn_modes)

        # --- understanding rows: text tokens, then ViT tokens
        und_index = [text_indexes.to(device)]
        und_embeds = [self.language_model.embed_tokens(input_ids.to(device))]
        vision_hidden = connector_out = None
        if vit_pixel_patches is not None and vit_pixel_patches.numel() > 0:
            vit_embeds, vision_hidden, connector_out = self.embed_vit(
                vit_pixel_patches.to(device=device, dtype=dtype), vit_position_ids.to(device), vit_seqlens,
                return_parts=True)
            und_embeds.append(vit_embeds)
            und_index.append(vit_token_indexes.to(device))
        und_index = torch.cat(und_index)
        und_hidden = torch.cat(und_embeds, dim=0)[None]

        # --- generation rows: VAE latent tokens (clean context copies and noisy targets)
        gen_hidden = gen_index = None
        flow_t = x_t = clean = noise = None
        has_latents = padded_latents is not None or latent_tokens is not None
        if has_latents and vae_token_indexes is not None and vae_token_indexes.numel() > 0:
            if latent_tokens is not None:  # already patchified (e.g. the self-forcing CE pass)
                clean = latent_tokens.to(device=device, dtype=dtype)
            else:
                clean = self.patchify_latents(padded_latents.to(device=device, dtype=dtype), latent_shapes,
                                              self.config.latent_patch_size)
            if clean.shape[0] != vae_token_indexes.numel():
                raise ValueError(f"latents give {clean.shape[0]} tokens but vae_token_indexes has "
                                 f"{vae_token_indexes.numel()}")
            if flow_noise is None:
                noise = torch.randn(clean.shape, generator=generator, device=device, dtype=dtype)
            else:
                if tuple(flow_noise.shape) != tuple(clean.shape):
                    raise ValueError(f"flow_noise has shape {tuple(flow_noise.shape)}, expected {tuple(clean.shape)}")
                noise = flow_noise.to(device=device, dtype=dtype)
            flow_t = self.flow_time(timesteps.to(device)).to(dtype)
            x_t = (1 - flow_t[:, None]) * clean + flow_t[:, None] * noise
            gen_hidden = self.embed_latents(x_t, flow_t, latent_position_ids.to(device))[None]
            gen_index = vae_token_indexes.to(device)

        if self.config.freeze_und and self.training:
            und_hidden = und_hidden.detach()
        if self.config.freeze_gen and self.training and gen_hidden is not None:
            gen_hidden = gen_hidden.detach()

        routing = TokenRouting(total, und_index, gen_index, device)
        positions = position_ids.to(device)[None]

        def attend(layer, q, k, v):
            return packed_attention(layer, q[0], k[0], v[0], layout)[None]

        und_out, gen_out, layer_outputs = self.language_model.run(
            und_hidden, gen_hidden, routing, positions, attend, collect_layers=output_hidden_states)

        # --- losses
        row_of_position = torch.full((total,), -1, dtype=torch.long, device=device)
        row_of_position[und_index] = torch.arange(und_index.numel(), device=device)
        ce = logits = ce_loss = None
        if ce_loss_indexes is not None and ce_loss_indexes.numel() > 0:
            rows = row_of_position[ce_loss_indexes.to(device)]
            if (rows < 0).any():
                raise ValueError("ce_loss_indexes point at positions that are not text tokens")
            logits = self.lm_head(und_out[0, rows])
            ce = F.cross_entropy(logits.float(), labels.to(device), reduction="none")
            ce_loss = ce.sum() / ce.numel()
        mse = velocity = mse_loss = None
        if gen_out is not None and not self.config.freeze_gen:
            has_loss = flow_t > 0
            if has_loss.any():
                if mse_loss_indexes is not None and not torch.equal(
                        gen_index[has_loss].cpu(), mse_loss_indexes.to(torch.long).cpu()):
                    raise ValueError("mse_loss_indexes do not match the noisy (finite-timestep) VAE tokens")
                velocity = self.llm2vae(gen_out[0, has_loss])
                target = (noise - clean)[has_loss]
                mse = (velocity.float() - target.float()) ** 2
                mse_loss = mse.mean(dim=-1).sum() / mse.shape[0]
        losses = [l for l in (ce_loss, mse_loss) if l is not None]
        loss = sum(losses) if losses else None

        last_hidden = inputs_embeds = None
        if output_hidden_states:
            last_hidden = routing.merge(und_out, gen_out)[0]
            inputs_embeds = routing.merge(und_hidden, gen_hidden)[0]
        return UniBrainOutput(
            loss=loss, ce_loss=ce_loss, mse_loss=mse_loss, ce_per_token=ce, mse_per_element=mse, logits=logits,
            velocity=velocity, last_hidden_state=last_hidden, inputs_embeds=inputs_embeds,
            hidden_states=tuple(h[0] for h in layer_outputs) if output_hidden_states else None,
            vision_hidden_state=vision_hidden, connector_output=connector_out, flow_timesteps=flow_t,
            flow_inputs=x_t)

    # ------------------------------------------------------------------ KV-cache inference
    def new_cache(self) -> UniBrainKVCache:
        return UniBrainKVCache(self.config.text_config.num_hidden_layers)

    def forward_cached(self, cache: UniBrainKVCache, und_embeds, gen_embeds, und_index, gen_index,
                       position_ids: torch.Tensor, causal: bool, update_cache: bool):
        """Run a block of new tokens (B, L, D) against ``cache``.

        Returns ``(und_out, gen_out, cache)``: final-normed hidden states per expert and the cache
        with the block appended (``update_cache=True``) or unchanged (read-only, e.g. denoising).
        """
        reference = und_embeds if und_embeds is not None else gen_embeds
        batch, device = reference.shape[0], reference.device
        total = (0 if und_embeds is None else und_embeds.shape[1]) + (0 if gen_embeds is None else gen_embeds.shape[1])
        if und_index is None and gen_index is None:  # a single-expert block
            everything = torch.arange(total, device=device)
            und_index, gen_index = (everything, None) if gen_embeds is None else (None, everything)
        routing = TokenRouting(total, und_index, gen_index, device)
        if cache.length and cache.batch_size != batch:
            raise ValueError(f"cache holds batch size {cache.batch_size} but the block has {batch}")
        new_cache = cache.copy() if update_cache else cache

        def attend(layer, q, k, v):
            past_k, past_v = cache.layer(layer.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, L, d)
            if past_k is not None:
                k = torch.cat([past_k, k.to(past_k.dtype)], dim=2)
                v = torch.cat([past_v, v.to(past_v.dtype)], dim=2)
            if update_cache:
                new_cache.set_layer(layer.layer_idx, k, v)
            return cached_attention(layer, q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), causal)

        positions = position_ids.to(device)
        if positions.dim() == 1:
            positions = positions[None].expand(batch, -1)
        und_out, gen_out, _ = self.language_model.run(und_embeds, gen_embeds, routing, positions, attend)
        return und_out, gen_out, new_cache

    @torch.no_grad()
    def prefill_text_cached(self, cache, input_ids: torch.LongTensor, start_position: int):
        """Append a text segment (B, L) — already wrapped in ``<|im_start|> … <|im_end|>`` — causally."""
        input_ids = input_ids.to(self.lm_head.weight.device)
        embeds = self.language_model.embed_tokens(input_ids)
        positions = torch.arange(start_position, start_position + input_ids.shape[1], device=embeds.device)
        _, _, cache = self.forward_cached(cache, embeds, None, None, None, positions, causal=True,
                                          update_cache=True)
        return cache

    def _marker_embeds(self, batch: int, device):
        ids = torch.tensor([self.config.start_of_image_token_id, self.config.end_of_image_token_id], device=device)
        return self.language_model.embed_tokens(ids)[None].expand(batch, -1, -1)

    @torch.no_grad()
    def prefill_vit_cached(self, cache, pixel_patches, position_ids, seqlens, position: int):
        """Append ViT image blocks ``[<|vision_start|>, tokens, <|vision_end|>]`` (one per batch row)."""
        device, dtype = self.lm_head.weight.device, self.lm_head.weight.dtype
        seqlens = [int(s) for s in seqlens]
        if len(set(seqlens)) != 1:
            raise ValueError("a batched ViT prefill needs images of one size")
        embeds = self.embed_vit(pixel_patches.to(device=device, dtype=dtype), position_ids.to(device), seqlens)
        embeds = embeds.reshape(len(seqlens), seqlens[0], -1)
        markers = self._marker_embeds(len(seqlens), device).to(embeds.dtype)
        block = torch.cat([markers[:, :1], embeds, markers[:, 1:]], dim=1)
        positions = torch.full((block.shape[1],), position, device=device)
        _, _, cache = self.forward_cached(cache, block, None, None, None, positions, causal=False, update_cache=True)
        return cache

    def _latent_block(self, latent_embeds):
        batch, num_tokens, _ = latent_embeds.shape
        device = latent_embeds.device
        markers = self._marker_embeds(batch, device).to(latent_embeds.dtype)
        und_index = torch.tensor([0, num_tokens + 1], device=device)
        gen_index = torch.arange(1, num_tokens + 1, device=device)
        return markers, und_index, gen_index

    def latent_block_cached(self, cache, latent_tokens, timestep, latent_position_ids, position: int,
                            update_cache: bool):
        """Run ``[<|vision_start|>, latents, <|vision_end|>]`` at one RoPE position in generation mode.

        Returns ``(velocity (B, N, p·p·C), cache)``.
        """
        device, dtype = self.lm_head.weight.device, self.lm_head.weight.dtype
        latent_tokens = latent_tokens.to(device=device, dtype=dtype)
        batch, num_tokens, _ = latent_tokens.shape
        t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1)[:1]
        embeds = self.embed_latents(latent_tokens.reshape(batch * num_tokens, -1), t,
                                    latent_position_ids.to(device).repeat(batch)).reshape(batch, num_tokens, -1)
        markers, und_index, gen_index = self._latent_block(embeds)
        positions = torch.full((num_tokens + 2,), position, device=device)
        _, gen_out, cache = self.forward_cached(cache, markers, embeds, und_index, gen_index, positions,
                                                causal=False, update_cache=update_cache)
        return self.llm2vae(gen_out), cache

    @torch.no_grad()
    def prefill_latents_cached(self, cache, latent_tokens, latent_position_ids, position: int):
        """Append clean VAE latent blocks (t = 0) to the cache."""
        _, cache = self.latent_block_cached(cache, latent_tokens, 0.0, latent_position_ids, position,
                                            update_cache=True)
        return cache

    @torch.no_grad()
    def velocity_cached(self, cache, latent_tokens, timestep, latent_position_ids, position: int):
        """Predicted flow velocity of noisy latents at time t, reading (not writing) the cache."""
        velocity, _ = self.latent_block_cached(cache, latent_tokens, timestep, latent_position_ids, position,
                                               update_cache=False)
        return velocity

    @torch.no_grad()
    def next_token_logits_cached(self, cache, token_ids: torch.LongTensor, position: int):
        """Feed one token per batch row at ``position``; returns (logits (B, V), cache)."""
        token_ids = token_ids.to(self.lm_head.weight.device).reshape(-1, 1)
        embeds = self.language_model.embed_tokens(token_ids)
        positions = torch.tensor([position], device=embeds.device)
        und_out, _, cache = self.forward_cached(cache, embeds, None, None, None, positions, causal=True,
                                                update_cache=True)
        return self.lm_head(und_out[:, -1]), cache


__all__ = ["UniBrainForConditionalGeneration", "UniBrainPreTrainedModel", "UniBrainOutput", "UniBrainKVCache",
           "sincos_2d_table", "flattened_position_ids"]


# Saved checkpoints carry an ``auto_map`` and a copy of this code, so Hub users without the
# package can load them with ``AutoModel.from_pretrained(..., trust_remote_code=True)``.
UniBrainConfig.register_for_auto_class()
UniBrainForConditionalGeneration.register_for_auto_class("AutoModel")
