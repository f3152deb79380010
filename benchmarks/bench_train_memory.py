"""Peak RSS of a short training run as the cohort grows: the cohort is streamed, never held in memory.

Workload: two phantom cohorts written by ``unibrain phantom`` (``--small`` and ``--large``
subjects, default 50 and 400, 4 mm voxels, 5 subjects per parquet file), one small starting
pipeline bootstrapped from the small cohort (BPE tokenizer, random FLUX-shaped VAE, MoT decoder
hidden 32 × 2 layers), and for each cohort a fresh process that trains stage ``unified`` for
``--steps`` steps (one process, no DataLoader workers, no checkpoint, no export) and reports its
peak RSS (``ru_maxrss``) and the largest RSS measured after a training step (the process
peak can be set during start-up; the second number is what the training loop holds). Runs alternate small / large ``--rounds`` times, so both see the same
machine load. ``--materialise`` additionally runs the trainer after reading the whole cohort
into a list first (what the trainer used to do), to show that the measurement does see a cohort
held in memory.

    python benchmarks/bench_train_memory.py --work-dir runs/bench/memory --out-json runs/bench/train_memory.json --materialise

(Under 10 minutes on an idle 2-core machine, most of it writing the 400-subject cohort once.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SEED = 11


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "n/a"


def prepare(work_dir: Path, small: int, large: int) -> dict[str, Path]:
    """Write (or reuse) the two cohorts with ``unibrain phantom`` and the starting pipeline."""
    cohorts = {}
    for name, subjects in (("small", small), ("large", large)):
        cohort = work_dir / f"cohort_{subjects}"
        if not (cohort / "phantom_info.json").exists():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "unibrain_hf.cli", "phantom", str(cohort), "--subjects",
                            str(subjects), "--seed", str(SEED), "--size", "4", "--overwrite", "--quiet"], check=True)
            print(f"{name} cohort: {subjects} subjects in {time.perf_counter() - started:.0f} s", flush=True)
        cohorts[name] = cohort
    init = work_dir / "init"
    if not (init / "model_index.json").exists():
        from unibrain_hf.train.bootstrap import bootstrap_pipeline

        bootstrap_pipeline(cohorts["small"], init, image_size=64, hidden_size=32, layers=2, vae_steps=0,
                           vocab_size=400, log=lambda *_: None)
    cohorts["init"] = init
    return cohorts


def run_child(cohort: str, init: str, out_dir: str, steps: int, materialise: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    import unibrain_hf.train.trainer as trainer
    from unibrain_hf.train.config import load_config

    # The process peak can be set by start-up (imports, loading); the RSS after each step shows
    # what the training loop itself holds.
    after_step: list[float] = []
    original_step = trainer.Trainer.train_step

    def recording_step(self, packs):
        record = original_step(self, packs)
        after_step.append(_rss_mib())
        return record

    trainer.Trainer.train_step = recording_step

    held = None
    if materialise:  # the old trainer: list(iter_subject_records(...)) before training
        from unibrain_hf.data.radgenome import iter_subject_records

        held = list(iter_subject_records(cohort, split="train"))
    config = load_config(None, [
        "stage=unified", f"model.pretrained={init}", f"data.path={cohort}", "data.image_size=64",
        "data.vae_max_size=64", "data.vae_min_size=32", "data.vit_max_size=56", "data.vit_min_size=28",
        "data.expected_num_tokens=512", "data.max_num_tokens=1024", "data.max_num_tokens_per_sample=1024",
        "data.prefer_buffer_before=256", f"train.max_steps={steps}", "train.save_every=0", "train.warmup_steps=1",
        "train.export_pipeline=false", f"train.output_dir={out_dir}", "train.log_every=1000"])
    started = time.perf_counter()
    result = trainer.train(config, progress=False)
    return {"steps": result.steps, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
            "rss_after_first_step_mib": round(after_step[0], 1), "max_rss_after_steps_mib": round(max(after_step), 1),
            "rss_after_last_step_mib": round(after_step[-1], 1), "subjects_held": 0 if held is None else len(held)}


def _rss_mib() -> float:
    """Current resident set size (``/proc/self/statm``), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(cohort: Path, init: Path, work_dir: Path, steps: int, materialise: bool) -> dict:
    out = work_dir / "runs" / f"{cohort.name}-{'list' if materialise else 'stream'}-{time.time_ns()}"
    command = [sys.executable, __file__, "--child", str(cohort), str(init), str(out), str(steps)]
    if materialise:
        command.append("--materialise")
    before = _uptime()
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if completed.returncode != 0:
        raise RuntimeError(f"child failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return {**result, "cohort": cohort.name, "materialised": materialise, "uptime_before": before,
            "uptime_after": _uptime()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="runs/bench/memory")
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--large", type=int, default=400)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--materialise", action="store_true", help="also run with the cohort read into a list")
    parser.add_argument("--out-json", default=None)
    parser.add_argument("--child", nargs=4, metavar=("COHORT", "INIT", "OUT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        cohort, init, out, steps = args.child
        print(json.dumps(run_child(cohort, init, out, int(steps), args.materialise)))
        return 0
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = prepare(work_dir, args.small, args.large)
    runs = []
    modes = [False, True] if args.materialise else [False]
    for round_index in range(args.rounds):
        for materialise in modes:
            for name in ("small", "large"):
                run = measure(paths[name], paths["init"], work_dir, args.steps, materialise)
                run["round"] = round_index
                runs.append(run)
                print(json.dumps(run), flush=True)
    summary = {}
    for materialise in modes:
        key = "list" if materialise else "stream"
        summary[key] = {}
        for metric in ("peak_rss_mib", "max_rss_after_steps_mib"):
            values = {name: [r[metric] for r in runs if r["cohort"] == paths[name].name
                             and r["materialised"] == materialise] for name in ("small", "large")}
            summary[key][metric] = {**values, "large_over_small": round(max(values["large"]) / min(values["small"]), 3)}
    report = {"machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "workload": {"small": args.small, "large": args.large, "steps": args.steps, "rounds": args.rounds},
              "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=2))
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
