"""``unibrain phantom``: write a synthetic multi-contrast brain MRI cohort.

Subjects cycle through glioma, meningioma, metastasis, stroke, white-matter
hyperintensities and normal controls; each has the sequences its RadGenome source has,
a lesion mask and a radiology report. Output: ``chunk_<k>.parquet`` in the RadGenome
schema, ``train_val_test_split_subject.json`` (~70/15/15, stratified by class),
``phantom_info.json`` and, with ``--preview``, ``preview.png``.

    unibrain phantom out/cohort --subjects 12 --seed 0
    unibrain phantom runs/tiny --subjects 6 --seed 1 --size 4 --preview    # coarse: a few seconds
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import UniBrainError
from ..utils.atomic import check_output_dir
from ..utils.cli_types import non_negative_int, positive_int
from .phantom.tissue import FIELD_STRENGTHS, check_field_strength


def _voxel_size(text: str) -> float:
    from .phantom.anatomy import check_voxel_size

    try:
        size = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a voxel size in mm, got {text!r}") from None
    try:
        return check_voxel_size(size)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _field_strength(text: str) -> float:
    try:
        return check_field_strength(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="directory to write the cohort into (must be empty unless --overwrite)")
    parser.add_argument("--subjects", type=positive_int, default=12, metavar="N",
                        help="number of subjects; classes cycle so N >= 6 covers all six (default 12)")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                        help="random seed; the same seed gives byte-identical volumes and text (default 0)")
    parser.add_argument("--size", type=_voxel_size, default=1.5, metavar="MM",
                        help="isotropic voxel size in mm (1-8); 3-4 mm gives ~45-70 px slices for quick runs "
                             "(default 1.5)")
    parser.add_argument("--field", type=_field_strength, default=3.0, metavar="T",
                        help=f"field strength in tesla, one of {', '.join(f'{f:g}' for f in FIELD_STRENGTHS)}; "
                             "selects the T1/T2 relaxation values (default 3)")
    parser.add_argument("--subjects-per-file", type=positive_int, default=5, metavar="K",
                        help="subjects per parquet chunk (default 5, as RadGenome)")
    parser.add_argument("--preview", action="store_true",
                        help="also write preview.png, a contact sheet of the first subjects")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    parser.add_argument("--quiet", action="store_true", help="print only the output directory")


def run(args: argparse.Namespace) -> int:
    from .phantom.generator import generate_cohort

    try:  # before any subject is drawn, in this command's own words
        check_output_dir(args.out_dir, "OUT_DIR", args.overwrite, "--overwrite")
    except UniBrainError as exc:
        print(f"unibrain phantom: error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()

    def progress(done: int, total: int, subject_id: str) -> None:
        if not args.quiet:
            print(f"[{done}/{total}] {subject_id}", file=sys.stderr, flush=True)

    try:
        out = generate_cohort(args.out_dir, args.subjects, args.seed, voxel_size=args.size, field_strength=args.field,
                              preview=args.preview, overwrite=args.overwrite,
                              subjects_per_file=args.subjects_per_file, progress=progress)
    except (FileExistsError, ValueError) as exc:
        print(f"unibrain phantom: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        elapsed = time.perf_counter() - start
        print(f"wrote {args.subjects} subjects ({args.size:g} mm, {args.field:g} T) in {elapsed:.1f} s", file=sys.stderr)
    print(out)
    return 0
