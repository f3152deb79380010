"""Image geometry and normalisation for the two image paths (VAE and ViT).

Both paths resize an RGB image so that the long edge is at most ``max_size``, the short edge at
least ``min_size`` and both sides are multiples of ``stride`` (16 for the VAE: 8× VAE downsampling
× 2×2 latent patches; 14 for the SigLIP patches), with PIL bicubic resampling, then map uint8
to [-1, 1]. An image already at a valid size passes through unchanged.

    python -c "from unibrain_hf.processing.image_transforms import StrideResize as R; \
print(R(512, 256, 16).target_size(250, 240))"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024


@dataclass(frozen=True)
class StrideResize:
    """Aspect-preserving resize to stride multiples within [min_size, max_size] (BAGEL's rule)."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def _divisible(self, value: float) -> int:
        return max(self.stride, int(round(value / self.stride) * self.stride))

    def _scaled(self, width: int, height: int, scale: float) -> tuple[int, int]:
        return self._divisible(round(width * scale)), self._divisible(round(height * scale))

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}×{height}")
        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        new_w, new_h = self._scaled(width, height, scale)
        if new_w * new_h > self.max_pixels:
            new_w, new_h = self._scaled(new_w, new_h, self.max_pixels / (new_w * new_h))
        if max(new_w, new_h) > self.max_size:
            new_w, new_h = self._scaled(new_w, new_h, self.max_size / max(new_w, new_h))
        return new_w, new_h

    def __call__(self, image: Image.Image) -> Image.Image:
        size = self.target_size(*image.size)
        if size == image.size:
            return image
        return image.resize(size, resample=Image.BICUBIC)

    def to_dict(self) -> dict:
        return asdict(self)


def to_model_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor (3, H, W) in [-1, 1] (``x/255`` then ``(x − 0.5)/0.5``)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return tensor.sub_(0.5).div_(0.5)


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) → (H/p · W/p, p·p·C) with (row-in-patch, col-in-patch, channel) order, raster patches."""
    channels, height, width = image.shape
    if height % patch or width % patch:
        raise ValueError(f"image {height}×{width} is not divisible into {patch}-pixel patches")
    grid = image.reshape(channels, height // patch, patch, width // patch, patch)
    return torch.einsum("chpwq->hwpqc", grid).reshape(-1, patch * patch * channels)
