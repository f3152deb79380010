"""The main job: a synthetic cohort → a small UniBrain trained through all three stages → a report.

    unibrain demo --out runs/demo            # ~25 minutes of 2 CPU cores
    unibrain demo --out runs/demo --quick    # a few steps of everything (a smoke test, ~2 minutes)
    unibrain demo --out runs/abl --eval-split val --set unified_steps=2000   # an ablation, scored on val

What it does, honestly: it generates a phantom cohort (physics-based multi-contrast MRI on real
MNI152 anatomy with five lesion classes and templated reports), builds a *small* starting
pipeline (a byte-level tokenizer and a small VAE fitted on the cohort, a randomly initialised
MoT model of a few million parameters), trains it through UniBrain's three stages on CPU —
self-alignment, unified imputation + reasoning, dynamic-hidden-state self-forcing — and
evaluates it on held-out subjects with paired bootstrap intervals against baselines
(:mod:`unibrain_hf.demo_report`). It demonstrates the whole system end to end; the numbers
say nothing about the 14B model on real data. The same stages with ``configs/bagel_*.yaml``
reproduce the paper's setting on GPUs.

Every knob of the recipe is a field of :class:`DemoPlan`; ``--set field=value`` changes one
(recorded in ``report/demo.json``), and ``--eval-split val`` scores the validation split, which is
the only split recipes are tuned on. Each phase's CPU time is recorded next to its wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path


#: Each stage's losses, next to its run folder (read back by --reuse-stages).
LOSSES_FILE = "losses.json"


@dataclass(frozen=True)
class DemoPlan:
    """The whole recipe. Sizes are the model's; ``*_steps`` are optimiser steps; ``*_lr`` peak learning rates."""

    subjects: int = 400
    voxel_size: float = 4.0
    image_size: int = 64
    # bootstrap: the VAE (its reconstruction is the ceiling of every imputation) and the model's latent geometry
    vae_steps: int = 1500
    vae_downsample: int = 4
    vae_channels: int = 16  # the encoder's base width
    # Channels of the latent (FLUX: 16); a token carries patch² × this many numbers. 8 rather than 16: with 16
    # a token holds 64 numbers for 64 pixels (no compression) and the generator followed its input less
    # (docs/DEMO_RUN.md, ablations P and Q), for a ceiling only 0.3 dB lower.
    vae_latent_channels: int = 8
    vae_lr: float = 2e-3
    latent_patch_size: int = 2
    # Side of the ViT's (understanding) copy of a slice, a multiple of its 14-pixel patch; 0: the largest
    # multiple of 14 not above image_size (56 for 64² slices: a 4 × 4 grid of patches).
    vit_image_size: int = 0
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    velocity_head_std: float = 0.0  # initial std of the llm2vae head (0: the initializer range, 0.02)
    # > 0: start the generation expert with a head that reads the same grid position of earlier images, of this
    # QK-norm gain (train/copy_head.py): a stand-in for the editing heads a BAGEL checkpoint brings. It raised every
    # image number on two training seeds (docs/DEMO_RUN.md, rows AE, AF). 0: off.
    copy_head_gain: float = 2.0
    # the three stages
    align_steps: int = 300
    align_lr: float = 1e-3
    unified_steps: int = 6000  # 3000 in rows A-P of the ablations; doubling moved every image number up (K, Q)
    unified_lr: float = 8e-4
    dhs_steps: int = 250
    dhs_lr: float = 2e-4
    lr_scheduler: str = "cosine"
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.95  # decay of the weight average each stage exports (0.95: about the last 20 steps)
    unified_ema_decay: float = 0.0  # stage 2's decay when > 0 (its many steps can average over more); 0: ema_decay
    tokens_per_step: int = 1024
    # Condition dropout of stages 2-3 (what classifier-free guidance learns from). 0.1 rather than the
    # reference's 0.3, and no guidance below: at this scale both measured better on the validation
    # split (docs/DEMO_RUN.md, ablations).
    vit_dropout: float = 0.1
    vae_dropout: float = 0.1
    mse_weight: float = 1.0
    # evaluation
    eval_subjects: int = 0  # 0: every eligible subject of the split
    inference_steps: int = 10
    # Steps of the conditional-mean CNN that tells how predictable each target is from T1n (0: skip it)
    predictability_steps: int = 600
    # Steps of the same regression in the VAE's latent space, the model's own (what its mean could reach; 0: skip)
    latent_predictability_steps: int = 1500
    # Steps of the classifier that tells how diagnosable the subjects are from each set of images (0: skip it)
    diagnosability_steps: int = 3000
    max_new_tokens: int = 96
    targets: str = "t2w,t2f"
    guidance_scale: float = 1.0  # the pipeline's defaults (the reference's) are 3.0 and 1.2
    image_guidance_scale: float = 1.0
    timestep_shift: float = 0.0  # 0: the pipeline's default for the task
    think: str = "auto"  # auto (the pipeline's default: think in the unified task) | on | off
    target_names: str = ""  # e.g. "t2w=T2w": how the unified instructions name a target (default its code)

    def replace(self, assignments: list[str]) -> "DemoPlan":
        """A copy with ``field=value`` assignments applied (values converted to the field's type)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for assignment in assignments:
            name, _, text = assignment.partition("=")
            if name not in fields or not _:
                raise SystemExit(f"unibrain demo: error: --set {assignment!r}: expected FIELD=VALUE with FIELD one "
                                 f"of {', '.join(fields)}")
            kind = type(getattr(self, name))
            try:
                changes[name] = kind(float(text)) if kind is int else kind(text)
            except ValueError:
                raise SystemExit(f"unibrain demo: error: --set {assignment!r}: {text!r} is not a {kind.__name__}")
        return dataclasses.replace(self, **changes)

    @property
    def target_list(self) -> list[str]:
        return [code.strip() for code in self.targets.split(",") if code.strip()]


FULL = DemoPlan()
QUICK = DemoPlan(subjects=24, voxel_size=6.0, image_size=48, vae_steps=10, hidden_size=32, layers=2,
                 align_steps=3, unified_steps=4, dhs_steps=2, eval_subjects=2, inference_steps=2, max_new_tokens=8,
                 predictability_steps=5, latent_predictability_steps=5, diagnosability_steps=5,
                 copy_head_gain=0.0)  # 8-channel heads leave no room for a copy head


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (cohort, runs, report)")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--seed", type=int, default=0, help="cohort and training seed")
    parser.add_argument("--cohort", default=None, metavar="DIR",
                        help="use this existing cohort instead of generating one under --out")
    parser.add_argument("--eval-split", default="test", choices=("val", "test"),
                        help="split scored by the report (tune recipes on val; default test)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one field of the recipe (see DemoPlan), e.g. --set unified_steps=2000")
    parser.add_argument("--reuse-stages", action="store_true",
                        help="reuse the stages already trained under --out (same recipe) and only evaluate; "
                             "for evaluation-setting ablations")


class PhaseClock:
    """Wall and CPU seconds per phase (CPU = user + system of this process and its children)."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self._wall, self._cpu = time.perf_counter(), self._cpu_now()

    @staticmethod
    def _cpu_now() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def done(self, name: str) -> None:
        wall, cpu = time.perf_counter(), self._cpu_now()
        self.phases[name] = {"wall_s": round(wall - self._wall, 1), "cpu_s": round(cpu - self._cpu, 1)}
        self._wall, self._cpu = wall, cpu
        print(f"[demo] {name} done ({self.phases[name]['wall_s']} s wall, {self.phases[name]['cpu_s']} s CPU)",
              flush=True)

    def totals(self) -> dict:
        return {"wall_s": round(sum(p["wall_s"] for p in self.phases.values()), 1),
                "cpu_s": round(sum(p["cpu_s"] for p in self.phases.values()), 1)}


def stage_config(stage: str, out: Path, init: Path, cohort: Path, steps: int, learning_rate: float, plan: DemoPlan,
                 weights=None, seed: int = 0):
    """The training config of one stage: ``configs/tiny_<stage>.yaml``'s settings with the plan's values."""
    from .train.bootstrap import vit_resize_bounds
    from .train.config import load_config

    size = plan.image_size
    ema_decay = plan.unified_ema_decay if stage == "unified" and plan.unified_ema_decay > 0 else plan.ema_decay
    vit_max, vit_min = vit_resize_bounds(size, plan.vit_image_size or None)
    values = [f"stage={stage}", f"model.pretrained={init}", f"data.path={cohort}", f"data.image_size={size}",
              f"data.vae_max_size={size}", f"data.vae_min_size={size}", f"data.vit_max_size={vit_max}",
              f"data.vit_min_size={vit_min}", f"data.expected_num_tokens={plan.tokens_per_step}",
              f"data.max_num_tokens={plan.tokens_per_step * 3 // 2}",
              f"data.max_num_tokens_per_sample={plan.tokens_per_step * 3 // 2}",
              f"data.prefer_buffer_before={plan.tokens_per_step // 2}", f"train.max_steps={steps}",
              f"train.save_every={max(steps, 1)}", f"train.warmup_steps={max(1, steps // 20)}",
              f"train.learning_rate={learning_rate}", f"train.lr_scheduler={plan.lr_scheduler}",
              f"train.min_lr_ratio={plan.min_lr_ratio}", f"train.ema_decay={ema_decay}", "train.log_every=10",
              f"train.mse_weight={plan.mse_weight}",
              f"train.output_dir={out / stage}", f"train.seed={seed}", f"train.data_seed={seed + 1}"]
    if stage != "align":  # stage 1 keeps the reference's condition dropout
        values += [f"data.vit_dropout={plan.vit_dropout}", f"data.vae_dropout={plan.vae_dropout}"]
    if weights is not None:
        values.append(f"model.weights={weights}")
    return load_config(None, values)


def vae_recipe(plan: DemoPlan):
    """The plan's VAE: its size, latent channels and fit (the model's latent geometry follows it)."""
    from .train.bootstrap import VaeRecipe

    return VaeRecipe(steps=plan.vae_steps, downsample=plan.vae_downsample, base_channels=plan.vae_channels,
                     latent_channels=plan.vae_latent_channels, learning_rate=plan.vae_lr)


def write_stage_record(folder: Path, steps: int, losses: list[dict], last_checkpoint) -> None:
    """Record a trained stage's losses and last checkpoint in ``folder`` (read back by --reuse-stages).

    The checkpoint is stored relative to the stage folder, so that a run folder that was copied or
    moved (or a demo started from another working directory) still finds it.
    """
    checkpoint = Path(last_checkpoint)
    try:
        stored = str(checkpoint.resolve().relative_to(Path(folder).resolve()))
    except ValueError:  # outside the stage folder: keep it as it is
        stored = str(checkpoint)
    (Path(folder) / LOSSES_FILE).write_text(json.dumps({"steps": steps, "losses": losses,
                                                         "last_checkpoint": stored}))


def read_stage_record(folder: Path) -> tuple[Path, list[dict]]:
    """(last checkpoint, losses) of a stage trained before; the checkpoint is looked up in ``folder`` first.

    Records written before checkpoints were stored relative to the stage folder hold the path as the
    run saw it; their last component still names the checkpoint inside ``folder/checkpoints``.
    """
    folder = Path(folder)
    record = json.loads((folder / LOSSES_FILE).read_text())
    stored = Path(record["last_checkpoint"])
    candidates = ([] if stored.is_absolute() else [folder / stored]) + [folder / "checkpoints" / stored.name, stored]
    checkpoint = next((path for path in candidates if path.is_dir()), None)
    if checkpoint is None:
        raise SystemExit(f"unibrain demo: error: --reuse-stages: {folder / LOSSES_FILE} names the checkpoint "
                         f"{stored}, which is not in {folder / 'checkpoints'}; train the stage again without "
                         f"--reuse-stages")
    return checkpoint, record["losses"]


def _require_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("unibrain demo: error: the report's figures need matplotlib: "
                         "pip install -c constraints.txt -e '.[phantom]'") from None


def _plan_error(field: str, value, reason: str) -> SystemExit:
    return SystemExit(f"unibrain demo: error: --set {field}={value}: {reason}")


def check_plan(plan: DemoPlan) -> None:
    """Refuse a plan that could only fail later (after the cohort, the VAE fit or the training), naming the field."""
    from .evaluation.cohort import check_codes
    from .protocol.templates import CANONICAL_MODALITIES
    from .train.bootstrap import model_config, vit_resize_bounds

    sizes = ("subjects", "image_size", "hidden_size", "layers", "heads", "kv_heads", "vae_downsample",
             "vae_channels", "vae_latent_channels", "latent_patch_size", "align_steps", "unified_steps", "dhs_steps",
             "tokens_per_step", "max_new_tokens")
    for name in sizes:
        if getattr(plan, name) < 1:
            raise _plan_error(name, getattr(plan, name), "must be at least 1")
    for name in ("vae_steps", "eval_subjects", "predictability_steps", "latent_predictability_steps",
                 "diagnosability_steps", "vit_image_size"):
        if getattr(plan, name) < 0:
            raise _plan_error(name, getattr(plan, name), "must be 0 or more")
    for name in ("ema_decay", "unified_ema_decay"):
        if not 0 <= getattr(plan, name) < 1:
            raise _plan_error(name, getattr(plan, name), "an EMA decay must be in [0, 1)")
    if plan.inference_steps < 2:  # the evaluation counts sampler grid points, as the reference does
        raise _plan_error("inference_steps", plan.inference_steps,
                          "the evaluation's sampler grid needs at least 2 points (N points, N − 1 Euler steps)")
    if not plan.target_list:
        raise _plan_error("targets", plan.targets, "name at least one sequence to impute from T1n, e.g. t2w,t2f")
    try:
        targets = check_codes(plan.target_list, "targets")
    except ValueError as err:
        raise _plan_error("targets", plan.targets, str(err)) from None
    unknown = [code for code in targets if code not in CANONICAL_MODALITIES]
    if unknown or "t1n" in targets:
        raise _plan_error("targets", plan.targets, f"targets are sequences imputed from T1n: choose from "
                          f"{', '.join(c for c in CANONICAL_MODALITIES if c != 't1n')}"
                          + (f" ({', '.join(unknown)} unknown)" if unknown else " (t1n is the input)"))
    stride = plan.vae_downsample * plan.latent_patch_size
    if plan.image_size % stride:
        raise _plan_error("image_size", plan.image_size,
                          f"must be a positive multiple of vae_downsample × latent_patch_size = {stride}")
    try:
        vit_resize_bounds(plan.image_size, plan.vit_image_size or None)
    except ValueError as err:
        if not plan.vit_image_size:
            raise _plan_error("image_size", plan.image_size, str(err)) from None
        raise _plan_error("vit_image_size", plan.vit_image_size, f"{err} (0: the default)") from None
    try:
        model_config(1024, [0, 1, 2, 3], hidden_size=plan.hidden_size, layers=plan.layers, heads=plan.heads,
                     kv_heads=plan.kv_heads, max_image_size=plan.image_size * 2, vae_downsample=plan.vae_downsample,
                     latent_patch_size=plan.latent_patch_size, latent_channels=plan.vae_latent_channels)
    except ValueError as err:  # ConfigError is a ValueError
        raise SystemExit(f"unibrain demo: error: the model sizes (hidden_size {plan.hidden_size}, heads {plan.heads}, "
                         f"kv_heads {plan.kv_heads}): {err}") from None
    if plan.copy_head_gain:  # 0 is off
        from .train.copy_head import check_copy_head

        try:
            check_copy_head(plan.hidden_size, plan.heads, plan.copy_head_gain)
        except ValueError as err:
            raise SystemExit(f"unibrain demo: error: --set copy_head_gain={plan.copy_head_gain}: {err} (hidden_size "
                             f"{plan.hidden_size} / heads {plan.heads}; --set copy_head_gain=0 turns it off)") from None


def check_cohort_serves_plan(cohort: Path, split: str, plan: DemoPlan) -> None:
    """The evaluation scores the ``split`` subjects that have T1n and every target: refuse a cohort without any."""
    from .errors import EvaluationInputError
    from .evaluation.cohort import index_cohort, select_subjects

    try:
        select_subjects(index_cohort(cohort, split), ["t1n"], plan.target_list)
    except EvaluationInputError as err:
        raise SystemExit(f"unibrain demo: error: --set targets={plan.targets}: {err}") from None


def run(args) -> int:
    import torch

    from .data.phantom.generator import generate_cohort
    from .train.bootstrap import bootstrap_pipeline
    from .train.trainer import train

    _require_plotting()
    plan = (QUICK if args.quick else FULL).replace(args.assignments)
    check_plan(plan)  # before anything is written
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    clock = PhaseClock()

    cohort = Path(args.cohort) if args.cohort else out / "cohort"
    if not (cohort / "train_val_test_split_subject.json").exists():
        if args.cohort:
            raise SystemExit(f"unibrain demo: error: --cohort {cohort} is not a cohort (no split file)")
        generate_cohort(cohort, plan.subjects, seed=args.seed, voxel_size=plan.voxel_size, preview=True,
                        overwrite=True)
    check_cohort_serves_plan(cohort, args.eval_split, plan)  # before any training
    clock.done("cohort")
    init = out / "init"
    if not (init / "model_index.json").exists():
        bootstrap_pipeline(cohort, init, image_size=plan.image_size, hidden_size=plan.hidden_size,
                           layers=plan.layers, heads=plan.heads, kv_heads=plan.kv_heads, seed=args.seed,
                           vae=vae_recipe(plan),
                           latent_patch_size=plan.latent_patch_size, vit_image_size=plan.vit_image_size or None,
                           progress=True,
                           velocity_head_std=plan.velocity_head_std or None,
                           copy_head_gain=plan.copy_head_gain or None)
    clock.done("bootstrap")
    runs = out / "runs"

    def stage(name, title, config):
        """Train one stage (or, with --reuse-stages, take the one trained before).

        Returns the exported pipeline folder, the last checkpoint folder (the raw, not EMA, weights) and the losses.
        """
        folder = runs / name
        if args.reuse_stages and (folder / "pipeline" / "model_index.json").exists():
            checkpoint, losses = read_stage_record(folder)
            clock.done(f"{title} (reused)")
            return folder / "pipeline", checkpoint, losses
        result = train(config, progress=True)
        write_stage_record(folder, result.steps, result.losses, result.last_checkpoint)
        clock.done(title)
        return result.export_dir, result.last_checkpoint, result.losses

    # Stage 2 starts from stage 1's trained (not EMA-averaged) weights, as the reference chains its stages.
    _, align_weights, align_losses = stage("align", "stage 1 (align)", stage_config(
        "align", runs, init, cohort, plan.align_steps, plan.align_lr, plan, seed=args.seed))
    unified_dir, _, unified_losses = stage("unified", "stage 2 (unified)", stage_config(
        "unified", runs, init, cohort, plan.unified_steps, plan.unified_lr, plan, weights=align_weights,
        seed=args.seed))
    dhs_dir, _, dhs_losses = stage("dhs", "stage 3 (dhs)", stage_config(
        "dhs", runs, unified_dir, cohort, plan.dhs_steps, plan.dhs_lr, plan, seed=args.seed))

    from .demo_report import evaluate_demo, write_demo_report

    report = out / "report"
    report.mkdir(exist_ok=True)
    results = evaluate_demo(dhs_dir, unified_dir, cohort, report, plan, split=args.eval_split, seed=args.seed)
    clock.done("evaluation")
    losses = {"stage 1 (align)": align_losses, "stage 2 (unified)": unified_losses, "stage 3 (dhs)": dhs_losses}
    summary = write_demo_report(report, results, plan, losses, init, clock, vars(args))
    print(f"[demo] report written to {report / 'summary.md'} (total {clock.totals()['wall_s']:.0f} s wall, "
          f"{clock.totals()['cpu_s']:.0f} s CPU)")
    print(json.dumps(summary["headline"], indent=1, default=float))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unibrain demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
