"""CPU benchmark of ``UniBrainPipeline``'s unified task: 1 input slice → k targets + impression + diagnosis.

Workload: a small but realistically shaped random model (MoT decoder hidden 512, 4 layers,
8 query / 2 KV heads, intermediate 1376; SigLIP hidden 256, 4 layers; FLUX-shaped VAE with 64
base channels), a seeded 128×128 uint8 input slice, 10 sampler grid points (9 Euler steps), both
guidance branches on (text 3, image 1.2, interval [0.4, 1], text_channel), thinking before every
image. Random weights never emit ``<|im_end|>``, so every text runs to ``--max-new-tokens`` decode
steps (most ids drawn fall outside the small test tokenizer and decode to nothing, so the text that
re-enters the context is much shorter than the budget). After a short warm-up, runs k = 1, 2, 3
targets in one process and reports wall and CPU time (``time.process_time``: robust on a shared
machine), the time of each part (text decoding, denoising, VAE decoding, image and text prefills),
the peak RSS of each run (``VmHWM``, reset after setup and before each run; Linux) and the
context lengths each image is denoised against.

Run from the repository root (under half a minute on an idle 2-core machine):

    python benchmarks/bench_pipeline.py --threads 1 2 --max-new-tokens 32 [--dtype bfloat16]

Side by side with the reference (``zhiyuns/UniBrain``, the BAGEL fork UniBrain ships), on identical
weights, each configuration a fresh process, ours and the reference interleaved per thread count
and round (the order alternates between rounds), the load average recorded around every run:

    python benchmarks/bench_pipeline.py --reference-repo REF_CHECKOUT --reference-python REF_VENV/bin/python \
        --threads 1 2 --max-new-tokens 32 --repeats 3 --json sbs.json

``REF_CHECKOUT`` is a plain checkout of the reference repository and ``REF_VENV`` a virtualenv
with torch (CPU), transformers 4.49, einops, safetensors, pillow, numpy; the driver
``benchmarks/reference_unified.py`` runs it unmodified (its docstring lists the CPU stand-ins). It
first writes the reference's randomly initialised model as a BAGEL-format directory, which ours
converts (``--bagel-dir DIR`` reuses one). ``--dtype`` applies to ours only; the reference runs float32.

The tokenizer is converted from the BAGEL fixture (``--fixture``) into a temporary directory.
``--bagel-dir DIR`` converts a BAGEL-format directory of the same sizes (configs,
``ema.safetensors``, ``ae.safetensors``, tokenizer; its ``model_config.json`` sets the image sizes,
here 128 for the VAE and 126 for the ViT) and benchmarks its weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from part_clock import PartClock  # this folder (the script's own) is on sys.path

SEED = 0


def build_pipeline(tokenizer_dir: str):
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, Qwen2Config, SiglipVisionConfig

    from unibrain_hf import UniBrainConfig, UniBrainForConditionalGeneration, UniBrainPipeline, UniBrainProcessor
    from unibrain_hf.modeling.vae import flux_vae_config
    from unibrain_hf.pipelines.components import flow_match_scheduler

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                           "<|vision_end|>")]
    text = Qwen2Config(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=8192,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                       tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                num_channels=3, image_size=70 * 14, patch_size=14, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6)
    config = UniBrainConfig(text_config=text, vision_config=vision, latent_patch_size=2, max_latent_size=64,
                            vit_max_num_patch_per_side=70, latent_channels=16, vae_downsample=8,
                            bos_token_id=special[0], eos_token_id=special[1], start_of_image_token_id=special[2],
                            end_of_image_token_id=special[3])
    torch.manual_seed(SEED)
    model = UniBrainForConditionalGeneration(config).eval()
    with torch.no_grad():  # the velocity head is zero-initialised; give it weights so outputs vary
        model.llm2vae.weight.normal_(0, 0.02)
    vae = AutoencoderKL(**flux_vae_config(64, (1, 2, 4, 4), 1, 16, 128)).eval()
    processor = UniBrainProcessor(tokenizer, vae_max_size=128, vae_min_size=128, vae_stride=16, vit_max_size=126,
                                  vit_min_size=126, vit_patch_size=14, max_latent_size=64,
                                  vit_max_num_patch_per_side=70)
    pipe = UniBrainPipeline(model=model, vae=vae, scheduler=flow_match_scheduler(), tokenizer=tokenizer,
                            processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(converted_dir: str):
    from unibrain_hf import UniBrainPipeline

    pipe = UniBrainPipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _status_mib(key: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib(reset_ok: bool) -> float:
    hwm = _status_mib("VmHWM") if reset_ok else None
    # Without a reset, fall back to the process's monotonic peak.
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


INPUT_SHAPE = (128, 128)
TARGETS = ("t2w", "t2f", "t1c")


def input_slice() -> np.ndarray:
    """The benchmark's input: a seeded uint8 slice (taken as already scaled by both implementations)."""
    return np.random.default_rng(SEED).integers(0, 256, size=INPUT_SHAPE, dtype=np.uint8)


def instrument(pipe) -> PartClock:
    """Time the parts the reference driver times too (``benchmarks/reference_unified.py``)."""
    from unibrain_hf.pipelines.context import InterleavedContext

    clock = PartClock()
    clock.wrap(pipe, "generate_text", "text")
    clock.wrap(pipe, "denoise", "denoise")
    clock.wrap(pipe, "latents_to_uint8", "vae_decode")
    clock.wrap(pipe, "encode_images", "image_prefill")  # VAE encode + ViT patches; the prefill below
    clock.wrap(InterleavedContext, "add_image", "image_prefill")
    for name in ("add_system_prompt", "add_instruction", "add_generated_text"):
        clock.wrap(InterleavedContext, name, "text_prefill")
    return clock


def run_unified(pipe, targets, max_new_tokens: int, clock: PartClock | None = None) -> dict:
    denoise_seconds = {}
    marks = {}
    context_lengths = {}

    def timer(pipeline, step, t, kwargs):
        code = kwargs["target_modality"]
        now = time.perf_counter()
        marks.setdefault(code, [now])
        marks[code].append(now)
        context = kwargs["context"]
        context_lengths[code] = {"gen": context.gen.kv_len, "cfg_text": context.cfg_text.kv_len,
                                 "cfg_img": context.cfg_img.kv_len}
        return {}

    if clock is not None:
        clock.parts.clear()
    reset_ok = _reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    output = pipe(images={"t1n": input_slice()}, target_modalities=list(targets), task="unified", num_grid_points=10,
                  max_new_tokens=max_new_tokens, generator=torch.Generator().manual_seed(SEED),
                  callback_on_step_end=timer, callback_on_step_end_tensor_inputs=["target_modality", "context"])
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _peak_rss_mib(reset_ok)
    for code, times in marks.items():
        # first mark is after step 0; extrapolate the first step with the mean of the others
        mean_step = (times[-1] - times[0]) / max(len(times) - 1, 1)
        denoise_seconds[code] = round(times[-1] - times[0] + mean_step, 3)
    return {"targets": len(targets), "total_s": round(total, 3), "cpu_s": round(cpu, 3),
            "denoise_s_per_target": denoise_seconds, "peak_rss_mib": round(peak, 1),
            "parts": {} if clock is None else {k: dict(v) for k, v in clock.parts.items()},
            "context_at_image": context_lengths,
            "thinking_tokens": {code: len(pipe.tokenize(texts[0])) for code, texts in output.thinking.items()},
            "impression_tokens": len(pipe.tokenize(output.impression[0])),
            "diagnosis_tokens": len(pipe.tokenize(output.diagnosis[0]))}


def _load_for_run(args, workdir: str):
    from unibrain_hf.convert.convert_bagel import convert_bagel_checkpoint

    if args.bagel_dir:
        convert_bagel_checkpoint(args.bagel_dir, f"{workdir}/converted")
        pipe = load_pipeline(f"{workdir}/converted")
    else:
        convert_bagel_checkpoint(args.fixture, f"{workdir}/converted")
        pipe = build_pipeline(f"{workdir}/converted/tokenizer")
    if args.dtype != "float32":
        state = pipe.enable_fast_inference(dtype=torch.bfloat16, vae_dtype=torch.bfloat16 if args.dtype ==
                                           "bfloat16+vae" else None, device="cpu")
        if state.notes:
            raise SystemExit(f"--dtype {args.dtype}: {state.notes}")
    return pipe


def run_ours(args) -> dict:
    """One process: setup, a warm-up (1 target, 2 tokens), then k = 1, 2, 3."""
    torch.set_num_threads(args.threads[0])
    with tempfile.TemporaryDirectory() as workdir:
        pipe = _load_for_run(args, workdir)
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_after_setup = _status_mib("VmRSS")
    clock = instrument(pipe)
    run_unified(pipe, ["t2w"], 2, clock)  # warm-up (allocator, kernels)
    results = [run_unified(pipe, TARGETS[:k], args.max_new_tokens, clock) for k in (1, 2, 3)]
    return {"implementation": "ours", "threads": torch.get_num_threads(), "dtype": args.dtype,
            "max_new_tokens": args.max_new_tokens, "bagel_dir": args.bagel_dir,
            "setup_peak_rss_mib": round(setup_peak, 1), "rss_after_setup_mib": rss_after_setup,
            "torch": torch.__version__, "results": results}


def print_ours(run: dict) -> None:
    weights = f"weights={run['bagel_dir']}" if run["bagel_dir"] else "weights=random"
    print(f"threads={run['threads']} max_new_tokens={run['max_new_tokens']} dtype={run['dtype']} {weights} "
          f"setup_peak_rss_mib={run['setup_peak_rss_mib']:.1f}")
    print("| targets | total s | CPU s | s per target | denoise s per target | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for row in run["results"]:
        per_target = row["total_s"] / row["targets"]
        print(f"| {row['targets']} | {row['total_s']} | {row['cpu_s']} | {per_target:.2f} | "
              f"{row['denoise_s_per_target']} | {row['peak_rss_mib']} |")


# ---------------------------------------------------------------------------------------------
# Side by side with the reference (its own interpreter and checkout)
# ---------------------------------------------------------------------------------------------
def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _reference_spec(threads: int, args) -> dict:
    from unibrain_hf.protocol import templates
    from unibrain_hf.protocol.prompts import (build_unified_diagnosis_prompt, build_unified_impression_prompt,
                                              build_unified_instructions)

    rgb = np.repeat(input_slice()[..., None], 3, axis=-1)
    return {"threads": threads, "max_new_tokens": args.max_new_tokens, "targets": [1, 2, 3], "num_grid_points": 10,
            "system_prompt": templates.GEN_THINK_SYSTEM_PROMPT,
            "instructions": build_unified_instructions(list(TARGETS)),
            "impression_prompt": build_unified_impression_prompt(),
            "diagnosis_prompt": build_unified_diagnosis_prompt(), "image_rgb": rgb.tolist()}


def _subprocess_json(command: list[str], threads: int) -> dict:
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    before = _loadavg()
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-5000:])
        raise SystemExit(f"{command[1]} failed with exit code {completed.returncode}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["loadavg_before"], result["loadavg_after"] = before, _loadavg()
    return result


def side_by_side(args) -> list[dict]:
    """Ours and the reference, each in fresh processes, interleaved per thread count and round."""
    import sys

    here = Path(__file__).resolve().parent
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as workdir:
        bagel_dir = args.bagel_dir
        if bagel_dir is None:  # the reference builds the weights once; ours converts them
            bagel_dir = f"{workdir}/bagel"
            subprocess_args = [args.reference_python, str(here / "reference_unified.py"), "--reference-repo",
                               args.reference_repo, "--make-weights", bagel_dir, "--fixture", args.fixture]
            import subprocess

            subprocess.run(subprocess_args, check=True, capture_output=True)
        for round_index in range(args.repeats):
            for threads in args.threads:
                spec_path = Path(workdir) / f"spec_{threads}.json"
                spec_path.write_text(json.dumps(_reference_spec(threads, args)))
                ours = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads),
                        "--max-new-tokens", str(args.max_new_tokens), "--bagel-dir", bagel_dir,
                        "--dtype", args.dtype]
                # The reference always runs float32 (its bf16 casts aliased away); --dtype is ours only.
                reference = [args.reference_python, str(here / "reference_unified.py"), "--reference-repo",
                             args.reference_repo, "--bagel-dir", bagel_dir, "--spec", str(spec_path)]
                order = [("ours", ours), ("reference", reference)]
                if round_index % 2:
                    order.reverse()
                for name, command in order:
                    result = _subprocess_json(command, threads)
                    result.update(implementation=name, round=round_index)
                    runs.append(result)
                    print(f"round {round_index} threads {threads} {name}: "
                          f"{[r['total_s'] for r in result['results']]} s, CPU "
                          f"{[r['cpu_s'] for r in result['results']]} s, load {result['loadavg_before']}",
                          flush=True)
    return runs


def summarize(runs: list[dict]) -> None:
    """Median over rounds of wall and CPU seconds per (threads, k), ours vs the reference."""
    import statistics

    print("| threads | k | ours wall s | ref wall s | wall ratio | ours CPU s | ref CPU s | CPU ratio | "
          "ours peak RSS MiB | ref peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in sorted({r["threads"] for r in runs}):
        for k in (1, 2, 3):
            cell = {}
            for name in ("ours", "reference"):
                rows = [row for r in runs if r["implementation"] == name and r["threads"] == threads
                        for row in r["results"] if row["targets"] == k]
                cell[name] = {key: statistics.median(row[key] for row in rows)
                              for key in ("total_s", "cpu_s", "peak_rss_mib")}
            o, f = cell["ours"], cell["reference"]
            print(f"| {threads} | {k} | {o['total_s']:.2f} | {f['total_s']:.2f} | {o['total_s'] / f['total_s']:.2f} | "
                  f"{o['cpu_s']:.2f} | {f['cpu_s']:.2f} | {o['cpu_s'] / f['cpu_s']:.2f} | {o['peak_rss_mib']:.0f} | "
                  f"{f['peak_rss_mib']:.0f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch CPU thread counts")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="text budget per generated text")
    parser.add_argument("--fixture", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "bagel_tiny"),
                        help="BAGEL fixture (tokenizer)")
    parser.add_argument("--bagel-dir", help="benchmark the weights of this BAGEL-format directory (converted "
                                            "first) instead of the random model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "bfloat16+vae"), default="float32",
                        help="ours: model weights' dtype; bfloat16+vae also runs the VAE in bf16 (latents and the "
                             "Euler update stay float32). The reference always runs float32")
    parser.add_argument("--reference-repo", help="a checkout of the reference repository: run it side by side")
    parser.add_argument("--reference-python", help="the reference environment's interpreter")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (side by side)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_repo:
        if not args.reference_python:
            parser.error("--reference-repo needs --reference-python (the reference environment's interpreter)")
        runs = side_by_side(args)
        summarize(runs)
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs}, indent=2))
        return
    if args.worker:
        print(json.dumps(run_ours(args)))
        return
    for threads in args.threads:
        args_one = argparse.Namespace(**{**vars(args), "threads": [threads]})
        run = run_ours(args_one)
        print_ours(run)
        if args.json:
            Path(args.json).write_text(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
