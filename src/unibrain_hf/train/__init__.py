"""Training: the three UniBrain stages on accelerate, LoRA via peft, EMA, exact resume.

    accelerate launch -m unibrain_hf.train --config configs/tiny_unified.yaml
"""

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
