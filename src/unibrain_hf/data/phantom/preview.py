"""Contact sheet of phantom subjects: one row per subject, one column per sequence.

Each tile is the axial slice through the widest part of the subject's lesion (the middle
of the head for normal subjects), windowed like the training data (0.5-99.5 percentiles
of the volume's non-zero voxels). The last column overlays the lesion labels on the
first sequence (1 red, 2 yellow, 3 cyan). Missing sequences are left dark.

    python -m unibrain_hf.data.phantom.preview out.png --size 4
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..schema import SubjectRecord
from .classes import ALL_SEQUENCES

TILE = 128
HEADER = 18
LABEL_WIDTH = 150
LABEL_COLOURS = {1: (230, 40, 40), 2: (240, 220, 40), 3: (40, 220, 240)}


def lesion_slice(record: SubjectRecord) -> int:
    """Index of the axial slice with the largest lesion area (the middle slice of the head if none)."""
    if record.mask is not None and (record.mask > 0).any():
        return int(np.argmax((record.mask > 0).sum(axis=(1, 2))))
    first = next(iter(record.volumes.values()))
    slices = np.nonzero((first > 0).any(axis=(1, 2)))[0]
    return int(slices[len(slices) // 2]) if len(slices) else first.shape[0] // 2


def window(volume: np.ndarray, image: np.ndarray) -> np.ndarray:
    """uint8 display of ``image`` with the volume's 0.5-99.5 percentile window."""
    foreground = volume[volume > 0]
    if foreground.size == 0:
        return np.zeros(image.shape, dtype=np.uint8)
    lo, hi = np.percentile(foreground, [0.5, 99.5])
    scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return (scaled * 255).astype(np.uint8)


@dataclass
class PreviewRow:
    """What the contact sheet shows of one subject: windowed slices, so whole volumes need not be kept."""

    subject_id: str
    slices: dict[str, np.ndarray]  # sequence -> uint8 (y, x)
    labels: np.ndarray | None  # lesion labels of the slice


def preview_row(record: SubjectRecord) -> PreviewRow:
    k = lesion_slice(record)
    slices = {code: window(volume, volume[k]) for code, volume in record.volumes.items()}
    labels = None if record.mask is None else record.mask[k].copy()
    return PreviewRow(record.subject_id, slices, labels)


def _tile(array: np.ndarray) -> Image.Image:
    """Fit a 2-D uint8 (or RGB) array into a TILE x TILE square, keeping its aspect ratio."""
    image = Image.fromarray(array)
    scale = TILE / max(image.size)
    image = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                         Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (TILE, TILE))
    canvas.paste(image.convert("RGB"), ((TILE - image.size[0]) // 2, (TILE - image.size[1]) // 2))
    return canvas


def contact_sheet(subjects: list[SubjectRecord | PreviewRow], sequences=ALL_SEQUENCES) -> Image.Image:
    """One row per subject, one column per sequence plus a label overlay."""
    if not subjects:
        raise ValueError("a contact sheet needs at least one subject")
    rows = [s if isinstance(s, PreviewRow) else preview_row(s) for s in subjects]
    columns = list(sequences) + ["mask"]
    sheet = Image.new("RGB", (LABEL_WIDTH + TILE * len(columns), HEADER + TILE * len(rows)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, name in enumerate(columns):
        draw.text((LABEL_WIDTH + c * TILE + 4, 3), name, fill=(230, 230, 230), font=font)
    for r, row in enumerate(rows):
        top = HEADER + r * TILE
        draw.text((4, top + TILE // 2 - 6), row.subject_id, fill=(230, 230, 230), font=font)
        for c, code in enumerate(sequences):
            if code in row.slices:
                sheet.paste(_tile(row.slices[code]), (LABEL_WIDTH + c * TILE, top))
        overlay = np.repeat(next(iter(row.slices.values()))[..., None], 3, axis=2)
        if row.labels is not None:
            for label, colour in LABEL_COLOURS.items():
                hit = row.labels == label
                overlay[hit] = (0.45 * overlay[hit] + 0.55 * np.asarray(colour)).astype(np.uint8)
        sheet.paste(_tile(overlay), (LABEL_WIDTH + len(sequences) * TILE, top))
    return sheet


def write_preview(subjects: list[SubjectRecord | PreviewRow], path: str | os.PathLike) -> Path:
    """Save the contact sheet as a PNG (written to a temporary file, then renamed)."""
    path = Path(path)
    sheet = contact_sheet(subjects)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


if __name__ == "__main__":
    import argparse

    from .classes import CLASS_ORDER
    from .generator import generate_subject

    parser = argparse.ArgumentParser(description="contact sheet of one subject per phantom class")
    parser.add_argument("out", help="PNG path")
    parser.add_argument("--size", type=float, default=4.0, help="voxel size in mm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    subjects = [generate_subject(i, args.seed, args.size) for i in range(len(CLASS_ORDER))]
    print(write_preview(subjects, args.out))
