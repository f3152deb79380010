"""diffusers' LoRA API for ``UniBrainPipeline``: several named adapters, weighted, fused exactly, saved losslessly.

``UniBrainLoraLoaderMixin`` gives the pipeline the methods diffusers users know from
``LoraBaseMixin`` — ``load_lora_weights``, ``set_adapters``, ``get_active_adapters``,
``get_list_adapters``, ``delete_adapters``, ``fuse_lora``, ``unfuse_lora``, ``enable_lora``,
``disable_lora``, ``unload_lora_weights``, ``set_lora_device`` — plus ``save_lora_weights``.

It is built the way diffusers builds its own loaders: peft's injection API
(``inject_adapter_in_model`` / ``set_peft_model_state_dict``, the functions peft publishes for
library integrations) puts LoRA layers *inside* the bare ``UniBrainForConditionalGeneration``, so
``pipe.model`` stays the model class and every pipeline method, offload hook and ``save_pretrained``
keeps working. transformers' own ``model.load_adapter`` is not used because it needs peft >= 0.22;
this module needs peft >= 0.18 (tested with 0.18.0 and 0.21.2; 0.17 does not import with transformers 5).

What it reads: the directory peft's ``PeftModel.save_pretrained`` writes — ``adapter_config.json`` +
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` — which is what
training exports (``train/lora.py::apply_lora`` + ``save_pretrained``) and what
:meth:`~UniBrainLoraLoaderMixin.save_lora_weights` writes; a single ``.safetensors`` file in the
peft or diffusers key layout; an in-memory state dict; or a Hub repository holding either. Pickled
weights (``adapter_model.bin``) are refused, never opened. Every bad input raises a package error
(:mod:`unibrain_hf.errors`) that names it, before the model is touched.

Beyond diffusers: ``unfuse_lora`` restores the base weights bit for bit (peft's subtraction alone
does not), and ``save_pretrained`` with adapters attached writes the unmodified base model to
``model/`` and each adapter to ``lora/<name>/``, which ``from_pretrained`` loads and re-activates.
See ``docs/LORA.md``.

    python -m pytest tests/test_lora.py -q
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, CorruptFileError, InputFileNotFoundError, InvalidInputError, UnsafeFileError
from ..utils.atomic import atomic_directory, atomic_file
from ..utils.readers import PICKLED_WEIGHT_SUFFIXES, read_json, read_safetensors, refuse_pickled_weights

logger = logging.getLogger(__name__)

#: peft's adapter directory layout (``PeftModel.save_pretrained``), the format training exports.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: diffusers' single-file LoRA name (``pipe.save_lora_weights`` in diffusers pipelines).
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: The safetensors header entry where diffusers stores a single file's LoRA config.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
#: ``PeftModel.save_pretrained`` prefixes every key with this; the bare model's module paths follow it.
PEFT_KEY_PREFIX = "base_model.model."
#: The pipeline component that takes adapters (diffusers' ``_lora_loadable_modules``).
LORA_COMPONENT = "model"
#: ``save_pretrained`` keeps attached adapters here, one peft directory each, plus the state file.
SAVED_LORA_DIR = "lora"
SAVED_LORA_STATE = "adapters.json"
#: What a (plain) LoRA checkpoint holds after each module path: peft's two low-rank factors.
LORA_KEY_SUFFIXES = ("lora_A.weight", "lora_B.weight")
#: Adapter names become ``nn.ModuleDict`` keys and folder names: keep them plain.
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
#: ``from_pretrained`` arguments that also locate saved adapters on the Hub.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")

_loading_kwargs: contextvars.ContextVar[dict | None] = contextvars.ContextVar("unibrain_lora_loading", default=None)


# ------------------------------------------------------------------------------------------ state
@dataclass
class _FusePatch:
    """The base-layer entries that peft's unmerge does not bring back exactly, with their true values.

    ``W + Δ − Δ`` differs from ``W`` wherever the addition rounded across a binade (about 1-5 % of the
    entries for typical adapters), so unfusing with subtraction alone drifts the base model. Keeping
    just those entries (on the CPU) makes ``unfuse_lora`` exact at a small fraction of a weight copy.
    """

    dtypes: dict[str, torch.dtype]
    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]


@dataclass
class _LoraState:
    """What the layers alone do not record: per-adapter weights, what is fused at which scale, on/off."""

    weights: dict[str, float] = field(default_factory=dict)
    fused: dict[str, float] = field(default_factory=dict)
    patches: dict[str, _FusePatch] = field(default_factory=dict)
    enabled: bool = True


def _tuner_layers(model) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def _replace_submodule(model, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _base_params(layer) -> dict[str, torch.nn.Parameter]:
    return dict(layer.get_base_layer().named_parameters(recurse=False))


def _check_adapter_name(name) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise InvalidInputError(f"adapter_name {name!r} is not usable: use letters, digits, '_' and '-' only "
                                f"(it names a module dict entry and a folder)")
    return name


def _check_weight(value, what: str) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(f"{what} must be a finite number; got {value!r}")
    return float(value)


def _check_components(what: str, components, kwargs: dict) -> None:
    """diffusers' ``components`` argument: only the model takes adapters here; unknown keywords are named."""
    if kwargs:
        raise InvalidInputError(f"{what} got unknown arguments {sorted(kwargs)}")
    if components is not None and (not isinstance(components, (list, tuple)) or set(components) - {LORA_COMPONENT}):
        raise InvalidInputError(f"{what}: components must be [{LORA_COMPONENT!r}]; got {components!r} (pass the "
                                f"scale as lora_scale=...)")


# ------------------------------------------------------------------------------------------ reading adapters
@dataclass
class _AdapterSource:
    """A LoRA checkpoint read into memory: module-path keys, its peft config (or None) and where it came from."""

    state_dict: dict[str, torch.Tensor]
    config: dict | None
    label: str
    config_label: str | None = None


def _strip_prefix(state_dict: dict) -> dict:
    """Keys relative to the bare model: drop peft's ``base_model.model.`` or diffusers' ``model.`` prefix."""
    for prefix in (PEFT_KEY_PREFIX, f"{LORA_COMPONENT}."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            return {key[len(prefix):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _metadata_config(path: Path) -> dict | None:
    """The LoRA config diffusers stores in a single file's safetensors header, if any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(DIFFUSERS_METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}: its '{DIFFUSERS_METADATA_KEY}' header is not valid JSON ({exc})") from exc
    prefix = f"{LORA_COMPONENT}."
    if any(key.startswith(prefix) for key in config):  # a pipeline-level file packs each component's config
        config = {key[len(prefix):]: value for key, value in config.items() if key.startswith(prefix)}
    return config


def _read_file(path: Path, config_path: Path | None = None) -> _AdapterSource:
    if path.suffix in PICKLED_WEIGHT_SUFFIXES:
        raise UnsafeFileError(f"LoRA weights {path} are a pickle file; only .safetensors adapters are loaded, because "
                              f"opening a pickle can run arbitrary code. Re-save the adapter with peft's "
                              f"save_pretrained (safe_serialization=True) or pipe.save_lora_weights.")
    if path.suffix != ".safetensors":
        raise InvalidInputError(f"LoRA weights {path} are not a .safetensors file")
    state_dict = read_safetensors(path, "LoRA weights")
    if config_path is not None:
        config = read_json(config_path, "LoRA adapter config")
        return _AdapterSource(state_dict, config, str(path), str(config_path))
    return _AdapterSource(state_dict, _metadata_config(path), str(path), str(path) + " (header)")


def _read_directory(directory: Path, weight_name: str | None) -> _AdapterSource:
    if weight_name is not None:
        return _read_path(directory / weight_name)
    if (directory / ADAPTER_CONFIG_NAME).exists():
        refuse_pickled_weights(directory, "LoRA adapter directory")
        weights = directory / ADAPTER_WEIGHTS_NAME
        if not weights.exists():
            raise InputFileNotFoundError(f"LoRA adapter directory {directory} has {ADAPTER_CONFIG_NAME} but no "
                                         f"{ADAPTER_WEIGHTS_NAME}")
        return _read_file(weights, directory / ADAPTER_CONFIG_NAME)
    refuse_pickled_weights(directory, "LoRA adapter directory")
    candidates = sorted(p.name for p in directory.glob("*.safetensors"))
    if DIFFUSERS_WEIGHTS_NAME in candidates:
        return _read_file(directory / DIFFUSERS_WEIGHTS_NAME)
    if len(candidates) == 1:
        return _read_file(directory / candidates[0])
    found = f"several .safetensors files {candidates}; pass weight_name=" if candidates else "no .safetensors file"
    raise InputFileNotFoundError(f"LoRA adapter directory {directory} has no {ADAPTER_CONFIG_NAME} and {found}")


def _read_path(path: Path, weight_name: str | None = None) -> _AdapterSource:
    if path.is_dir():
        return _read_directory(path, weight_name)
    if weight_name is not None:
        raise InvalidInputError(f"weight_name={weight_name!r} needs a directory or Hub repository; {path} is a file")
    sibling_config = path.parent / ADAPTER_CONFIG_NAME
    if path.name == ADAPTER_WEIGHTS_NAME and sibling_config.exists():
        return _read_file(path, sibling_config)  # a peft directory named by its weights file
    return _read_file(path)


def _looks_like_repo_id(value: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.startswith((".", "/", "~")) or os.sep in value.replace("/", "") or value.count("/") != 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str, filename: str, subfolder: str | None, hub_kwargs: dict) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, subfolder=subfolder or None, **hub_kwargs))


def _read_hub(repo_id: str, weight_name: str | None, subfolder: str | None, hub_kwargs: dict) -> _AdapterSource:
    """peft's layout first, then diffusers' single file; a missing repository or file is named."""
    from huggingface_hub.errors import EntryNotFoundError

    where = f"Hub repository {repo_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    try:
        if weight_name is not None:
            if Path(weight_name).suffix != ".safetensors":
                return _read_file(Path(weight_name))  # refuses pickles before anything is downloaded
            return _read_file(_download(repo_id, weight_name, subfolder, hub_kwargs))
        try:
            config = _download(repo_id, ADAPTER_CONFIG_NAME, subfolder, hub_kwargs)
        except EntryNotFoundError:
            return _read_file(_download(repo_id, DIFFUSERS_WEIGHTS_NAME, subfolder, hub_kwargs))
        try:
            weights = _download(repo_id, ADAPTER_WEIGHTS_NAME, subfolder, hub_kwargs)
        except EntryNotFoundError as exc:
            raise UnsafeFileError(f"{where} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}; pickled "
                                  f"adapter weights (adapter_model.bin) are not loaded") from exc
        return _read_file(weights, config)
    except (UnsafeFileError, InvalidInputError, CorruptFileError, InputFileNotFoundError):
        raise
    except Exception as exc:  # huggingface_hub raises a family of errors; the caller needs the name and the reason
        from huggingface_hub import constants

        offline = " (offline mode: HF_HUB_OFFLINE=1, and it is not in the cache)" if constants.HF_HUB_OFFLINE else ""
        raise InputFileNotFoundError(f"LoRA adapter {repo_id!r} is neither a local path nor a loadable {where}"
                                     f"{offline}: {type(exc).__name__}: {exc}") from exc


def read_lora_adapter(source, weight_name: str | None = None, subfolder: str | None = None,
                      metadata: dict | None = None, **hub_kwargs) -> _AdapterSource:
    """Read a LoRA checkpoint (directory, file, state dict or Hub id) without touching any model."""
    if isinstance(source, dict):
        return _AdapterSource(dict(source), metadata, "the state dict passed to load_lora_weights",
                              "the metadata passed to load_lora_weights")
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidInputError(f"load_lora_weights takes a directory, a .safetensors file, a Hub repository id or "
                                f"a state dict; got {type(source).__name__}")
    path = Path(source) / subfolder if subfolder else Path(source)
    if path.exists():
        adapter = _read_path(path, weight_name)
    elif isinstance(source, str) and _looks_like_repo_id(source):
        adapter = _read_hub(source, weight_name, subfolder, hub_kwargs)
    else:
        raise InputFileNotFoundError(f"LoRA adapter {path} does not exist (and is not a Hub repository id)")
    if metadata is not None:
        adapter.config, adapter.config_label = metadata, "the metadata passed to load_lora_weights"
    return adapter


# ------------------------------------------------------------------------------------------ checking against the model
def _module_of(key: str, label: str) -> str:
    for suffix in LORA_KEY_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1]
    raise InvalidInputError(f"{label}: key {key!r} is not a LoRA weight in peft's layout "
                            f"('<module>.lora_A.weight' / '<module>.lora_B.weight'); plain LoRA adapters saved by "
                            f"peft, training or pipe.save_lora_weights are supported (not DoRA, LoRA biases or "
                            f"other tuners)")


def _model_key(key: str, adapter_name: str) -> str:
    """``<module>.lora_A.weight`` in a checkpoint → ``<module>.lora_A.<adapter>.weight`` in the model."""
    module, _, factor = key.rpartition(".")[0].rpartition(".")
    return f"{module}.{factor}.{adapter_name}.weight"


def _plain_modules(model) -> dict[str, torch.nn.Module]:
    """The model's modules by path as if no adapter were attached (tuner layers stand for their base layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules, inside = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside.append(name + ".")
            module = module.get_base_layer()
        modules[name] = module
    return modules


def _infer_config(state_dict: dict, modules: list[str]) -> dict:
    """A LoraConfig for a file without one: ranks from the shapes, alpha = rank (scale 1), as diffusers does."""
    ranks = {module: state_dict[f"{module}.lora_A.weight"].shape[0] for module in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {module: rank for module, rank in ranks.items() if rank != r}
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(modules)}


def _lora_config(adapter: _AdapterSource, state_dict: dict, modules: list[str]):
    """peft's ``LoraConfig`` for the adapter and the name of where it came from; bad configs are named."""
    from peft import LoraConfig

    if adapter.config is None:
        data, label = _infer_config(state_dict, modules), f"{adapter.label} (LoRA config inferred from the shapes)"
    else:
        data, label = adapter.config, adapter.config_label
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: a LoRA config must be a JSON object; got {type(data).__name__}")
    data = {key: value for key, value in data.items() if key != "runtime_config"}
    peft_type = str(data.get("peft_type", "LORA")).upper().rsplit(".", 1)[-1]
    if peft_type != "LORA":
        raise InvalidInputError(f"{label}: peft_type is {data.get('peft_type')!r}; only LoRA adapters are supported")
    data["peft_type"] = "LORA"
    try:
        config = LoraConfig.from_peft_type(**data)  # peft warns about (and drops) keys written by a newer peft
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: not a valid LoRA config ({exc})") from exc
    unsupported = [name for name, value in (("modules_to_save", config.modules_to_save),
                                            ("use_dora", config.use_dora),
                                            ("lora_bias", getattr(config, "lora_bias", False))) if value]
    if unsupported:
        raise InvalidInputError(f"{label}: {unsupported} are set; the pipeline's loader takes plain LoRA adapters "
                                f"on linear layers (what training exports)")
    return config, label


def _check_against_model(model, adapter: _AdapterSource, config, config_label: str, modules: list[str]) -> None:
    """Every adapter module exists in the model, is linear, and is exactly what the config targets."""
    from peft.tuners.tuners_utils import check_target_module_exists

    plain = _plain_modules(model)
    missing = [m for m in modules if m not in plain]
    if missing:
        what = "none of the" if len(missing) == len(modules) else f"{len(missing)} of the"
        raise InvalidInputError(f"{adapter.label}: {what} {len(modules)} modules this LoRA adapter targets exist in "
                                f"the model (e.g. {missing[:3]}); it was made for another model or configuration")
    not_linear = [f"{m} ({type(plain[m]).__name__})" for m in modules if not isinstance(plain[m], torch.nn.Linear)]
    if not_linear:
        raise InvalidInputError(f"{adapter.label}: LoRA targets must be linear layers; {not_linear[:3]} are not")
    targeted = {name for name, module in plain.items() if name and bool(check_target_module_exists(config, name))}
    if not targeted:
        raise InvalidInputError(f"{config_label}: target_modules {config.target_modules!r} match no module "
                                f"of the model")
    if targeted != set(modules):
        without_weights = sorted(targeted - set(modules))
        untargeted = sorted(set(modules) - targeted)
        raise InvalidInputError(
            f"{config_label}: target_modules {config.target_modules!r} do not match the weights in "
            f"{adapter.label}: " + "; ".join(part for part in (
                f"{len(without_weights)} targeted modules have no weights (e.g. {without_weights[:3]})"
                if without_weights else "",
                f"{len(untargeted)} modules with weights are not targeted (e.g. {untargeted[:3]})"
                if untargeted else "") if part))


# ------------------------------------------------------------------------------------------ the mixin
class UniBrainLoraLoaderMixin:
    """diffusers' LoRA API on ``pipe.model`` (see the module docstring and ``docs/LORA.md``)."""

    _lora_loadable_modules = [LORA_COMPONENT]

    # ---------------------------------------------------------------- state helpers
    def _lora_model(self):
        model = getattr(self, LORA_COMPONENT, None)
        if model is None:
            raise InvalidInputError("this pipeline has no model component to attach LoRA adapters to")
        return model

    def _lora_state(self) -> _LoraState:
        model = self._lora_model()
        state = model.__dict__.get("_unibrain_lora_state")
        if state is None:
            state = model.__dict__["_unibrain_lora_state"] = _LoraState()
        return state

    def _adapter_names(self) -> list[str]:
        return list(getattr(self._lora_model(), "peft_config", {}) or {})

    def _require_loaded(self, what: str) -> list[str]:
        loaded = self._adapter_names()
        if not loaded:
            raise InvalidInputError(f"{what}: no LoRA adapter is loaded; call pipe.load_lora_weights(...) first")
        return loaded

    def _require_adapters(self, names, what: str) -> list[str]:
        """``names`` (a name or a list) checked against the loaded adapters; unknown ones are named."""
        loaded = self._require_loaded(what)
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise InvalidInputError(f"{what}: adapter names must be a string or a list of strings; got {names!r}")
        unknown = [n for n in names if n not in loaded]
        if unknown:
            raise InvalidInputError(f"{what}: adapter name(s) {unknown} are not loaded; loaded adapters: {loaded}")
        if len(set(names)) != len(names):
            raise InvalidInputError(f"{what}: adapter names repeat: {list(names)}")
        return list(names)

    @contextlib.contextmanager
    def _offload_paused(self):
        """Take diffusers' offload hooks off while layers change, then put them back (as diffusers' loaders do)."""
        try:  # diffusers' own helpers for this; private, so tolerate their absence in other versions
            from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading
            from diffusers.loaders.lora_base import _func_optionally_disable_offloading
        except ImportError:
            yield
            return
        model_offload, sequential_offload, group_offload = _func_optionally_disable_offloading(self)
        try:
            yield
        finally:
            if model_offload:
                self.enable_model_cpu_offload()
            elif sequential_offload:
                self.enable_sequential_cpu_offload()
            elif group_offload:
                _maybe_remove_and_reapply_group_offloading(self._lora_model())

    def _activate(self, names: list[str]) -> None:
        """Make ``names`` the active adapters everywhere, every adapter at its stored weight, frozen (inference)."""
        state = self._lora_state()
        for _, layer in _tuner_layers(self._lora_model()):
            layer.enable_adapters(state.enabled)
            layer.set_adapter(names)
            for attribute in layer.adapter_layer_names:  # loaded for inference, as PeftModel.from_pretrained does
                getattr(layer, attribute).requires_grad_(False)
            for name in list(layer.scaling):
                layer.set_scale(name, state.weights.get(name, 1.0))

    def _remove_layers(self, layers=None) -> None:
        """Swap tuner layers (all, or those given) back to their base layers."""
        model = self._lora_model()
        for name, layer in (_tuner_layers(model) if layers is None else layers):
            _replace_submodule(model, name, layer.get_base_layer())

    def _forget_all_adapters(self) -> None:
        model = self._lora_model()
        if "peft_config" in model.__dict__:
            del model.peft_config
        model.__dict__.pop("_unibrain_lora_state", None)

    # ---------------------------------------------------------------- loading
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        """Attach a LoRA adapter to ``pipe.model`` under ``adapter_name`` and make it the active one.

        Args:
            pretrained_model_name_or_path_or_dict: a peft adapter directory (``adapter_config.json`` +
                ``adapter_model.safetensors``, what training and :meth:`save_lora_weights` write), a single
                ``.safetensors`` file (peft keys ``base_model.model.…`` or diffusers keys ``model.…``; its LoRA
                config from the header if diffusers wrote one, else ranks from the shapes and alpha = rank), a
                state dict, or a Hub repository id holding either layout.
            adapter_name (`str`, *optional*): defaults to ``default_<n>`` like diffusers.
            weight_name, subfolder, cache_dir, force_download, local_files_only, proxies, revision, token: how to
                find the file (diffusers' names). metadata (`dict`): a LoRA config for a state dict or a bare
                file. low_cpu_mem_usage (`bool`): create the adapter layers empty before filling them.

        Like diffusers, the newly loaded adapter becomes the only active one (at weight 1.0); combine adapters
        with :meth:`set_adapters`.
        """
        if kwargs.pop("use_safetensors", None) is False:
            raise UnsafeFileError("load_lora_weights(use_safetensors=False): only .safetensors LoRA weights are "
                                  "loaded; pickled weights are never opened")
        if kwargs.pop("hotswap", False):
            raise InvalidInputError("load_lora_weights(hotswap=True) is not supported; load under a new adapter_name "
                                    "and delete_adapters() the old one")
        weight_name = kwargs.pop("weight_name", None)
        subfolder = kwargs.pop("subfolder", None)
        metadata = kwargs.pop("metadata", None)
        low_cpu_mem_usage = bool(kwargs.pop("low_cpu_mem_usage", False))
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
        if kwargs:
            raise InvalidInputError(f"load_lora_weights got unknown arguments {sorted(kwargs)}")

        model = self._lora_model()
        loaded = self._adapter_names()
        if adapter_name is None:
            adapter_name = f"default_{len(loaded)}"
        _check_adapter_name(adapter_name)
        if adapter_name in loaded:
            raise InvalidInputError(f"adapter_name {adapter_name!r} is already loaded (loaded: {loaded}); choose "
                                    f"another name or delete_adapters({adapter_name!r}) first")

        adapter = read_lora_adapter(pretrained_model_name_or_path_or_dict, weight_name, subfolder, metadata,
                                    **hub_kwargs)
        state_dict = _strip_prefix(adapter.state_dict)
        if not state_dict:
            raise InvalidInputError(f"{adapter.label} holds no LoRA weights")
        modules = sorted({_module_of(key, adapter.label) for key in state_dict})
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point()
               or v.dim() != 2]
        if bad:
            raise InvalidInputError(f"{adapter.label}: {bad[:3]} are not 2-D floating-point tensors (LoRA factors)")
        not_finite = [k for k, v in state_dict.items() if not torch.isfinite(v).all()]
        if not_finite:
            raise InvalidInputError(f"{adapter.label}: {not_finite[:3]} contain NaN or Inf")
        half = [f"{m}.{factor}.weight" for m in modules for factor in ("lora_A", "lora_B")
                if f"{m}.{factor}.weight" not in state_dict]
        if half:
            raise InvalidInputError(f"{adapter.label}: {len(half)} LoRA factors are missing (e.g. {half[:3]}); each "
                                    f"adapted module needs lora_A and lora_B")
        config, config_label = _lora_config(adapter, state_dict, modules)
        _check_against_model(model, adapter, config, config_label, modules)
        self._inject(adapter_name, config, state_dict, adapter.label, low_cpu_mem_usage)
        logger.info("loaded LoRA adapter %r from %s (%d layers)", adapter_name, adapter.label, len(modules))

    def _inject(self, adapter_name: str, config, state_dict: dict, label: str, low_cpu_mem_usage: bool) -> None:
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        model = self._lora_model()
        state = self._lora_state()
        before = {name for name, _ in _tuner_layers(model)}
        active_before = self.get_active_adapters()
        with self._offload_paused():
            try:
                with warnings.catch_warnings():  # peft warns whenever a second adapter joins a model; that is the point
                    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
                    inject_adapter_in_model(config, model, adapter_name=adapter_name, state_dict=state_dict,
                                            low_cpu_mem_usage=low_cpu_mem_usage)
                expected = {key: model.get_parameter(_model_key(key, adapter_name)).shape for key in state_dict}
                wrong = [f"{key}: file {tuple(state_dict[key].shape)}, model needs {tuple(shape)}"
                         for key, shape in expected.items() if tuple(state_dict[key].shape) != tuple(shape)]
                if wrong:
                    raise InvalidInputError(f"{label}: {len(wrong)} LoRA weights do not fit this model "
                                            f"(rank r={config.r} from the config, layer sizes from the model): "
                                            f"{wrong[:3]}")
                result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name,
                                                   low_cpu_mem_usage=low_cpu_mem_usage)
                unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
                if unexpected:
                    raise InvalidInputError(f"{label}: {len(unexpected)} weights were not used (e.g. {unexpected[:3]})")
            except BaseException:
                self._drop_adapter(adapter_name, before)
                if self._adapter_names():  # peft made the new adapter the active one; undo that too
                    self._activate(active_before)
                raise
            state.weights[adapter_name] = 1.0
            for _, layer in _tuner_layers(model):
                layer.train(model.training)  # new dropout modules start in training mode; follow the model
            self._activate([adapter_name])

    def _drop_adapter(self, adapter_name: str, keep_layers: set[str] | None = None) -> None:
        """Remove the adapter from every layer and the config (also undoes a partial load); drop emptied layers."""
        model = self._lora_model()
        emptied = []
        for name, layer in _tuner_layers(model):
            if adapter_name in layer.scaling or adapter_name in layer.lora_A:
                with warnings.catch_warnings():  # peft announces its own choice of a new active adapter; ours follows
                    warnings.simplefilter("ignore")
                    layer.delete_adapter(adapter_name)
            if not layer.lora_A and (keep_layers is None or name not in keep_layers):
                emptied.append((name, layer))
        self._remove_layers(emptied)
        config = getattr(model, "peft_config", None)
        if config is not None:
            config.pop(adapter_name, None)
        self._lora_state().weights.pop(adapter_name, None)
        if not _tuner_layers(model):
            self._forget_all_adapters()

    # ---------------------------------------------------------------- choosing adapters
    def set_adapters(self, adapter_names: list[str] | str, adapter_weights: float | list | dict | None = None):
        """Activate ``adapter_names`` together, each scaled by its weight (default 1.0), like diffusers.

        The model then computes ``W x + Σ_i weight_i · (alpha_i / r_i) · B_i A_i x`` in every adapted layer.
        ``adapter_weights`` is a number for all, a list (one number or None per name), or diffusers' per-component
        dict ``{"model": number}``.
        """
        names = self._require_adapters(adapter_names, "set_adapters")
        weights = adapter_weights
        if isinstance(weights, dict):
            unknown = sorted(set(weights) - {LORA_COMPONENT})
            if unknown:
                raise InvalidInputError(f"set_adapters: adapter_weights components {unknown} are not LoRA components "
                                        f"of this pipeline (only {LORA_COMPONENT!r}); per-layer weights are not "
                                        f"supported")
            weights = weights.get(LORA_COMPONENT)
        if not isinstance(weights, (list, tuple)):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise InvalidInputError(f"set_adapters: {len(names)} adapter names {names} but {len(weights)} "
                                    f"adapter_weights {list(weights)}")
        state = self._lora_state()
        for name, weight in zip(names, weights):
            state.weights[name] = _check_weight(weight, f"set_adapters: the weight of adapter {name!r}")
        self._activate(names)

    def get_active_adapters(self) -> list[str]:
        """The active adapters' names (empty when none is loaded)."""
        for _, layer in _tuner_layers(self._lora_model()):
            return list(layer.active_adapters)
        return []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Loaded adapters per component, diffusers' shape: ``{"model": [...]}`` (empty dict when none)."""
        names = self._adapter_names()
        return {LORA_COMPONENT: names} if names else {}

    def enable_lora(self) -> None:
        """Apply the active adapters again after :meth:`disable_lora`."""
        self._require_loaded("enable_lora")
        self._lora_state().enabled = True
        self._activate(self.get_active_adapters())

    def disable_lora(self) -> None:
        """Run the base model without unloading the adapters (:meth:`enable_lora` turns them back on)."""
        self._require_loaded("disable_lora")
        state = self._lora_state()
        if state.fused:
            raise InvalidInputError(f"disable_lora: adapters {sorted(state.fused)} are fused into the weights; call "
                                    f"pipe.unfuse_lora() first (or unload_lora_weights() to keep them fused)")
        state.enabled = False
        for _, layer in _tuner_layers(self._lora_model()):
            layer.enable_adapters(False)

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        """Remove adapters and their layers; the remaining ones keep their weights."""
        names = self._require_adapters(adapter_names, "delete_adapters")
        fused = sorted(set(names) & set(self._lora_state().fused))
        if fused:
            raise InvalidInputError(f"delete_adapters: adapters {fused} are fused into the weights; call "
                                    f"pipe.unfuse_lora() first")
        still_active = [n for n in self.get_active_adapters() if n not in names]
        with self._offload_paused():
            for name in names:
                self._drop_adapter(name)
        if self._adapter_names():
            self._activate(still_active)

    def unload_lora_weights(self) -> None:
        """Remove every adapter layer; fused adapters stay in the weights (diffusers' fuse → unload → save)."""
        model = self._lora_model()
        if not _tuner_layers(model):
            self._forget_all_adapters()
            return
        fused = sorted(self._lora_state().fused)
        with self._offload_paused():
            self._remove_layers()
            self._forget_all_adapters()
        if fused:
            logger.info("unloaded LoRA layers; adapters %s stay fused into the base weights", fused)

    def set_lora_device(self, adapter_names: list[str], device) -> None:
        """Move the given adapters' weights to ``device`` (e.g. park unused adapters on the CPU)."""
        names = self._require_adapters(adapter_names, "set_lora_device")
        for _, layer in _tuner_layers(self._lora_model()):
            for name in names:
                if name in layer.lora_A:
                    layer.lora_A[name].to(device)
                    layer.lora_B[name].to(device)

    # ---------------------------------------------------------------- fusing
    @property
    def fused_loras(self) -> set[str]:
        """Names of the adapters fused into the base weights."""
        model = getattr(self, LORA_COMPONENT, None)
        state = None if model is None else model.__dict__.get("_unibrain_lora_state")
        return set(state.fused) if state else set()

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None, **kwargs) -> None:
        """Fold adapters into the base weights (no per-step LoRA cost); :meth:`unfuse_lora` undoes it exactly.

        Args:
            components: diffusers' argument; only ``["model"]`` (the default) takes adapters here.
            lora_scale (`float`): multiplies each fused adapter's :meth:`set_adapters` weight.
            safe_fusing (`bool`): refuse (and leave the weights untouched) if fusing produces NaN or Inf.
            adapter_names: what to fuse; defaults to the active adapters.

        While adapters are fused, a fused layer computes with its fused weight only (peft's rule), so fuse all
        the adapters you want applied. Adapters already fused stay as they are.
        """
        _check_components("fuse_lora", components, kwargs)
        scale = _check_weight(lora_scale, "fuse_lora: lora_scale")
        names = self._require_adapters(adapter_names if adapter_names is not None else self.get_active_adapters(),
                                       "fuse_lora")
        state = self._lora_state()
        if not state.enabled:
            raise InvalidInputError("fuse_lora: LoRA is disabled; call pipe.enable_lora() first")
        wanted = dict(state.fused)
        for name in names:
            wanted.setdefault(name, state.weights.get(name, 1.0) * scale)
        if wanted != state.fused:
            with self._offload_paused():
                self._fuse(wanted, safe_fusing)

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Take fused adapters out of the base weights, restoring them bit for bit."""
        _check_components("unfuse_lora", components, kwargs)
        if self.fused_loras:
            with self._offload_paused():
                self._unfuse()

    def _fuse(self, multipliers: dict[str, float], safe: bool) -> None:
        """Fuse ``{adapter: multiplier}`` into every layer (after unfusing what was fused), recording patches.

        On failure the weights are back where they were, including what was fused before.
        """
        state = self._lora_state()
        previous = dict(state.fused)
        self._unfuse()
        try:
            for name, layer in _tuner_layers(self._lora_model()):
                present = {a: m for a, m in multipliers.items() if a in layer.lora_A}
                if present:
                    state.patches[name] = self._merge_exactly(layer, present, safe, name)
                    state.fused = multipliers  # from the first layer on, _unfuse must see what is merged
        except BaseException:
            self._unfuse()
            if previous:
                self._fuse(previous, safe=False)
            raise
        state.fused = dict(multipliers)

    def _merge_exactly(self, layer, multipliers: dict[str, float], safe: bool, layer_name: str) -> _FusePatch:
        """peft's merge, plus the entries its unmerge would not restore (found by unmerging once, then re-merging)."""
        state = self._lora_state()
        params = _base_params(layer)
        original = {name: param.detach().clone() for name, param in params.items()}
        names = list(multipliers)
        try:
            for adapter in names:
                layer.set_scale(adapter, multipliers[adapter])
            layer.merge(adapter_names=names)
            if safe and not all(torch.isfinite(p).all() for p in params.values()):
                layer.unmerge()
                for name, param in params.items():
                    param.data.copy_(original[name])
                raise InvalidInputError(f"fuse_lora(safe_fusing=True): fusing adapters {names} gives NaN/Inf in "
                                        f"{layer_name}; the weights are left as they were")
            layer.unmerge()
            patch = _FusePatch({}, {}, {})
            for name, param in params.items():
                differs = (param.data != original[name]).reshape(-1)
                index = differs.nonzero().squeeze(1)
                patch.dtypes[name] = param.dtype
                patch.indices[name] = index.to("cpu", torch.int32 if differs.numel() < 2 ** 31 else torch.int64)
                patch.values[name] = original[name].reshape(-1)[index].cpu()
                param.data.copy_(original[name])
            layer.merge(adapter_names=names)  # deterministic: the same fused weights as the first merge
        finally:
            for adapter in names:
                layer.set_scale(adapter, state.weights.get(adapter, 1.0))
        return patch

    def _unfuse(self) -> None:
        state = self._lora_state()
        if not state.fused:
            return
        for name, layer in _tuner_layers(self._lora_model()):
            if not layer.merged:
                continue
            for adapter in layer.merged_adapters:
                layer.set_scale(adapter, state.fused.get(adapter, state.weights.get(adapter, 1.0)))
            merged = list(layer.merged_adapters)
            layer.unmerge()
            for adapter in merged:
                layer.set_scale(adapter, state.weights.get(adapter, 1.0))
            patch = state.patches.pop(name, None)
            if patch is None:
                continue
            for param_name, param in _base_params(layer).items():
                if param.dtype != patch.dtypes[param_name]:
                    logger.warning("%s changed dtype while fused (%s → %s); its base weights are restored by "
                                   "subtraction only, not exactly", name, patch.dtypes[param_name], param.dtype)
                    continue
                index = patch.indices[param_name].to(param.device, torch.int64)
                param.data.view(-1)[index] = patch.values[param_name].to(param.device)
        state.patches.clear()
        state.fused = {}

    # ---------------------------------------------------------------- saving
    def save_lora_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
        """Write one adapter as a peft directory (``adapter_config.json`` + ``adapter_model.safetensors``).

        The layout and keys (``base_model.model.<module>.lora_A.weight``) are exactly what
        ``PeftModel.save_pretrained`` and training write, so :meth:`load_lora_weights` and
        ``PeftModel.from_pretrained`` read it. ``adapter_name`` may be omitted when only one adapter is
        loaded or active. Returns the directory.
        """
        from safetensors.torch import save_file

        loaded = self._require_loaded("save_lora_weights")
        if adapter_name is None:
            active = self.get_active_adapters()
            candidates = loaded if len(loaded) == 1 else active
            if len(candidates) != 1:
                raise InvalidInputError(f"save_lora_weights: several adapters are loaded ({loaded}); pass "
                                        f"adapter_name=")
            adapter_name = candidates[0]
        self._require_adapters([adapter_name], "save_lora_weights")
        directory = Path(save_directory)
        if directory.is_file():
            raise InvalidInputError(f"save_lora_weights: {directory} is a file; a directory is expected")
        model = self._lora_model()
        # Collected here rather than by peft's get_peft_model_state_dict, which in peft 0.18 matches adapter names
        # as substrings (adapter "a" also collects "b"'s keys, via "language_model"); the key layout is peft's.
        tensors = {}
        for module, layer in _tuner_layers(model):
            if adapter_name in layer.lora_A:
                for factor in ("lora_A", "lora_B"):
                    weight = getattr(layer, factor)[adapter_name].weight
                    tensors[f"{PEFT_KEY_PREFIX}{module}.{factor}.weight"] = weight.detach().contiguous().cpu()
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / ADAPTER_WEIGHTS_NAME, ".safetensors") as temporary:
            save_file(tensors, str(temporary), metadata={"format": "pt"})
        with tempfile.TemporaryDirectory(dir=directory, prefix=".adapter-config-") as scratch:
            model.peft_config[adapter_name].save_pretrained(scratch)  # peft writes the JSON, as save_pretrained does
            os.replace(Path(scratch) / ADAPTER_CONFIG_NAME, directory / ADAPTER_CONFIG_NAME)
        return directory

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """diffusers' ``save_pretrained``; with adapters attached the save is lossless and reloads as it was.

        ``model/`` receives the unmodified base weights (fused adapters are taken out exactly for the write), and
        ``lora/<name>/`` each adapter in peft's layout with ``lora/adapters.json`` recording weights, active
        adapters, fusing and on/off; :meth:`from_pretrained` restores all of it. Without adapters, a ``lora/``
        folder left by an earlier save into the same directory is removed so that it cannot be picked up.
        """
        directory = Path(save_directory)
        model = getattr(self, LORA_COMPONENT, None)
        if model is None or not _tuner_layers(model):
            if (directory / SAVED_LORA_DIR / SAVED_LORA_STATE).exists():
                shutil.rmtree(directory / SAVED_LORA_DIR)
            return super().save_pretrained(save_directory, *args, **kwargs)
        state = self._lora_state()
        names = self._adapter_names()
        # The adapters are written first so that a push_to_hub inside super().save_pretrained uploads them too.
        with atomic_directory(directory / SAVED_LORA_DIR) as temporary:
            for name in names:
                self.save_lora_weights(temporary / name, adapter_name=name)
            record = {"adapters": names, "weights": {n: state.weights.get(n, 1.0) for n in names},
                      "active": self.get_active_adapters(), "enabled": state.enabled, "fused": dict(state.fused)}
            (temporary / SAVED_LORA_STATE).write_text(json.dumps(record, indent=2))
        with self._base_model_view():
            return super().save_pretrained(save_directory, *args, **kwargs)

    @contextlib.contextmanager
    def _base_model_view(self):
        """The model exactly as without adapters (unfused, tuner layers swapped out), restored afterwards."""
        model = self._lora_model()
        state = self._lora_state()
        fused = dict(state.fused)
        with self._offload_paused():
            self._unfuse()
            layers = _tuner_layers(model)
            self._remove_layers(layers)
            try:
                yield
            finally:
                for name, layer in layers:
                    _replace_submodule(model, name, layer)
                if fused:
                    self._fuse(fused, safe=False)

    # ---------------------------------------------------------------- reloading what save_pretrained wrote
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader; adapters saved by :meth:`save_pretrained` come back loaded and active as they were."""
        token = _loading_kwargs.set({key: kwargs[key] for key in HUB_KWARGS if key in kwargs})
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        finally:
            _loading_kwargs.reset(token)

    def register_to_config(self, **kwargs):
        # diffusers' DiffusionPipeline.from_pretrained records the source as ``_name_or_path`` right after building
        # the pipeline, whichever class it was called on; restoring saved adapters here also covers
        # ``DiffusionPipeline.from_pretrained(dir)``, which never calls this class's from_pretrained.
        super().register_to_config(**kwargs)
        source = kwargs.get("_name_or_path")
        if source is not None and getattr(self, LORA_COMPONENT, None) is not None:
            self._restore_saved_adapters(source, _loading_kwargs.get() or {})

    def _saved_lora_dir(self, source, hub_kwargs: dict) -> Path | None:
        local = Path(source)
        if local.is_dir():
            root = local / SAVED_LORA_DIR
            return root if (root / SAVED_LORA_STATE).exists() else None
        if not isinstance(source, str) or not _looks_like_repo_id(source):
            return None
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            _download(source, f"{SAVED_LORA_DIR}/{SAVED_LORA_STATE}", None, hub_kwargs)
        except EntryNotFoundError:
            return None
        except Exception as exc:  # offline and not cached, or no access: the pipeline itself did load
            logger.warning("could not check %s for saved LoRA adapters (%s: %s); loading without them", source,
                           type(exc).__name__, exc)
            return None
        folder = snapshot_download(source, allow_patterns=[f"{SAVED_LORA_DIR}/*", f"{SAVED_LORA_DIR}/*/*"],
                                   **hub_kwargs)
        return Path(folder) / SAVED_LORA_DIR

    def _restore_saved_adapters(self, source, hub_kwargs: dict) -> None:
        root = self._saved_lora_dir(source, hub_kwargs)
        if root is None:
            return
        if self._adapter_names():
            logger.warning("the model already has LoRA adapters %s; the ones saved in %s are not loaded",
                           self._adapter_names(), root)
            return
        state_file = root / SAVED_LORA_STATE
        record = read_json(state_file, "saved LoRA state")
        try:
            names = [str(n) for n in record["adapters"]]
            weights = {str(k): float(v) for k, v in record["weights"].items()}
            active = [str(n) for n in record["active"]]
            enabled = bool(record["enabled"])
            fused = {str(k): float(v) for k, v in record["fused"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptFileError(f"saved LoRA state ({state_file}) is incomplete or malformed: "
                                   f"{type(exc).__name__}: {exc}") from exc
        for name in names:
            self.load_lora_weights(root / name, adapter_name=name)
        state = self._lora_state()
        state.weights.update({n: weights.get(n, 1.0) for n in names})
        self._activate(self._require_adapters(active, f"saved LoRA state ({state_file})") if active else [])
        if fused:
            with self._offload_paused():
                self._fuse({n: m for n, m in fused.items() if n in names}, safe=False)
        if not enabled:
            self.disable_lora()

    # ---------------------------------------------------------------- the pipeline's earlier one-adapter API
    def load_lora(self, adapter_dir, merge: bool = False, adapter_name: str = "default") -> None:
        """Deprecated: ``load_lora_weights``; ``merge=True`` adds ``fuse_lora`` + ``unload_lora_weights``."""
        warnings.warn("pipe.load_lora is deprecated; use pipe.load_lora_weights(path, adapter_name=...) and, for "
                      "merge=True, pipe.fuse_lora() followed by pipe.unload_lora_weights()", FutureWarning,
                      stacklevel=2)
        if merge and self._adapter_names():
            raise InvalidInputError(f"load_lora(merge=True) would unload the other adapters {self._adapter_names()}; "
                                    f"use load_lora_weights + fuse_lora(adapter_names=[...]) instead")
        self.load_lora_weights(adapter_dir, adapter_name=adapter_name)
        if merge:
            self.fuse_lora(adapter_names=[adapter_name])
            self.unload_lora_weights()

    def unload_lora(self) -> None:
        """Deprecated: ``unload_lora_weights()``."""
        warnings.warn("pipe.unload_lora is deprecated; use pipe.unload_lora_weights()", FutureWarning, stacklevel=2)
        if not self._adapter_names():
            raise InvalidInputError("unload_lora: no LoRA adapter is attached")
        self.unload_lora_weights()


__all__ = ["UniBrainLoraLoaderMixin", "read_lora_adapter"]
