"""Training configuration: one YAML file per run, strictly validated, with ``key=value`` overrides.

    python -m unibrain_hf.train --config configs/tiny_unified.yaml train.max_steps=20 --print-config

Every key is declared here with its default; an unknown key, a missing data path or a value of the
wrong type is an error that names the key. ``stage`` decides what trains (see :mod:`.stages`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("align", "unified", "dhs")


@dataclass
class ModelSection:
    pretrained: str | None = None  # pipeline or model directory; None → build from `preset`
    preset: str = "tiny"  # tiny | bagel_7b_mot (used when `pretrained` is None)
    preset_overrides: dict = field(default_factory=dict)
    weights: str | None = None  # a safetensors file loaded over `pretrained` (e.g. stage-1 raw weights)
    vae: str | None = None  # AutoencoderKL directory (defaults to <pretrained>/vae)
    tokenizer: str | None = None  # tokenizer directory (defaults to <pretrained>/tokenizer)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    path: str = ""  # a RadGenome / phantom parquet cohort directory
    split: str = "train"
    image_size: int = 256  # slices are zero-padded to this square size (stage 2/3 task)
    vae_max_size: int = 512
    vae_min_size: int = 256
    vit_max_size: int = 980
    vit_min_size: int = 224
    text_dropout: float = 0.1
    vit_dropout: float = 0.3
    vae_dropout: float = 0.3
    expected_num_tokens: int = 32768
    max_num_tokens: int = 36864
    max_num_tokens_per_sample: int = 16384
    prefer_buffer_before: int = 16384
    num_workers: int = 0
    num_epochs: int | None = None  # None: cycle the cohort forever (max_steps ends the run)


@dataclass
class LoraSection:
    enabled: bool = False
    preset: str = "both"  # und | gen | both
    rank: int = 8
    alpha: int = 32
    dropout: float = 0.1
    projections: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])


@dataclass
class TrainSection:
    max_steps: int = 2000
    learning_rate: float = 2e-5
    warmup_steps: int = 200
    lr_scheduler: str = "constant"  # constant | cosine | linear (after the linear warm-up)
    min_lr_ratio: float = 0.0  # cosine / linear decay ends at learning_rate × min_lr_ratio
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-15
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.995
    ce_weight: float = 1.0
    mse_weight: float = 1.0
    mixed_precision: str = "no"  # no | bf16 (GPU)
    seed: int = 4396
    data_seed: int = 42
    save_every: int = 500
    log_every: int = 10
    sample_every: int = 0  # 0 disables periodic sample panels
    output_dir: str = "runs/unibrain"
    export_pipeline: bool = True


@dataclass
class TrainConfig:
    stage: str = "unified"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self, check_paths: bool = True) -> "TrainConfig":
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.lora.preset not in ("und", "gen", "both"):
            raise ValueError(f"lora.preset must be 'und', 'gen' or 'both', got {self.lora.preset!r}")
        if self.train.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.train.mixed_precision!r}")
        if self.train.lr_scheduler not in ("constant", "cosine", "linear"):
            raise ValueError(f"train.lr_scheduler must be 'constant', 'cosine' or 'linear', got {self.train.lr_scheduler!r}")
        if self.train.max_steps < 1 or self.train.save_every < 1:
            raise ValueError("train.max_steps and train.save_every must be positive")
        if check_paths:
            if not self.data.path:
                raise ValueError("data.path is not set: point it at a parquet cohort (e.g. from `unibrain phantom`)")
            if not Path(self.data.path).exists():
                raise FileNotFoundError(f"data.path {self.data.path!r} does not exist")
            if self.model.pretrained and not Path(self.model.pretrained).exists():
                raise FileNotFoundError(f"model.pretrained {self.model.pretrained!r} does not exist")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict:
        """The settings a checkpoint must agree with to be resumed (architecture and stage)."""
        return {"stage": self.stage, "model": self.to_dict()["model"], "lora": self.to_dict()["lora"]}


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; known keys in "
                         f"{where.rstrip('.') or 'the top level'}: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING \
            else known[name].default
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, default, f"{where}{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, key: str):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key} must be true/false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(value) if not (isinstance(default, int) and isinstance(value, float)
                                                and not value.is_integer()) else value
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    if isinstance(default, (list, dict)) and not isinstance(value, type(default)):
        raise ValueError(f"{key} must be a {type(default).__name__}, got {value!r}")
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars) to a raw config dict."""
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} must look like section.key=value")
        dotted, text = override.split("=", 1)
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None, check_paths: bool = True) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        # Relative data/model paths in a config file are relative to the working directory, like CLI paths.
    raw = apply_overrides(raw, list(overrides or []))
    return _build(TrainConfig, raw, "").validate(check_paths=check_paths)


def dump_config(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)
