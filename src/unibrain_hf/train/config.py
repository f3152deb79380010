"""Training configuration: one YAML file per run, validated as a whole before anything is loaded.

    python -m unibrain_hf.train --config configs/tiny_unified.yaml train.max_steps=20 --print-config

Every key is declared below with its type, range and default, and cross-field rules (token
budget, warm-up vs. run length, LoRA preset vs. stage, ...) are checked together. Validation is
pydantic's strict mode, so ``max_steps: true`` is not read as 1 and ``learning_rate: "fast"``
is not coerced; an unknown key, a wrong type or a value out of range is a
:class:`~unibrain_hf.errors.ConfigError` that names the file (or override) and the dotted key,
raised before a model or a cohort is touched. ``stage`` decides what trains (see :mod:`.stages`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError, InputFileNotFoundError
from ..utils.readers import check_safetensors

STAGES = ("align", "unified", "dhs")
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")

# PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a *string*; YAML 1.2 and every user read it as a
# number. Only strings of exactly that shape are turned into floats; anything else stays an error.
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml12_float(value: Any) -> Any:
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    return value


Float = Annotated[float, BeforeValidator(_yaml12_float)]


def _yaml11_no(value: Any) -> Any:
    # YAML 1.1 reads a bare `no` as False; `mixed_precision: no` means the string.
    return "no" if value is False else value


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    pretrained: str | None = None  # pipeline or model directory; None → build from `preset`
    preset: Literal["tiny", "bagel_7b_mot"] = "tiny"  # used when `pretrained` is None
    preset_overrides: dict[str, Any] = Field(default_factory=dict)
    # Loaded over `pretrained`: a safetensors file of model weights, or a training checkpoint
    # directory (its trained weights, e.g. stage 1's raw weights for stage 2).
    weights: str | None = None
    vae: str | None = None  # AutoencoderKL directory (defaults to <pretrained>/vae)
    tokenizer: str | None = None  # tokenizer directory (defaults to <pretrained>/tokenizer)
    attn_implementation: Literal[ATTENTION_IMPLEMENTATIONS] = "sdpa"
    gradient_checkpointing: bool = False


class DataSection(_Section):
    path: str = ""  # a RadGenome / phantom parquet cohort directory (streamed, never held in memory)
    split: str = "train"
    image_size: int = Field(256, ge=8)  # slices are zero-padded to this square size (stage 2/3 task)
    vae_max_size: int = Field(512, ge=8)
    vae_min_size: int = Field(256, ge=8)
    vit_max_size: int = Field(980, ge=8)
    vit_min_size: int = Field(224, ge=8)
    text_dropout: Float = Field(0.1, ge=0.0, le=1.0)
    vit_dropout: Float = Field(0.3, ge=0.0, le=1.0)
    vae_dropout: Float = Field(0.3, ge=0.0, le=1.0)
    expected_num_tokens: int = Field(32768, ge=1)
    max_num_tokens: int = Field(36864, ge=1)
    max_num_tokens_per_sample: int = Field(16384, ge=1)
    prefer_buffer_before: int = Field(16384, ge=0)
    num_workers: int = Field(0, ge=0)  # DataLoader workers per process
    num_epochs: int | None = Field(None, ge=1)  # None: cycle the cohort forever (max_steps ends the run)
    # Subjects held (decoded) in the streaming shuffle window of each rank/worker: memory is this
    # many subjects, whatever the cohort size.
    stream_shuffle_buffer: int = Field(16, ge=1)
    # Posterior parameters of the frozen VAE, read instead of encoding every image every step
    # (`unibrain cache-latents` fills it offline; the trainer fills what is missing). Losses are
    # bit-identical with and without it; a cache of another VAE or image transform is refused.
    latent_cache: str | None = None

    @model_validator(mode="after")
    def _budget(self) -> "DataSection":
        if self.expected_num_tokens > self.max_num_tokens:
            raise ValueError(f"expected_num_tokens ({self.expected_num_tokens}) exceeds max_num_tokens "
                             f"({self.max_num_tokens})")
        if self.max_num_tokens_per_sample > self.max_num_tokens:
            raise ValueError(f"max_num_tokens_per_sample ({self.max_num_tokens_per_sample}) exceeds max_num_tokens "
                             f"({self.max_num_tokens}): such a sample could not fit even an empty pack")
        for kind in ("vae", "vit"):
            low, high = getattr(self, f"{kind}_min_size"), getattr(self, f"{kind}_max_size")
            if low > high:
                raise ValueError(f"{kind}_min_size ({low}) exceeds {kind}_max_size ({high})")
        return self


class LoraSection(_Section):
    enabled: bool = False
    preset: Literal["und", "gen", "both"] = "both"  # which expert's projections get adapters
    rank: int = Field(8, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: Float = Field(0.1, ge=0.0, lt=1.0)
    projections: list[Literal[LORA_PROJECTIONS]] = Field(default_factory=lambda: list(LORA_PROJECTIONS),
                                                        min_length=1)
    # Advanced: a peft `target_modules` (regex string or list of names) replacing the preset.
    target_modules: str | list[str] | None = None


class TrainSection(_Section):
    max_steps: int = Field(2000, ge=1)
    learning_rate: Float = Field(2e-5, gt=0.0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"  # after the linear warm-up
    min_lr_ratio: Float = Field(0.0, ge=0.0, le=1.0)  # cosine/linear floor, as a fraction of learning_rate
    warmup_steps: int = Field(200, ge=0)
    beta1: Float = Field(0.9, ge=0.0, lt=1.0)
    beta2: Float = Field(0.95, ge=0.0, lt=1.0)
    eps: Float = Field(1e-15, gt=0.0)
    weight_decay: Float = Field(0.0, ge=0.0)
    max_grad_norm: Float = Field(1.0, gt=0.0)
    ema_decay: Float = Field(0.995, ge=0.0, lt=1.0)
    ce_weight: Float = Field(1.0, ge=0.0)
    mse_weight: Float = Field(1.0, ge=0.0)
    # Autocast through accelerate with fp32 master weights (fp16 adds dynamic loss scaling). bf16 runs
    # on GPUs and on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere it is refused (see
    # `unibrain_hf.train.precision`). Drift against fp32: benchmarks/README.md.
    mixed_precision: Annotated[Literal["no", "bf16", "fp16"], BeforeValidator(_yaml11_no)] = "no"
    threads: int | None = Field(None, ge=1)  # torch intra-op threads per process; None: the usable cores
    # torch.compile of the decoder's per-expert MLPs and norms (see `unibrain_hf.train.compile`): ~1 % on
    # the CPU after ~45 s of compiling, so off by default; falls back to eager with a warning.
    compile: bool = False
    # Packs per optimizer step on each process (gradient accumulation); the global batch is
    # packs_per_step × number of processes packs.
    packs_per_step: int = Field(1, ge=1)
    seed: int = Field(4396, ge=0)
    data_seed: int = Field(42, ge=0)
    save_every: int = Field(500, ge=0)  # 0: no resumable checkpoints (the final export is still written)
    keep_checkpoints: int = Field(3, ge=1)  # the newest checkpoints kept on disk
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(0, ge=0)  # 0 disables periodic sample panels
    output_dir: str = "runs/unibrain"
    export_pipeline: bool = True
    export_weights: Literal["ema", "trained"] = "ema"  # what the exported pipeline (and adapter) hold

    @model_validator(mode="after")
    def _schedule(self) -> "TrainSection":
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if self.lr_scheduler == "constant" and self.min_lr_ratio not in (0.0, 1.0):
            raise ValueError(f"min_lr_ratio ({self.min_lr_ratio}) only applies to lr_scheduler 'cosine' or "
                             "'linear'; the constant schedule has no floor")
        return self


class TrainConfig(_Section):
    stage: Literal[STAGES] = "unified"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)

    @model_validator(mode="after")
    def _across_sections(self) -> "TrainConfig":
        if self.lora.enabled and self.stage == "align" and self.lora.preset != "gen":
            raise ValueError("stage 'align' trains only the generation expert (the understanding expert is "
                             f"gradient-stopped), so lora.preset must be 'gen', not {self.lora.preset!r}")
        if self.model.pretrained is None and (self.model.vae is None or self.model.tokenizer is None):
            raise ValueError("model.vae and model.tokenizer must be set when model.pretrained is not set")
        return self

    def check_paths(self) -> "TrainConfig":
        """Every input path exists (raised by name, before any loading)."""
        if not self.data.path:
            raise ConfigError("data.path is not set: point it at a parquet cohort (e.g. from `unibrain phantom`)")
        for key, value in (("data.path", self.data.path), ("model.pretrained", self.model.pretrained),
                           ("model.weights", self.model.weights), ("model.vae", self.model.vae),
                           ("model.tokenizer", self.model.tokenizer)):
            if value and not Path(value).exists():
                raise InputFileNotFoundError(f"{key} {value!r} does not exist")
        if self.model.weights and Path(self.model.weights).is_file():
            # A weights file must be complete safetensors (pickles refused) before any model is built.
            check_safetensors(self.model.weights, "model.weights")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def fingerprint(self) -> dict:
        """The settings a checkpoint must agree with to be resumed (architecture and stage)."""
        data = self.to_dict()
        return {"stage": self.stage, "model": data["model"], "lora": data["lora"]}


# ------------------------------------------------------------------------------------- loading
_SECTIONS = {"model": ModelSection, "data": DataSection, "lora": LoraSection, "train": TrainSection}


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "the config"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        section = _SECTIONS.get(str(error["loc"][0])) if len(error["loc"]) > 1 else TrainConfig
        known = sorted(section.model_fields) if section is not None else []
        return f"{key}: unknown key (known keys here: {known})"
    if error["type"] == "missing":
        return f"{key}: missing"
    if "input" in error and error["type"] != "value_error":
        return f"{key}: {message} (got {error['input']!r})"
    return f"{key}: {message}"


def validate_config(raw: Any, source: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a raw mapping; every problem is listed in one :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a training config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid training config: " + "; ".join(problems)) from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars) to a raw config dict."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        dotted, text = override.split("=", 1)
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {override!r}: the value is not a YAML scalar ({exc})") from None
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None, check_paths: bool = True) -> TrainConfig:
    """Read, override and validate a training config (``path`` may be None: overrides only)."""
    from ..utils.readers import read_yaml

    raw: Any = {}
    source = "config overrides"
    if path is not None:
        raw = read_yaml(path, what="--config")
        raw = {} if raw is None else raw
        source = str(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a training config must be a mapping of sections, got {type(raw).__name__}")
    # Relative data/model paths in a config file are relative to the working directory, like CLI paths.
    raw = apply_overrides(raw, list(overrides or []))
    config = validate_config(raw, source + (f" (with overrides {list(overrides)})" if overrides and path else ""))
    return config.check_paths() if check_paths else config


def dump_config(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)


__all__ = ["TrainConfig", "ModelSection", "DataSection", "LoraSection", "TrainSection", "load_config",
           "validate_config", "apply_overrides", "dump_config", "STAGES"]
