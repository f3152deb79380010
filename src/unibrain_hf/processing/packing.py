"""Pack sequence plans into the model's packed training batch (the one shared batch format).

A pack concatenates several samples into one sequence. Per sample, items are emitted as:

* text → ``<|im_start|> ids <|im_end|>``, one ``causal`` split, one RoPE position per token;
  with a loss, the ``<|im_start|>``…last-id positions predict ``ids + <|im_end|>``;
* ViT image → ``<|vision_start|> N_vit tokens <|vision_end|>``, ``full`` split, one position;
* clean VAE image → same framing with latent tokens, ``full`` split, one position (then +1);
* noisy VAE target → ``noise`` split at the current position, which is **not** advanced (the
  clean copy that follows shares it); its raw timestep is one N(0, 1) draw per image.

Condition dropout (classifier-free guidance training) removes items whose ``enable_cfg`` is
set with the configured probabilities; a dropped image still consumes its position, a dropped
text does not. Everything random comes from the ``numpy.random.Generator`` passed in, so a pack
is reproducible.

    python -m unibrain_hf.processing.packing   # packs a toy sample and prints the layout
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .image_transforms import StrideResize, patchify, to_model_tensor
from .sequence_plan import PlanItem, to_rgb_pil


@dataclass(frozen=True)
class DropoutProbabilities:
    """Condition-dropout rates at packing time (UniBrain uses text 0.1, ViT 0.3, clean VAE 0.3)."""

    text: float = 0.0
    vit: float = 0.0
    vae: float = 0.0

    def __post_init__(self):
        for name in ("text", "vit", "vae"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"dropout probability {name}={value} is outside [0, 1]")


@dataclass
class PackedBatch:
    """Tensors of one packed sequence, named as ``UniBrainForConditionalGeneration.forward`` expects.

    ``padded_images`` holds every VAE image of the pack in [-1, 1], zero-padded to the largest
    height/width; encode it with the VAE into ``padded_latents`` before calling the model.
    """

    sequence_length: int
    sample_lens: list[int]
    split_lens: list[int]
    attn_modes: list[str]
    input_ids: torch.Tensor
    text_indexes: torch.Tensor
    position_ids: torch.Tensor
    ce_loss_indexes: torch.Tensor
    labels: torch.Tensor
    vit_pixel_patches: torch.Tensor | None = None
    vit_position_ids: torch.Tensor | None = None
    vit_token_indexes: torch.Tensor | None = None
    vit_seqlens: torch.Tensor | None = None
    padded_images: torch.Tensor | None = None
    latent_shapes: list[tuple[int, int]] = field(default_factory=list)
    latent_position_ids: torch.Tensor | None = None
    vae_token_indexes: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    mse_loss_indexes: torch.Tensor | None = None
    num_samples: int = 0
    sample_ids: list = field(default_factory=list)

    def model_inputs(self, padded_latents: torch.Tensor | None = None) -> dict:
        """Keyword arguments for the model's training forward."""
        inputs = {k: getattr(self, k) for k in (
            "sequence_length", "sample_lens", "split_lens", "attn_modes", "input_ids", "text_indexes",
            "position_ids", "ce_loss_indexes", "labels", "vit_pixel_patches", "vit_position_ids",
            "vit_token_indexes", "vit_seqlens", "latent_shapes", "latent_position_ids", "vae_token_indexes",
            "timesteps", "mse_loss_indexes")}
        inputs["padded_latents"] = padded_latents
        return inputs

    @property
    def num_ce_tokens(self) -> int:
        return int(self.ce_loss_indexes.numel())

    @property
    def num_mse_tokens(self) -> int:
        return 0 if self.mse_loss_indexes is None else int(self.mse_loss_indexes.numel())


@dataclass(frozen=True)
class PackingSpec:
    """What the packer needs to know about the model: token ids and image geometry."""

    bos_token_id: int
    eos_token_id: int
    start_of_image_token_id: int
    end_of_image_token_id: int
    vae_resize: StrideResize
    vit_resize: StrideResize
    vit_patch_size: int
    vae_stride: int  # pixels per latent token side (VAE downsample × latent patch)
    max_latent_size: int
    vit_max_num_patch_per_side: int

    @classmethod
    def from_config(cls, config, vae_resize: StrideResize | None = None, vit_resize: StrideResize | None = None):
        return cls(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
            start_of_image_token_id=config.start_of_image_token_id,
            end_of_image_token_id=config.end_of_image_token_id,
            vae_resize=vae_resize or StrideResize(512, 256, config.latent_downsample),
            vit_resize=vit_resize or StrideResize(980, 224, config.vit_patch_size),
            vit_patch_size=config.vit_patch_size, vae_stride=config.latent_downsample,
            max_latent_size=config.max_latent_size, vit_max_num_patch_per_side=config.vit_max_num_patch_per_side)


def _grid_ids(height: int, width: int, patch: int, grid: int) -> torch.Tensor:
    rows, cols = height // patch, width // patch
    if rows > grid or cols > grid:
        raise ValueError(f"an image of {height}×{width} px needs a {rows}×{cols} grid of {patch}-px patches, larger "
                         f"than the model's {grid}×{grid} position table")
    return (torch.arange(rows)[:, None] * grid + torch.arange(cols)[None, :]).flatten()


class SequencePacker:
    """Turns lists of :class:`PlanItem` into a :class:`PackedBatch`."""

    def __init__(self, spec: PackingSpec, tokenize, dropout: DropoutProbabilities | None = None):
        self.spec = spec
        self.tokenize = tokenize  # str -> list[int], without special tokens
        self.dropout = dropout or DropoutProbabilities()

    # -------------------------------------------------------------- per-item preparation
    def vae_tensor(self, image) -> torch.Tensor:
        return to_model_tensor(self.spec.vae_resize(to_rgb_pil(image)))

    def vit_tensor(self, image) -> torch.Tensor:
        return to_model_tensor(self.spec.vit_resize(to_rgb_pil(image)))

    def count_tokens(self, items: list[PlanItem]) -> int:
        """Exact token count of a sample before dropout (used by the token-budget policy)."""
        total = 0
        for item in items:
            if item.kind == "text":
                total += len(self.tokenize(item.text)) + 2
            else:
                image = to_rgb_pil(item.image)
                if item.kind == "vae_image":
                    w, h = self.spec.vae_resize.target_size(*image.size)
                    total += (w // self.spec.vae_stride) * (h // self.spec.vae_stride) + 2
                else:
                    w, h = self.spec.vit_resize.target_size(*image.size)
                    total += (w // self.spec.vit_patch_size) * (h // self.spec.vit_patch_size) + 2
        return total

    # -------------------------------------------------------------- packing
    def pack(self, samples: list[list[PlanItem]], rng: np.random.Generator | int | None = None,
             timesteps: list[list[float]] | None = None, sample_ids: list | None = None) -> PackedBatch:
        """Pack ``samples`` (each a list of plan items) into one sequence.

        ``timesteps`` optionally fixes the raw (pre-sigmoid) timestep of every noisy target, per
        sample, in order; otherwise they are drawn from ``rng``.
        """
        if not samples:
            raise ValueError("cannot pack an empty list of samples")
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        spec, drop = self.spec, self.dropout
        text_ids, text_idx, positions, ce_idx, labels = [], [], [], [], []
        vit_patches, vit_pos, vit_idx, vit_lens = [], [], [], []
        vae_images, latent_shapes, latent_pos, vae_idx, raw_t, mse_idx = [], [], [], [], [], []
        sample_lens, split_lens, modes = [], [], []
        curr = 0
        for sample_number, items in enumerate(samples):
            if not items:
                raise ValueError(f"sample {sample_number} has no items")
            fixed_t = list(timesteps[sample_number]) if timesteps is not None else None
            rope, sample_start = 0, curr
            for item in items:
                if not isinstance(item, PlanItem):
                    raise TypeError(f"sample {sample_number} contains {type(item).__name__}, expected PlanItem")
                if item.kind == "text":
                    if item.enable_cfg and drop.text > 0 and rng.random() < drop.text:
                        continue
                    ids = list(self.tokenize(item.text))
                    segment = [spec.bos_token_id] + ids + [spec.eos_token_id]
                    text_ids.extend(segment)
                    text_idx.extend(range(curr, curr + len(segment)))
                    if item.loss:
                        ce_idx.extend(range(curr, curr + len(segment) - 1))
                        labels.extend(ids + [spec.eos_token_id])
                    positions.extend(range(rope, rope + len(segment)))
                    rope += len(segment)
                    curr += len(segment)
                    split_lens.append(len(segment))
                    modes.append("causal")
                elif item.kind == "vit_image":
                    if item.enable_cfg and drop.vit > 0 and rng.random() < drop.vit:
                        rope += 1
                        continue
                    tensor = self.vit_tensor(item.image)
                    _, height, width = tensor.shape
                    patches = patchify(tensor, spec.vit_patch_size)
                    count = patches.shape[0]
                    vit_patches.append(patches)
                    vit_pos.append(_grid_ids(height, width, spec.vit_patch_size, spec.vit_max_num_patch_per_side))
                    vit_lens.append(count)
                    text_ids.extend([spec.start_of_image_token_id, spec.end_of_image_token_id])
                    text_idx.extend([curr, curr + count + 1])
                    vit_idx.extend(range(curr + 1, curr + 1 + count))
                    positions.extend([rope] * (count + 2))
                    rope += 1
                    curr += count + 2
                    split_lens.append(count + 2)
                    modes.append("full")
                else:  # vae_image
                    if not item.loss and item.enable_cfg and drop.vae > 0 and rng.random() < drop.vae:
                        rope += 1
                        continue
                    tensor = self.vae_tensor(item.image)
                    _, height, width = tensor.shape
                    h, w = height // spec.vae_stride, width // spec.vae_stride
                    count = h * w
                    vae_images.append(tensor)
                    latent_shapes.append((h, w))
                    latent_pos.append(_grid_ids(height, width, spec.vae_stride, spec.max_latent_size))
                    text_ids.extend([spec.start_of_image_token_id, spec.end_of_image_token_id])
                    text_idx.extend([curr, curr + count + 1])
                    vae_idx.extend(range(curr + 1, curr + 1 + count))
                    if item.loss:
                        if fixed_t is not None:
                            if not fixed_t:
                                raise ValueError(f"sample {sample_number}: not enough fixed timesteps")
                            t = float(fixed_t.pop(0))
                        else:
                            t = float(rng.standard_normal())
                        raw_t.extend([t] * count)
                        mse_idx.extend(range(curr + 1, curr + 1 + count))
                        modes.append("noise")
                    else:
                        raw_t.extend([float("-inf")] * count)
                        modes.append("full")
                    positions.extend([rope] * (count + 2))
                    if not item.loss:
                        rope += 1  # a noisy target shares its position with the clean copy after it
                    curr += count + 2
                    split_lens.append(count + 2)
            if curr == sample_start:
                raise ValueError(f"sample {sample_number} is empty after condition dropout")
            sample_lens.append(curr - sample_start)

        long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        batch = PackedBatch(
            sequence_length=curr, sample_lens=sample_lens, split_lens=split_lens, attn_modes=modes,
            input_ids=long(text_ids), text_indexes=long(text_idx), position_ids=long(positions),
            ce_loss_indexes=long(ce_idx), labels=long(labels), num_samples=len(samples),
            sample_ids=list(sample_ids) if sample_ids is not None else list(range(len(samples))))
        if vit_patches:
            batch.vit_pixel_patches = torch.cat(vit_patches)
            batch.vit_position_ids = torch.cat(vit_pos)
            batch.vit_token_indexes = long(vit_idx)
            batch.vit_seqlens = long(vit_lens)
        if vae_images:
            max_h = max(t.shape[1] for t in vae_images)
            max_w = max(t.shape[2] for t in vae_images)
            padded = torch.zeros(len(vae_images), 3, max_h, max_w)
            for i, tensor in enumerate(vae_images):
                padded[i, :, :tensor.shape[1], :tensor.shape[2]] = tensor
            batch.padded_images = padded
            batch.latent_shapes = latent_shapes
            batch.latent_position_ids = torch.cat(latent_pos)
            batch.vae_token_indexes = long(vae_idx)
            batch.timesteps = torch.tensor(raw_t, dtype=torch.float32)
            batch.mse_loss_indexes = long(mse_idx)
        return batch


def _demo() -> None:
    from .sequence_plan import image_items, text_item

    image = np.zeros((32, 48, 3), dtype=np.uint8)
    spec = PackingSpec(1, 2, 3, 4, StrideResize(64, 32, 16), StrideResize(56, 28, 14), 14, 16, 16, 8)
    packer = SequencePacker(spec, tokenize=lambda text: [5 + (ord(c) % 50) for c in text])
    plan = [text_item("translate", enable_cfg=False), *image_items(image, need_vae=True, need_vit=True),
            text_item("think", loss=True), *image_items(image, need_loss=True, need_vae=True)]
    batch = packer.pack([plan], rng=0)
    print("splits", list(zip(batch.split_lens, batch.attn_modes)))
    print("positions", batch.position_ids.tolist())


if __name__ == "__main__":
    _demo()
