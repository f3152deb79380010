"""UniBrain's rectified-flow sampler settings: the time grid, the guidance window and the CFG combination.

The sampler integrates the model's velocity (pointing from data to noise) from t = 1 to t = 0.
UniBrain's time grid is ``linspace(1, 0, N)`` warped by ``s·t / (1 + (s − 1)·t)`` (float32, like
the reference); its N − 1 non-zero points are handed to the scheduler as ``sigmas`` through the
scheduler's own ``set_timesteps``, so ``num_inference_steps`` = N − 1 denoising steps (diffusers'
meaning) and any diffusers flow-matching scheduler that accepts custom sigmas can be swapped in.
Guidance follows BAGEL: a text-unconditional and an image-unconditional branch, active only for
``interval[0] < t <= interval[1]`` — compared in float32, as the reference compares its float32
timestep tensor with the Python bounds — combined and renormalised by one of ``global`` /
``channel`` / ``text_channel``.

    python -c "from unibrain_hf.pipelines.sampler import flow_sigmas; print(flow_sigmas(9, 3.0))"
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidInputError

RENORM_TYPES = ("global", "channel", "text_channel")


def flow_sigmas(num_inference_steps: int, shift: float) -> torch.Tensor:
    """The ``num_inference_steps + 1`` shifted grid points ``1 = t_0 > … > t_N = 0`` (float32)."""
    if int(num_inference_steps) < 1:
        raise InvalidInputError(f"num_inference_steps must be >= 1; got {num_inference_steps}")
    if not shift > 0:
        raise InvalidInputError(f"timestep_shift must be > 0; got {shift}")
    grid = torch.linspace(1, 0, int(num_inference_steps) + 1)
    return shift * grid / (1 + (shift - 1) * grid)


def check_scheduler(scheduler) -> None:
    """Refuse, by name, a scheduler that cannot run UniBrain's grid (its ``set_timesteps`` takes no ``sigmas``).

    The same check as diffusers' ``retrieve_timesteps``, which each diffusers pipeline copies into
    its own module rather than exporting.
    """
    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise InvalidInputError(f"the scheduler {type(scheduler).__name__} does not accept custom sigmas in "
                                f"set_timesteps; use a flow-matching scheduler that does (e.g. "
                                f"FlowMatchEulerDiscreteScheduler)")


def set_flow_timesteps(scheduler, sigmas: torch.Tensor, device) -> torch.Tensor:
    """Give ``scheduler`` the non-zero grid points as custom sigmas; returns its timesteps (sigma × 1000)."""
    check_scheduler(scheduler)
    scheduler.set_timesteps(sigmas=sigmas[:-1].cpu().numpy(), device=device)
    return scheduler.timesteps


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
            raise InvalidInputError(f"cfg_renorm_type must be one of {RENORM_TYPES}; got {self.renorm_type!r}")
        if len(self.interval) != 2 or not self.interval[0] <= self.interval[1]:
            raise InvalidInputError(f"cfg_interval must be (low, high) with low <= high; got {self.interval!r}")

    def in_interval(self, t) -> bool:
        """``low < t <= high`` with t and both bounds in float32.

        The reference tests ``t > low and t <= high`` on its float32 timestep tensor, which casts
        the Python bounds to float32; on a grid point equal to ``float32(low)`` guidance is off.
        """
        t32 = np.float32(t.item() if isinstance(t, torch.Tensor) else t)
        low, high = np.float32(self.interval[0]), np.float32(self.interval[1])
        return bool(low < t32 <= high)

    def scales_at(self, t, text_scale: float | None = None, image_scale: float | None = None) -> tuple[float, float]:
        """Effective (text, image) scales at time t: both 1 outside the interval (branches skipped).

        ``text_scale`` / ``image_scale`` override the stored scales (a callback may change them mid-run).
        """
        if self.in_interval(t):
            text = self.text_scale if text_scale is None else text_scale
            image = self.image_scale if image_scale is None else image_scale
            return float(text), float(image)
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
        raise InvalidInputError(f"cfg_renorm_type must be one of {RENORM_TYPES}; got {renorm_type!r}")
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
