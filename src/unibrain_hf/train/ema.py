"""Exponential moving average of the trainable weights, kept exactly as the weights are kept.

UniBrain uses a constant decay (``ema = d·ema + (1−d)·param``, d = 0.995). diffusers' ``EMAModel``
applies its own warm-up schedule to the decay and holds full copies of the weights, hence this
class. It is built from the *prepared* parameters (after DDP / FSDP2 / DeepSpeed wrapped the
model), so under FSDP2 each shadow tensor is a DTensor with the parameter's sharding and each
rank averages only its own shard; under DeepSpeed ZeRO-3 the shadow mirrors each parameter's
local partition (``ds_tensor``). Its state dict is keyed by parameter name and saved with the
model's (sharded) state, through torch distributed checkpoint.

    python -c "from unibrain_hf.train.ema import ExponentialMovingAverage; help(ExponentialMovingAverage)"
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """The tensor this rank updates: a ZeRO-3 partition, or the (possibly DTensor) parameter itself."""
    return getattr(parameter, "ds_tensor", parameter)


class ExponentialMovingAverage:
    """EMA of ``named_parameters`` (name, prepared parameter) pairs; names key the state dict."""

    def __init__(self, named_parameters, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        named = [(name, p) for name, p in named_parameters if p.requires_grad]
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        with torch.no_grad():
            self.shadow = [_local(p).detach().clone().float() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.mul_(self.decay).add_(_local(parameter).detach().float(), alpha=1.0 - self.decay)

    @contextmanager
    def applied(self):
        """Temporarily hold the averaged weights in the parameters (in place, shard by shard)."""
        with torch.no_grad():
            saved = [_local(p).detach().clone() for p in self.parameters]
            for shadow, parameter in zip(self.shadow, self.parameters):
                _local(parameter).copy_(shadow.to(_local(parameter).dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for backup, parameter in zip(saved, self.parameters):
                    _local(parameter).copy_(backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.names if name not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        for shadow, name in zip(self.shadow, self.names):
            shadow.copy_(state[name])
