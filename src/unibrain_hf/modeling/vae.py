"""The FLUX-style VAE as a diffusers ``AutoencoderKL``, and how UniBrain uses it.

UniBrain's latents are *sampled* from the VAE posterior (``mean + std·ε``), also at inference,
then normalised ``z = scale·(sample − shift)``; decoding inverts the normalisation. This module
builds the diffusers config (from explicit sizes or from a FLUX/LDM state dict's shapes) and
wraps encode/decode with an explicit ``ε`` so runs are reproducible.

    python -c "from unibrain_hf.modeling.vae import tiny_vae; print(tiny_vae().config.latent_channels)"
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159


def flux_vae_config(base_channels: int = 128, channel_multipliers=(1, 2, 4, 4), num_res_blocks: int = 2,
                    latent_channels: int = 16, sample_size: int = 256,
                    scaling_factor: float = FLUX_SCALING_FACTOR, shift_factor: float = FLUX_SHIFT_FACTOR,
                    norm_num_groups: int = 32) -> dict:
    """An ``AutoencoderKL`` config with FLUX's architecture (no quant convs, mid attention, GroupNorm 32)."""
    levels = len(channel_multipliers)
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[base_channels * m for m in channel_multipliers], layers_per_block=num_res_blocks,
        act_fn="silu", latent_channels=latent_channels, norm_num_groups=norm_num_groups, sample_size=sample_size,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=True, force_upcast=True)


def flux_vae_config_from_ldm_state_dict(state_dict, scaling_factor=FLUX_SCALING_FACTOR,
                                        shift_factor=FLUX_SHIFT_FACTOR, sample_size: int = 256) -> dict:
    """Infer the FLUX VAE sizes from an LDM-named state dict (``encoder.down.N.block.M…``)."""
    try:
        base = state_dict["encoder.conv_in.weight"].shape[0]
        latent = state_dict["encoder.conv_out.weight"].shape[0] // 2
    except KeyError as exc:
        raise ValueError(f"not a FLUX/LDM autoencoder state dict: missing {exc}") from None
    levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down."))
    multipliers = []
    for level in range(levels):
        weight = state_dict[f"encoder.down.{level}.block.0.conv1.weight"]
        out_channels = weight.shape[0]
        if out_channels % base:
            raise ValueError(f"encoder level {level} has {out_channels} channels, not a multiple of {base}")
        multipliers.append(out_channels // base)
    blocks = 1 + max(int(k.split(".")[4]) for k in state_dict if k.startswith("encoder.down.0.block."))
    return flux_vae_config(base, tuple(multipliers), blocks, latent, sample_size, scaling_factor, shift_factor)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A small random FLUX-shaped VAE (32 base channels, 4 levels, 1 block) for tests and demos."""
    torch.manual_seed(seed)
    return AutoencoderKL(**flux_vae_config(32, (1, 1, 1, 1), 1, 16, 64))


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _deduplicate(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct images of a batch and, per original row, the index of its distinct image."""
    keys: dict[tuple, list[int]] = {}
    unique_rows, inverse = [], []
    sums = images.flatten(1).sum(dim=1).tolist()
    for row in range(images.shape[0]):
        match = None
        for candidate in keys.get((sums[row],), []):
            if torch.equal(images[row], images[unique_rows[candidate]]):
                match = candidate
                break
        if match is None:
            match = len(unique_rows)
            unique_rows.append(row)
            keys.setdefault((sums[row],), []).append(match)
        inverse.append(match)
    return images[unique_rows], torch.tensor(inverse, device=images.device)


def encode_latents(vae: AutoencoderKL, images: torch.Tensor, posterior_eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, sample: bool = True,
                   deduplicate: bool = True) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W) → normalised latents ``scale·(mean + std·ε − shift)``.

    ``posterior_eps`` (same shape as the latent means) makes the posterior sample reproducible;
    otherwise ε is drawn with ``generator``. ``sample=False`` returns the posterior mean.
    A training pack holds each generated target twice (noisy target + clean copy); with
    ``deduplicate`` identical images go through the encoder once (the encoder is deterministic and
    per-image, so the result is the same) and each copy still gets its own ε.
    """
    # Only the dtype is taken from the VAE: the images stay where the caller put them (the execution
    # device). ``vae.device`` is ``meta`` under sequential offload, and hooks move inputs themselves.
    images = images.to(dtype=vae.dtype)
    if deduplicate and images.shape[0] > 1:
        unique, inverse = _deduplicate(images)
        dist = vae.encode(unique).latent_dist
        mean, logvar = dist.mean[inverse], dist.logvar[inverse]
    else:
        dist = vae.encode(images).latent_dist
        mean, logvar = dist.mean, dist.logvar
    return sample_latents(vae, mean, logvar, posterior_eps, generator, sample)


def sample_latents(vae, mean: torch.Tensor, logvar: torch.Tensor, posterior_eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
    """Normalised latents ``scale·(mean + std·ε − shift)`` from posterior parameters.

    ε is ``posterior_eps`` when given (parity replays), else one ``randn`` of the means' shape from
    ``generator`` (or the global generator, seeded per pack by the trainer). Used by
    :func:`encode_latents` and by the latent cache, so cached and fresh latents are drawn alike.
    """
    if sample:
        if posterior_eps is None:
            from diffusers.utils.torch_utils import randn_tensor

            # randn_tensor draws on the generator's device, so a CPU generator also seeds a GPU run.
            posterior_eps = randn_tensor(tuple(mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
        elif tuple(posterior_eps.shape) != tuple(mean.shape):
            raise ValueError(f"posterior_eps has shape {tuple(posterior_eps.shape)}, the latent mean "
                             f"{tuple(mean.shape)}")
        # exp(logvar / 2) is diffusers' own std, bit for bit (its log-variance is clamped to [-30, 20]
        # before; FLUX does not clamp, which only matters for degenerate encoders).
        latent = mean + torch.exp(0.5 * logvar) * posterior_eps.to(mean)
    else:
        latent = mean
    shift = vae.config.shift_factor or 0.0
    return vae.config.scaling_factor * (latent - shift)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents → images in [-1, 1]-ish (N, 3, H, W), unclamped."""
    shift = vae.config.shift_factor or 0.0
    latents = latents.to(dtype=vae.dtype) / vae.config.scaling_factor + shift
    return vae.decode(latents).sample
