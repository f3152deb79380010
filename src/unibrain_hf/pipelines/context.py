"""The interleaved KV-cache context the pipeline builds, with its two guidance twins.

UniBrain's inference keeps three contexts side by side (BAGEL's ``interleave_inference``):

* ``gen`` — everything: system prompt, images (VAE then ViT block), instructions, generated text.
* ``cfg_text`` — the text-unconditional twin: a snapshot of ``gen`` taken just before the most
  recent instruction (and refreshed after every image), so it lacks the last prompt.
* ``cfg_img`` — the image-unconditional twin: the text only (system prompt + instructions).

Each context is a KV cache plus the next free RoPE position. A snapshot is a new view on the same
cache buffers (no copy); appends write in place and copy only where two contexts diverge from a
shared prefix (see :mod:`unibrain_hf.modeling.cache`). Every append runs once for a batch of B rows
that share lengths (e.g. B slices of one volume under one prompt). Denoising queries never write a
cache; a step's guidance branches run as one model call (attention per context). Every
tensor the context creates (token ids, sampling state) lives on its ``device`` — the
pipeline's execution device, which under offloading differs from where the weights rest.

    python -c "from unibrain_hf.pipelines.context import InterleavedContext; help(InterleavedContext)"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modeling.cache import UniBrainKVCache


@dataclass
class KVContext:
    """One KV cache and the RoPE position the next token gets."""

    cache: UniBrainKVCache
    rope: int = 0

    @property
    def kv_len(self) -> int:
        return self.cache.length

    def snapshot(self) -> "KVContext":
        return KVContext(self.cache.copy(), self.rope)


@dataclass
class EncodedImage:
    """An image ready to prefill: latent tokens for the VAE block, patches for the ViT block.

    ``latent_tokens`` (B, N, p·p·C) with ``latent_position_ids`` (N,); ``vit_patches``
    (B·M, 14·14·3) with ``vit_position_ids`` (B·M,) — B images of one size.
    """

    latent_tokens: torch.Tensor
    latent_position_ids: torch.Tensor
    vit_patches: torch.Tensor
    vit_position_ids: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.latent_tokens.shape[0])


class InterleavedContext:
    """The gen / cfg_text / cfg_img contexts and the operations that grow them.

    Args:
        model: a ``UniBrainForConditionalGeneration`` (its ``*_cached`` primitives do the work).
        bos_token_id / eos_token_id: ids wrapping every text segment (``<|im_start|>`` / ``<|im_end|>``).
        batch_size: rows B; a text given once is shared by all rows.
        device: where the context's own tensors are created (the pipeline's ``_execution_device``).
        batch_branches: evaluate a denoising step's guidance branches in one model call (the default;
            ``False`` runs one call per branch — the same velocities up to float rounding).
    """

    def __init__(self, model, bos_token_id: int, eos_token_id: int, batch_size: int = 1, device="cpu",
                 batch_branches: bool = True):
        self.model = model
        self.batch_branches = bool(batch_branches)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.bos_token_id = int(bos_token_id)
        self.eos_token_id = int(eos_token_id)
        self.gen = KVContext(model.new_cache())
        self.cfg_text = KVContext(model.new_cache())
        self.cfg_img = KVContext(model.new_cache())

    # ------------------------------------------------------------------ primitives on one context
    def _wrap(self, token_ids) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[0] == 1 and self.batch_size > 1:
            ids = ids.expand(self.batch_size, -1)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"text has {ids.shape[0]} rows but the context has {self.batch_size}")
        batch = ids.shape[0]
        bos = torch.full((batch, 1), self.bos_token_id, dtype=torch.long, device=self.device)
        eos = torch.full((batch, 1), self.eos_token_id, dtype=torch.long, device=self.device)
        return torch.cat([bos, ids, eos], dim=1)

    def _text(self, context: KVContext, wrapped: torch.Tensor) -> KVContext:
        cache = self.model.prefill_text_cached(context.cache, wrapped.to(self.device), context.rope)
        return KVContext(cache, context.rope + wrapped.shape[1])

    def _image(self, context: KVContext, image: EncodedImage) -> KVContext:
        # The VAE block and the ViT block each take one RoPE position (then +1).
        cache = self.model.prefill_latents_cached(context.cache, image.latent_tokens.to(self.device),
                                                  image.latent_position_ids.to(self.device), context.rope)
        per_image = image.vit_patches.shape[0] // image.batch_size
        cache = self.model.prefill_vit_cached(cache, image.vit_patches.to(self.device),
                                              image.vit_position_ids.to(self.device),
                                              [per_image] * image.batch_size, context.rope + 1)
        return KVContext(cache, context.rope + 2)

    # ------------------------------------------------------------------ reference operations
    def add_system_prompt(self, token_ids) -> None:
        """A system prompt conditions both the full and the image-free context (not cfg_text)."""
        wrapped = self._wrap(token_ids)
        self.gen = self._text(self.gen, wrapped)
        self.cfg_img = self._text(self.cfg_img, wrapped)

    def add_instruction(self, token_ids) -> None:
        """A user instruction: cfg_text keeps the context before it; gen and cfg_img receive it."""
        wrapped = self._wrap(token_ids)
        self.cfg_text = self.gen.snapshot()
        self.gen = self._text(self.gen, wrapped)
        self.cfg_img = self._text(self.cfg_img, wrapped)

    def add_generated_text(self, token_ids) -> None:
        """Generated text (thinking, answers) re-enters the full context only."""
        self.gen = self._text(self.gen, self._wrap(token_ids))

    def add_image(self, image: EncodedImage) -> None:
        """An image (input or generated) as VAE block then ViT block; cfg_text follows gen."""
        self.gen = self._image(self.gen, image)
        self.cfg_text = self.gen.snapshot()

    def image_branch_from_gen(self) -> None:
        """UniBrain's unified loop: before appending a generated image, cfg_img becomes the current gen."""
        self.cfg_img = self.gen.snapshot()

    def fork(self) -> "InterleavedContext":
        """A free copy (snapshots share cache buffers): e.g. ask a question without keeping it."""
        clone = InterleavedContext.__new__(InterleavedContext)
        clone.model, clone.bos_token_id, clone.eos_token_id = self.model, self.bos_token_id, self.eos_token_id
        clone.batch_size, clone.device, clone.batch_branches = self.batch_size, self.device, self.batch_branches
        clone.gen, clone.cfg_text, clone.cfg_img = self.gen.snapshot(), self.cfg_text.snapshot(), self.cfg_img.snapshot()
        return clone

    # ------------------------------------------------------------------ queries (never write)
    def velocities(self, x_t: torch.Tensor, t: float, latent_position_ids: torch.Tensor, text_scale: float,
                   image_scale: float):
        """(v_cond, v_uncond_text, v_uncond_image) of noisy latents; unneeded branches are None.

        The generated image sits at each context's own next RoPE position.
        """
        latent_position_ids = latent_position_ids.to(self.device)
        branches = [self.gen]
        if text_scale > 1.0:
            branches.append(self.cfg_text)
            if image_scale > 1.0:
                branches.append(self.cfg_img)
        if len(branches) == 1 or not self.batch_branches:
            found = [self.model.velocity_cached(b.cache, x_t, t, latent_position_ids, b.rope) for b in branches]
        else:  # one model call for all branches of the step
            found = self.model.velocities_cached([b.cache for b in branches], x_t, t, latent_position_ids,
                                                 [b.rope for b in branches])
        found += [None] * (3 - len(found))
        return tuple(found)

    @torch.no_grad()
    def generate_text(self, max_length: int, do_sample: bool = False, temperature: float = 1.0,
                      generator=None, return_logits: bool = False):
        """Decode from ``gen`` without changing it (BAGEL's ``generate_text`` on a copy).

        Feeds ``<|im_start|>`` at the current RoPE position, then one token per step; stops when
        every row produced ``<|im_end|>`` or after ``max_length`` fed tokens. Returns ids (B, T)
        starting with ``<|im_start|>`` (the end token is not included; finished rows are padded
        with it) and, optionally, the logits of every step (B, T', V). ``generator`` (one, or one
        per row) drives sampling; each row samples on its generator's device.
        """
        cache, position = self.gen.cache, self.gen.rope
        batch = self.batch_size
        current = torch.full((batch,), self.bos_token_id, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        tokens, step_logits = [], []
        for _ in range(int(max_length)):
            tokens.append(current)
            logits, cache = self.model.next_token_logits_cached(cache, current, position)
            logits = logits.float().to(self.device)
            if return_logits:
                step_logits.append(logits)
            chosen = _sample(logits, temperature, generator) if do_sample else logits.argmax(dim=-1)
            chosen = torch.where(finished, torch.full_like(chosen, self.eos_token_id), chosen)
            finished = finished | (chosen == self.eos_token_id)
            current = chosen
            position += 1
            if bool(finished.all()):
                break
        ids = torch.stack(tokens, dim=1)
        if return_logits:
            return ids, torch.stack(step_logits, dim=1)
        return ids


def _sample(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """One token per row from softmax(logits / T); a list of generators gives each row its own."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if isinstance(generator, list):
        return torch.cat([_multinomial(row[None], row_generator) for row, row_generator in zip(probs, generator)])
    return _multinomial(probs, generator)


def _multinomial(probs: torch.Tensor, generator) -> torch.Tensor:
    """Sample where the generator lives (a CPU generator also seeds a GPU run); ids come back on probs' device."""
    device = probs.device if generator is None else generator.device
    return torch.multinomial(probs.to(device), 1, generator=generator).reshape(-1).to(probs.device)
