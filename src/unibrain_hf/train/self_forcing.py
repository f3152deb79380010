"""Stage-3 "dynamic hidden state" (self-forcing) forward of UniBrain.

Stage 2 conditions every later token on *ground-truth* latents. At inference the model sees its
own generations instead, so stage 3 trains on them (exposure-bias correction). Per sample, in
sequence order, with a training-time KV cache:

* text / ViT tokens before each image are appended to the cache (no grad, causal);
* a **noisy target** is predicted in one step from ``x_t = (1−t)·x0 + t·ε`` with ``t ~ U(0, 1]``
  against the (detached) cache; its flow-matching MSE is the stage's generation loss, and
  ``x̂0 = x_t − t·v`` (detached) is remembered; the noisy block never enters the cache;
* the **clean copy** that follows a target is replaced by ``x̂0`` before it is cached — later
  text and images are conditioned on the model's own prediction;
* finally one ordinary packed forward (all VAE slots holding the latents actually used, t = 0)
  gives the cross-entropy on the text.

The number of decoder calls per pack depends on the pack (one per text run and per image), so
ranks holding different packs call each layer a different number of times. DDP copes (one
gradient all-reduce per step); parameter sharding does not (every call of an FSDP2 / ZeRO-3 unit
is an all-gather that every rank must join), so the trainer refuses this stage under FSDP2 and
ZeRO-3. The reference pads with dummy forwards to equalise the calls; that is not done here.

    python -c "from unibrain_hf.train.self_forcing import self_forcing_forward; help(self_forcing_forward)"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modeling.modeling_unibrain import UniBrainOutput


@dataclass
class _Image:
    start: int  # sequence index of the first latent token
    count: int
    token_offset: int  # row of its first token among all latent tokens of the pack
    is_target: bool


def _images_of(batch) -> list[_Image]:
    images, offset = [], 0
    vae_index = batch.vae_token_indexes.tolist()
    timesteps = batch.timesteps
    for h, w in batch.latent_shapes:
        count = int(h) * int(w)
        images.append(_Image(vae_index[offset], count, offset, bool(torch.isfinite(timesteps[offset]))))
        offset += count
    return images


def self_forcing_forward(model, batch, padded_latents: torch.Tensor, generator: torch.Generator | None = None,
                         shift: float | None = None) -> UniBrainOutput:
    """Run the stage-3 rollout on a :class:`~unibrain_hf.processing.packing.PackedBatch`.

    Returns ``UniBrainOutput`` with ``mse_per_element`` (rows of the one-step predictions),
    ``ce_per_token`` (from the final packed pass) and their token means.
    """
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    config = model.config
    shift = config.timestep_shift if shift is None else shift
    patch = config.latent_patch_size
    clean = model.patchify_latents(padded_latents.to(device=device, dtype=dtype), batch.latent_shapes, patch)
    positions = batch.position_ids.to(device)

    # Pre-embed the pack: text with gradients (the image markers of the one-step blocks learn),
    # ViT + connector without (they are frozen in this stage).
    sequence = torch.zeros(batch.sequence_length, config.hidden_size, device=device, dtype=dtype)
    text_embeds = model.language_model.embed_tokens(batch.input_ids.to(device))
    sequence = sequence.index_put((batch.text_indexes.to(device),), text_embeds)
    if batch.vit_pixel_patches is not None:
        with torch.no_grad():
            vit = model.embed_vit(batch.vit_pixel_patches.to(device=device, dtype=dtype),
                                  batch.vit_position_ids.to(device), batch.vit_seqlens)
        sequence = sequence.index_put((batch.vit_token_indexes.to(device),), vit)

    images = _images_of(batch)
    latent_positions = batch.latent_position_ids.to(device)
    used_latents = clean.detach().clone()
    mse_rows = []
    sample_start = 0
    image_cursor = 0
    for sample_len in batch.sample_lens:
        sample_end = sample_start + sample_len
        cache = model.new_cache()
        processed = sample_start
        last_prediction = None
        while image_cursor < len(images) and images[image_cursor].start < sample_end:
            image = images[image_cursor]
            image_cursor += 1
            open_marker, close_marker = image.start - 1, image.start + image.count
            if open_marker > processed:  # text / ViT tokens since the last image enter the cache
                with torch.no_grad():
                    _, _, cache = model.forward_cached(
                        cache, sequence[processed:open_marker].detach()[None], None, None, None,
                        positions[processed:open_marker], causal=True, update_cache=True)
            rows = slice(image.token_offset, image.token_offset + image.count)
            block_positions = positions[open_marker:close_marker + 1]
            markers = torch.stack([sequence[open_marker], sequence[close_marker]])[None]
            und_index = torch.tensor([0, image.count + 1], device=device)
            gen_index = torch.arange(1, image.count + 1, device=device)
            if image.is_target:
                t = 1.0 - torch.rand((), generator=generator).item()
                noise = torch.randn(image.count, clean.shape[1], generator=generator).to(device=device, dtype=dtype)
                x0 = clean[rows]
                x_t = (1.0 - t) * x0 + t * noise
                t_model = shift * t / (1 + (shift - 1) * t)
                embeds = model.embed_latents(x_t, torch.tensor([t_model], device=device), latent_positions[rows])
                _, gen_out, _ = model.forward_cached(cache, markers, embeds[None], und_index, gen_index,
                                                     block_positions, causal=False, update_cache=False)
                velocity = model.llm2vae(gen_out[0])
                mse_rows.append((velocity.float() - (noise - x0).float()) ** 2)
                last_prediction = (x_t - t * velocity).detach()
                used_latents[rows] = last_prediction
            else:
                latent = clean[rows]
                if last_prediction is not None:  # the dynamic hidden state: condition on our own prediction
                    latent, last_prediction = last_prediction, None
                    used_latents[rows] = latent
                with torch.no_grad():
                    embeds = model.embed_latents(latent, torch.zeros(1, device=device), latent_positions[rows])
                    _, _, cache = model.forward_cached(cache, markers.detach(), embeds[None], und_index, gen_index,
                                                       block_positions, causal=False, update_cache=True)
            processed = close_marker + 1
        sample_start = sample_end

    # One packed pass over the pack with the latents actually used (all at t = 0) for the text loss.
    inputs = batch.model_inputs(None)
    inputs["timesteps"] = torch.full_like(batch.timesteps, float("-inf"))
    inputs["mse_loss_indexes"] = None
    ce_output = model(**inputs, latent_tokens=used_latents.detach(), flow_noise=torch.zeros_like(used_latents))
    mse = torch.cat(mse_rows, dim=0) if mse_rows else None
    mse_loss = mse.mean(dim=-1).sum() / mse.shape[0] if mse is not None else None
    losses = [l for l in (ce_output.ce_loss, mse_loss) if l is not None]
    return UniBrainOutput(loss=sum(losses) if losses else None, ce_loss=ce_output.ce_loss, mse_loss=mse_loss,
                          ce_per_token=ce_output.ce_per_token, mse_per_element=mse, logits=ce_output.logits)
