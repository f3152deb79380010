"""Exponential moving average of the trainable weights, updated after every optimiser step.

UniBrain uses a constant decay (``ema = d·ema + (1−d)·param``, d = 0.995). diffusers' ``EMAModel``
applies its own warm-up schedule to the decay, which would change the recipe, hence this class.

    python -c "from unibrain_hf.train.ema import ExponentialMovingAverage; help(ExponentialMovingAverage)"
"""

from __future__ import annotations

import torch


class ExponentialMovingAverage:
    def __init__(self, named_parameters, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().clone().float() for name, p in named_parameters if p.requires_grad}

    @torch.no_grad()
    def update(self, named_parameters) -> None:
        for name, parameter in named_parameters:
            if name in self.shadow:
                self.shadow[name].mul_(self.decay).add_(parameter.detach().float(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model) -> None:
        """Write the averaged weights into ``model`` (names as in ``model.named_parameters()``)."""
        parameters = dict(model.named_parameters())
        for name, value in self.shadow.items():
            parameters[name].copy_(value.to(parameters[name].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        for name in self.shadow:
            self.shadow[name] = state[name].float().clone()
