"""UniBrain's rectified-flow sampler: the time grid and the classifier-free-guidance combination.

The sampler integrates the model's velocity (pointing from data to noise) from t = 1 to t = 0
with explicit Euler steps on the reference grid ``linspace(1, 0, N)`` warped by
``s·t / (1 + (s − 1)·t)``; N grid points give N − 1 model evaluations (×3 with both guidance
branches). Guidance follows BAGEL: a text-unconditional and an image-unconditional branch,
active only for ``interval[0] < t <= interval[1]``, combined and renormalised by one of
``global`` / ``channel`` / ``text_channel``.

    python -c "from unibrain_hf.pipelines.sampler import flow_timesteps; print(flow_timesteps(10, 3.0))"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RENORM_TYPES = ("global", "channel", "text_channel")


def flow_timesteps(num_inference_steps: int, shift: float) -> torch.Tensor:
    """The N shifted grid points ``t_0 = 1 > … > t_{N-1} = 0`` (float32, like the reference)."""
    if int(num_inference_steps) < 2:
        raise ValueError(f"num_inference_steps must be >= 2 (N grid points give N-1 steps); got {num_inference_steps}")
    if not shift > 0:
        raise ValueError(f"timestep_shift must be > 0; got {shift}")
    grid = torch.linspace(1, 0, int(num_inference_steps))
    return shift * grid / (1 + (shift - 1) * grid)


@dataclass(frozen=True)
class GuidanceSettings:
    """Classifier-free guidance as UniBrain's evaluation uses it (text scale 3, image 1.2, text_channel)."""

    text_scale: float = 3.0
    image_scale: float = 1.2
    interval: tuple[float, float] = (0.4, 1.0)
    renorm_type: str = "text_channel"
    renorm_min: float = 0.0

    def __post_init__(self):
        if self.renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}; got {self.renorm_type!r}")
        if len(self.interval) != 2 or not self.interval[0] <= self.interval[1]:
            raise ValueError(f"cfg_interval must be (low, high) with low <= high; got {self.interval!r}")

    def scales_at(self, t: float) -> tuple[float, float]:
        """Effective (text, image) scales at time t: both 1 outside the interval (branches skipped)."""
        low, high = self.interval
        if low < t <= high:
            return float(self.text_scale), float(self.image_scale)
        return 1.0, 1.0


def _norm(v: torch.Tensor, per_token: bool) -> torch.Tensor:
    """L2 norm per token (last dim) or over a whole image (all but the batch dim)."""
    if per_token:
        return torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    # Per batch row: the reference takes one norm over its single image (batch size 1).
    return torch.linalg.vector_norm(v.flatten(1), dim=-1).reshape(-1, *([1] * (v.dim() - 1)))


def combine_guidance(v_cond: torch.Tensor, v_uncond_text: torch.Tensor | None, v_uncond_image: torch.Tensor | None,
                     text_scale: float, image_scale: float, renorm_type: str, renorm_min: float) -> torch.Tensor:
    """Guided velocity from the three branches (tensors (B, N, C)); mirrors BAGEL's ``_forward_flow``.

    With ``text_scale <= 1`` no guidance happens at all (the image branch is ignored too), and
    with ``image_scale <= 1`` the image branch is not used.
    """
    if text_scale <= 1.0:
        return v_cond
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}; got {renorm_type!r}")
    guided_text = v_uncond_text + text_scale * (v_cond - v_uncond_text)
    if renorm_type == "text_channel":
        # Renormalise the text-guided velocity per token, then apply image guidance unrenormalised.
        ratio = _norm(v_cond, True) / (_norm(guided_text, True) + 1e-8)
        guided_text = guided_text * ratio.clamp(min=renorm_min, max=1.0)
        if image_scale > 1.0:
            return v_uncond_image + image_scale * (guided_text - v_uncond_image)
        return guided_text
    guided = guided_text
    if image_scale > 1.0:
        guided = v_uncond_image + image_scale * (guided_text - v_uncond_image)
    per_token = renorm_type == "channel"
    ratio = _norm(v_cond, per_token) / (_norm(guided, per_token) + 1e-8)
    return guided * ratio.clamp(min=renorm_min, max=1.0)
