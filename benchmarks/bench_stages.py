"""CPU throughput and memory of the three UniBrain training stages (align, unified, dhs).

Each stage runs the real training loop (:func:`unibrain_hf.train.trainer.train`) on the same
starting pipeline and the same phantom cohort, in a fresh subprocess per (stage, thread count),
so the peak RSS (``ru_maxrss`` read at the end of the run) is the stage's own.

Workload:

* cohort: phantom, ``--subjects`` subjects (default 16) at 2 mm voxels (about 100 × 120 px axial
  slices), the training split; unified / dhs slices are padded to 128 × 128;
* model, fp32, seeded random init: MoT decoder hidden 512, 4 layers, 8 query / 2 KV heads,
  intermediate 1376, vocabulary from a BPE tokenizer trained on the cohort's texts; SigLIP
  hidden 256, 4 layers, 4 heads, intermediate 512, patch 14, 10 × 10 position grid;
  ``max_latent_size`` 8; FLUX-shaped VAE ``flux_vae_config(64, (1, 2, 4, 4), 1, 16, 128)`` with
  random weights (throughput does not depend on what the VAE has learnt);
* processor: VAE images 64–128 px (stride 16 → at most 8 × 8 latent tokens), ViT images 28–126 px
  (stride 14 → at most 9 × 9 tokens);
* token budget: expected 4096, max 6144, max per sample 6144, prefer_buffer_before 2048.

Reported per stage and thread count, over the steps after ``--warmup``:

* the median step time, as the trainer times it: VAE encode → forward (or the stage-3
  self-forcing rollout) → backward → clipping → AdamW → EMA; fetching the next pack is not
  part of it and is reported separately (``fetch``);
* tokens/s: the median of the trainer's per-step ``tokens_per_second`` (pack length / step time);
* the median CPU time per step (``time.process_time`` of the whole process, all threads, from
  the end of a pack's fetch to the next fetch, so it also covers the trainer's logging); with one
  thread it leaves out the time lost to other jobs on a shared machine;
* peak RSS of the whole subprocess;
* for dhs, its ratio to unified (median step time, tokens/s and CPU time per step). Both stages
  build their packs from the same task and data seed, so they train on the same packs.

The ``uptime`` line (with the load average) is recorded before and after every run.

Run from the repository root (roughly 10 minutes on an idle 2-core machine, judging by the CPU
time per step; several times longer when other jobs share the cores):

    python benchmarks/bench_stages.py --steps 12 --warmup 2 --threads 1 2 --out-json runs/bench/stages.json

``--work-dir DIR`` keeps (and reuses) the cohort and the starting pipeline; by default they go
into a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("align", "unified", "dhs")
SEED = 20261122
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
BUDGET = {"expected_num_tokens": 4096, "max_num_tokens": 6144, "max_num_tokens_per_sample": 6144,
          "prefer_buffer_before": 2048}


# ---------------------------------------------------------------------------------------------
# Setup: cohort and starting pipeline
# ---------------------------------------------------------------------------------------------
def build_model(tokenizer):
    import torch
    from transformers import Qwen2Config, SiglipVisionConfig

    from unibrain_hf.modeling import UniBrainConfig, UniBrainForConditionalGeneration

    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL]
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = SiglipVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                image_size=10 * 14, patch_size=14)
    config = UniBrainConfig(text_config=text, vision_config=vision, max_latent_size=8, vit_max_num_patch_per_side=10,
                            bos_token_id=ids[0], eos_token_id=ids[1], start_of_image_token_id=ids[2],
                            end_of_image_token_id=ids[3])
    torch.manual_seed(SEED)
    model = UniBrainForConditionalGeneration(config)
    model.init_generation_expert_from_understanding()
    return model


def prepare(work_dir: Path, subjects: int) -> tuple[Path, Path, dict]:
    """Write (or reuse) ``work_dir/cohort`` and ``work_dir/pipeline``; return their paths and a summary."""
    import torch
    from diffusers import AutoencoderKL

    from unibrain_hf.data.phantom.generator import generate_cohort
    from unibrain_hf.data.radgenome import iter_subject_records
    from unibrain_hf.modeling.vae import flux_vae_config
    from unibrain_hf.pipelines.components import write_pipeline_index
    from unibrain_hf.processing.processor import UniBrainProcessor
    from unibrain_hf.train.bootstrap import cohort_texts, train_tokenizer

    cohort, pipeline = work_dir / "cohort", work_dir / "pipeline"
    if not (cohort / "phantom_info.json").exists():
        if cohort.exists():
            shutil.rmtree(cohort)
        started = time.perf_counter()
        generate_cohort(cohort, subjects, SEED, voxel_size=2.0)
        print(f"cohort: {subjects} subjects in {time.perf_counter() - started:.1f} s", flush=True)
    records = list(iter_subject_records(cohort, split="train"))
    if not (pipeline / "model_index.json").exists():
        if pipeline.exists():
            shutil.rmtree(pipeline)
        tokenizer = train_tokenizer(cohort_texts(records))
        model = build_model(tokenizer)
        torch.manual_seed(SEED)
        vae = AutoencoderKL(**flux_vae_config(64, (1, 2, 4, 4), 1, 16, 128))
        processor = UniBrainProcessor.for_model(model.config, tokenizer, vae_max_size=128, vae_min_size=64,
                                                vit_max_size=126, vit_min_size=28)
        model.save_pretrained(str(pipeline / "model"))
        vae.save_pretrained(str(pipeline / "vae"))
        tokenizer.save_pretrained(str(pipeline / "tokenizer"))
        processor.save_pretrained(pipeline / "processor", save_tokenizer=False)
        write_pipeline_index(pipeline)
    from transformers import AutoTokenizer

    from unibrain_hf.modeling import UniBrainForConditionalGeneration

    model = UniBrainForConditionalGeneration.from_pretrained(str(pipeline / "model"))
    vae = AutoencoderKL.from_pretrained(str(pipeline / "vae"))
    summary = {
        "train_subjects": len(records),
        "vocab_size": len(AutoTokenizer.from_pretrained(str(pipeline / "tokenizer"))),
        "model_parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "vae_parameters_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 2),
    }
    return cohort, pipeline, summary


# ---------------------------------------------------------------------------------------------
# One stage in this process (the child)
# ---------------------------------------------------------------------------------------------
class _RecordingLoader:
    """Wraps the trainer's pack loader: per pack, its shape and how long fetching it took."""

    def __init__(self, loader, log: list):
        self.loader, self.log = loader, log

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            started, cpu_started = time.perf_counter(), time.process_time()
            _MARKS.append(cpu_started)
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.log.append({
                "fetch_s": time.perf_counter() - started,
                "cpu_after_fetch": time.process_time(),
                "sequence_length": int(batch.sequence_length),
                "samples": len(batch.sample_lens),
                "vae_images": len(batch.latent_shapes),
                "mse_tokens": batch.num_mse_tokens,
                "ce_tokens": batch.num_ce_tokens,
                "vit_images": 0 if batch.vit_seqlens is None else int(batch.vit_seqlens.numel()),
                "maxrss_mib_at_fetch": _maxrss_mib(),
                "rss_mib_at_fetch": _rss_mib(),
            })
            yield batch


_MARKS: list[float] = []  # process CPU time when the trainer asks for the next pack, or saves


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _rss_mib() -> float:
    """Current resident set size (``/proc/self/statm``), in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(stage: str, threads: int, steps: int, cohort: str, pipeline: str, out_dir: str, result_path: str):
    import torch

    torch.set_num_threads(threads)
    import unibrain_hf.data.packed_dataset as packed_dataset
    import unibrain_hf.train.trainer as trainer
    from unibrain_hf.train.config import load_config

    packs: list[dict] = []
    original_loader = packed_dataset.packed_dataloader
    packed_dataset.packed_dataloader = lambda dataset, **kw: _RecordingLoader(original_loader(dataset, **kw), packs)
    rss_before_save: list[float] = []
    original_save = trainer.Trainer.save_checkpoint

    def recording_save(self, *args, **kwargs):
        _MARKS.append(time.process_time())
        rss_before_save.append(_maxrss_mib())
        return original_save(self, *args, **kwargs)

    trainer.Trainer.save_checkpoint = recording_save
    overrides = [
        f"stage={stage}", f"model.pretrained={pipeline}", f"data.path={cohort}", "data.image_size=128",
        "data.vae_max_size=128", "data.vae_min_size=64", "data.vit_max_size=126", "data.vit_min_size=28",
        *(f"data.{k}={v}" for k, v in BUDGET.items()),
        f"train.max_steps={steps}", f"train.save_every={steps + 1000}", f"train.output_dir={out_dir}",
        "train.export_pipeline=false",
    ]
    config = load_config(None, overrides)
    started = time.perf_counter()
    error = None
    try:
        result = trainer.train(config, progress=False)
        losses = result.losses
    except Exception:  # report the failure precisely; the library code is not ours to fix here
        import traceback

        error = traceback.format_exc()
        losses = []
    # CPU seconds of each step (all threads of this process): from the end of its pack's fetch to the
    # next request for a pack (or the final checkpoint); with 1 thread it excludes time lost to other jobs.
    for index, pack in enumerate(packs):
        after = _MARKS[index + 1] if index + 1 < len(_MARKS) else None
        pack["step_cpu_s"] = None if after is None else after - pack.pop("cpu_after_fetch")
        pack.pop("cpu_after_fetch", None)
    record = {
        "stage": stage, "threads": threads, "torch_threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - started, "losses": losses, "packs": packs,
        "maxrss_mib_before_final_save": rss_before_save[0] if rss_before_save else None,
        "maxrss_mib": _maxrss_mib(), "error": error,
    }
    Path(result_path).write_text(json.dumps(record))
    return 1 if error else 0


# ---------------------------------------------------------------------------------------------
# Driver (the parent)
# ---------------------------------------------------------------------------------------------
def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def summarise(record: dict, warmup: int) -> dict:
    losses, packs = record["losses"], record["packs"]
    timed = losses[warmup:]
    summary = {"stage": record["stage"], "threads": record["threads"], "steps": len(losses),
               "timed_steps": len(timed), "peak_rss_mib": round(record["maxrss_mib"], 0),
               "peak_rss_mib_before_final_save": record["maxrss_mib_before_final_save"],
               "rss_mib_at_first_pack": packs[0]["maxrss_mib_at_fetch"] if packs else None,
               "error": record["error"], "load_before": record.get("load_before"),
               "load_after": record.get("load_after")}
    if not timed:
        return summary
    step_s = [p["sequence_length"] / r["tokens_per_second"] for r, p in zip(losses, packs)][warmup:]
    tps = [r["tokens_per_second"] for r in timed]
    timed_packs = packs[warmup:len(losses)]
    summary.update({
        "median_step_s": statistics.median(step_s), "min_step_s": min(step_s), "max_step_s": max(step_s),
        "median_tokens_per_s": statistics.median(tps),
        "median_pack_tokens": statistics.median(p["sequence_length"] for p in timed_packs),
        "mean_samples_per_pack": statistics.mean(p["samples"] for p in timed_packs),
        "mean_vae_images_per_pack": statistics.mean(p["vae_images"] for p in timed_packs),
        "median_fetch_s": statistics.median(p["fetch_s"] for p in timed_packs),
        "median_step_cpu_s": statistics.median(c) if (c := [p["step_cpu_s"] for p in timed_packs
                                                             if p.get("step_cpu_s") is not None]) else None,
        "step_s": step_s, "pack_tokens": [p["sequence_length"] for p in timed_packs],
    })
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="leading steps left out of the statistics")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--work-dir", default=None, help="keep and reuse the cohort and pipeline here")
    parser.add_argument("--out-json", default=None)
    parser.add_argument("--child", nargs=6, metavar=("STAGE", "THREADS", "STEPS", "COHORT", "PIPELINE", "RESULT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        stage, threads, steps, cohort, pipeline, result_path = args.child
        return run_child(stage, int(threads), int(steps), cohort, pipeline,
                         str(Path(result_path).with_suffix("")) + "_run", result_path)
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")

    import torch

    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="bench_stages-") if temporary else args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        cohort, pipeline, setup = prepare(work_dir, args.subjects)
        print(f"setup: {setup}", flush=True)
        results = []
        for threads in args.threads:
            for stage in args.stages:
                result_path = work_dir / f"result_{stage}_t{threads}.json"
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                           TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
                load_before = _uptime()
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--child", stage, str(threads), str(args.steps),
                                       str(cohort), str(pipeline), str(result_path)],
                                      env=env, capture_output=True, text=True)
                wall = time.perf_counter() - started
                load_after = _uptime()
                if not result_path.exists():
                    record = {"stage": stage, "threads": threads, "losses": [], "packs": [], "maxrss_mib": 0.0,
                              "maxrss_mib_before_final_save": None,
                              "error": f"subprocess exited {proc.returncode}:\n{proc.stderr[-4000:]}"}
                else:
                    record = json.loads(result_path.read_text())
                record.update(load_before=load_before, load_after=load_after)
                summary = summarise(record, args.warmup)
                summary["process_wall_s"] = wall
                results.append(summary)
                shutil.rmtree(str(result_path.with_suffix("")) + "_run", ignore_errors=True)
                if summary["error"]:
                    print(f"{stage} t{threads}: FAILED\n{summary['error']}", flush=True)
                else:
                    print(f"{stage:8s} t{threads}: median step {summary['median_step_s']:.2f} s "
                          f"(CPU {summary['median_step_cpu_s'] or float('nan'):.2f} s), "
                          f"{summary['median_tokens_per_s']:.0f} tok/s, pack {summary['median_pack_tokens']:.0f} tok, "
                          f"peak RSS {summary['peak_rss_mib']:.0f} MiB, process {wall:.0f} s | "
                          f"before: {load_before} | after: {load_after}", flush=True)
        overhead = {}
        for threads in args.threads:
            by_stage = {r["stage"]: r for r in results if r["threads"] == threads and not r["error"]}
            if "dhs" in by_stage and "unified" in by_stage:
                dhs, unified = by_stage["dhs"], by_stage["unified"]
                overhead[threads] = {
                    "step_time_ratio": dhs["median_step_s"] / unified["median_step_s"],
                    "tokens_per_s_ratio": dhs["median_tokens_per_s"] / unified["median_tokens_per_s"],
                    "step_cpu_ratio": (dhs["median_step_cpu_s"] / unified["median_step_cpu_s"]
                                       if dhs["median_step_cpu_s"] and unified["median_step_cpu_s"] else None),
                    "same_packs": dhs["pack_tokens"] == unified["pack_tokens"],
                }
                print(f"dhs / unified at {threads} thread(s): step time x{overhead[threads]['step_time_ratio']:.2f}, "
                      f"tokens/s x{overhead[threads]['tokens_per_s_ratio']:.2f}, "
                      f"CPU s/step x{overhead[threads]['step_cpu_ratio'] or float('nan'):.2f} "
                      f"(same packs: {overhead[threads]['same_packs']})", flush=True)
        report = {
            "args": vars(args), "setup": setup, "budget": BUDGET, "results": results, "dhs_over_unified": overhead,
            "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "cpu": next((line.split(":", 1)[1].strip() for line in
                                     Path("/proc/cpuinfo").read_text().splitlines()
                                     if line.startswith("model name")), platform.processor())},
        }
        if args.out_json:
            Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out_json).write_text(json.dumps(report, indent=2))
        return 1 if any(r["error"] for r in results) else 0
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
