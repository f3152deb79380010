"""Writers for evaluation outputs: image panels, metric JSON, Markdown summaries, NIfTI volumes.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``)
so an interrupted evaluation never leaves a half-written result that looks complete.
Panels are drawn with PIL alone (its built-in default font), so no plotting library is needed.

Image convention, shared with :mod:`unibrain_hf.evaluation.metrics`: integer images hold
0–255 intensities, float images hold values in [0, 1].

    python -c "import numpy as np; from unibrain_hf.evaluation.report import save_panel; save_panel('panel.png', [('input', np.zeros((64, 64), np.uint8)), ('imputed', np.full((64, 64), 200, np.uint8))])"
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@contextlib.contextmanager
def _atomic_destination(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    ``suffix`` keeps the real extension on the temporary name for writers that choose
    the format from it (nibabel).
    """
    from ..utils.atomic import atomic_file

    with atomic_file(path, suffix) as temporary:
        yield temporary


def _write_text_atomically(path: str | Path, text: str) -> Path:
    with _atomic_destination(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


# --------------------------------------------------------------------------- images


def difference_map(gt, pred) -> np.ndarray:
    """Absolute difference ``|gt - pred|``; uint8 when both inputs are uint8, else float64 or int64."""
    ground_truth, prediction = np.asarray(gt), np.asarray(pred)
    if ground_truth.shape != prediction.shape:
        raise ValueError(f"gt and pred shapes differ: {ground_truth.shape} vs {prediction.shape}")
    for name, array in (("gt", ground_truth), ("pred", prediction)):
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise ValueError(f"{name} must be an integer or float array, got dtype {array.dtype}")
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or infinite values")
    if np.issubdtype(ground_truth.dtype, np.integer) and np.issubdtype(prediction.dtype, np.integer):
        # Subtracting uint8 directly would wrap around; go through a signed type.
        difference = np.abs(ground_truth.astype(np.int64) - prediction.astype(np.int64))
        if ground_truth.dtype == np.uint8 and prediction.dtype == np.uint8:
            return difference.astype(np.uint8)
        return difference
    return np.abs(ground_truth.astype(np.float64) - prediction.astype(np.float64))


def to_display_uint8(image, *, name: str = "image") -> np.ndarray:
    """A 2-D grayscale image as uint8: integers must be 0–255, floats in [0, 1] (scaled by 255)."""
    array = np.asarray(image)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D grayscale image, got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"{name}: integer images must hold 0–255, got [{array.min()}, {array.max()}]")
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or infinite values")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"{name}: float images must lie in [0, 1], got [{array.min():g}, {array.max():g}]; "
                "convert 0–255 floats to uint8 first"
            )
        return np.round(array * 255.0).astype(np.uint8)
    raise ValueError(f"{name} must be an integer, float or bool array, got dtype {array.dtype}")


def save_panel(
    path: str | Path,
    columns: Sequence[tuple[str, np.ndarray]],
    *,
    gap: int = 4,
    label_height: int = 16,
    scale: int = 1,
    title: str | Sequence[str] = (),
    captions: Sequence[str] | None = None,
) -> Path:
    """Write a PNG of labelled grayscale images side by side, e.g. inputs | imputed | ground truth | difference.

    Args:
        path: output ``.png`` file.
        columns: ``(label, image)`` pairs, left to right; images are 2-D (see :func:`to_display_uint8`).
        gap: black pixels between columns.
        label_height: height of the label strip above the images (and of each title line).
        scale: integer nearest-neighbour magnification, for small slices.
        title: one or more lines written across the top of the panel (e.g. subject id, scores, diagnosis).
        captions: one line per column written under its image (e.g. its PSNR/SSIM); ``None`` for none.

    The panel is ``scale * sum(widths) + gap * (len(columns) - 1)`` pixels wide and
    ``label_height * (title lines + 1 + (1 if captions))+ scale * max(heights)`` high; shorter images
    are top-aligned on black. A label longer than its column is clipped to it.
    """
    if isinstance(columns, Mapping) or len(columns) == 0:
        raise ValueError("columns must be a non-empty list of (label, image) pairs")
    if not isinstance(scale, int) or scale < 1 or gap < 0 or label_height < 0:
        raise ValueError(f"need an integer scale >= 1 and non-negative gap/label_height, got {scale}, {gap}, {label_height}")
    tiles: list[tuple[str, Image.Image]] = []
    for index, column in enumerate(columns):
        if not isinstance(column, (tuple, list)) or len(column) != 2 or not isinstance(column[0], str):
            raise ValueError(f"column {index} must be a (label, image) pair, got {type(column).__name__}")
        label, image = column
        tile = Image.fromarray(to_display_uint8(image, name=f"column {index} ({label!r})"), mode="L")
        if scale > 1:
            tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
        tiles.append((label, tile))

    title_lines = [title] if isinstance(title, str) else list(title)
    if captions is not None and len(captions) != len(tiles):
        raise ValueError(f"captions must have one entry per column ({len(tiles)}), got {len(captions)}")
    width = sum(tile.width for _, tile in tiles) + gap * (len(tiles) - 1)
    top = label_height * len(title_lines)
    image_height = max(tile.height for _, tile in tiles)
    height = top + label_height + image_height + (label_height if captions is not None else 0)
    panel = Image.new("L", (width, height), 0)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(panel)
    for line_number, line in enumerate(title_lines):
        draw.text((2, line_number * label_height + 1), str(line), fill=255, font=font)
    left = 0
    for index, (label, tile) in enumerate(tiles):
        strips = [(label, top)]
        if captions is not None:
            strips.append((str(captions[index]), top + label_height + image_height))
        for text, y in strips:
            if label_height:
                # Drawing on a strip the column's width keeps long labels from spilling over.
                strip = Image.new("L", (tile.width, label_height), 0)
                ImageDraw.Draw(strip).text((2, 1), text, fill=255, font=font)
                panel.paste(strip, (left, y))
        panel.paste(tile, (left, top + label_height))
        left += tile.width + gap

    with _atomic_destination(path, suffix=".png") as temporary:
        panel.save(temporary, format="PNG")
    return Path(path)


# --------------------------------------------------------------------------- numbers


def _jsonable(value):
    """Plain-JSON form: numpy scalars/arrays become Python values; inf and NaN become strings."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        # Strict JSON has no Infinity/NaN; "inf" (e.g. PSNR of identical images) reads back via float().
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics_json(path: str | Path, metrics: Mapping) -> Path:
    """Write ``metrics`` as indented, strict JSON, atomically.

    numpy values are converted; non-finite floats are written as the strings
    ``"inf"``, ``"-inf"`` and ``"nan"`` (``float()`` parses them back).
    """
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a mapping, got {type(metrics).__name__}")
    try:
        text = json.dumps(_jsonable(metrics), indent=2, allow_nan=False)
    except TypeError as error:
        raise ValueError(f"metrics hold a value JSON cannot represent: {error}") from error
    return _write_text_atomically(path, text + "\n")


def _markdown_cell(value, float_format: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        number = float(value)
        text = float_format.format(number) if math.isfinite(number) else str(number)
    else:
        text = str(value)
    # A bare "|" would end the cell and a newline would end the row.
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], *, float_format: str = "{:.4f}") -> str:
    """A GitHub-style Markdown table with ``columns`` as header; a key missing from a row is an empty cell."""
    if isinstance(columns, str) or len(columns) == 0:
        raise ValueError("columns must be a non-empty list of column names")
    lines = [
        "| " + " | ".join(_markdown_cell(column, float_format) for column in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {index} must be a dict, got {type(row).__name__}")
        lines.append("| " + " | ".join(_markdown_cell(row.get(column), float_format) for column in columns) + " |")
    return "\n".join(lines)


def write_summary_markdown(
    path: str | Path,
    title: str,
    tables: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write a Markdown summary atomically: ``# title``, one ``## heading`` per table, then a Notes list.

    ``tables`` maps section headings to rendered tables (see :func:`markdown_table`), in order.
    """
    if not isinstance(title, str) or not title.strip():
        raise ValueError("title must be a non-empty string")
    if isinstance(notes, str):
        raise ValueError("notes must be a list of strings, not a single string")
    sections = list(tables.items()) if isinstance(tables, Mapping) else list(tables)
    parts = [f"# {title}", ""]
    for index, section in enumerate(sections):
        if not isinstance(section, (tuple, list)) or len(section) != 2:
            raise ValueError(f"table {index} must be a (heading, markdown) pair")
        heading, table = section
        parts += [f"## {heading}", "", str(table).rstrip(), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return _write_text_atomically(path, "\n".join(parts))


# --------------------------------------------------------------------------- volumes


def save_nifti_like(
    path: str | Path,
    array: np.ndarray,
    reference,
    *,
    array_order: Literal["xyz", "zyx"] = "xyz",
) -> Path:
    """Write ``array`` as NIfTI with the geometry of ``reference``, atomically.

    Args:
        path: ``.nii`` or ``.nii.gz`` output.
        array: the volume. ``array_order="zyx"`` means (z, y, x) as in our parquet data; it is
            transposed to NIfTI's (x, y, z), as SimpleITK's ``GetImageFromArray`` does.
        reference: a nibabel image or a path to one (its affine and header are reused and the
            shapes must agree), or a 4×4 affine.

    The stored data type is the array's own (bool becomes uint8), with no intensity scaling.
    """
    import nibabel as nib  # only needed when volumes are written

    name = Path(path).name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else None
    if suffix is None:
        raise ValueError(f"{path}: NIfTI output must end in .nii or .nii.gz")
    volume = np.asarray(array)
    if volume.dtype == bool:
        volume = volume.astype(np.uint8)
    if volume.ndim < 2 or volume.size == 0:
        raise ValueError(f"array must be a non-empty image with at least 2 dimensions, got shape {volume.shape}")
    if array_order == "zyx":
        if volume.ndim != 3:
            raise ValueError(f"array_order='zyx' needs a 3-D array, got shape {volume.shape}")
        volume = np.ascontiguousarray(volume.transpose(2, 1, 0))
    elif array_order != "xyz":
        raise ValueError(f"array_order must be 'xyz' or 'zyx', got {array_order!r}")
    if np.issubdtype(volume.dtype, np.floating) and not np.all(np.isfinite(volume)):
        raise ValueError("array contains NaN or infinite values")

    if isinstance(reference, (str, Path)):
        reference = nib.load(str(reference))
    if hasattr(reference, "affine") and hasattr(reference, "header"):
        if tuple(volume.shape[:3]) != tuple(reference.shape[:3]):
            raise ValueError(
                f"array shape {volume.shape} (as x, y, z) does not match the reference's {reference.shape}; "
                "check array_order"
            )
        header = reference.header.copy()
        header.set_slope_inter(1.0, 0.0)  # the reference's scaling must not rescale our values
        image = nib.Nifti1Image(volume, reference.affine, header=header, dtype=volume.dtype)
    else:
        affine = np.asarray(reference, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"reference must be a NIfTI image, a path to one, or a finite 4x4 affine; got shape {affine.shape}")
        image = nib.Nifti1Image(volume, affine, dtype=volume.dtype)

    with _atomic_destination(path, suffix=suffix) as temporary:
        nib.save(image, str(temporary))
    return Path(path)
