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
flow MSE + next-token CE) and, with ``phase=``, one KV-cache inference phase (text / ViT / latent
prefill, decode step, velocity); the ``*_cached`` methods the pipeline is built from are thin
wrappers that call the model, so offload hooks see every phase. The VAE is not part of this model
(see :mod:`unibrain_hf.modeling.vae`).

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
from transformers import initialization as init
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
from .memory_options import check_memory_options


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


def _in_float_dtype_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the floating dtype of a module declared in ``_keep_in_fp32_modules``.

    Such a module is float32 after an fp16 load, or in whatever dtype a whole-model cast left it
    (``pipe.to(torch.bfloat16)``); a quantized or fp8 storage dtype never decides the input dtype
    (transformers' T5 and diffusers' Wan treat their fp32 modules the same way).
    """
    dtype = module.weight.dtype
    return x.to(dtype) if dtype.is_floating_point and dtype.itemsize >= 2 else x


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
        # The patch embedding is SigLIP's convolution written as a Linear over flattened patches; like the
        # convolution it is declared out of quantization (and float32 under an fp16 load).
        positions = self.position_embedding(position_ids)
        patches = self.patch_embedding(_in_float_dtype_of(self.patch_embedding, pixel_patches))
        return patches.to(positions.dtype) + positions


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
        # The sinusoids are float32, and so is the MLP: the model declares this module in
        # ``_keep_in_fp32_modules(_strict)`` (float32 under fp16/bf16 loading, never quantized).
        frequencies = self.frequencies(t.reshape(-1).float())
        return self.embedding(_in_float_dtype_of(self.embedding.linear_1, frequencies))


# ---------------------------------------------------------------------------------------------
# Token routing between the two experts
# ---------------------------------------------------------------------------------------------
class TokenRouting:
    """Which positions of a (B, L) block go to the understanding / generation expert.

    ``merge`` interleaves per-expert tensors (B, L_und, …) and (B, L_gen, …) back into sequence
    order; ``split`` does the opposite. An expert with no tokens costs nothing. ``to(device)``
    lets accelerate's hooks move a routing with the hidden states (multi-device ``device_map``).
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

    @property
    def device(self) -> torch.device:
        return self.inverse.device

    def to(self, device, non_blocking: bool = False) -> "TokenRouting":
        if torch.device(device) == self.device:
            return self
        moved = TokenRouting.__new__(TokenRouting)
        moved.__dict__.update(self.__dict__)
        for name in ("und_index", "gen_index", "inverse"):
            setattr(moved, name, getattr(self, name).to(device, non_blocking=non_blocking))
        return moved

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
def _maybe_detach(tensor, frozen: bool):
    return tensor.detach() if frozen else tensor


class UniBrainExpert(nn.Module):
    """One expert's copy of a decoder layer's weights (attention projections, QK-norm, MLP, norms).

    Its two uses per layer are both calls of this module, so that offload hooks placed on an
    expert (or on its leaves) see every use of its weights:

    * ``expert(hidden, position_embeddings=(cos, sin))`` → ``(q, k, v)`` of shape (B, L, heads, d):
      pre-norm, projections, QK-norm, RoPE;
    * ``expert(hidden, attention_output=attn)`` → the residual stream after ``o_proj`` and the MLP.

    ``stop_gradients`` (training only) detaches the expert's contributions, so it receives no gradient.
    """

    def __init__(self, config, qk_norm: bool = True):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qk_norm = bool(qk_norm)
        head_dim = self.head_dim
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * head_dim, config.hidden_size, bias=False)
        self.q_norm = Qwen2RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen2RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, hidden, position_embeddings=None, attention_output=None, stop_gradients: bool = False):
        if attention_output is None:
            return self._project(hidden, position_embeddings, stop_gradients)
        hidden = hidden + _maybe_detach(self.o_proj(attention_output), stop_gradients)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + _maybe_detach(mlp_out, stop_gradients)

    def _project(self, hidden, position_embeddings, stop_gradients: bool):
        batch, length, _ = hidden.shape
        x = self.input_layernorm(hidden)
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_key_value_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_key_value_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if stop_gradients:
            q, k, v = q.detach(), k.detach(), v.detach()
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        return q, k, v


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
        self.und = UniBrainExpert(text, config.qk_norm)
        self.gen = UniBrainExpert(text, config.qk_norm)

    def forward(self, und_hidden, gen_hidden, routing: TokenRouting, position_embeddings, attend,
                stop_gradients: tuple[bool, bool] = (False, False)):
        """``position_embeddings`` = (cos_und, sin_und, cos_gen, sin_gen); ``attend(layer, q, k, v) -> (B, L, H·d)``.

        ``stop_gradients`` = (understanding, generation) flags, honoured in training mode only.
        """
        stop_und, stop_gen = (bool(flag) and self.training for flag in stop_gradients)
        rope = position_embeddings
        q_u = k_u = v_u = q_g = k_g = v_g = None
        if routing.has_und:
            q_u, k_u, v_u = self.und(und_hidden, position_embeddings=rope[:2], stop_gradients=stop_und)
        if routing.has_gen:
            q_g, k_g, v_g = self.gen(gen_hidden, position_embeddings=rope[2:], stop_gradients=stop_gen)
        attn = attend(self, routing.merge(q_u, q_g), routing.merge(k_u, k_g), routing.merge(v_u, v_g))
        attn_und, attn_gen = routing.split(attn)
        if routing.has_und:
            und_hidden = self.und(und_hidden, attention_output=attn_und, stop_gradients=stop_und)
        if routing.has_gen:
            gen_hidden = self.gen(gen_hidden, attention_output=attn_gen, stop_gradients=stop_gen)
        return und_hidden, gen_hidden


@dataclass
class UniBrainDecoderOutput(ModelOutput):
    """What :class:`UniBrainTextModel` returns: final-normed hidden states per expert, and on request
    the decoder inputs and every layer's output (sequence order)."""

    und_hidden_state: torch.FloatTensor | None = None
    gen_hidden_state: torch.FloatTensor | None = None
    routing: TokenRouting | None = None
    inputs_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class UniBrainTextModel(nn.Module):
    """Token embedding, the MoT layers, a final RMSNorm per expert and the 1-D RoPE table.

    Every use of these weights — the token lookup included — happens inside :meth:`forward`, so
    that a hook on this module (diffusers' block-level group offload, a ``device_map`` entry)
    covers them. ``stop_und_gradients`` / ``stop_gen_gradients`` are the training-time
    gradient-stopping flags (set through ``UniBrainForConditionalGeneration.freeze_experts``).
    """

    def __init__(self, config: UniBrainConfig):
        super().__init__()
        text = config.text_config
        self.config = config
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList([UniBrainDecoderLayer(config, i) for i in range(text.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.norm_gen = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(text)
        # Initial values from the config (older configs carry them); freeze_experts() changes them.
        self.stop_und_gradients = bool(getattr(config, "freeze_und", False))
        self.stop_gen_gradients = bool(getattr(config, "freeze_gen", False))

    def forward(self, position_ids: torch.Tensor, attend, input_ids: torch.LongTensor | None = None,
                und_embeds: torch.Tensor | None = None, gen_embeds: torch.Tensor | None = None,
                und_index: torch.Tensor | None = None, gen_index: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> UniBrainDecoderOutput:
        """Run a block of B rows through every layer.

        Understanding rows are ``[embed_tokens(input_ids), und_embeds]`` (B, L_und, D) — token ids first,
        then ready-made embeddings (ViT tokens); generation rows are ``gen_embeds`` (B, L_gen, D).
        ``und_index`` / ``gen_index`` give each row's position in the block (default: a single-expert
        block in order); ``position_ids`` (B, L) or (L,) are the RoPE positions in block order.
        ``attend(layer, q, k, v)`` is the attention (packed training layout or KV cache).
        """
        parts = []
        if input_ids is not None:
            parts.append(self.embed_tokens(input_ids))
        if und_embeds is not None:
            parts.append(und_embeds.to(parts[0]) if parts else und_embeds)
        und_hidden = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)) if parts else None
        if gen_embeds is not None and und_hidden is not None:
            gen_embeds = gen_embeds.to(und_hidden.device)
        reference = und_hidden if und_hidden is not None else gen_embeds
        if reference is None:
            raise ValueError("the decoder needs input_ids, und_embeds or gen_embeds")
        batch, device = reference.shape[0], reference.device
        total = (0 if und_hidden is None else und_hidden.shape[1]) + (0 if gen_embeds is None else gen_embeds.shape[1])
        if und_index is None and gen_index is None:  # a single-expert block in sequence order
            everything = torch.arange(total, device=device)
            und_index, gen_index = (everything, None) if gen_embeds is None else (None, everything)
        elif gen_embeds is None and und_index is not None:
            # An understanding-only block given out of order (e.g. markers, then ViT tokens): put the
            # rows in sequence order once so that every layer takes the gather-free path.
            order = torch.empty_like(und_index)
            order[und_index.to(order.device)] = torch.arange(und_index.numel(), device=order.device)
            und_hidden = und_hidden[:, order.to(device)]
            und_index = torch.arange(total, device=device)
        routing = TokenRouting(total, und_index, gen_index, device)

        training = self.training
        stop_und, stop_gen = self.stop_und_gradients and training, self.stop_gen_gradients and training
        if stop_und and und_hidden is not None:
            und_hidden = und_hidden.detach()
        if stop_gen and gen_embeds is not None:
            gen_embeds = gen_embeds.detach()
        gen_hidden = gen_embeds
        inputs_embeds = routing.merge(und_hidden, gen_hidden) if output_hidden_states else None

        positions = position_ids.to(device)
        if positions.dim() == 1:
            positions = positions[None].expand(batch, -1)
        cos, sin = self.rotary_emb(reference, positions)
        cos_u, cos_g = routing.split(cos)
        sin_u, sin_g = routing.split(sin)
        rope = (cos_u, sin_u, cos_g, sin_g)
        flags = (self.stop_und_gradients, self.stop_gen_gradients)
        layer_outputs = []
        for layer in self.layers:
            und_hidden, gen_hidden = layer(und_hidden, gen_hidden, routing, rope, attend, flags)
            if output_hidden_states:
                layer_outputs.append(routing.merge(und_hidden, gen_hidden))
        if routing.has_und:
            und_hidden = _maybe_detach(self.norm(und_hidden), stop_und)
        if routing.has_gen:
            gen_hidden = _maybe_detach(self.norm_gen(gen_hidden), stop_gen)
        return UniBrainDecoderOutput(und_hidden_state=und_hidden, gen_hidden_state=gen_hidden, routing=routing,
                                     inputs_embeds=inputs_embeds,
                                     hidden_states=tuple(layer_outputs) if output_hidden_states else None)

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
#: The inference phases :meth:`UniBrainForConditionalGeneration.forward` runs (``phase=...``), and the
#: experts whose weights each one uses. The latent block ``[<|vision_start|>, latents, <|vision_end|>]``
#: routes its two marker tokens to the understanding expert, so a velocity evaluation uses it too (for
#: two rows per layer: their keys/values depend on the noisy latents, through attention, at every layer).
INFERENCE_PHASES = {
    "prefill_text": ("und",),
    "prefill_vit": ("und",),
    "prefill_latents": ("und", "gen"),
    "velocity": ("und", "gen"),
    "decode": ("und",),
}


@dataclass
class UniBrainCachedOutput(ModelOutput):
    """Result of an inference phase: the cache after it, and the phase's product (logits or velocity)."""

    cache: UniBrainKVCache | None = None
    logits: torch.FloatTensor | None = None
    velocity: torch.FloatTensor | None = None


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
    # Never quantized (transformers' quantizers add these to ``modules_to_not_convert``) and float32
    # under an fp16 load: the flow-time embedder (float32 under bf16 too), the two small latent
    # adapters the velocity goes through and the ViT patch embedding (SigLIP's convolution, which no
    # quantizer converts; 1.6 M parameters in all for BAGEL-7B-MoT).
    _keep_in_fp32_modules = ["time_embedder", "vae2llm", "llm2vae", "patch_embedding"]
    _keep_in_fp32_modules_strict = ["time_embedder"]
    # A KV cache holds each layer's keys/values on that layer's device: hooks must not move it.
    _skip_keys_device_placement = ["cache"]
    # diffusers' block-level group offload streams the decoder and ViT layers (their ModuleLists).
    _group_offload_block_modules = ["language_model", "vision_model"]
    # diffusers' apply_layerwise_casting: lookups, norms, position tables and the time embedder keep
    # the compute dtype (the model's dtype is read from the token embedding).
    _skip_layerwise_casting_patterns = ["embed_tokens", "norm", "pos_embed", "rotary_emb", "time_embedder"]

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers' guarded initialisation: a tensor already loaded from a checkpoint is never touched.
        if isinstance(module, SinCosPositionTable):
            module.reset_table()  # a fixed, unsaved table
        elif isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
            # A fresh velocity head predicts zero, as in BAGEL, so training starts from a calm state.
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:  # Linear / Embedding: normal(0, initializer_range); norms: ones/zeros; RoPE: inv_freq
            super()._init_weights(module)


class UniBrainForConditionalGeneration(UniBrainPreTrainedModel):
    """The UniBrain mixture-of-transformer-experts model (understanding + flow-matching generation).

    ``forward`` is the packed training forward, and with ``phase=`` one step of KV-cache inference
    (see :data:`INFERENCE_PHASES`); the ``*_cached`` methods are thin wrappers that call the model
    (``self(...)``), so that every memory mode's hooks — ``enable_model_cpu_offload``'s on the whole
    model, sequential/group offload's and ``device_map``'s on sub-modules — see every phase. Tensors
    the model creates go to the device of its hidden states, never to a parameter's device (which is
    ``meta`` under offload).
    """

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
        check_memory_options(**kwargs)  # device_map / max_memory / quantization_config: named errors, early
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

    def freeze_experts(self, und: bool = False, gen: bool = False) -> None:
        """Stop gradients at an expert's contributions during training (stage-1 alignment: ``und=True``).

        The flags live on the decoder (they act in training mode only); ``config.freeze_und`` /
        ``config.freeze_gen`` are their initial values and are kept in step so a saved config says
        how the model was trained.
        """
        self.language_model.stop_und_gradients = bool(und)
        self.language_model.stop_gen_gradients = bool(gen)
        self.config.freeze_und, self.config.freeze_gen = bool(und), bool(gen)

    @property
    def frozen_experts(self) -> dict[str, bool]:
        return {"und": self.language_model.stop_und_gradients, "gen": self.language_model.stop_gen_gradients}

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
        """ViT patches (N, p·p·3) → LLM-width embeddings (N, D) (+ the encoder/connector outputs).

        ``pixel_patches`` are cast to the model's dtype (that of the token embedding: never a
        quantized storage dtype); they stay on their device (the caller's, or a hook moves them).
        """
        vision = self.vision_model(pixel_patches.to(self.dtype), position_ids, seqlens)
        connected = self.connector(vision)
        embeds = connected + self.vit_pos_embed(position_ids).to(connected)
        return (embeds, vision, connected) if return_parts else embeds

    def embed_latents(self, latent_tokens, timesteps, position_ids):
        """Patchified latents (…, p·p·C) at flow time t → LLM-width embeddings."""
        dtype = self.dtype
        hidden = self.vae2llm(_in_float_dtype_of(self.vae2llm, latent_tokens.to(dtype))).to(dtype)
        time_embeds = self.time_embedder(timesteps).to(hidden)
        pos = self.latent_pos_embed(position_ids).to(hidden)
        return hidden + time_embeds + pos

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

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        text_indexes: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        sample_lens: list[int] | torch.Tensor | None = None,
        split_lens: list[int] | torch.Tensor | None = None,
        attn_modes: list[str] | None = None,
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
        phase: str | None = None,
        cache: UniBrainKVCache | None = None,
        position: int | None = None,
        **unused,
    ) -> UniBrainOutput | UniBrainCachedOutput:
        """Packed training forward, or (with ``phase``) one KV-cache inference phase.

        Training (see :mod:`unibrain_hf.processing.packing` for the batch format): text (and image
        marker) tokens and ViT tokens use the understanding expert, VAE latent tokens the generation
        expert. Noisy latents (``timesteps`` finite) are mixed with ``flow_noise`` (drawn with
        ``generator`` when not given) as ``x_t = (1−t)·x0 + t·ε`` and the velocity target is ``ε − x0``.
        ``latent_tokens`` may replace ``padded_latents`` with already patchified clean latents (Σ h·w, p·p·C).

        Inference (``phase`` one of :data:`INFERENCE_PHASES`, ``cache`` the context, ``position`` the
        RoPE position of the block): ``prefill_text`` (``input_ids`` (B, L), positions ``position…``),
        ``prefill_vit`` (``vit_pixel_patches``, ``vit_position_ids``, ``vit_seqlens``), ``prefill_latents``
        (``latent_tokens`` (B, N, p·p·C), ``latent_position_ids`` (N,)), ``velocity`` (the same plus
        ``timesteps``; reads the cache, never writes it; ``cache`` may be a tuple of n caches with
        ``position`` a tuple of n positions: the guidance branches in one call, velocities (n·B, N, p·p·C))
        and ``decode`` (``input_ids`` (B,)). Returns a :class:`UniBrainCachedOutput`.
        """
        if phase is not None:
            return self._run_phase(phase, cache, position, input_ids=input_ids, vit_pixel_patches=vit_pixel_patches,
                                   vit_position_ids=vit_position_ids, vit_seqlens=vit_seqlens,
                                   latent_tokens=latent_tokens, latent_position_ids=latent_position_ids,
                                   timesteps=timesteps)
        missing = [name for name, value in (("input_ids", input_ids), ("text_indexes", text_indexes),
                                            ("position_ids", position_ids), ("sample_lens", sample_lens),
                                            ("split_lens", split_lens), ("attn_modes", attn_modes)) if value is None]
        if missing:
            raise ValueError(f"the packed training forward needs {missing} (or pass phase=... for inference)")
        sample_lens = [int(s) for s in (sample_lens.tolist() if torch.is_tensor(sample_lens) else sample_lens)]
        split_lens = [int(s) for s in (split_lens.tolist() if torch.is_tensor(split_lens) else split_lens)]
        total = int(sequence_length) if sequence_length is not None else sum(sample_lens)
        if sum(sample_lens) != total:
            raise ValueError(f"sample_lens sum to {sum(sample_lens)} but sequence_length is {total}")
        layout = PackedAttentionLayout(sample_lens, split_lens, attn_modes)
        frozen = self.frozen_experts

        # --- understanding rows: text tokens, then ViT tokens
        und_index = [text_indexes]
        vit_embeds = vision_hidden = connector_out = None
        if vit_pixel_patches is not None and vit_pixel_patches.numel() > 0:
            vit_embeds, vision_hidden, connector_out = self.embed_vit(vit_pixel_patches, vit_position_ids, vit_seqlens,
                                                                      return_parts=True)
            und_index.append(vit_token_indexes.to(text_indexes.device))
        und_index = torch.cat(und_index)

        # --- generation rows: VAE latent tokens (clean context copies and noisy targets)
        gen_embeds = gen_index = None
        flow_t = x_t = clean = noise = None
        has_latents = padded_latents is not None or latent_tokens is not None
        if has_latents and vae_token_indexes is not None and vae_token_indexes.numel() > 0:
            dtype = self.dtype
            if latent_tokens is not None:  # already patchified (e.g. the self-forcing CE pass)
                clean = latent_tokens.to(dtype)
            else:
                clean = self.patchify_latents(padded_latents.to(dtype), latent_shapes, self.config.latent_patch_size)
            if clean.shape[0] != vae_token_indexes.numel():
                raise ValueError(f"latents give {clean.shape[0]} tokens but vae_token_indexes has "
                                 f"{vae_token_indexes.numel()}")
            if flow_noise is None:
                noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=dtype)
            else:
                if tuple(flow_noise.shape) != tuple(clean.shape):
                    raise ValueError(f"flow_noise has shape {tuple(flow_noise.shape)}, expected {tuple(clean.shape)}")
                noise = flow_noise.to(clean)
            flow_t = self.flow_time(timesteps.to(clean.device)).to(dtype)
            x_t = (1 - flow_t[:, None]) * clean + flow_t[:, None] * noise
            gen_embeds = self.embed_latents(x_t, flow_t, latent_position_ids)[None]
            gen_index = vae_token_indexes

        def attend(layer, q, k, v):
            return packed_attention(layer, q[0], k[0], v[0], layout)[None]

        decoded = self.language_model(position_ids[None], attend, input_ids=input_ids[None],
                                      und_embeds=None if vit_embeds is None else vit_embeds[None],
                                      gen_embeds=gen_embeds, und_index=und_index, gen_index=gen_index,
                                      output_hidden_states=output_hidden_states)
        und_out, gen_out, routing = decoded.und_hidden_state, decoded.gen_hidden_state, decoded.routing
        device = und_out.device

        # --- losses
        und_index = routing.und_index
        row_of_position = torch.full((total,), -1, dtype=torch.long, device=device)
        row_of_position[und_index] = torch.arange(und_index.numel(), device=device)
        ce = logits = ce_loss = None
        if ce_loss_indexes is not None and ce_loss_indexes.numel() > 0:
            rows = row_of_position[ce_loss_indexes.to(device)]
            if (rows < 0).any():
                raise ValueError("ce_loss_indexes point at positions that are not text tokens")
            logits = self.lm_head(und_out[0, rows])
            ce = F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")
            ce_loss = ce.sum() / ce.numel()
        mse = velocity = mse_loss = None
        if gen_out is not None and not frozen["gen"]:
            has_loss = flow_t > 0
            if has_loss.any():
                if mse_loss_indexes is not None and not torch.equal(
                        gen_index[has_loss.to(gen_index.device)].cpu(), mse_loss_indexes.to(torch.long).cpu()):
                    raise ValueError("mse_loss_indexes do not match the noisy (finite-timestep) VAE tokens")
                noisy = gen_out[0, has_loss.to(gen_out.device)]
                velocity = self.llm2vae(_in_float_dtype_of(self.llm2vae, noisy))
                target = (noise - clean)[has_loss].to(velocity.device)
                mse = (velocity.float() - target.float()) ** 2
                mse_loss = mse.mean(dim=-1).sum() / mse.shape[0]
        losses = [l for l in (ce_loss, mse_loss) if l is not None]
        loss = sum(losses) if losses else None

        last_hidden = inputs_embeds = None
        if output_hidden_states:
            last_hidden = routing.merge(und_out, gen_out)[0]
            inputs_embeds = decoded.inputs_embeds[0]
        return UniBrainOutput(
            loss=loss, ce_loss=ce_loss, mse_loss=mse_loss, ce_per_token=ce, mse_per_element=mse, logits=logits,
            velocity=velocity, last_hidden_state=last_hidden, inputs_embeds=inputs_embeds,
            hidden_states=tuple(h[0] for h in decoded.hidden_states) if output_hidden_states else None,
            vision_hidden_state=vision_hidden, connector_output=connector_out, flow_timesteps=flow_t,
            flow_inputs=x_t)

    # ------------------------------------------------------------------ KV-cache inference
    def new_cache(self) -> UniBrainKVCache:
        return UniBrainKVCache(self.config.text_config.num_hidden_layers)

    @staticmethod
    def _cache_attention(cache, causal: bool, update_cache: bool):
        """``attend`` for a block of new tokens against ``cache``; returns it and the cache to fill.

        ``cache`` may be a tuple of caches (read-only): the block's rows are then that many equal
        groups, group i attending to cache i — several guidance branches in one model call.
        """
        if isinstance(cache, (tuple, list)):
            if update_cache:
                raise ValueError("a group of caches can only be queried (update_cache=False)")
            caches = tuple(cache)

            def attend_group(layer, q, k, v):
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                rows = q.shape[0] // len(caches)
                outputs = []
                for index, member in enumerate(caches):
                    part = slice(index * rows, (index + 1) * rows)
                    keys, values = member.extended(layer.layer_idx, k[part], v[part])
                    outputs.append(cached_attention(layer, q[part], keys.to(q), values.to(q), causal))
                return torch.cat(outputs, dim=0)

            return attend_group, cache
        # The returned cache is a new view (the argument stays valid: snapshots and decoding copies
        # rely on it); appending writes only the block's tokens (see modeling/cache.py).
        new_cache = cache.copy() if update_cache else cache

        def attend(layer, q, k, v):
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, L, d)
            if update_cache:
                k, v = new_cache.append(layer.layer_idx, k, v)
            else:
                k, v = cache.extended(layer.layer_idx, k, v)
            return cached_attention(layer, q.transpose(1, 2), k.to(q), v.to(q), causal)

        return attend, new_cache

    def forward_cached(self, cache: UniBrainKVCache, und_embeds, gen_embeds, und_index, gen_index,
                       position_ids: torch.Tensor, causal: bool, update_cache: bool):
        """Run a block of ready-made embeddings (B, L, D) against ``cache`` (training's self-forcing rollout).

        Returns ``(und_out, gen_out, cache)``: final-normed hidden states per expert and the cache
        with the block appended (``update_cache=True``) or unchanged (read-only, e.g. denoising).
        """
        reference = und_embeds if und_embeds is not None else gen_embeds
        if cache.length and cache.batch_size != reference.shape[0]:
            raise ValueError(f"cache holds batch size {cache.batch_size} but the block has {reference.shape[0]}")
        attend, new_cache = self._cache_attention(cache, causal, update_cache)
        decoded = self.language_model(position_ids, attend, und_embeds=und_embeds, gen_embeds=gen_embeds,
                                      und_index=und_index, gen_index=gen_index)
        return decoded.und_hidden_state, decoded.gen_hidden_state, new_cache

    def _run_phase(self, phase: str, cache: UniBrainKVCache | None, position: int | None, **inputs):
        if phase not in INFERENCE_PHASES:
            raise ValueError(f"phase must be one of {sorted(INFERENCE_PHASES)}; got {phase!r}")
        if cache is None or position is None:
            raise ValueError(f"phase {phase!r} needs a cache and a RoPE position")
        if isinstance(cache, (tuple, list)):  # guidance branches in one call (velocity only)
            if phase != "velocity":
                raise ValueError(f"phase {phase!r} takes one cache; only 'velocity' takes a group of caches")
            positions = [int(p) for p in position] if isinstance(position, (tuple, list)) else None
            if positions is None or len(positions) != len(cache):
                raise ValueError(f"a group of {len(cache)} caches needs as many RoPE positions; got {position!r}")
            position = tuple(positions)
        else:
            position = int(position)
        return getattr(self, f"_phase_{phase}")(cache, position, **{k: v for k, v in inputs.items()
                                                                    if v is not None})

    def _block(self, cache, position_ids, causal: bool, update_cache: bool, **rows):
        """One block through the decoder against ``cache`` (or a group of caches): (decoder output, cache after it)."""
        batch = next(t.shape[0] for t in (rows.get("input_ids"), rows.get("und_embeds"), rows.get("gen_embeds"))
                     if t is not None)
        group = cache if isinstance(cache, (tuple, list)) else (cache,)
        for member in group:
            if member.length and member.batch_size * len(group) != batch:
                per_cache = "" if len(group) == 1 else " per cache"
                raise ValueError(f"cache holds batch size {member.batch_size} but the block has "
                                 f"{batch // len(group)}{per_cache}")
        attend, new_cache = self._cache_attention(cache, causal, update_cache)
        return self.language_model(position_ids, attend, **rows), new_cache

    def _marker_ids(self, batch: int, device=None) -> torch.Tensor:
        ids = torch.tensor([self.config.start_of_image_token_id, self.config.end_of_image_token_id], device=device)
        return ids[None].expand(batch, -1)

    def _phase_prefill_text(self, cache, position: int, input_ids):
        length = input_ids.shape[1]
        positions = torch.arange(position, position + length, device=input_ids.device)
        _, cache = self._block(cache, positions, causal=True, update_cache=True, input_ids=input_ids)
        return UniBrainCachedOutput(cache=cache)

    def _phase_prefill_vit(self, cache, position: int, vit_pixel_patches, vit_position_ids, vit_seqlens):
        seqlens = [int(s) for s in vit_seqlens]
        if len(set(seqlens)) != 1:
            raise ValueError("a batched ViT prefill needs images of one size")
        batch, count = len(seqlens), seqlens[0]
        embeds = self.embed_vit(vit_pixel_patches, vit_position_ids, seqlens).reshape(batch, count, -1)
        # [<|vision_start|>, ViT tokens, <|vision_end|>]: token ids first, then the embeddings.
        und_index = torch.tensor([0, count + 1] + list(range(1, count + 1)), device=embeds.device)
        positions = torch.full((count + 2,), position, device=embeds.device)
        _, cache = self._block(cache, positions, causal=False, update_cache=True,
                               input_ids=self._marker_ids(batch, embeds.device), und_embeds=embeds,
                               und_index=und_index)
        return UniBrainCachedOutput(cache=cache)

    def _latent_block(self, cache, position, latent_tokens, latent_position_ids, timesteps, update_cache):
        """``[<|vision_start|>, latents, <|vision_end|>]`` at one RoPE position in generation mode.

        With a group of n caches (and n positions) the block runs once for each, as n·B rows of one call.
        """
        batch, num_tokens, _ = latent_tokens.shape
        group = len(cache) if isinstance(cache, (tuple, list)) else 1
        t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)[:1]
        embeds = self.embed_latents(latent_tokens.reshape(batch * num_tokens, -1), t.to(latent_tokens.device),
                                    latent_position_ids.repeat(batch)).reshape(batch, num_tokens, -1)
        device = embeds.device
        und_index = torch.tensor([0, num_tokens + 1], device=device)
        gen_index = torch.arange(1, num_tokens + 1, device=device)
        if group == 1:
            positions = torch.full((num_tokens + 2,), int(position), device=device)
        else:  # every branch at its own context's next position
            embeds = embeds.repeat(group, 1, 1)
            positions = torch.tensor(position, device=device).repeat_interleave(batch)[:, None].expand(-1, num_tokens + 2)
        decoded, cache = self._block(cache, positions, causal=False, update_cache=update_cache,
                                     input_ids=self._marker_ids(batch * group, device), gen_embeds=embeds,
                                     und_index=und_index, gen_index=gen_index)
        return decoded.gen_hidden_state, cache

    def _phase_prefill_latents(self, cache, position: int, latent_tokens, latent_position_ids, timesteps=0.0):
        _, cache = self._latent_block(cache, position, latent_tokens, latent_position_ids, timesteps, True)
        return UniBrainCachedOutput(cache=cache)

    def _phase_velocity(self, cache, position: int, latent_tokens, latent_position_ids, timesteps):
        gen_out, _ = self._latent_block(cache, position, latent_tokens, latent_position_ids, timesteps, False)
        velocity = self.llm2vae(_in_float_dtype_of(self.llm2vae, gen_out))
        return UniBrainCachedOutput(cache=cache, velocity=velocity)

    def _phase_decode(self, cache, position: int, input_ids):
        token_ids = input_ids.reshape(-1, 1)
        positions = torch.tensor([position], device=token_ids.device)
        decoded, cache = self._block(cache, positions, causal=True, update_cache=True, input_ids=token_ids)
        return UniBrainCachedOutput(cache=cache, logits=self.lm_head(decoded.und_hidden_state[:, -1]))

    # The public primitives the pipeline is built from; each is one call of the model.
    @torch.no_grad()
    def prefill_text_cached(self, cache, input_ids: torch.LongTensor, start_position: int):
        """Append a text segment (B, L) — already wrapped in ``<|im_start|> … <|im_end|>`` — causally."""
        return self(phase="prefill_text", cache=cache, position=start_position, input_ids=input_ids).cache

    @torch.no_grad()
    def prefill_vit_cached(self, cache, pixel_patches, position_ids, seqlens, position: int):
        """Append ViT image blocks ``[<|vision_start|>, tokens, <|vision_end|>]`` (one per batch row)."""
        return self(phase="prefill_vit", cache=cache, position=position, vit_pixel_patches=pixel_patches,
                    vit_position_ids=position_ids, vit_seqlens=list(seqlens)).cache

    @torch.no_grad()
    def prefill_latents_cached(self, cache, latent_tokens, latent_position_ids, position: int):
        """Append clean VAE latent blocks (t = 0) to the cache."""
        return self(phase="prefill_latents", cache=cache, position=position, latent_tokens=latent_tokens,
                    latent_position_ids=latent_position_ids, timesteps=torch.zeros(1)).cache

    @torch.no_grad()
    def velocity_cached(self, cache, latent_tokens, timestep, latent_position_ids, position: int):
        """Predicted flow velocity (B, N, p·p·C) of noisy latents at time t, reading (not writing) the cache."""
        return self(phase="velocity", cache=cache, position=position, latent_tokens=latent_tokens,
                    latent_position_ids=latent_position_ids,
                    timesteps=torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[:1]).velocity

    @torch.no_grad()
    def velocities_cached(self, caches, latent_tokens, timestep, latent_position_ids, positions) -> list:
        """:meth:`velocity_cached` against several caches (guidance branches) in one model call.

        ``caches`` and ``positions`` pair up (each context's next RoPE position); the same noisy
        latents (B, N, p·p·C) are queried against each. Returns one velocity (B, N, p·p·C) per cache.
        The projections and MLPs run once for all branches (fewer, larger matmuls; under expert
        offload the marker rows' understanding weights stream once), attention stays per cache.
        """
        caches = tuple(caches)
        if len(caches) == 1:
            return [self.velocity_cached(caches[0], latent_tokens, timestep, latent_position_ids, positions[0])]
        velocity = self(phase="velocity", cache=caches, position=tuple(int(p) for p in positions),
                        latent_tokens=latent_tokens, latent_position_ids=latent_position_ids,
                        timesteps=torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[:1]).velocity
        return list(velocity.chunk(len(caches), dim=0))

    @torch.no_grad()
    def next_token_logits_cached(self, cache, token_ids: torch.LongTensor, position: int):
        """Feed one token per batch row at ``position``; returns (logits (B, V), cache)."""
        output = self(phase="decode", cache=cache, position=position, input_ids=token_ids.reshape(-1))
        return output.logits, output.cache


__all__ = ["UniBrainForConditionalGeneration", "UniBrainPreTrainedModel", "UniBrainOutput", "UniBrainCachedOutput",
           "UniBrainKVCache", "INFERENCE_PHASES", "sincos_2d_table", "flattened_position_ids"]


# Saved checkpoints carry an ``auto_map`` and a copy of this code, so Hub users without the
# package can load them with ``AutoModel.from_pretrained(..., trust_remote_code=True)``.
UniBrainConfig.register_for_auto_class()
UniBrainForConditionalGeneration.register_for_auto_class("AutoModel")
