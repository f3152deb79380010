"""Generate phantom subjects and whole cohorts in the RadGenome parquet schema.

One subject = the class table entry (name, sequences) + a warped MNI anatomy + the
class's lesions + tissue values jittered for the subject + the signal model for each of
its sequences + a templated report. Every random choice comes from streams derived from
``(seed, index)``, so a subject is byte-identical whenever it is regenerated, on its own
or inside any cohort.

    python -m unibrain_hf.data.phantom.generator runs/phantom --subjects 6 --size 4
    python -c "from unibrain_hf.data.phantom import generate_subject as g; print(g(0, seed=0, voxel_size=4).findings)"
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..schema import SPLIT_FILE_NAME, SubjectRecord, write_cohort
from .anatomy import LPI_DIRECTION, AnatomyParams, SubjectAnatomy, build_anatomy, check_voxel_size, output_grid
from .classes import CLASS_ORDER, PhantomClass, resolve_class
from .lesions import LESION_MODELS, LesionResult
from .reports import write_report
from .signal import simulate_images
from .template import load_template
from .tissue import check_field_strength, subject_tissues

PHANTOM_VERSION = 2  # 2: acute infarcts efface the sulcal CSF in their territory (dark on ADC)
INFO_FILE_NAME = "phantom_info.json"
PREVIEW_FILE_NAME = "preview.png"
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
_SPLIT_STREAM = 0x5B1D  # keeps the split's random stream apart from every subject's


@dataclass
class PhantomSubject:
    """A generated subject with the ground truth behind it (for tests and analysis)."""

    record: SubjectRecord
    phantom_class: PhantomClass
    anatomy: SubjectAnatomy
    lesions: LesionResult


def _check_non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_subject_count(num_subjects) -> int:
    if isinstance(num_subjects, bool) or not isinstance(num_subjects, numbers.Integral) or num_subjects <= 0:
        raise ValueError(f"number of subjects must be a positive integer, got {num_subjects!r}")
    return int(num_subjects)


def _label_map(compartments, shape) -> tuple[np.ndarray, np.ndarray]:
    """(labels, lesion fraction): the dominant lesion label where lesions fill >= half a voxel."""
    total = np.zeros(shape, dtype=np.float32)
    if not compartments:
        return total.copy(), total
    labels = sorted({c.label for c in compartments})
    per_label = np.zeros((len(labels),) + tuple(shape), dtype=np.float32)
    for c in compartments:
        per_label[labels.index(c.label)] += c.fraction
    total = per_label.sum(axis=0)
    threshold = 0.5
    if not (total >= threshold).any() and total.max() > 0:
        # A lesion smaller than a voxel still gets its most-involved voxels labelled.
        threshold = 0.5 * float(total.max())
    dominant = np.asarray(labels, dtype=np.float32)[np.argmax(per_label, axis=0)]
    return np.where(total >= threshold, dominant, np.float32(0.0)).astype(np.float32), total


def _mix_compartments(anatomy: SubjectAnatomy, tissues: dict, lesions: LesionResult):
    """(tissue, fraction) pairs: normal tissues with the lesions carved out, then the lesions."""
    normal = {"gm": anatomy.gm, "wm": anatomy.wm, "csf": anatomy.csf}
    for name, fraction in anatomy.extracranial.items():
        normal[name] = normal[name] + fraction if name in normal else fraction
    for comp in lesions.compartments:
        if comp.source is not None:
            normal[comp.source] = np.clip(normal[comp.source] - comp.fraction, 0.0, 1.0)
    masses = [c for c in lesions.compartments if c.source is None]
    mass_total = sum((c.fraction for c in masses), np.zeros(anatomy.grid.shape, np.float32))
    overfull = np.maximum(mass_total, 1.0)
    if float(overfull.max()) > 1.0:
        for c in masses:
            c.fraction = c.fraction / overfull
        mass_total = np.minimum(mass_total, 1.0)
    room = 1.0 - mass_total
    pairs = [(tissues[name], fraction * room) for name, fraction in normal.items()]
    for comp in lesions.compartments:
        pairs.append((comp.tissue, comp.fraction * room if comp.source is not None else comp.fraction))
    return pairs


def simulate_subject(index: int, seed: int, voxel_size: float = 1.5, field_strength: float = 3.0,
                     lesion_class: str | None = None) -> PhantomSubject:
    """Generate subject ``index`` of the cohort with random seed ``seed``, keeping the ground truth."""
    index = _check_non_negative_int(index, "subject index")
    seed = _check_non_negative_int(seed, "seed")
    voxel_size = check_voxel_size(voxel_size)
    field = check_field_strength(field_strength)
    phantom_class = resolve_class(lesion_class, index)
    anatomy_rng, tissue_rng, lesion_rng, signal_rng, report_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(5))

    template = load_template()
    grid = output_grid(voxel_size)
    tissues = subject_tissues(field, tissue_rng)
    params = AnatomyParams.draw(anatomy_rng)
    model = LESION_MODELS[phantom_class.key](lesion_rng, template, tissues, field)
    anatomy = build_anatomy(grid, params, template, anatomy_rng, pushes=model.pushes,
                            scalp=not phantom_class.skull_stripped, ventricles=model.needs_ventricle_distance)
    lesions = model.render(anatomy)

    mask, lesion_total = _label_map(lesions.compartments, grid.shape)
    foreground = None
    if phantom_class.skull_stripped:
        foreground = (anatomy.brain >= 0.5) | (lesion_total >= 0.5)
        mask = np.where(foreground, mask, np.float32(0.0))
    images = simulate_images(_mix_compartments(anatomy, tissues, lesions), phantom_class.sequences, tissues["wm"],
                             signal_rng, voxel_size, foreground)

    anatomy_facts = {"volume_loss": params.atrophy > 0.2 or params.ventricle_scale > 1.35}
    report = write_report(phantom_class.key, lesions.facts, anatomy_facts, phantom_class.sequences, report_rng)
    record = SubjectRecord(
        subject_id=phantom_class.subject_id(index),
        volumes={code: images[code] for code in phantom_class.sequences},
        findings=report.findings,
        impression=report.impression,
        disease=[phantom_class.disease],
        global_finding=report.global_finding,
        spacing=grid.spacing,
        direction=LPI_DIRECTION,
        mask=mask.astype(np.float32),
    )
    record.validate()
    return PhantomSubject(record, phantom_class, anatomy, lesions)


def generate_subject(index: int, seed: int, voxel_size: float = 1.5, field_strength: float = 3.0,
                     lesion_class: str | None = None) -> SubjectRecord:
    """One phantom subject as a :class:`SubjectRecord`.

    Args:
        index: position in the cohort (0-based); sets the subject number in its id and,
            unless ``lesion_class`` is given, its class (classes cycle in
            :data:`~unibrain_hf.data.phantom.classes.CLASS_ORDER`).
        seed: cohort seed; the same (seed, index) always gives the same bytes.
        voxel_size: isotropic voxel size in mm (1-8).
        field_strength: 1.5 or 3 (tesla); selects the T1/T2 table columns.
        lesion_class: ``glioma``, ``meningioma``, ``metastasis``, ``stroke``, ``wmh`` or ``normal``.
    """
    return simulate_subject(index, seed, voxel_size, field_strength, lesion_class).record


def stratified_split(subject_classes: list[tuple[str, str]], seed: int) -> dict[str, list[str]]:
    """~70/15/15 train/val/test split of (subject_id, class) pairs, stratified by class.

    Each class's subjects are shuffled, the classes are interleaved round-robin, and the
    interleaved order is cut into test, val, train, so every split sees as many classes as
    its size allows. Cohorts of three or more subjects get at least one val and one test subject.
    """
    n = len(subject_classes)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM]))
    by_class: dict[str, list[str]] = {}
    for subject, key in subject_classes:
        by_class.setdefault(key, []).append(subject)
    queues = []
    for key in sorted(by_class, key=lambda k: CLASS_ORDER.index(k) if k in CLASS_ORDER else len(CLASS_ORDER)):
        members = list(by_class[key])
        queues.append([members[i] for i in rng.permutation(len(members))])
    interleaved = []
    while any(queues):
        for queue in queues:
            if queue:
                interleaved.append(queue.pop(0))
    n_test = int(math.floor(SPLIT_FRACTIONS["test"] * n + 0.5))
    n_val = int(math.floor(SPLIT_FRACTIONS["val"] * n + 0.5))
    if n >= 3:
        n_test, n_val = max(n_test, 1), max(n_val, 1)
    order = {subject: i for i, (subject, _) in enumerate(subject_classes)}
    test = sorted(interleaved[:n_test], key=order.get)
    val = sorted(interleaved[n_test:n_test + n_val], key=order.get)
    train = sorted(interleaved[n_test + n_val:], key=order.get)
    return {"train": train, "val": val, "test": test}


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_cohort(out_dir: str | os.PathLike, num_subjects: int, seed: int, voxel_size: float = 1.5,
                    field_strength: float = 3.0, preview: bool = False, overwrite: bool = False,
                    subjects_per_file: int = 5, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write ``num_subjects`` phantom subjects to ``out_dir`` in the RadGenome parquet schema.

    Writes ``chunk_<k>.parquet`` files and the train/val/test split file atomically (see
    :func:`~unibrain_hf.data.schema.write_cohort`), then ``phantom_info.json`` (the
    parameters and each subject's class) and, with ``preview=True``, ``preview.png``.
    ``progress(done, total, subject_id)`` is called after each subject.
    """
    num_subjects = check_subject_count(num_subjects)
    seed = _check_non_negative_int(seed, "seed")
    voxel_size = check_voxel_size(voxel_size)
    field = check_field_strength(field_strength)
    if isinstance(subjects_per_file, bool) or not isinstance(subjects_per_file, numbers.Integral) or subjects_per_file <= 0:
        raise ValueError(f"subjects_per_file must be a positive integer, got {subjects_per_file!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite to replace it)")

    classes = [resolve_class(None, i) for i in range(num_subjects)]
    subject_classes = [(cls.subject_id(i), cls.key) for i, cls in enumerate(classes)]
    split = stratified_split(subject_classes, seed)
    preview_samples = []
    if preview:
        from .preview import preview_row, write_preview

    def records():
        for i in range(num_subjects):
            record = generate_subject(i, seed, voxel_size, field)
            if preview and i < len(CLASS_ORDER):
                preview_samples.append(preview_row(record))
            if progress is not None:
                progress(i + 1, num_subjects, record.subject_id)
            yield record

    write_cohort(records(), out_dir, split=split, subjects_per_file=subjects_per_file, overwrite=overwrite)
    info = {
        "generator": "unibrain_hf.data.phantom", "version": PHANTOM_VERSION, "num_subjects": num_subjects,
        "seed": seed, "voxel_size_mm": voxel_size, "field_strength_t": field, "split_file": SPLIT_FILE_NAME,
        "subjects": [{"subject_id": sid, "class": key, "sequences": list(cls.sequences)}
                     for (sid, key), cls in zip(subject_classes, classes)],
    }
    _write_text_atomically(out_dir / INFO_FILE_NAME, json.dumps(info, indent=1))
    if preview:
        write_preview(preview_samples, out_dir / PREVIEW_FILE_NAME)
    return out_dir


if __name__ == "__main__":
    import argparse
    import sys

    from .. import phantom_cli

    parser = argparse.ArgumentParser(prog="python -m unibrain_hf.data.phantom.generator",
                                     description="write a phantom cohort (the same as `unibrain phantom`)")
    phantom_cli.add_arguments(parser)
    sys.exit(phantom_cli.run(parser.parse_args()))
