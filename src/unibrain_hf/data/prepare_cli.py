"""``unibrain prepare``: NIfTI subject folders + reports -> RadGenome parquet cohort.

    unibrain prepare INPUT_DIR --reports reports.csv OUT_DIR
    unibrain prepare INPUT_DIR --reports reports.json OUT_DIR --hash-ids --salt "$SALT" \\
        --keep-pattern '(GLI|MEN|MET)' --split 0.8 0.1 0.1 --seed 0 --overwrite

Input layout, report formats, preprocessing and de-identification are described in
:mod:`unibrain_hf.data.prepare`. Prints a summary with every skipped file and why; exits 2
(writing nothing) when no subject is usable or the inputs are invalid, naming the flag or file.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UniBrainError
from ..utils.cli_types import positive_int

#: Exit status for input that cannot be used (argparse uses the same code for bad flags).
EXIT_BAD_INPUT = 2
#: How error messages name :func:`prepare_cohort`'s arguments on this command line.
FLAG_NAMES = {"input_dir": "INPUT_DIR", "reports": "--reports", "out_dir": "OUT_DIR", "split_fractions": "--split",
              "keep_pattern": "--keep-pattern", "hash_subject_ids": "--hash-ids",
              "subjects_per_file": "--subjects-per-file", "nifti_dir": "--nifti-out", "overwrite": "--overwrite"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", metavar="INPUT_DIR",
                        help="one folder per subject, one NIfTI per sequence (<anything>-<code>.nii.gz)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="cohort directory to write (chunk_<k>.parquet + split file)")
    parser.add_argument("--reports", required=True, metavar="FILE",
                        help="reports as .csv (subject_id, impression, diagnosis, finding_<code>) or .json")
    parser.add_argument("--split", nargs=3, type=float, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                        help="subject fractions per split, summing to 1 (default: 0.8 0.1 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subject shuffle behind the split (default: 0)")
    parser.add_argument("--hash-ids", action="store_true",
                        help="replace subject ids by HMAC-SHA-256(salt, id) prefixes")
    parser.add_argument("--salt", default=None,
                        help="hash key; the same salt gives the same ids (default: random, ids differ per run)")
    parser.add_argument("--keep-pattern", default=None, metavar="REGEX",
                        help="with --hash-ids, keep this regex match of the original id (its first group if any) "
                             "as a prefix, e.g. '(GLI|MEN|MET)'")
    parser.add_argument("--subjects-per-file", type=positive_int, default=5,
                        help="subjects per parquet chunk (default: 5)")
    parser.add_argument("--nifti-out", default=None, metavar="DIR",
                        help="also write the preprocessed volumes as de-identified NIfTI files here, for review")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR (and --nifti-out) if not empty")


def run(args: argparse.Namespace) -> int:
    from .prepare import prepare_cohort  # nibabel, scipy: only once the command runs

    try:
        report = prepare_cohort(
            args.input_dir, args.reports, args.out_dir, split_fractions=tuple(args.split), seed=args.seed,
            hash_subject_ids=args.hash_ids, salt=args.salt, overwrite=args.overwrite,
            keep_pattern=args.keep_pattern, subjects_per_file=args.subjects_per_file, nifti_dir=args.nifti_out,
            argument_names=FLAG_NAMES)
    except UniBrainError as exc:
        print(f"unibrain prepare: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # e.g. no permission to write next to OUT_DIR: nothing was written
        print(f"unibrain prepare: error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
