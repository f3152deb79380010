"""``unibrain eval``: score a pipeline on a cohort split (generation / diagnosis / unified; protocol in docs/EVALUATION.md).

Writes into ``--out``: ``metrics.json`` (numbers, baselines, per-subject records, settings),
``summary.md`` (Markdown tables that put each metric next to its baseline), ``panels/*.png``,
``images/*.png`` (2-D imputations, reusable with ``--replaced-by``), ``nifti/*.nii.gz`` (3-D mode)
and ``predictions.jsonl`` (text tasks). Bad input (a missing or damaged file, an unknown split or
modality, a cohort without the requested sequences, an empty split, a device this machine lacks)
exits with code 2 before the model is loaded, naming the flag and saying what is available.

    unibrain eval --pipeline out/pipeline --cohort out/cohort --task generation --modalities-in t1n t2w --modalities-out t2f --out out/eval/gen
    unibrain eval --pipeline out/pipeline --cohort out/cohort --task generation --modalities-in t1n --modalities-out t2f --mode 3d --slice-stride 2 --out out/eval/gen3d
    unibrain eval --pipeline out/pipeline --cohort out/cohort --task diagnosis --modalities-in t1n t2f --replaced-by out/eval/gen --out out/eval/diag
    unibrain eval --pipeline out/pipeline --cohort out/cohort --task unified --modalities-in t1n --modalities-out t2w t2f --out out/eval/unified
    # tiny CPU run: add --steps 2 --max-new-tokens 16 --max-subjects 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputFileNotFoundError, InvalidInputError, UniBrainError
from ..utils.atomic import check_output_dir
from ..utils.cli_types import non_negative_int, positive_int
from ..utils.readers import check_pipeline_directory, existing_path, read_json

TASKS = ("generation", "diagnosis", "unified")
#: Exit status for input the evaluation cannot use (argparse uses the same code for bad flags).
EXIT_BAD_INPUT = 2


def _steps(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("--steps must be at least 2 (N grid points give N - 1 sampler steps)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, metavar="DIR",
                        help="a UniBrainPipeline directory (save_pretrained / unibrain convert output)")
    parser.add_argument("--cohort", required=True, metavar="DIR",
                        help="a RadGenome-schema cohort: *.parquet + train_val_test_split_subject.json")
    parser.add_argument("--task", required=True, choices=TASKS,
                        help="generation: impute and score PSNR/SSIM; diagnosis: class-word accuracy; "
                             "unified: impute + impression + diagnosis in one context")
    parser.add_argument("--modalities-in", nargs="+", required=True, metavar="CODE",
                        help="input sequences, e.g. t1n t2w (a subject must have all of them)")
    parser.add_argument("--modalities-out", nargs="+", default=[], metavar="CODE",
                        help="sequences to impute (generation, unified), e.g. t2f")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty unless --overwrite)")
    parser.add_argument("--split", default="test", help="split of the cohort's split file to evaluate (default test)")
    parser.add_argument("--mode", choices=("2d", "3d"), default="2d",
                        help="generation only: 2d = the middle lesion slice; 3d = every --slice-stride-th axial "
                             "slice, scored as one volume and written as NIfTI (default 2d)")
    parser.add_argument("--slice-stride", type=positive_int, default=1, metavar="N",
                        help="3-D mode: keep every N-th axial slice (default 1)")
    parser.add_argument("--sample-time", type=positive_int, default=1, metavar="K",
                        help="generation only: average K generations per slice pixel-wise, an ensemble (default 1)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="base seed; each subject and sample gets a seed derived from it (default 0)")
    parser.add_argument("--steps", type=_steps, default=10, metavar="N",
                        help="flow-sampler grid points per image, as the reference's 10 (default 10)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                        help="text budget per answer (default: the reference's 512 / 800 tokens)")
    parser.add_argument("--max-subjects", type=positive_int, default=None, metavar="N",
                        help="evaluate only the first N eligible subjects")
    parser.add_argument("--replaced-by", default=None, metavar="DIR",
                        help="diagnosis only: take input images from DIR/<subject>-<modality>.png, or from the "
                             "images/ of a previous 2-D generation run's --out")
    parser.add_argument("--rules", default=None, metavar="JSON",
                        help='diagnosis class rules: {"rules": {"-GLI-": "Gli", ...}, "fallback": "Degeneration"} '
                             "(default: the reference's rules)")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                        help="3-D mode: slices denoised together (default 8)")
    parser.add_argument("--device", default=None, help="torch device for the pipeline, e.g. cuda (default: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; print only the summary path")


def _fail(message: str) -> int:
    print(f"unibrain eval: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _check_task_flags(args) -> str | None:
    """The flag combinations that make no sense for the chosen task, as one message (or None)."""
    if args.task in ("generation", "unified") and not args.modalities_out:
        return f"--task {args.task} needs --modalities-out (the sequences to impute)"
    if args.task == "diagnosis" and args.modalities_out:
        return "--task diagnosis generates text only; drop --modalities-out (or use --task unified)"
    if args.task != "generation":
        if args.mode != "2d":
            return f"--mode 3d is for --task generation; {args.task} uses the middle lesion slice"
        if args.sample_time != 1:
            return f"--sample-time is for --task generation; {args.task} generates one sample"
    if args.replaced_by is not None and args.task != "diagnosis":
        return "--replaced-by is for --task diagnosis"
    if args.max_new_tokens is not None and args.task == "generation":
        return "--max-new-tokens is for the text tasks (diagnosis, unified)"
    for flag, codes in (("--modalities-in", args.modalities_in), ("--modalities-out", args.modalities_out)):
        repeated = sorted({code for code in codes if codes.count(code) > 1})
        if repeated:
            return f"{flag} lists {' '.join(repeated)} more than once"
    both = [code for code in args.modalities_out if code in args.modalities_in]
    if both:
        return f"{' '.join(both)} is in both --modalities-in and --modalities-out; a target must be a missing sequence"
    return None


def _check_device(text: str | None) -> None:
    """``--device`` names a device torch knows and this machine has (checked before the model loads)."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"--device {text!r} is not a torch device; use e.g. cpu, cuda or cuda:1") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise InvalidInputError(f"--device {text}: this machine has no {device.type} device (torch "
                                f"{torch.__version__}); use --device cpu or run where one is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidInputError(f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s)")


def _check_paths(args) -> None:
    """Every path flag, before the cohort is indexed or the pipeline loaded (errors name the flag)."""
    check_output_dir(args.out, "--out", args.overwrite, "--overwrite")
    pipeline_dir = existing_path(args.pipeline, "--pipeline", kind="directory")
    if not (pipeline_dir / "model_index.json").is_file():
        raise InputFileNotFoundError(f"--pipeline {pipeline_dir} has no model_index.json; it is not a pipeline "
                                     f"directory (one written by save_pretrained or `unibrain convert`)")
    check_pipeline_directory(pipeline_dir, "--pipeline")
    existing_path(args.cohort, "--cohort", kind="directory")
    if args.rules is not None:
        read_json(args.rules, "--rules")
    if args.replaced_by is not None:
        replaced_by = existing_path(args.replaced_by, "--replaced-by", kind="directory")
        if not any(replaced_by.glob("*.png")) and not any(replaced_by.glob("images/*.png")):
            raise InputFileNotFoundError(f"--replaced-by {replaced_by} holds no <subject>-<modality>.png images "
                                         f"(nor an images/ folder of them, as a 2-D generation run writes)")
    _check_device(args.device)


def _check_cohort(args, index_cohort, select_subjects, also_required) -> None:
    """The split and the modality codes exist in the cohort (metadata only, no volume is read)."""
    from ..data.radgenome import load_split
    from ..data.schema import SPLIT_FILE_NAME
    from ..data.templates import CANONICAL_MODALITIES

    split_file = Path(args.cohort) / SPLIT_FILE_NAME
    splits = load_split(split_file)
    if args.split not in splits:
        raise InvalidInputError(f"--split {args.split!r} is not a split of {split_file}; it has "
                                f"{', '.join(f'{name} ({len(ids)} subjects)' for name, ids in splits.items())}")
    index = index_cohort(args.cohort, args.split)
    known = list(dict.fromkeys([*CANONICAL_MODALITIES, *index.all_modalities]))
    for flag, codes in (("--modalities-in", args.modalities_in), ("--modalities-out", args.modalities_out)):
        unknown = [code for code in codes if code not in known]
        if unknown:
            raise InvalidInputError(f"{flag} {' '.join(unknown)}: not a modality code; known codes are "
                                    f"{', '.join(CANONICAL_MODALITIES)} and this cohort has "
                                    f"{', '.join(index.all_modalities)}")
    select_subjects(index, args.modalities_in, args.modalities_out, also_required=also_required)


def run(args: argparse.Namespace) -> int:
    problem = _check_task_flags(args)
    if problem:
        return _fail(problem)

    from .diagnosis import DiagnosisRules
    from .tasks import DIAGNOSIS_ALSO_REQUIRED, EvaluationInputError, index_cohort, run_task, select_subjects

    rules = None
    try:
        _check_paths(args)
        if args.rules is not None:
            try:
                rules = DiagnosisRules.from_json(args.rules)
            except (OSError, ValueError) as error:
                raise InvalidInputError(f"--rules {args.rules}: {error}") from error
        # Checking the cohort first reports a wrong split, cohort or modality before the model is loaded.
        also_required = DIAGNOSIS_ALSO_REQUIRED if args.task == "diagnosis" else ()
        _check_cohort(args, index_cohort, select_subjects, also_required)
    except (EvaluationInputError, UniBrainError) as error:
        return _fail(str(error))

    from ..pipelines.pipeline_unibrain import UniBrainPipeline

    out_dir = Path(args.out)
    try:
        pipe = UniBrainPipeline.from_pretrained(str(args.pipeline))
    except UniBrainError as error:
        return _fail(f"--pipeline {args.pipeline}: {error}")
    if args.device:
        pipe = pipe.to(args.device)
    # One bar over subjects is enough; the pipeline's per-image bars would interleave with it.
    pipe.set_progress_bar_config(disable=True)
    common = dict(split=args.split, seed=args.seed, out_dir=out_dir, max_subjects=args.max_subjects,
                  progress=not args.quiet)
    if args.task == "generation":
        kwargs = dict(modalities_in=args.modalities_in, modalities_out=args.modalities_out, mode=args.mode,
                      sample_time=args.sample_time, slice_stride=args.slice_stride, num_inference_steps=args.steps,
                      batch_size=args.batch_size)
    elif args.task == "diagnosis":
        kwargs = dict(modalities_in=args.modalities_in, replaced_by=args.replaced_by, rules=rules,
                      max_new_tokens=args.max_new_tokens)
    else:
        kwargs = dict(modalities_in=args.modalities_in, modalities_out=args.modalities_out, rules=rules,
                      max_new_tokens=args.max_new_tokens, num_inference_steps=args.steps)
    try:
        result = run_task(args.task, pipe, args.cohort, **common, **kwargs)
    except (EvaluationInputError, UniBrainError) as error:
        return _fail(str(error))
    summary = out_dir / "summary.md"
    if args.quiet:
        print(summary)
    else:
        print(summary.read_text(encoding="utf-8"))
        print(f"wrote {out_dir}/ (metrics.json, summary.md, panels/); {len(result.per_subject)} subject(s) scored")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unibrain eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
