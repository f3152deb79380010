"""Convert a BAGEL-format checkpoint directory (or a UniBrain release) into this package's format.

Input — a BAGEL directory as released (``ByteDance-Seed/BAGEL-7B-MoT``) or as in the test fixture:
``ema.safetensors`` (or ``model.safetensors``), ``ae.safetensors`` (FLUX autoencoder),
``llm_config.json``, ``vit_config.json`` (layers stored as *effective + 1*), tokenizer files
(``vocab.json`` + ``merges.txt``, optionally ``tokenizer.json`` / ``tokenizer_config.json``), and
optionally ``model_config.json`` (BAGEL-level settings). A UniBrain release (model/ema weights
without configs) converts with ``weights=`` pointing at its safetensors file and ``src_dir`` at
the BAGEL directory that provides configs, tokenizer and VAE.

Output — a self-contained pipeline directory::

    DST/model_index.json
    DST/model/      config.json + sharded safetensors   (UniBrainForConditionalGeneration)
    DST/vae/        diffusers AutoencoderKL
    DST/scheduler/  diffusers FlowMatchEulerDiscreteScheduler
    DST/tokenizer/  tokenizer with <|im_start|> <|im_end|> <|vision_start|> <|vision_end|>

The model weights stream tensor by tensor into shards, so converting the 29 GB BAGEL
checkpoint needs about one shard of RAM; everything is written to a temporary directory that
is renamed into place at the end.

    unibrain convert /path/to/BAGEL-7B-MoT /path/to/unibrain-bagel
    unibrain convert /path/to/BAGEL-7B-MoT out/ --weights checkpoints_s3/0000200/ema.safetensors
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, SiglipVisionConfig

from ..errors import ConversionError, UniBrainError
from ..utils.readers import check_safetensors
from ..modeling.configuration_unibrain import UniBrainConfig
from ..modeling.modeling_unibrain import UniBrainForConditionalGeneration, sincos_2d_table
from .bagel_keys import FIXED_TABLE_KEYS, UnknownKeyError, rename_bagel_key, vit_layer_index

SPECIAL_TOKEN_STRINGS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3
#: How an error message tells a Python caller to set an option (the CLI substitutes its flags).
OPTION_HINTS = {"overwrite": "overwrite=True", "weights": "weights=<safetensors file>"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ConversionReport:
    destination: Path
    num_tensors: int = 0
    total_bytes: int = 0
    dropped: list[str] = field(default_factory=list)
    special_token_ids: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ configs
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"missing {path.name} in {path.parent}") from None
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None


def build_config_from_bagel(src_dir: Path, special_token_ids: dict[str, int]) -> UniBrainConfig:
    """Map ``llm_config.json`` / ``vit_config.json`` / ``model_config.json`` onto a ``UniBrainConfig``."""
    llm = _read_json(src_dir / "llm_config.json")
    vit = _read_json(src_dir / "vit_config.json")
    model = _read_json(src_dir / "model_config.json") if (src_dir / "model_config.json").exists() else {}
    required_llm = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
    missing = [k for k in required_llm if k not in llm]
    if missing:
        raise ConversionError(f"llm_config.json lacks required key(s) {missing}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "patch_size") if k not in vit]
    if missing:
        raise ConversionError(f"vit_config.json lacks required key(s) {missing}")
    rope_theta = llm.get("rope_theta") or (llm.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    if llm.get("rope_scaling"):
        raise ConversionError(f"llm_config.json uses rope_scaling {llm['rope_scaling']}, which BAGEL never uses")
    text = Qwen2Config(
        vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"], intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"], num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm.get("num_key_value_heads", llm["num_attention_heads"]),
        hidden_act=llm.get("hidden_act", "silu"), max_position_embeddings=llm.get("max_position_embeddings", 32768),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6), initializer_range=llm.get("initializer_range", 0.02),
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        attention_dropout=llm.get("attention_dropout", 0.0), tie_word_embeddings=False,
        bos_token_id=llm.get("bos_token_id"), eos_token_id=llm.get("eos_token_id"))
    grid = int(model.get("vit_max_num_patch_per_side", 70))
    # BAGEL's vit_config.json stores one layer more than it runs (it drops the last layer to use
    # the penultimate layer's features).
    vision = SiglipVisionConfig(
        hidden_size=vit["hidden_size"], intermediate_size=vit["intermediate_size"],
        num_hidden_layers=int(vit["num_hidden_layers"]) - 1, num_attention_heads=vit["num_attention_heads"],
        num_channels=vit.get("num_channels", 3), patch_size=vit["patch_size"], image_size=grid * vit["patch_size"],
        hidden_act=vit.get("hidden_act", "gelu_pytorch_tanh"), layer_norm_eps=vit.get("layer_norm_eps", 1e-6),
        attention_dropout=vit.get("attention_dropout", 0.0))
    if vit.get("rope", False):
        raise ConversionError("vit_config.json enables 2-D RoPE in the ViT; BAGEL-MoT checkpoints never do")
    if model.get("interpolate_pos", False):
        raise ConversionError("model_config.json uses interpolated ViT positions; only 'extrapolate' is supported")
    vae = model.get("vae", {})
    return UniBrainConfig(
        text_config=text, vision_config=vision,
        latent_patch_size=model.get("latent_patch_size", 2), max_latent_size=model.get("max_latent_size", 64),
        vit_max_num_patch_per_side=grid, latent_channels=vae.get("z_channels", 16),
        vae_downsample=vae.get("downsample", 8), connector_act=model.get("connector_act", "gelu_pytorch_tanh"),
        timestep_shift=model.get("timestep_shift", 1.0), qk_norm=True,
        bos_token_id=special_token_ids["bos_token_id"], eos_token_id=special_token_ids["eos_token_id"],
        start_of_image_token_id=special_token_ids["start_of_image"],
        end_of_image_token_id=special_token_ids["end_of_image"])


# ------------------------------------------------------------------------------------------ tokenizer
def load_bagel_tokenizer(src_dir: Path):
    """Load the Qwen2 tokenizer of a BAGEL directory and make sure the four special tokens exist.

    Missing special tokens are appended in BAGEL's order, exactly as its training code does, so
    the ids agree with the checkpoint's embedding rows.
    """
    from transformers import AutoTokenizer, Qwen2Tokenizer

    has_fast = (src_dir / "tokenizer.json").exists() or (src_dir / "tokenizer_config.json").exists()
    has_bpe = (src_dir / "vocab.json").exists() and (src_dir / "merges.txt").exists()
    if not (has_fast or has_bpe):
        raise ConversionError(f"{src_dir} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    try:
        # Without a tokenizer_config.json the class cannot be auto-detected; BAGEL is always Qwen2.
        loader = AutoTokenizer if (src_dir / "tokenizer_config.json").exists() else Qwen2Tokenizer
        tokenizer = loader.from_pretrained(str(src_dir))
    except ConversionError:
        raise
    except Exception as exc:  # tokenizer libraries raise many kinds of errors on bad files
        raise ConversionError(f"cannot load the tokenizer in {src_dir}: {exc}") from exc
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in SPECIAL_TOKEN_STRINGS if tok not in vocab]
    if missing:
        tokenizer.add_tokens(missing)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           zip(("bos_token_id", "eos_token_id", "start_of_image", "end_of_image"), SPECIAL_TOKEN_STRINGS)}
    unresolved = [name for name, value in ids.items() if value is None or value == tokenizer.unk_token_id]
    if unresolved:
        raise ConversionError(f"tokenizer cannot resolve special token(s) {unresolved}")
    return tokenizer, ids


# ------------------------------------------------------------------------------------------ weights
def _open_weights(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise ConversionError(f"weights file {path} does not exist") from None
    except Exception as exc:
        raise ConversionError(f"{path} is not a readable safetensors file ({exc})") from exc


def _convert_tensor(source_key: str, tensor: torch.Tensor) -> torch.Tensor:
    if source_key.endswith("patch_embedding.weight") and tensor.dim() == 4:
        # A Conv2d patch embedding (out, c, kh, kw) becomes the Linear over (kh, kw, c)-ordered patches.
        tensor = tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
    return tensor


def _check_fixed_table(name: str, stored: torch.Tensor, config: UniBrainConfig) -> None:
    grid = config.max_latent_size if name == "latent_pos_embed" else config.vit_max_num_patch_per_side
    expected = sincos_2d_table(grid, config.hidden_size)
    if tuple(stored.shape) != tuple(expected.shape):
        raise ConversionError(f"{name}.pos_embed has shape {tuple(stored.shape)} but the config implies "
                              f"{tuple(expected.shape)} (grid {grid}, hidden {config.hidden_size})")
    difference = (stored.float() - expected).abs().max().item()
    if difference > 1e-2:  # bf16 storage rounds the table; anything larger is a different formula
        raise ConversionError(f"{name}.pos_embed differs from the 2-D sin-cos formula (max |diff| {difference:.3g})")


def plan_weight_conversion(weights_path: Path, config: UniBrainConfig):
    """Check every key and shape without loading tensors; return [(source, target, shape, nbytes)] + dropped."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UniBrainForConditionalGeneration(config).state_dict().items()}
    effective_vit_layers = config.vision_config.num_hidden_layers
    plan, dropped, unknown, misshaped = [], [], [], []
    handle = _open_weights(weights_path)
    for key in handle.keys():
        layer = vit_layer_index(key)
        if layer is not None and layer >= effective_vit_layers:
            dropped.append(key)  # the unused last SigLIP layer, when a checkpoint keeps it
            continue
        try:
            target = rename_bagel_key(key)
        except UnknownKeyError:
            unknown.append(key)
            continue
        if target is None:
            dropped.append(key)
            continue
        tensor_slice = handle.get_slice(key)
        shape = tuple(tensor_slice.get_shape())
        if key.endswith("patch_embedding.weight") and len(shape) == 4:
            shape = (shape[0], shape[1] * shape[2] * shape[3])
        if target not in expected:
            unknown.append(key)
            continue
        if shape != expected[target]:
            misshaped.append(f"{key}: {shape} (expected {expected[target]} for {target})")
            continue
        itemsize = torch.empty(0, dtype=_safetensors_dtype(tensor_slice.get_dtype())).element_size()
        plan.append((key, target, shape, itemsize * math.prod(shape)))
    targets = {t for _, t, _, _ in plan}
    missing = sorted(set(expected) - targets)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[:5]}")
    if unknown:
        problems.append(f"{len(unknown)} unexpected tensor(s), e.g. {unknown[:5]}")
    if misshaped:
        problems.append(f"{len(misshaped)} tensor(s) with the wrong shape, e.g. {misshaped[:3]}")
    if problems:
        raise ConversionError(f"{weights_path.name} does not match the configuration: " + "; ".join(problems))
    return plan, dropped


def _safetensors_dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    if name not in table:
        raise ConversionError(f"unsupported tensor dtype {name}")
    return table[name]


def write_model_shards(weights_path: Path, config: UniBrainConfig, out_dir: Path, dtype: torch.dtype | None = None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ConversionReport:
    """Stream-convert ``weights_path`` into ``out_dir`` as (sharded) safetensors + config.json."""
    plan, dropped = plan_weight_conversion(weights_path, config)
    shards, current, current_bytes = [], [], 0
    for entry in plan:
        if current and current_bytes + entry[3] > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += entry[3]
    if current:
        shards.append(current)
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = _open_weights(weights_path)
    for key in dropped:
        table = FIXED_TABLE_KEYS.get(key)
        if table:
            _check_fixed_table(table, handle.get_tensor(key), config)
    weight_map, total = {}, 0
    single = len(shards) == 1
    for index, shard in enumerate(shards, start=1):
        name = "model.safetensors" if single else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for source, target, _, _ in shard:
            tensor = _convert_tensor(source, handle.get_tensor(source))
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[target] = tensor.contiguous()
            weight_map[target] = name
            total += tensor.numel() * tensor.element_size()
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        del tensors  # keep peak memory at about one shard
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if dtype is not None:
        config.dtype = str(dtype).replace("torch.", "")
    config.save_pretrained(str(out_dir))
    return ConversionReport(destination=out_dir, num_tensors=len(plan), total_bytes=total, dropped=dropped)


# ------------------------------------------------------------------------------------------ VAE
def convert_flux_vae(ae_path: Path, out_dir: Path, scaling_factor: float, shift_factor: float):
    """``ae.safetensors`` (FLUX / LDM names) → a diffusers ``AutoencoderKL`` directory."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ..modeling.vae import flux_vae_config_from_ldm_state_dict

    if not ae_path.exists():
        raise ConversionError(f"missing VAE weights {ae_path}")
    try:
        state = load_file(str(ae_path))
    except Exception as exc:
        raise ConversionError(f"{ae_path} is not a readable safetensors file ({exc})") from exc
    config = flux_vae_config_from_ldm_state_dict(state, scaling_factor, shift_factor)
    converted = convert_ldm_vae_checkpoint(state, config)
    vae = AutoencoderKL(**config)
    result = vae.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConversionError(f"VAE weights do not fit a FLUX autoencoder: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    vae.save_pretrained(str(out_dir))
    return vae


def processor_from_bagel(model_meta: dict, config: UniBrainConfig, tokenizer):
    """The image geometry UniBrain uses (VAE 512/256/16, ViT 980/224/14) unless the directory says otherwise."""
    from ..processing.processor import UniBrainProcessor

    vae_t, vit_t = model_meta.get("vae_transform", {}), model_meta.get("vit_transform", {})
    return UniBrainProcessor.for_model(
        config, tokenizer,
        vae_max_size=vae_t.get("max_image_size", 512), vae_min_size=vae_t.get("min_image_size", 256),
        vit_max_size=vit_t.get("max_image_size", 980), vit_min_size=vit_t.get("min_image_size", 224))


# ------------------------------------------------------------------------------------------ entry
def convert_bagel_checkpoint(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                             weights: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
                             max_shard_size: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> ConversionReport:
    """Convert a BAGEL-format directory into a complete UniBrain pipeline directory (see module doc).

    Args:
        src_dir: BAGEL directory (configs, tokenizer, ``ae.safetensors`` and, unless ``weights`` is
            given, ``ema.safetensors`` or ``model.safetensors``).
        dst_dir: output directory (must not exist unless ``overwrite``).
        weights: a safetensors file to take the model weights from (e.g. a UniBrain stage checkpoint).
        dtype: cast floating-point weights (``"bfloat16"``, ``"float32"`` …); default keeps the source dtype.
        max_shard_size: bytes per model shard.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise ConversionError(f"source {src_dir} is not a directory")
    if dst_dir.exists() and not overwrite:
        raise ConversionError(f"destination {dst_dir} already exists; pass {OPTION_HINTS['overwrite']} to replace it",
                              option="overwrite")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConversionError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if weights is None:
        candidates = [src_dir / "ema.safetensors", src_dir / "model.safetensors"]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise ConversionError(f"{src_dir} has neither ema.safetensors nor model.safetensors; pass "
                                  f"{OPTION_HINTS['weights']} to take the weights from elsewhere", option="weights")
        weights = found[0]
    weights = Path(weights)
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ConversionError(f"max_shard_size must be a positive number of bytes; got {max_shard_size!r}",
                              option="max_shard_size")
    try:  # a missing, truncated or pickled weights file is reported before anything is built
        check_safetensors(weights, "weights")
    except UniBrainError as exc:
        raise ConversionError(str(exc), option="weights_file") from exc

    tokenizer, special_ids = load_bagel_tokenizer(src_dir)
    config = build_config_from_bagel(src_dir, special_ids)
    if max(special_ids.values()) >= config.text_config.vocab_size:
        raise ConversionError(f"special token ids {special_ids} exceed the embedding size "
                              f"{config.text_config.vocab_size}")
    model_meta = _read_json(src_dir / "model_config.json") if (src_dir / "model_config.json").exists() else {}
    recorded = model_meta.get("special_token_ids")
    if recorded and any(recorded.get(k) != v for k, v in special_ids.items() if k in recorded):
        raise ConversionError(f"tokenizer gives special ids {special_ids} but model_config.json records {recorded}")
    vae_meta = model_meta.get("vae", {})

    from ..pipelines.components import write_pipeline_index
    from ..utils.atomic import atomic_directory

    with atomic_directory(dst_dir) as tmp:
        report = write_model_shards(weights, config, tmp / "model", dtype=dtype, max_shard_bytes=max_shard_size)
        convert_flux_vae(src_dir / "ae.safetensors", tmp / "vae",
                         vae_meta.get("scale_factor", 0.3611), vae_meta.get("shift_factor", 0.1159))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        processor_from_bagel(model_meta, config, tokenizer).save_pretrained(tmp / "processor", save_tokenizer=False)
        write_pipeline_index(tmp)
    report.destination = dst_dir
    report.special_token_ids = special_ids
    return report
