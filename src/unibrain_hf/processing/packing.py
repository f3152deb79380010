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

from dataclasses import dataclass, field, fields, replace

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


# How each PackedBatch field is merged when packs are concatenated (see ``PackedBatch.concatenate``).
SUM, EXTEND, CAT, CAT_OFFSET, PAD_IMAGES = "sum", "extend", "cat", "cat_offset", "pad_images"


def _field(merge: str, *, model_input: bool = False, stat: bool = False, **kwargs):
    """A PackedBatch field whose metadata says how packs merge, and whether the model or the stats read it.

    ``model_input``: passed to ``UniBrainForConditionalGeneration.forward`` under the field's name.
    ``stat``: a counter the packed dataset adds to its statistics (and to its resume state).
    """
    return field(metadata={"merge": merge, "model_input": model_input, "stat": stat}, **kwargs)


@dataclass
class PackedBatch:
    """Tensors of one packed sequence, named as ``UniBrainForConditionalGeneration.forward`` expects.

    This dataclass is the one definition of the packed-batch format: each field's metadata says
    whether it is a model input, how it merges when packs are concatenated (index fields are
    shifted by the preceding packs' length) and whether it is a statistic. ``padded_images``
    holds every VAE image of the pack in [-1, 1], zero-padded to the largest height/width; encode
    it with the VAE into ``padded_latents`` before calling the model.
    """

    sequence_length: int = _field(SUM, model_input=True)
    sample_lens: list[int] = _field(EXTEND, model_input=True)
    split_lens: list[int] = _field(EXTEND, model_input=True)
    attn_modes: list[str] = _field(EXTEND, model_input=True)
    input_ids: torch.Tensor = _field(CAT, model_input=True)
    text_indexes: torch.Tensor = _field(CAT_OFFSET, model_input=True)
    position_ids: torch.Tensor = _field(CAT, model_input=True)
    ce_loss_indexes: torch.Tensor = _field(CAT_OFFSET, model_input=True)
    labels: torch.Tensor = _field(CAT, model_input=True)
    vit_pixel_patches: torch.Tensor | None = _field(CAT, model_input=True, default=None)
    vit_position_ids: torch.Tensor | None = _field(CAT, model_input=True, default=None)
    vit_token_indexes: torch.Tensor | None = _field(CAT_OFFSET, model_input=True, default=None)
    vit_seqlens: torch.Tensor | None = _field(CAT, model_input=True, default=None)
    padded_images: torch.Tensor | None = _field(PAD_IMAGES, default=None)
    latent_shapes: list[tuple[int, int]] = _field(EXTEND, model_input=True, default_factory=list)
    latent_position_ids: torch.Tensor | None = _field(CAT, model_input=True, default=None)
    vae_token_indexes: torch.Tensor | None = _field(CAT_OFFSET, model_input=True, default=None)
    timesteps: torch.Tensor | None = _field(CAT, model_input=True, default=None)
    mse_loss_indexes: torch.Tensor | None = _field(CAT_OFFSET, model_input=True, default=None)
    num_samples: int = _field(SUM, default=0)
    sample_ids: list = _field(EXTEND, default_factory=list)
    # Condition dropout, counted by the packer as it decides (eligible items and dropped ones).
    text_cfg_eligible: int = _field(SUM, stat=True, default=0)
    text_cfg_dropped: int = _field(SUM, stat=True, default=0)
    vit_cfg_eligible: int = _field(SUM, stat=True, default=0)
    vit_cfg_dropped: int = _field(SUM, stat=True, default=0)
    vae_cfg_eligible: int = _field(SUM, stat=True, default=0)
    vae_cfg_dropped: int = _field(SUM, stat=True, default=0)

    @classmethod
    def model_input_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata["model_input"])

    @classmethod
    def stat_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata["stat"])

    def to(self, device) -> "PackedBatch":
        """A copy whose model-input tensors are on ``device`` (the model does not move its inputs)."""
        moved = {name: getattr(self, name).to(device) for name in self.model_input_names()
                 if torch.is_tensor(getattr(self, name))}
        return replace(self, **moved)

    def model_inputs(self, padded_latents: torch.Tensor | None = None) -> dict:
        """Keyword arguments for the model's training forward."""
        inputs = {name: getattr(self, name) for name in self.model_input_names()}
        inputs["padded_latents"] = padded_latents
        return inputs

    def stats(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.stat_names()}

    @property
    def num_ce_tokens(self) -> int:
        return int(self.ce_loss_indexes.numel())

    @property
    def num_mse_tokens(self) -> int:
        return 0 if self.mse_loss_indexes is None else int(self.mse_loss_indexes.numel())

    @classmethod
    def concatenate(cls, packs: list["PackedBatch"]) -> "PackedBatch":
        """One pack from several, exactly as if their samples had been packed together.

        The packer treats samples independently apart from the running token offset, so shifting
        every index field by the preceding packs' lengths reproduces a joint pack.
        """
        if not packs:
            raise ValueError("cannot concatenate an empty list of packs")
        offsets = np.cumsum([0] + [p.sequence_length for p in packs[:-1]]).tolist()
        merged = {}
        for spec in fields(cls):
            values = [getattr(p, spec.name) for p in packs]
            merge = spec.metadata["merge"]
            if merge == SUM:
                merged[spec.name] = sum(values)
            elif merge == EXTEND:
                merged[spec.name] = [item for value in values for item in value]
            elif merge in (CAT, CAT_OFFSET):
                parts = [v + (offset if merge == CAT_OFFSET else 0) for v, offset in zip(values, offsets)
                         if v is not None]
                merged[spec.name] = torch.cat(parts) if parts else None
            else:  # PAD_IMAGES: each part was padded to its own maximum; re-pad to the joint one
                merged[spec.name] = _pad_images([image for part in values if part is not None for image in part])
        return cls(**merged)


def _pad_images(images: list[torch.Tensor]) -> torch.Tensor | None:
    """(C, H, W) images → (N, C, max H, max W), zero-padded at the bottom/right (top-left aligned)."""
    if not images:
        return None
    max_h, max_w = max(t.shape[-2] for t in images), max(t.shape[-1] for t in images)
    padded = torch.zeros(len(images), images[0].shape[0], max_h, max_w, dtype=images[0].dtype)
    for i, image in enumerate(images):
        padded[i, :, :image.shape[-2], :image.shape[-1]] = image
    return padded


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
        cfg = dict.fromkeys(PackedBatch.stat_names(), 0)

        def dropped(kind: str, probability: float) -> bool:
            """Condition dropout of one eligible item (counted); draws only when the rate is non-zero."""
            cfg[f"{kind}_cfg_eligible"] += 1
            drop_it = probability > 0 and rng.random() < probability
            cfg[f"{kind}_cfg_dropped"] += int(drop_it)
            return drop_it

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
                    if item.enable_cfg and dropped("text", drop.text):
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
                    if item.enable_cfg and dropped("vit", drop.vit):
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
                    if not item.loss and item.enable_cfg and dropped("vae", drop.vae):
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
            sample_ids=list(sample_ids) if sample_ids is not None else list(range(len(samples))), **cfg)
        if vit_patches:
            batch.vit_pixel_patches = torch.cat(vit_patches)
            batch.vit_position_ids = torch.cat(vit_pos)
            batch.vit_token_indexes = long(vit_idx)
            batch.vit_seqlens = long(vit_lens)
        if vae_images:
            batch.padded_images = _pad_images(vae_images)
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
