"""Configuration of the UniBrain / BAGEL mixture-of-transformer-experts model.

``UniBrainConfig`` is a composite transformers config: a Qwen2 text config (the decoder that
holds both experts), a SigLIP vision config (the understanding encoder, with the number of
layers that are actually *run*), and the adapter / generation settings that glue them together.

    python -c "from unibrain_hf import UniBrainConfig; print(UniBrainConfig.tiny())"

``UniBrainConfig()`` (and ``AutoConfig.for_model("unibrain")``) has the BAGEL-7B-MoT sizes that
UniBrain fine-tunes (14B parameters); :meth:`UniBrainConfig.tiny` is a few-hundred-kB model for CPU
tests. A ``config.json`` must hold both sub-configs: one without ``text_config`` or
``vision_config`` is refused instead of silently becoming the 14B default.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from transformers import PreTrainedConfig, Qwen2Config, SiglipVisionConfig

try:  # this file also runs as Hub remote code, without the package
    from unibrain_hf.errors import ConfigError
except ImportError:
    ConfigError = ValueError

# Special tokens every UniBrain text segment / image is wrapped in (Qwen2.5 vocabulary names).
SPECIAL_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image_token_id": "<|vision_start|>",
    "end_of_image_token_id": "<|vision_end|>",
}


#: The BAGEL-7B-MoT decoder (Qwen2.5-7B sizes; each weight exists once per expert).
BAGEL_7B_MOT_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False,
    attention_dropout=0.0, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)
#: The BAGEL-7B-MoT understanding encoder (SigLIP-so400m/14 at 980 px, the 26 layers that run).
BAGEL_7B_MOT_VISION = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16, num_channels=3,
    image_size=980, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
REQUIRED_SUB_CONFIGS = ("text_config", "vision_config")


class MissingSubConfigError(ConfigError):
    """A stored config lacks a required sub-config (re-raised by ``from_pretrained`` naming the file)."""


class UniBrainConfig(PreTrainedConfig):
    r"""Configuration for :class:`UniBrainForConditionalGeneration`.

    Args:
        text_config: Qwen2 decoder settings (hidden size, layers, heads, GQA KV heads, RoPE, vocab).
            Every decoder weight exists twice, once per expert (understanding / generation). ``None``
            gives the BAGEL-7B-MoT decoder. Word embeddings are never tied (``tie_word_embeddings=True``
            is refused here and in ``text_config``).
        vision_config: SigLIP encoder settings. ``num_hidden_layers`` is the number of layers that
            run (BAGEL stores one more in its ``vit_config.json`` and drops the last one).
            ``image_size`` must equal ``vit_max_num_patch_per_side * patch_size``. ``None`` gives the
            BAGEL-7B-MoT encoder.
        latent_patch_size: VAE latent pixels per side merged into one generation token (2).
        max_latent_size: side of the 2-D sin-cos table for latent tokens (64 for BAGEL-7B-MoT).
        vit_max_num_patch_per_side: side of the ViT position grid (70 = 980 px / 14).
        latent_channels: VAE latent channels (16 for the FLUX VAE).
        vae_downsample: VAE spatial downsampling factor (8).
        connector_act: activation of the ViT→LLM connector MLP.
        timestep_shift: training-time flow timestep shift ``s`` in ``s·t / (1 + (s-1)·t)``.
        qk_norm: RMS-normalise queries and keys per head before RoPE (always on in BAGEL).
        freeze_und / freeze_gen: detach the understanding (resp. generation) expert's activations
            during training so that it receives no gradient (stage-1 self-alignment uses freeze_und).
        bos_token_id, eos_token_id, start_of_image_token_id, end_of_image_token_id: ids of
            ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``.
    """

    model_type = "unibrain"
    sub_configs = {"text_config": Qwen2Config, "vision_config": SiglipVisionConfig}

    def __init__(
        self,
        text_config: dict | Qwen2Config | None = None,
        vision_config: dict | SiglipVisionConfig | None = None,
        latent_patch_size: int = 2,
        max_latent_size: int = 64,
        vit_max_num_patch_per_side: int = 70,
        latent_channels: int = 16,
        vae_downsample: int = 8,
        connector_act: str = "gelu_pytorch_tanh",
        timestep_shift: float = 1.0,
        qk_norm: bool = True,
        freeze_und: bool = False,
        freeze_gen: bool = False,
        bos_token_id: int = 151644,
        eos_token_id: int = 151645,
        start_of_image_token_id: int = 151652,
        end_of_image_token_id: int = 151653,
        **kwargs,
    ):
        if text_config is None:
            text_config = Qwen2Config(**BAGEL_7B_MOT_TEXT)
        elif isinstance(text_config, dict):
            text_config = Qwen2Config(**text_config)
        if vision_config is None:
            vision_config = SiglipVisionConfig(**BAGEL_7B_MOT_VISION)
        elif isinstance(vision_config, dict):
            vision_config = SiglipVisionConfig(**vision_config)
        # The MoT decoder has its own lm_head next to the embeddings; tying them would change the model.
        if kwargs.get("tie_word_embeddings") or getattr(text_config, "tie_word_embeddings", False):
            where = "tie_word_embeddings" if kwargs.get("tie_word_embeddings") else "text_config.tie_word_embeddings"
            raise ConfigError(f"UniBrainConfig: {where}=True is not supported; the MoT decoder never ties its "
                              f"input embeddings to lm_head (set it to false)")
        self.text_config = text_config
        self.vision_config = vision_config
        self.latent_patch_size = int(latent_patch_size)
        self.max_latent_size = int(max_latent_size)
        self.vit_max_num_patch_per_side = int(vit_max_num_patch_per_side)
        self.latent_channels = int(latent_channels)
        self.vae_downsample = int(vae_downsample)
        self.connector_act = connector_act
        self.timestep_shift = float(timestep_shift)
        self.qk_norm = bool(qk_norm)
        self.freeze_und = bool(freeze_und)
        self.freeze_gen = bool(freeze_gen)
        self.start_of_image_token_id = int(start_of_image_token_id)
        self.end_of_image_token_id = int(end_of_image_token_id)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self.validate_sizes()
        _load_model_class()

    # ------------------------------------------------------------------ derived sizes
    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        """The decoder's vocabulary (``text_config.vocab_size``), as text-model utilities expect it at the top."""
        return self.text_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        self.text_config.vocab_size = value

    @property
    def latent_downsample(self) -> int:
        """Image pixels per latent token side (VAE downsample × latent patch size = 16)."""
        return self.vae_downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        """Channels of one latent token: p·p·C (64 for BAGEL)."""
        return self.latent_patch_size ** 2 * self.latent_channels

    @property
    def vit_patch_size(self) -> int:
        return self.vision_config.patch_size

    @property
    def special_token_ids(self) -> dict[str, int]:
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "start_of_image": self.start_of_image_token_id, "end_of_image": self.end_of_image_token_id}

    def validate_sizes(self) -> None:
        text, vision = self.text_config, self.vision_config
        problems = []
        if text.hidden_size % text.num_attention_heads:
            problems.append(f"text hidden_size {text.hidden_size} is not divisible by num_attention_heads "
                            f"{text.num_attention_heads}")
        if text.num_attention_heads % text.num_key_value_heads:
            problems.append(f"num_attention_heads {text.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {text.num_key_value_heads}")
        if self.hidden_size % 4:
            problems.append(f"hidden_size {self.hidden_size} must be divisible by 4 for the 2-D sin-cos tables")
        if vision.image_size != self.vit_max_num_patch_per_side * vision.patch_size:
            problems.append(f"vision_config.image_size ({vision.image_size}) must equal vit_max_num_patch_per_side "
                            f"({self.vit_max_num_patch_per_side}) × patch_size ({vision.patch_size})")
        if problems:
            raise ConfigError("invalid UniBrainConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ loading
    @classmethod
    def check_config_dict(cls, config_dict: dict, source: str = "the config") -> None:
        """Refuse a stored config without its sub-configs (it would otherwise become the 14B default)."""
        missing = [key for key in REQUIRED_SUB_CONFIGS
                   if not isinstance(config_dict.get(key), (dict, PreTrainedConfig))]
        if missing:
            raise MissingSubConfigError(f"{source} has no {' or '.join(repr(k) for k in missing)}: a UniBrain config "
                                    f"holds the decoder (text_config) and the ViT (vision_config) settings, so this "
                                    f"file is incomplete (re-run the converter or save_pretrained)")

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        merged = {**config_dict, **{k: v for k, v in kwargs.items() if k in REQUIRED_SUB_CONFIGS}}
        name = kwargs.get("name_or_path")
        cls.check_config_dict(merged, source=f"the config.json of {name}" if name else "the config (config.json)")
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike):
        with open(json_file, encoding="utf-8") as stream:
            cls.check_config_dict(json.load(stream), source=str(json_file))
        return super().from_json_file(json_file)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' loader; a stored config missing a sub-config is refused naming its file."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except MissingSubConfigError as error:
            location = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "", "config.json")
            message = str(error).split(" has no ", 1)[1]
            raise ConfigError(f"{location} has no {message}") from None

    # ------------------------------------------------------------------ presets
    @classmethod
    def bagel_7b_mot(cls, **overrides) -> "UniBrainConfig":
        """The BAGEL-7B-MoT sizes (Qwen2.5-7B decoder ×2 experts, SigLIP-so400m/14 @ 980 px, 26 layers)."""
        text = Qwen2Config(**BAGEL_7B_MOT_TEXT)
        vision = SiglipVisionConfig(**BAGEL_7B_MOT_VISION)
        kwargs = dict(text_config=text, vision_config=vision, latent_patch_size=2, max_latent_size=64,
                      vit_max_num_patch_per_side=70, latent_channels=16, vae_downsample=8)
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def tiny(cls, vocab_size: int = 320, **overrides) -> "UniBrainConfig":
        """A tiny configuration for CPU tests and demos (hidden 64, 2 layers, GQA 4:2)."""
        text = Qwen2Config(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=4096,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False)
        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_channels=3,
            image_size=14 * 16, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        kwargs = dict(text_config=text, vision_config=vision, latent_patch_size=2, max_latent_size=16,
                      vit_max_num_patch_per_side=16, latent_channels=16, vae_downsample=8,
                      bos_token_id=vocab_size - 4, eos_token_id=vocab_size - 3,
                      start_of_image_token_id=vocab_size - 2, end_of_image_token_id=vocab_size - 1)
        kwargs.update(overrides)
        return cls(**kwargs)


def register_auto_config() -> None:
    """``AutoConfig.register("unibrain", UniBrainConfig)`` (the package runs it once transformers is imported)."""
    from transformers import AutoConfig

    AutoConfig.register(UniBrainConfig.model_type, UniBrainConfig, exist_ok=True)


def _load_model_class() -> None:
    """Import the model module once a config exists: importing it registers ``AutoModel`` (see the package's
    ``__init__``), so ``AutoModel.from_pretrained`` / ``from_config`` find the class. Skipped when this file
    runs as remote code, where transformers maps the classes through ``auto_map``."""
    if __name__.startswith("unibrain_hf.") and "unibrain_hf.modeling.modeling_unibrain" not in sys.modules:
        importlib.import_module("unibrain_hf.modeling.modeling_unibrain")


if __name__.startswith("unibrain_hf."):
    # Inside the package (not as Hub remote code) the config type is known to AutoConfig from the start.
    register_auto_config()
