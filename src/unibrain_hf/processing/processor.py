"""``UniBrainProcessor``: tokenizer + image geometry + packing, saved next to the model.

It knows how text becomes ids (the four special tokens included), how an image is resized and
normalised for the VAE path and for the ViT path, and how sequence plans are packed into a
training batch. Its settings live in ``processor_config.json``; the tokenizer is saved with it
(or, inside a pipeline directory, in the sibling ``tokenizer/`` folder).

    python -c "from unibrain_hf import UniBrainProcessor; help(UniBrainProcessor)"
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputFileNotFoundError, InvalidInputError
from ..protocol.tokens import SPECIAL_TOKENS
from ..utils.atomic import atomic_file
from ..utils.readers import existing_path, read_json, read_tokenizer
from .image_transforms import StrideResize
from .packing import DropoutProbabilities, PackedBatch, PackingSpec, SequencePacker

PROCESSOR_CONFIG_NAME = "processor_config.json"
#: Every setting of ``processor_config.json`` and its default (UniBrain's values).
PROCESSOR_SETTINGS = {"vae_max_size": 512, "vae_min_size": 256, "vae_stride": 16, "vit_max_size": 980,
                      "vit_min_size": 224, "vit_patch_size": 14, "max_latent_size": 64,
                      "vit_max_num_patch_per_side": 70}


def check_processor_settings(settings: dict, where: str, error: type[Exception] = InvalidInputError) -> None:
    """Every size is a positive integer and each min size is at most its max size; errors name the key."""
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise error(f"{where}: {name} must be a positive integer, got {value!r}")
    for kind in ("vae", "vit"):
        low, high = settings[f"{kind}_min_size"], settings[f"{kind}_max_size"]
        if low > high:
            raise error(f"{where}: {kind}_min_size ({low}) is larger than {kind}_max_size ({high})")


class UniBrainProcessor:
    """Turns text and images into model inputs.

    Args:
        tokenizer: a transformers tokenizer containing ``<|im_start|>``, ``<|im_end|>``,
            ``<|vision_start|>``, ``<|vision_end|>``.
        vae_max_size / vae_min_size / vae_stride: VAE-path resize rule (UniBrain: 512 / 256 / 16).
        vit_max_size / vit_min_size / vit_patch_size: ViT-path resize rule (980 / 224 / 14).
        max_latent_size / vit_max_num_patch_per_side: sides of the model's 2-D position grids.
    """

    def __init__(self, tokenizer=None, vae_max_size: int = 512, vae_min_size: int = 256, vae_stride: int = 16,
                 vit_max_size: int = 980, vit_min_size: int = 224, vit_patch_size: int = 14,
                 max_latent_size: int = 64, vit_max_num_patch_per_side: int = 70):
        check_processor_settings(dict(
            vae_max_size=vae_max_size, vae_min_size=vae_min_size, vae_stride=vae_stride, vit_max_size=vit_max_size,
            vit_min_size=vit_min_size, vit_patch_size=vit_patch_size, max_latent_size=max_latent_size,
            vit_max_num_patch_per_side=vit_max_num_patch_per_side), type(self).__name__, InvalidInputError)
        self.tokenizer = tokenizer
        self.vae_resize = StrideResize(int(vae_max_size), int(vae_min_size), int(vae_stride))
        self.vit_resize = StrideResize(int(vit_max_size), int(vit_min_size), int(vit_patch_size))
        self.max_latent_size = int(max_latent_size)
        self.vit_max_num_patch_per_side = int(vit_max_num_patch_per_side)

    # -------------------------------------------------------------- construction / persistence
    @classmethod
    def for_model(cls, config, tokenizer, **overrides) -> "UniBrainProcessor":
        """A processor matching a model config (its strides and grids), UniBrain's resize limits."""
        kwargs = dict(vae_stride=config.latent_downsample, vit_patch_size=config.vit_patch_size,
                      max_latent_size=config.max_latent_size,
                      vit_max_num_patch_per_side=config.vit_max_num_patch_per_side)
        kwargs.update(overrides)
        return cls(tokenizer, **kwargs)

    def to_dict(self) -> dict:
        return {"processor_class": type(self).__name__,
                "vae_max_size": self.vae_resize.max_size, "vae_min_size": self.vae_resize.min_size,
                "vae_stride": self.vae_resize.stride, "vit_max_size": self.vit_resize.max_size,
                "vit_min_size": self.vit_resize.min_size, "vit_patch_size": self.vit_resize.stride,
                "max_latent_size": self.max_latent_size,
                "vit_max_num_patch_per_side": self.vit_max_num_patch_per_side}

    def save_pretrained(self, save_directory: str | os.PathLike, save_tokenizer: bool = True, **_) -> None:
        directory = Path(save_directory)
        with atomic_file(directory / PROCESSOR_CONFIG_NAME) as temporary:
            temporary.write_text(json.dumps(self.to_dict(), indent=2))
        if save_tokenizer and self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, tokenizer=None, subfolder: str | None = None, **_):
        """Load ``processor_config.json`` (every value checked, by file and key) and the tokenizer next to it.

        The tokenizer comes from the same folder or, in a pipeline directory, from the sibling
        ``tokenizer/`` folder; a damaged tokenizer file is reported by name.
        """
        directory = existing_path(Path(path) / subfolder if subfolder else Path(path), "processor directory",
                                  kind="directory")
        config_file = directory / PROCESSOR_CONFIG_NAME
        if not config_file.is_file():
            raise InputFileNotFoundError(f"processor directory {directory} has no {PROCESSOR_CONFIG_NAME}")
        settings = read_json(config_file)
        if not isinstance(settings, dict):
            raise ConfigError(f"{config_file}: expected a JSON object of settings, got {type(settings).__name__}")
        settings = dict(settings)
        saved_class = settings.pop("processor_class", cls.__name__)
        if saved_class != cls.__name__:
            raise ConfigError(f"{config_file}: processor_class is {saved_class!r}, not {cls.__name__!r}")
        unknown = sorted(set(settings) - set(PROCESSOR_SETTINGS))
        if unknown:
            raise ConfigError(f"{config_file}: unknown setting(s) {unknown}; known: {list(PROCESSOR_SETTINGS)}")
        check_processor_settings({**PROCESSOR_SETTINGS, **settings}, str(config_file), ConfigError)
        if tokenizer is None:
            for candidate in (directory, directory.parent / "tokenizer"):
                if (candidate / "tokenizer_config.json").exists():
                    tokenizer = read_tokenizer(candidate, "tokenizer")
                    break
        return cls(tokenizer, **settings)

    # -------------------------------------------------------------- text
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise InvalidInputError("this UniBrainProcessor has no tokenizer; pass one or load it from a model "
                                    "directory")
        return self.tokenizer

    def tokenize(self, text: str) -> list[int]:
        """Text → ids without special tokens (they are added when packing / prefilling)."""
        return self._require_tokenizer().encode(text, add_special_tokens=False)

    def special_token_ids(self) -> dict[str, int]:
        tokenizer = self._require_tokenizer()
        ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None or i == tokenizer.unk_token_id]
            raise InvalidInputError(f"the tokenizer lacks the special token(s) {missing}; UniBrain needs "
                                    f"{SPECIAL_TOKENS}")
        return dict(zip(("bos_token_id", "eos_token_id", "start_of_image", "end_of_image"), ids))

    def decode(self, ids) -> str:
        return self._require_tokenizer().decode(list(ids), skip_special_tokens=False)

    # -------------------------------------------------------------- packing
    def packing_spec(self) -> PackingSpec:
        ids = self.special_token_ids()
        return PackingSpec(
            bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
            start_of_image_token_id=ids["start_of_image"], end_of_image_token_id=ids["end_of_image"],
            vae_resize=self.vae_resize, vit_resize=self.vit_resize, vit_patch_size=self.vit_resize.stride,
            vae_stride=self.vae_resize.stride, max_latent_size=self.max_latent_size,
            vit_max_num_patch_per_side=self.vit_max_num_patch_per_side)

    def packer(self, dropout: DropoutProbabilities | None = None) -> SequencePacker:
        return SequencePacker(self.packing_spec(), self.tokenize, dropout)

    def pack(self, samples, rng: np.random.Generator | int | None = None,
             dropout: DropoutProbabilities | None = None, timesteps=None, sample_ids=None) -> PackedBatch:
        """Pack sequence plans (lists of ``PlanItem``) into one training batch."""
        return self.packer(dropout).pack(samples, rng=rng, timesteps=timesteps, sample_ids=sample_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"
