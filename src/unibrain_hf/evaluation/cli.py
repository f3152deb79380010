"""``unibrain eval``: score a pipeline on a cohort split (generation / diagnosis / unified; protocol in docs/EVALUATION.md).

Writes into ``--out``: ``metrics.json`` (numbers, baselines, per-subject records, settings),
``summary.md`` (Markdown tables that put each metric next to its baseline), ``panels/*.png``,
``images/*.png`` (2-D imputations, reusable with ``--replaced-by``), ``nifti/*.nii.gz`` (3-D mode)
and ``predictions.jsonl`` (text tasks). Bad input (unknown split or modality, a cohort without
the requested sequences, an empty split) exits with code 2 and says what is available.

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

from ..utils.cli_types import non_negative_int, positive_int

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
    return None


def run(args: argparse.Namespace) -> int:
    problem = _check_task_flags(args)
    if problem:
        return _fail(problem)
    out_dir = Path(args.out)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not args.overwrite)):
        return _fail(f"{out_dir} exists and is not an empty directory (pass --overwrite to write into it)")
    pipeline_dir = Path(args.pipeline)
    if not (pipeline_dir / "model_index.json").is_file():
        return _fail(f"{pipeline_dir} is not a pipeline directory (no model_index.json)")

    from .diagnosis import DiagnosisRules
    from .tasks import DIAGNOSIS_ALSO_REQUIRED, EvaluationInputError, index_cohort, run_task, select_subjects

    rules = None
    if args.rules is not None:
        try:
            rules = DiagnosisRules.from_json(args.rules)
        except (OSError, ValueError) as error:
            return _fail(f"--rules {args.rules}: {error}")
    try:
        # Checking the cohort first reports a wrong split, cohort or modality before the model is loaded.
        also_required = DIAGNOSIS_ALSO_REQUIRED if args.task == "diagnosis" else ()
        select_subjects(index_cohort(args.cohort, args.split), args.modalities_in, args.modalities_out,
                        also_required=also_required)
    except EvaluationInputError as error:
        return _fail(str(error))

    from ..pipelines.pipeline_unibrain import UniBrainPipeline

    pipe = UniBrainPipeline.from_pretrained(str(pipeline_dir))
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
    except EvaluationInputError as error:
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
