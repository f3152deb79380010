"""One reader per file format, each naming its file in every error.

Every NIfTI, safetensors, YAML and JSON file this package reads goes through one of these
functions, so a damaged, truncated or missing file is reported as a
:class:`~unibrain_hf.errors.CorruptFileError` / :class:`~unibrain_hf.errors.InputFileNotFoundError`
that names the path and the argument it came from (``what``), before any model work, instead
of a ``zlib.error`` from deep inside a library. Pickle-based weight files are never opened.

    python -c "from unibrain_hf.utils.readers import read_yaml; print(read_yaml('configs/tiny_align.yaml')['stage'])"
"""

from __future__ import annotations

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


def _label(path: Path, what: str | None) -> str:
    return f"{what} ({path})" if what else str(path)


def existing_path(path: str | os.PathLike, what: str | None = None, kind: str = "file") -> Path:
    """``path`` as a ``Path`` if it exists (as a file / directory), else a clear error naming it."""
    path = Path(path)
    if kind == "directory":
        if not path.is_dir():
            state = "is not a directory" if path.exists() else "does not exist"
            raise InputFileNotFoundError(f"{_label(path, what)} {state}")
    elif not path.exists():
        raise InputFileNotFoundError(f"{_label(path, what)} does not exist")
    elif path.is_dir():
        raise InvalidInputError(f"{_label(path, what)} is a directory; a file is expected")
    return path


# --------------------------------------------------------------------------------------- NIfTI
def read_nifti(source, what: str | None = None):
    """A nibabel image whose voxel data has been read and checked (damaged files fail here, by name).

    ``source`` is a ``.nii``/``.nii.gz`` path or an in-memory nibabel image (returned as is after its
    data was read once). The returned image holds its data in memory, so later access cannot fail.
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    if not isinstance(source, (str, os.PathLike)):
        if not (hasattr(source, "dataobj") and hasattr(source, "affine")):
            raise InvalidInputError(f"{what or 'input'}: expected a NIfTI path or a nibabel image, got "
                                    f"{type(source).__name__}")
        return source
    path = existing_path(source, what)
    if not str(path).endswith(NIFTI_SUFFIXES):
        raise InvalidInputError(f"{_label(path, what)} is not a NIfTI file (expected .nii or .nii.gz)")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except (zlib.error, EOFError, ImageFileError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{_label(path, what)} is not a readable NIfTI file: it is damaged or truncated "
                               f"({type(exc).__name__}: {exc})") from exc
    return image.__class__(data, image.affine, image.header)


# --------------------------------------------------------------------------------------- safetensors
def check_safetensors(path: str | os.PathLike, what: str | None = None) -> Path:
    """Validate a safetensors file's header and length without loading its tensors."""
    from safetensors import safe_open

    path = existing_path(path, what)
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError for damaged files
        raise CorruptFileError(f"{_label(path, what)} is not a readable safetensors file: it is damaged or "
                               f"truncated ({exc})") from exc
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

    Loading them would run ``torch.load``; the message says how to convert them instead.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").exists():
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED_WEIGHT_SUFFIXES)
    if pickled:
        raise UnsafeFileError(
            f"{_label(directory, what)} holds weights only as pickle files {pickled}; this package loads "
            f"safetensors only, because opening a pickle can run arbitrary code. Convert them once, in an "
            f"environment you trust: `from safetensors.torch import save_file; "
            f"save_file(torch.load(path, weights_only=True), 'model.safetensors')`.")


# --------------------------------------------------------------------------------------- text formats
def read_yaml(path: str | os.PathLike, what: str | None = None) -> Any:
    """A YAML document (safe loader); a syntax error names the file, line and column."""
    import yaml

    path = existing_path(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{_label(path, what)} is not UTF-8 text ({exc})") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CorruptFileError(f"{_label(path, what)} is not valid YAML{where}: {problem}") from exc


def read_json(path: str | os.PathLike, what: str | None = None) -> Any:
    """A JSON document; a syntax error names the file, line and column."""
    path = existing_path(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{_label(path, what)} is not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{_label(path, what)} is not valid JSON at line {exc.lineno}, column {exc.colno}: "
                               f"{exc.msg}") from exc


__all__ = ["existing_path", "read_nifti", "check_safetensors", "read_safetensors", "refuse_pickled_weights",
           "read_yaml", "read_json", "PICKLED_WEIGHT_SUFFIXES", "NIFTI_SUFFIXES"]
