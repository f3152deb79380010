"""One reader per file format, each naming its file in every error.

Every NIfTI, safetensors, parquet, YAML and JSON file this package reads goes through one of
these functions, so a damaged, truncated or missing file is reported as a
:class:`~unibrain_hf.errors.CorruptFileError` / :class:`~unibrain_hf.errors.InputFileNotFoundError`
that names the path and the argument it came from (``what``, e.g. ``"images['t1n']"`` or
``"--weights"``), before any model work, instead of a ``zlib.error`` from deep inside a library.
Pickle-based weight files are never opened: :func:`refuse_pickled_weights` and
:func:`check_safetensors` refuse them by name, and :func:`check_pretrained_weights` checks a whole
weights folder (single file or shards) before ``from_pretrained`` builds anything.

    python -c "from unibrain_hf.utils.readers import read_yaml; print(read_yaml('configs/tiny_align.yaml')['stage'])"
"""

from __future__ import annotations

import functools
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError, InputFileNotFoundError, InvalidInputError, UnsafeFileError

#: Weight files that are pickles underneath; reading one can execute code, so they are refused.
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Index files of sharded safetensors checkpoints (transformers, diffusers).
SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
# First bytes of a pickle (PROTO opcode, protocols 2-5) and of a torch.save zip archive: a file
# named *.safetensors that starts like this is a renamed pickle and is refused, not parsed.
_PICKLE_MAGICS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _label(path: Path, what: str | None) -> str:
    return f"{what} ({path})" if what else str(path)


def existing_path(path: str | os.PathLike, what: str | None = None, kind: str = "file") -> Path:
    """``path`` if it exists as a ``kind`` (``"file"``, ``"directory"`` or ``"any"``), else an error naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"{what or 'path'}: expected a {kind} path, got {type(path).__name__} {path!r}")
    path = Path(path)
    if kind == "directory":
        if not path.exists():
            raise InputFileNotFoundError(f"{_label(path, what)} does not exist")
        if not path.is_dir():
            raise InvalidInputError(f"{_label(path, what)} is a file; a directory is expected")
    elif not path.exists():
        raise InputFileNotFoundError(f"{_label(path, what)} does not exist")
    elif path.is_dir() and kind == "file":
        raise InvalidInputError(f"{_label(path, what)} is a directory; a file is expected")
    return path


# --------------------------------------------------------------------------------------- NIfTI
def read_nifti(source, what: str | None = None):
    """A nibabel image whose voxel data has been read and checked (damaged files fail here, by name).

    ``source`` is a ``.nii``/``.nii.gz`` path or an in-memory nibabel image (returned as is). The
    returned image holds its data in memory, so later access cannot fail.
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    if not isinstance(source, (str, os.PathLike)):
        if not (hasattr(source, "dataobj") and hasattr(source, "affine")):
            raise InvalidInputError(f"{what or 'input'}: expected a NIfTI path or a nibabel image, got "
                                    f"{type(source).__name__}")
        return source
    path = existing_path(source, what)
    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        raise InvalidInputError(f"{_label(path, what)} is not a NIfTI file (expected .nii or .nii.gz)")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except (zlib.error, EOFError, ImageFileError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{_label(path, what)} is not a readable NIfTI file: it is damaged or truncated "
                               f"({type(exc).__name__}: {exc})") from exc
    return image.__class__(data, image.affine, image.header)


# --------------------------------------------------------------------------------------- safetensors
def _refuse_pickle_file(path: Path, what: str | None) -> None:
    if path.suffix.lower() in PICKLED_WEIGHT_SUFFIXES:
        raise UnsafeFileError(f"{_label(path, what)} is a pickle-based weights file; this package loads safetensors "
                              f"only, because opening a pickle can run arbitrary code. {_conversion_hint(path)}")
    with path.open("rb") as handle:
        head = handle.read(4)
    if head.startswith(_PICKLE_MAGICS):
        raise UnsafeFileError(f"{_label(path, what)} is a pickle / torch.save archive, not a safetensors file; it "
                              f"was not opened. {_conversion_hint(path)}")


def _conversion_hint(path: Path) -> str:
    stem = path.name.split(".")[0]
    if stem.startswith("pytorch_model"):  # transformers names: pytorch_model*.bin -> model*.safetensors
        stem = "model" + stem[len("pytorch_model"):]
    target = path.with_name(stem + ".safetensors")
    return (f"Convert it once, in an environment you trust: python -c \"import torch; from safetensors.torch import "
            f"save_file; save_file(torch.load('{path}', weights_only=True), '{target}')\"")


def check_safetensors(path: str | os.PathLike, what: str | None = None) -> Path:
    """Validate a safetensors file's header and length without loading its tensors.

    A pickle (by suffix or by its first bytes) is refused with :class:`UnsafeFileError`; a
    truncated or damaged file is a :class:`CorruptFileError` naming it.
    """
    from safetensors import safe_open

    path = existing_path(path, what)
    _refuse_pickle_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError for damaged files
        raise CorruptFileError(f"{_label(path, what)} is not a readable safetensors file: it is damaged or "
                               f"truncated ({exc}); copy or download it again") from exc
    return path


def read_safetensors(path: str | os.PathLike, what: str | None = None, device: str = "cpu") -> dict:
    """All tensors of a safetensors file (``{name: tensor}``); damaged files fail by name."""
    from safetensors.torch import load_file

    path = check_safetensors(path, what)
    try:
        return load_file(str(path), device=device)
    except Exception as exc:
        raise CorruptFileError(f"{_label(path, what)} could not be read ({exc})") from exc


def refuse_pickled_weights(directory: str | os.PathLike, what: str | None = None) -> None:
    """Raise :class:`UnsafeFileError` if ``directory`` holds weights only as pickles (no safetensors).

    Loading them would run ``torch.load``; the message names the files and says how to convert them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    if any(directory.glob("*.safetensors")) or any(directory.glob(f"*{SAFETENSORS_INDEX_SUFFIX}")):
        return
    pickled = sorted(p for p in directory.iterdir() if p.suffix.lower() in PICKLED_WEIGHT_SUFFIXES)
    if pickled:
        raise UnsafeFileError(
            f"{_label(directory, what)} holds weights only as pickle files {[p.name for p in pickled]}; this package "
            f"loads safetensors only, because opening a pickle can run arbitrary code. {_conversion_hint(pickled[0])}")


def check_pretrained_weights(directory: str | os.PathLike, what: str | None = None,
                             config_name: str | None = "config.json") -> list[Path]:
    """Check a local ``from_pretrained`` folder before anything is built from it; return its weight files.

    Checks, each failing with the file's path: ``config_name`` exists and is valid JSON; the weights
    are not pickles (:func:`refuse_pickled_weights`); a sharded checkpoint's index is valid JSON and
    every shard it lists exists; every safetensors file has a complete header
    (:func:`check_safetensors`). Works for transformers (``model.safetensors``) and diffusers
    (``diffusion_pytorch_model.safetensors``) folders alike.
    """
    directory = existing_path(directory, what, kind="directory")
    if config_name is not None:
        config = directory / config_name
        if not config.is_file():
            raise InputFileNotFoundError(f"{_label(directory, what)} has no {config_name}; it is not a saved model "
                                         f"folder")
        if not isinstance(read_json(config, what), dict):
            raise CorruptFileError(f"{_label(config, what)} is not a JSON object of settings")
    refuse_pickled_weights(directory, what)
    files = sorted(directory.glob("*.safetensors"))
    for index in sorted(directory.glob(f"*{SAFETENSORS_INDEX_SUFFIX}")):
        content = read_json(index, what)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise CorruptFileError(f"{_label(index, what)} has no 'weight_map' object; it is not a safetensors index")
        for shard in sorted(set(map(str, weight_map.values()))):
            path = directory / shard
            if not path.is_file():
                raise InputFileNotFoundError(f"{_label(path, what)} is listed in {index.name} but does not exist; "
                                             f"the checkpoint is incomplete (copy every shard)")
            if path not in files:
                files.append(path)
    if not files:
        raise InputFileNotFoundError(f"{_label(directory, what)} holds no *.safetensors weights")
    for path in files:
        check_safetensors(path, what)
    return files


def check_pipeline_directory(directory: str | os.PathLike, what: str | None = None) -> Path:
    """Check a local pipeline directory (``model_index.json`` + component folders) before loading it.

    ``model_index.json`` must be valid JSON; every component it lists must have its folder; every
    folder that holds weights is checked with :func:`check_pretrained_weights` (pickles refused,
    safetensors complete). In folders without weights (tokenizer, scheduler, processor) every JSON file must parse.
    """
    directory = existing_path(directory, what, kind="directory")
    index = read_json(directory / "model_index.json", what)
    if not isinstance(index, dict):
        raise CorruptFileError(f"{_label(directory / 'model_index.json', what)} is not a JSON object")
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[:1] == [None]:
            continue  # metadata (_class_name, ...) and components saved as None
        folder = directory / name
        if not folder.is_dir():
            raise InputFileNotFoundError(f"{_label(folder, what)} does not exist, but model_index.json lists the "
                                         f"component {name!r}; the pipeline directory is incomplete")
        has_weights = any(p.name.endswith(".safetensors") or p.name.endswith(SAFETENSORS_INDEX_SUFFIX)
                          or p.suffix.lower() in PICKLED_WEIGHT_SUFFIXES for p in folder.iterdir())
        if has_weights:
            check_pretrained_weights(folder, what)
        else:  # tokenizer, scheduler, processor: their settings files must at least parse
            for settings_file in sorted(folder.glob("*.json")):
                read_json(settings_file, what)
    return directory


# --------------------------------------------------------------------------------------- parquet
def open_parquet_file(path: str | os.PathLike, what: str | None = None):
    """A ``pyarrow.parquet.ParquetFile`` whose footer (schema, row groups) has been read.

    A missing file, a file that is not parquet, and a truncated one (its footer is at the end)
    fail here by name; reading damaged data pages later is wrapped by :func:`read_parquet_table`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = existing_path(path, what)
    try:
        return pq.ParquetFile(str(path))
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{_label(path, what)} is not a readable parquet file: it is damaged, truncated or "
                               f"not parquet ({exc})") from exc


def read_parquet_table(path: str | os.PathLike, columns: list[str] | None = None, what: str | None = None,
                       row_group: int | None = None):
    """A ``pyarrow.Table`` of ``columns`` (one row group, or the whole file); damaged files fail by name."""
    import pyarrow as pa

    parquet_file = open_parquet_file(path, what)
    where = f" (row group {row_group})" if row_group is not None else ""
    try:
        if row_group is not None:
            return parquet_file.read_row_group(row_group, columns=columns)
        return parquet_file.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{_label(Path(path), what)}{where} cannot be read: the file is damaged "
                               f"({exc})") from exc


# --------------------------------------------------------------------------------------- tokenizer
def read_tokenizer(directory: str | os.PathLike, what: str | None = None):
    """``AutoTokenizer.from_pretrained(directory)``, offline; a damaged tokenizer file is named.

    The libraries behind ``AutoTokenizer`` report a truncated ``tokenizer.json`` as a bare
    ``JSONDecodeError`` without its path; on failure every JSON file of the folder is re-read
    through :func:`read_json`, so the error names the damaged one.
    """
    from transformers import AutoTokenizer

    directory = existing_path(directory, what, kind="directory")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise InputFileNotFoundError(f"{_label(directory, what)} holds no tokenizer files (tokenizer.json, "
                                     f"tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # tokenizers, sentencepiece and json each raise their own types
        for path in sorted(directory.glob("*.json")):
            read_json(path, what)
        raise CorruptFileError(f"{_label(directory, what)} is not a loadable tokenizer folder "
                               f"({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------- text formats
@functools.lru_cache(maxsize=1)
def _yaml_loader():
    """PyYAML's safe loader, refusing duplicate keys (PyYAML keeps the last one silently).

    Hand-written because PyYAML has no option for it: a hand-edited config with ``train:`` twice
    would otherwise lose the first section without a word.
    """
    import yaml

    class StrictSafeLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line {first_line[key] + 1})", key_node.start_mark)
                first_line[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: PyYAML's own constructor reports it
                pass
        return loader.construct_mapping(node, deep=deep)

    StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictSafeLoader


def read_yaml(path: str | os.PathLike, what: str | None = None) -> Any:
    """A YAML document (safe loader, duplicate keys refused); a syntax error names the file, line and column."""
    import yaml

    path = existing_path(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{_label(path, what)} is not UTF-8 text ({exc})") from exc
    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CorruptFileError(f"{_label(path, what)} is not valid YAML{where}: {problem}") from exc


def _no_duplicate_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def read_json(path: str | os.PathLike, what: str | None = None) -> Any:
    """A JSON document (duplicate keys refused); a syntax error names the file, line and column."""
    path = existing_path(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{_label(path, what)} is not UTF-8 text ({exc})") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{_label(path, what)} is not valid JSON at line {exc.lineno}, column {exc.colno}: "
                               f"{exc.msg}") from exc
    except ValueError as exc:  # a duplicate key
        raise CorruptFileError(f"{_label(path, what)} is not valid JSON: {exc}") from exc


__all__ = ["existing_path", "read_nifti", "check_safetensors", "read_safetensors", "refuse_pickled_weights",
           "check_pretrained_weights", "check_pipeline_directory", "open_parquet_file", "read_parquet_table", "read_tokenizer", "read_yaml",
           "read_json",
           "PICKLED_WEIGHT_SUFFIXES", "NIFTI_SUFFIXES"]
