"""Where does an imputed image look? Attention from the target's tokens to the input image's tokens.

UniBrain imputes a sequence from the input's clean VAE tokens in its context. To carry the input's
anatomy into the target, some attention head has to read, for each target token, the input token at
the *same* grid position. A head that spreads that read over the neighbours blurs the anatomy by a
token's width (``vae_downsample · latent_patch_size`` pixels); a head that reads the whole image
carries only its contrast and outline. :func:`copy_attention` measures this on the training forward
of a trained model: input slice (clean VAE + ViT copies), the translation instruction, the target as
a noisy VAE image at fixed noise levels; per layer and head, averaged over subjects and noise
levels:

* ``on_input``: the attention mass the target's tokens put on the input image's VAE tokens;
* ``same_position``: the part of it on the input token at the target token's own grid position;
* ``neighbours``: the part on the 8 tokens around that position.

``sharpest`` is the head with the largest ``same_position`` mass (the model's best copy head);
``same_position / on_input`` is the share of its input reading that is exact (uniform reading:
1 / tokens per image).

    python -c "from unibrain_hf.evaluation.copy_attention import copy_attention; help(copy_attention)"
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..modeling.attention import recording_attention
from ..modeling.vae import encode_latents
from ..pipelines.mri_io import load_slice
from ..processing.sequence_plan import image_items, text_item
from ..protocol.prompts import translation_question
from .cohort import evaluation_slices

#: Noise levels (t = 1: pure noise) at which the target is shown; the flow's training draws cover them.
DEFAULT_NOISE_LEVELS = (0.25, 0.5, 0.75, 0.95)


def grid_masses(probabilities: torch.Tensor, query_tokens: torch.Tensor, key_tokens: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
    """``(H, 3)``: per head, the mean over queries of the mass on the keys, on the same position, on its 8 neighbours.

    ``probabilities`` is one sample's ``(H, L, L)``; ``query_tokens`` and ``key_tokens`` list the
    sequence positions of two images with the same ``grid`` (rows, columns) of tokens, row-major.
    """
    rows, cols = grid
    if len(query_tokens) != rows * cols or len(key_tokens) != rows * cols:
        raise ValueError(f"both images need {rows}x{cols} tokens; got {len(query_tokens)} and {len(key_tokens)}")
    block = probabilities[:, query_tokens][:, :, key_tokens]  # H, queries, keys
    cell = torch.arange(rows * cols)
    row, col = cell // cols, cell % cols
    distance = torch.maximum((row[:, None] - row[None]).abs(), (col[:, None] - col[None]).abs())
    same = (distance == 0).to(block.dtype)
    around = (distance == 1).to(block.dtype)
    return torch.stack([block.sum(-1).mean(-1), (block * same).sum(-1).mean(-1),
                        (block * around).sum(-1).mean(-1)], dim=-1)


def _translation_plan(pipe, images: dict, source: str, target: str, rng) -> list:
    # The stage-2 layout of one target: input (clean VAE + ViT), instruction, target as a noisy VAE image;
    # both slices padded to the model's canvas as the pipeline pads its inputs.
    source_rgb, target_rgb = (load_slice(images[code], code, pipe.processor.vae_resize).rgb
                              for code in (source, target))
    return [*image_items(source_rgb, need_vae=True, need_vit=True),
            text_item(translation_question([source], [target], rng).rstrip()),
            *image_items(target_rgb, need_loss=True)]


@torch.no_grad()
def copy_attention(pipe, cohort, split: str, subjects: list[str], source: str, target: str,
                   noise_levels=DEFAULT_NOISE_LEVELS, seed: int = 0) -> dict:
    """Attention of the ``target`` image's tokens to the ``source`` image's, per layer and head (module docstring).

    ``pipe`` is a loaded :class:`~unibrain_hf.UniBrainPipeline`; the slices are the evaluation slices
    of ``subjects`` (those with both sequences). Returns ``{"subjects", "noise_levels", "tokens",
    "grid", "layers": [[{"on_input", "same_position", "neighbours"} per head] per layer], "sharpest":
    {"layer", "head", "on_input", "same_position", "neighbours", "exact_share", "uniform_share"}}``.
    """
    levels = [float(t) for t in noise_levels]
    if not levels or not all(0.0 < t < 1.0 for t in levels):
        raise ValueError(f"noise_levels must be in (0, 1) (1 is pure noise); got {list(noise_levels)}")
    slices = evaluation_slices(cohort, split, subjects, [source, target])
    if not slices:
        raise ValueError(f"no subject of {subjects} in split {split!r} of {cohort} has {source} and {target}")
    model, processor = pipe.model, pipe.processor
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device).manual_seed(seed)  # the flow noise is drawn where the model is
    # The packer takes raw (pre-sigmoid) timesteps, as the training draws them.
    raw = [[math.log(t / (1.0 - t))] for t in levels]
    totals, count, grid = None, 0, None
    for images in slices.values():
        plan = _translation_plan(pipe, images, source, target, rng)
        for timesteps in raw:
            batch = processor.pack([plan], rng=0, timesteps=[timesteps])
            (source_grid, target_grid) = batch.latent_shapes
            if tuple(source_grid) != tuple(target_grid):
                raise ValueError(f"{source} and {target} slices give different token grids: {source_grid} vs "
                                 f"{target_grid}")
            grid = tuple(source_grid)
            latents = encode_latents(pipe.vae, batch.padded_images.to(device))
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.model_inputs(latents).items()}
            tokens = grid[0] * grid[1]
            source_tokens = batch.vae_token_indexes[:tokens]
            target_tokens = batch.mse_loss_indexes
            with recording_attention() as record:
                model(**inputs, generator=generator)
            masses = torch.stack([grid_masses(layer[0].cpu(), target_tokens, source_tokens, grid)
                                  for layer in record])  # layers, H, 3
            totals = masses if totals is None else totals + masses
            count += 1
    mean = (totals / count).numpy()
    names = ("on_input", "same_position", "neighbours")
    layers = [[{name: float(value) for name, value in zip(names, head)} for head in layer] for layer in mean]
    layer, head = np.unravel_index(int(mean[..., 1].argmax()), mean.shape[:2])
    best = layers[layer][head]
    return {"subjects": len(slices), "noise_levels": levels, "tokens": grid[0] * grid[1], "grid": list(grid),
            "layers": layers,
            "sharpest": {"layer": int(layer), "head": int(head), **best,
                         "exact_share": best["same_position"] / max(best["on_input"], 1e-12),
                         "uniform_share": 1.0 / (grid[0] * grid[1])}}


__all__ = ["DEFAULT_NOISE_LEVELS", "copy_attention", "grid_masses"]
