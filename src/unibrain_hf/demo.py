"""The main job: a synthetic cohort → a small UniBrain trained through all three stages → a report.

    unibrain demo --out runs/demo            # ~20 minutes on 2 CPU cores
    unibrain demo --out runs/demo --quick    # a few steps of everything (a smoke test, ~3 minutes)

What it does, honestly: it generates a phantom cohort (physics-based multi-contrast MRI on real
MNI152 anatomy with five lesion classes and templated reports), builds a *small* starting
pipeline (a byte-level tokenizer and a small VAE fitted on the cohort, a randomly initialised
MoT model of a few million parameters), trains it through UniBrain's three stages on CPU —
self-alignment, unified imputation + reasoning, dynamic-hidden-state self-forcing — and
evaluates it on held-out subjects. It demonstrates the whole system end to end; the numbers
say nothing about the 14B model on real data. The same stages with ``configs/bagel_*.yaml``
reproduce the paper's setting on GPUs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoPlan:
    subjects: int
    voxel_size: float
    vae_steps: int
    hidden_size: int
    layers: int
    align_steps: int
    unified_steps: int
    dhs_steps: int
    eval_subjects: int
    inference_steps: int


FULL = DemoPlan(subjects=120, voxel_size=4.0, vae_steps=600, hidden_size=128, layers=4, align_steps=500,
                unified_steps=4000, dhs_steps=250, eval_subjects=18, inference_steps=10)
QUICK = DemoPlan(subjects=12, voxel_size=6.0, vae_steps=10, hidden_size=32, layers=2, align_steps=3,
                 unified_steps=4, dhs_steps=2, eval_subjects=2, inference_steps=2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (cohort, runs, report)")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--seed", type=int, default=0)


def _stage_config(stage: str, out: Path, init: Path, cohort: Path, steps: int, image_size: int, weights=None,
                  learning_rate: float = 5e-4, seed: int = 0):
    from .train.config import load_config

    values = [f"stage={stage}", f"model.pretrained={init}", f"data.path={cohort}", f"data.image_size={image_size}",
              f"data.vae_max_size={image_size}", f"data.vae_min_size={image_size}",
              f"data.vit_max_size={image_size - image_size % 14}", "data.vit_min_size=28",
              "data.expected_num_tokens=1024", "data.max_num_tokens=1536", "data.max_num_tokens_per_sample=1536",
              "data.prefer_buffer_before=512", f"train.max_steps={steps}", f"train.save_every={max(steps, 1)}",
              f"train.warmup_steps={max(1, steps // 10)}", f"train.learning_rate={learning_rate}",
              "train.ema_decay=0.95", "train.log_every=10", f"train.output_dir={out / stage}",
              f"train.seed={seed}", f"train.data_seed={seed + 1}"]
    if weights is not None:
        values.append(f"model.weights={weights}")
    return load_config(None, values)


def _plot_losses(path: Path, curves: dict[str, list[dict]]) -> None:
    """Loss curves as a PNG with PIL only (no plotting dependency)."""
    from PIL import Image, ImageDraw

    width, height, margin = 900, 300, 40
    image = Image.new("RGB", (width, height * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    for row, (name, records) in enumerate(curves.items()):
        top = row * height
        values = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        draw.text((margin, top + 5), f"{name}: loss per step", fill="black")
        if len(values) < 2:
            continue
        low, high = min(v for _, v in values), max(v for _, v in values)
        span = (high - low) or 1.0
        last = values[-1][0]
        points = [(margin + (s - 1) / max(last - 1, 1) * (width - 2 * margin),
                   top + height - margin - (v - low) / span * (height - 2 * margin)) for s, v in values]
        draw.line(points, fill=(31, 119, 180), width=2)
        draw.text((5, top + margin - 5), f"{high:.3f}", fill="black")
        draw.text((5, top + height - margin - 5), f"{low:.3f}", fill="black")
    image.save(path)


def run(args) -> int:
    import torch

    from .data.phantom.generator import generate_cohort
    from .train.bootstrap import bootstrap_pipeline
    from .train.trainer import train

    plan = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    timings, started = {}, time.perf_counter()
    image_size = 64 if not args.quick else 48

    def step(name):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        print(f"[demo] {name} done ({timings[name]} s)", flush=True)

    cohort = out / "cohort"
    if not (cohort / "train_val_test_split_subject.json").exists():
        generate_cohort(cohort, plan.subjects, seed=args.seed, voxel_size=plan.voxel_size, preview=True,
                        overwrite=True)
    step("cohort")
    init = out / "init"
    if not (init / "model_index.json").exists():
        bootstrap_pipeline(cohort, init, image_size=image_size, hidden_size=plan.hidden_size, layers=plan.layers,
                           vae_steps=plan.vae_steps, seed=args.seed)
    step("bootstrap")
    runs = out / "runs"
    align = train(_stage_config("align", runs, init, cohort, plan.align_steps, image_size, learning_rate=1e-3,
                                seed=args.seed), progress=True)
    step("stage 1 (align)")
    align_weights = align.last_checkpoint  # a checkpoint folder: the stage-1 raw (trained, not EMA) weights
    unified = train(_stage_config("unified", runs, init, cohort, plan.unified_steps, image_size,
                                  weights=align_weights, learning_rate=8e-4, seed=args.seed), progress=True)
    step("stage 2 (unified)")
    dhs = train(_stage_config("dhs", runs, unified.export_dir, cohort, plan.dhs_steps, image_size,
                              learning_rate=2e-4, seed=args.seed), progress=True)
    step("stage 3 (dhs)")

    report = out / "report"
    report.mkdir(exist_ok=True)
    _plot_losses(report / "loss_curves.png", {"stage 1 align": align.losses, "stage 2 unified": unified.losses,
                                              "stage 3 dhs": dhs.losses})
    summary = evaluate_demo(dhs.export_dir, cohort, report, plan, seed=args.seed)
    step("evaluation")
    summary["timings_s"] = timings
    summary["plan"] = plan.__dict__
    summary["losses"] = {name: {"first": r.losses[0]["loss"], "last": r.losses[-1]["loss"], "steps": r.steps}
                         for name, r in (("align", align), ("unified", unified), ("dhs", dhs))}
    (report / "demo.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"[demo] report written to {report} (total {sum(timings.values()):.0f} s)")
    return 0


def evaluate_demo(pipeline_dir: Path, cohort: Path, report: Path, plan: DemoPlan, seed: int = 0) -> dict:
    """Held-out evaluation: unified task (impute t2w, t2f from t1n, then impression + diagnosis),
    generation t1n → t2f vs copy-the-input, diagnosis from t1n alone vs the majority class."""
    from . import UniBrainPipeline
    from .evaluation.tasks import evaluate_diagnosis, evaluate_generation, evaluate_unified

    pipe = UniBrainPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    common = dict(split="test", seed=seed, max_subjects=plan.eval_subjects)
    steps = plan.inference_steps
    results = {
        "unified": evaluate_unified(pipe, cohort, ["t1n"], ["t2w", "t2f"], out_dir=report / "unified",
                                    max_new_tokens=96, num_inference_steps=steps, **common),
        "generation": evaluate_generation(pipe, cohort, ["t1n"], ["t2f"], out_dir=report / "generation",
                                          num_inference_steps=steps, **common),
        "diagnosis": evaluate_diagnosis(pipe, cohort, ["t1n"], out_dir=report / "diagnosis", max_new_tokens=48,
                                        **common),
    }
    write_report(report, results, plan)
    return {name: {"metrics": r.metrics, "baselines": r.baselines} for name, r in results.items()}


def write_report(report: Path, results: dict, plan: DemoPlan) -> Path:
    """``report/summary.md``: what was run, every table with its baselines, a sample of the generated text."""
    from .evaluation.report import write_summary_markdown

    tables = []
    for name, title in (("unified", "Unified task: t1n → t2w, t2f, then impression and diagnosis"),
                        ("generation", "Generation: t1n → t2f"), ("diagnosis", "Diagnosis from t1n alone")):
        for heading, table in results[name].summary_tables():
            if heading != "Per subject":
                tables.append((f"{title} — {heading}", table))
    sample = next((r for r in results["unified"].per_subject if r.get("impression")), None)
    notes = [
        "What this is: a small UniBrain model (a few million parameters) trained for minutes on CPU on a "
        "synthetic phantom cohort, through the three UniBrain stages (self-alignment, unified, self-forcing). "
        "It demonstrates the whole system end to end; it says nothing about the 14B model on real data. "
        "The same commands with configs/bagel_*.yaml reproduce the paper's setting on GPUs.",
        f"Plan: {plan}.",
        "Figures: loss_curves.png (per stage); unified/panels, generation/panels (inputs | imputed | truth | "
        "|difference|).",
    ]
    if sample is not None:
        notes.append(f"Sample ({sample['subject_id']}): generated impression: {sample['impression']!r} — "
                     f"diagnosis: {sample.get('diagnosis', '')!r} — reference impression: "
                     f"{sample['reference_impression']!r}.")
    return write_summary_markdown(report / "summary.md", "UniBrain demo on a synthetic phantom cohort", tables, notes)
