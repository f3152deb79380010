"""The sequence plan: what one interleaved training/inference sample is made of.

A *sequence plan* is an ordered list of :class:`PlanItem` — text segments and images —
with, for each, whether it carries a loss and whether classifier-free-guidance dropout may
remove it. The data layer (sequence builder) produces plans; the processor turns a list of
plans into one packed batch for ``UniBrainForConditionalGeneration.forward``.

An image that should appear in several roles is expanded by :func:`image_items` in the
reference order: noisy VAE target (loss), clean VAE copy, ViT copy.

    python -c "from unibrain_hf.processing.sequence_plan import *; print(text_item('hi'))"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

ItemKind = Literal["text", "vit_image", "vae_image"]


@dataclass
class PlanItem:
    """One element of a sequence plan.

    Attributes:
        kind: ``"text"``, ``"vit_image"`` (understanding copy, SigLIP tokens) or
            ``"vae_image"`` (generation copy, VAE latent tokens).
        text: the text of a ``"text"`` item (no special tokens; they are added when packing).
        image: an RGB image for image items: ``PIL.Image`` or ``uint8`` array (H, W, 3).
        loss: text → cross-entropy on its tokens; ``vae_image`` → it is a *noisy target*
            that carries the flow-matching loss (and is hidden from every later token).
        enable_cfg: whether condition dropout may drop this item at packing time.
    """

    kind: ItemKind
    text: str | None = None
    image: Any = None
    loss: bool = False
    enable_cfg: bool = True
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("text", "vit_image", "vae_image"):
            raise ValueError(f"PlanItem.kind must be 'text', 'vit_image' or 'vae_image', got {self.kind!r}")
        if self.kind == "text":
            if not isinstance(self.text, str):
                raise ValueError("a text PlanItem needs `text` as a str")
        else:
            if self.image is None:
                raise ValueError(f"a {self.kind} PlanItem needs an `image`")
            if self.kind == "vit_image" and self.loss:
                raise ValueError("a vit_image item cannot carry a loss")


def text_item(text: str, loss: bool = False, enable_cfg: bool = True) -> PlanItem:
    return PlanItem("text", text=text, loss=loss, enable_cfg=enable_cfg)


def image_items(image, need_loss: bool = False, need_vae: bool = False, need_vit: bool = False,
                enable_cfg: bool = True) -> list[PlanItem]:
    """Expand one image into its plan items, in the reference order.

    ``need_loss`` → a noisy VAE target (never dropped), ``need_vae`` → a clean VAE copy,
    ``need_vit`` → a ViT copy. At least one must be set.
    """
    if not (need_loss or need_vae or need_vit):
        raise ValueError("image_items needs at least one of need_loss, need_vae, need_vit")
    items = []
    if need_loss:
        items.append(PlanItem("vae_image", image=image, loss=True, enable_cfg=False))
    if need_vae:
        items.append(PlanItem("vae_image", image=image, loss=False, enable_cfg=enable_cfg))
    if need_vit:
        items.append(PlanItem("vit_image", image=image, loss=False, enable_cfg=enable_cfg))
    return items


def to_rgb_pil(image) -> Image.Image:
    """Accept a PIL image or an (H, W[, 1|3]) uint8 array; return an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (got {array.dtype}); scale MRI intensities first")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image arrays must be (H, W), (H, W, 1) or (H, W, 3); got shape {array.shape}")
    return Image.fromarray(array, mode="RGB")
