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

The decoder calls of a pack (:func:`rollout_calls`: one per text run and per image) depend on the
pack. One process and DDP simply make them. Under parameter sharding (FSDP2, ZeRO-3) every call of
a sharded unit is a collective that every rank must join, so with ``lockstep=True`` the ranks
first agree on one common sequence of call kinds (:func:`~unibrain_hf.train.lockstep.common_schedule`)
and each rank runs a *padding call* in every slot its own pack does not fill: the same modules,
in the same order and with the same gradient mode as a real call of that kind, on a block with a
single latent token, whose result enters the loss multiplied by zero — so it adds exactly zero to
the loss and to every gradient, and its backward pass (with its collectives) still runs. For the
same reason a rank whose pack has no text-loss token runs the final pass with one token's
cross-entropy multiplied by zero. Padding calls draw no random numbers and leave the random
state untouched, so the real calls see the same draws as in one process.

    python -c "from unibrain_hf.train.self_forcing import self_forcing_forward; help(self_forcing_forward)"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modeling.modeling_unibrain import UniBrainOutput
from .lockstep import common_schedule

# Kinds of decoder call in the rollout (the values are what ranks exchange to agree on a schedule).
TEXT, IMAGE, PREDICT = 0, 1, 2  # cache a text / ViT run; cache a clean image; predict a target (with grad)


@dataclass(frozen=True)
class _Image:
    start: int  # sequence index of the first latent token
    count: int
    token_offset: int  # row of its first token among all latent tokens of the pack
    is_target: bool


@dataclass(frozen=True)
class RolloutCall:
    """One decoder call of the rollout: ``kind``, the sample it belongs to and what it processes."""

    kind: int
    sample: int
    image: _Image | None = None  # IMAGE / PREDICT
    span: tuple[int, int] | None = None  # TEXT: the sequence range [start, end) appended to the cache


def _images_of(batch) -> list[_Image]:
    images, offset = [], 0
    vae_index = batch.vae_token_indexes.tolist() if batch.vae_token_indexes is not None else []
    timesteps = batch.timesteps
    for h, w in batch.latent_shapes or []:
        count = int(h) * int(w)
        images.append(_Image(vae_index[offset], count, offset, bool(torch.isfinite(timesteps[offset]))))
        offset += count
    return images


def rollout_calls(batch) -> list[RolloutCall]:
    """The decoder calls of ``batch``'s rollout, in order, from its layout alone (no model needed)."""
    images = _images_of(batch)
    calls: list[RolloutCall] = []
    sample_start = cursor = 0
    for sample, sample_len in enumerate(batch.sample_lens):
        sample_end = sample_start + sample_len
        processed = sample_start
        while cursor < len(images) and images[cursor].start < sample_end:
            image = images[cursor]
            cursor += 1
            open_marker = image.start - 1
            if open_marker > processed:  # text / ViT tokens since the last image
                calls.append(RolloutCall(TEXT, sample, span=(processed, open_marker)))
            calls.append(RolloutCall(PREDICT if image.is_target else IMAGE, sample, image=image))
            processed = image.start + image.count + 1  # past the image's closing marker
        sample_start = sample_end
    return calls


def _padding_call(model, kind: int, sequence: torch.Tensor, latent_width: int) -> torch.Tensor | None:
    """A call of ``kind`` that another rank needs: the same modules as a real one, on a tiny block.

    Returns the PREDICT call's velocity times zero (to be added to the loss), else ``None``.
    """
    device, dtype = sequence.device, sequence.dtype
    cache = model.new_cache()
    first = torch.zeros(1, dtype=torch.long, device=device)
    if kind == TEXT:
        with torch.no_grad():
            model.forward_cached(cache, sequence[:1].detach()[None], None, None, None, first, causal=True,
                                 update_cache=False)
        return None
    # [open marker, one latent token, close marker], as a real image block; the markers come from
    # the pack's embeddings (with their gradient path, as a real prediction's markers).
    markers = torch.stack([sequence[0], sequence[0]])[None]
    positions = torch.zeros(3, dtype=torch.long, device=device)
    und_index = torch.tensor([0, 2], device=device)
    gen_index = torch.tensor([1], device=device)
    latent = torch.zeros(1, latent_width, device=device, dtype=dtype)
    if kind == IMAGE:
        with torch.no_grad():
            embeds = model.embed_latents(latent, torch.zeros(1, device=device), first)
            model.forward_cached(cache, markers.detach(), embeds[None], und_index, gen_index, positions,
                                 causal=False, update_cache=False)
        return None
    embeds = model.embed_latents(latent, torch.ones(1, device=device), first)
    _, gen_out, _ = model.forward_cached(cache, markers, embeds[None], und_index, gen_index, positions,
                                         causal=False, update_cache=False)
    return model.llm2vae(gen_out[0]).float().sum() * 0.0


def self_forcing_forward(model, batch, padded_latents: torch.Tensor | None, generator: torch.Generator | None = None,
                         shift: float | None = None, lockstep: bool = False) -> UniBrainOutput:
    """Run the stage-3 rollout on a :class:`~unibrain_hf.processing.packing.PackedBatch`.

    Returns ``UniBrainOutput`` with ``mse_per_element`` (rows of the one-step predictions),
    ``ce_per_token`` (from the final packed pass) and their token means. The computation runs
    where ``padded_latents`` are (else where the batch is), in the dtype of the token embeddings.
    ``lockstep=True`` (all ranks of a sharded model, together): make the same sequence of calls
    as every other rank, padding with calls that add exactly zero (see the module docstring).
    """
    config = model.config
    shift = config.timestep_shift if shift is None else shift
    patch = config.latent_patch_size
    device = padded_latents.device if padded_latents is not None else batch.input_ids.device
    positions = batch.position_ids.to(device)

    # Pre-embed the pack: text with gradients (the image markers of the one-step blocks learn),
    # ViT + connector without (they are frozen in this stage).
    text_embeds = model.language_model.embed_tokens(batch.input_ids.to(device))
    dtype = text_embeds.dtype
    sequence = torch.zeros(batch.sequence_length, config.hidden_size, device=device, dtype=dtype)
    sequence = sequence.index_put((batch.text_indexes.to(device),), text_embeds)
    if batch.vit_pixel_patches is not None:
        with torch.no_grad():
            vit = model.embed_vit(batch.vit_pixel_patches.to(device=device, dtype=dtype),
                                  batch.vit_position_ids.to(device), batch.vit_seqlens)
        sequence = sequence.index_put((batch.vit_token_indexes.to(device),), vit)
    clean = used_latents = latent_positions = None
    if padded_latents is not None:
        clean = model.patchify_latents(padded_latents.to(dtype=dtype), batch.latent_shapes, patch)
        used_latents = clean.detach().clone()
        latent_positions = batch.latent_position_ids.to(device)
    latent_width = config.patch_latent_dim

    calls = rollout_calls(batch)
    schedule = common_schedule([call.kind for call in calls]) if lockstep \
        else [(call.kind, True) for call in calls]
    own_calls = iter(calls)
    mse_rows, padding = [], []
    sample, cache, last_prediction = None, None, None
    for kind, own in schedule:
        if not own:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                zero = _padding_call(model, kind, sequence, latent_width)
            if zero is not None:
                padding.append(zero)
            continue
        call = next(own_calls)
        if call.sample != sample:  # a new sample: a fresh cache
            sample, cache, last_prediction = call.sample, model.new_cache(), None
        if kind == TEXT:
            start, end = call.span
            with torch.no_grad():
                _, _, cache = model.forward_cached(cache, sequence[start:end].detach()[None], None, None, None,
                                                   positions[start:end], causal=True, update_cache=True)
            continue
        image = call.image
        open_marker, close_marker = image.start - 1, image.start + image.count
        rows = slice(image.token_offset, image.token_offset + image.count)
        block_positions = positions[open_marker:close_marker + 1]
        markers = torch.stack([sequence[open_marker], sequence[close_marker]])[None]
        und_index = torch.tensor([0, image.count + 1], device=device)
        gen_index = torch.arange(1, image.count + 1, device=device)
        if kind == PREDICT:
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

    # One packed pass over the pack with the latents actually used (all at t = 0) for the text loss.
    inputs = batch.model_inputs(None)
    if batch.timesteps is not None:
        inputs["timesteps"] = torch.full_like(batch.timesteps, float("-inf"))
    inputs["mse_loss_indexes"] = None
    padding_ce = lockstep and batch.num_ce_tokens == 0
    if padding_ce:  # keep this pass in the backward pass, as on ranks that have text-loss tokens
        inputs["ce_loss_indexes"] = batch.text_indexes[:1]
        inputs["labels"] = torch.zeros(1, dtype=torch.long)
    flow_noise = None if used_latents is None else torch.zeros_like(used_latents)
    ce_output = model(**inputs, latent_tokens=None if used_latents is None else used_latents.detach(),
                      flow_noise=flow_noise)
    ce_per_token, ce_loss, logits = ce_output.ce_per_token, ce_output.ce_loss, ce_output.logits
    if padding_ce:
        ce_per_token, ce_loss, logits = ce_per_token * 0.0, None, None
    mse = torch.cat(mse_rows, dim=0) if mse_rows else None
    mse_loss = mse.mean(dim=-1).sum() / mse.shape[0] if mse is not None else None
    if padding:  # exact zeros that carry the padding predictions into the backward pass
        zero = torch.stack(padding).sum()
        mse = mse + zero if mse is not None else zero.reshape(1, 1).clone()  # (FSDP2 warns about views)
    losses = [l for l in (ce_loss, mse_loss) if l is not None]
    return UniBrainOutput(loss=sum(losses) if losses else None, ce_loss=ce_loss, mse_loss=mse_loss,
                          ce_per_token=ce_per_token, mse_per_element=mse, logits=logits)
