"""CPU benchmark of one UniBrain training step: VAE encode (no grad) + forward + backward.

The workload is a small but realistically shaped model (MoT decoder hidden 512, 4 layers,
8 query / 2 KV heads; SigLIP hidden 256, 4 layers; FLUX-shaped VAE with 64 base channels)
trained on one pack of 4 interleaved image-editing samples:

    [instruction text, no loss] [128×128 input image: clean VAE + ViT] [think text, CE loss]
    [128×128 target image: noisy VAE (MSE loss) + clean VAE + ViT] [answer text, CE loss]

VAE images are kept at 128×128 (stride 16 → 8×8 = 64 latent tokens), ViT images are resized
to 126×126 (stride 14 → 9×9 = 81 tokens). Every configuration (thread count, attention
backend) runs in a fresh subprocess, so the reported peak RSS (``ru_maxrss``) is its own.
Packing happens once, before timing; each timed step is ``zero_grad`` → VAE encode under
``no_grad`` → training forward → ``loss.backward()``.

Run from the repository root (about 1.5 minutes on an idle 2-core machine, longer under load):

    python benchmarks/bench_train_step.py --threads 1 2 --repeats 7 --warmup 2 --attn sdpa

``--json PATH`` also writes the results as JSON. The tokenizer is converted from the BAGEL
fixture (``--fixture``, default ``tests/fixtures/bagel_tiny``) into a temporary directory
unless ``--tokenizer`` points at an existing one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_FIXTURE = str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "bagel_tiny")
SEED = 20261122
NUM_SAMPLES = 4
IMAGE_SIZE = 128
TEXTS = {
    # token counts with the fixture tokenizer (special tokens excluded): 15, 21, 10
    "instruction": "Translate the T1 to T2.",
    "think": "<think>T1 to T2 image</think>",
    "answer": "Dx: Glioma",
}


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------
def build_config(attn_implementation: str):
    from transformers import Qwen2Config, SiglipVisionConfig

    from unibrain_hf.modeling.configuration_unibrain import UniBrainConfig

    text = Qwen2Config(
        vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False)
    vision = SiglipVisionConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_channels=3,
        image_size=70 * 14, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    config = UniBrainConfig(
        text_config=text, vision_config=vision, latent_patch_size=2, max_latent_size=64,
        vit_max_num_patch_per_side=70, latent_channels=16, vae_downsample=8,
        bos_token_id=291, eos_token_id=292, start_of_image_token_id=293, end_of_image_token_id=294)
    config._attn_implementation = attn_implementation
    return config


def build_batch(tokenizer_dir: str):
    import numpy as np
    from transformers import AutoTokenizer

    from unibrain_hf.processing.processor import UniBrainProcessor
    from unibrain_hf.processing.sequence_plan import image_items, text_item

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    processor = UniBrainProcessor(
        tokenizer, vae_max_size=128, vae_min_size=128, vae_stride=16, vit_max_size=126, vit_min_size=126,
        vit_patch_size=14, max_latent_size=64, vit_max_num_patch_per_side=70)
    rng = np.random.default_rng(SEED)
    samples = []
    for _ in range(NUM_SAMPLES):
        source = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        target = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        samples.append([
            text_item(TEXTS["instruction"], loss=False),
            *image_items(source, need_loss=False, need_vae=True, need_vit=True),
            text_item(TEXTS["think"], loss=True),
            *image_items(target, need_loss=True, need_vae=True, need_vit=True),
            text_item(TEXTS["answer"], loss=True),
        ])
    return processor.pack(samples, rng=SEED)


def layout_summary(batch) -> dict:
    vit_tokens = 0 if batch.vit_seqlens is None else int(batch.vit_seqlens.sum())
    vae_tokens = 0 if batch.vae_token_indexes is None else int(batch.vae_token_indexes.numel())
    return {
        "sequence_length": int(batch.sequence_length),
        "sample_lens": [int(s) for s in batch.sample_lens],
        "text_tokens": int(batch.input_ids.numel()),
        "vit_tokens": vit_tokens,
        "vae_tokens": vae_tokens,
        "ce_tokens": batch.num_ce_tokens,
        "mse_tokens": batch.num_mse_tokens,
        "vae_images": int(batch.padded_images.shape[0]),
    }


# ---------------------------------------------------------------------------------------------
# One configuration, measured in its own process
# ---------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_worker(threads: int, attn: str, repeats: int, warmup: int, tokenizer_dir: str) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from unibrain_hf.modeling.modeling_unibrain import UniBrainForConditionalGeneration
    from unibrain_hf.modeling.vae import encode_latents, flux_vae_config

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    model = UniBrainForConditionalGeneration(build_config(attn)).float().train()
    vae = AutoencoderKL(**flux_vae_config(64, (1, 2, 4, 4), 1, 16, 128)).float().eval().requires_grad_(False)
    batch = build_batch(tokenizer_dir)
    rss_after_setup = peak_rss_mib()

    def step() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            latents = encode_latents(vae, batch.padded_images)
        loss = model(**batch.model_inputs(latents), flow_noise=None).loss
        loss.backward()
        return time.perf_counter() - start, time.process_time() - cpu_start

    for _ in range(warmup):
        step()
    measured = [step() for _ in range(repeats)]
    times = [wall for wall, _ in measured]
    cpu_times = [cpu for _, cpu in measured]
    median = statistics.median(times)
    layout = layout_summary(batch)
    return {
        "implementation": "unibrain_hf",
        "attn_implementation": model.config._attn_implementation,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "times_s": times,
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "tokens_per_s": layout["sequence_length"] / median,
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_setup_mib": rss_after_setup,
        "num_parameters": model.num_parameters(),
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "layout": layout,
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def prepare_tokenizer(args, workdir: str) -> str:
    if args.tokenizer:
        return args.tokenizer
    from unibrain_hf.convert.convert_bagel import convert_bagel_checkpoint

    converted = Path(workdir) / "converted"
    convert_bagel_checkpoint(args.fixture, converted)
    return str(converted / "tokenizer")


def run_configuration(threads: int, args, tokenizer_dir: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads),
               "--attn", args.attn, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--tokenizer", tokenizer_dir]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"worker for {threads} thread(s) failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(results: list[dict]) -> None:
    layout = results[0]["layout"]
    print(f"packed sequence: {layout['sequence_length']} tokens ({layout['sample_lens']} per sample; "
          f"text {layout['text_tokens']}, ViT {layout['vit_tokens']}, VAE {layout['vae_tokens']}; "
          f"CE {layout['ce_tokens']}, MSE {layout['mse_tokens']}; {layout['vae_images']} VAE images)")
    print(f"{'attn':6} {'threads':>7} {'median s':>9} {'min s':>7} {'max s':>7} {'tokens/s':>9} {'CPU s':>6} "
          f"{'peak RSS MiB':>13}")
    for r in results:
        print(f"{r['attn_implementation']:6} {r['threads']:>7} {r['median_s']:>9.3f} {r['min_s']:>7.3f} "
              f"{r['max_s']:>7.3f} {r['tokens_per_s']:>9.0f} {r['median_cpu_s']:>6.2f} {r['peak_rss_mib']:>13.1f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="model attention backend")
    parser.add_argument("--fixture", default=DEFAULT_FIXTURE, help="BAGEL fixture holding the tokenizer")
    parser.add_argument("--tokenizer", default=None, help="an already converted tokenizer directory")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.threads) < 1:
        parser.error("--repeats and --threads must be positive and --warmup non-negative")

    if args.worker:
        result = run_worker(args.threads[0], args.attn, args.repeats, args.warmup, args.tokenizer)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as workdir:
        tokenizer_dir = prepare_tokenizer(args, workdir)
        results = [run_configuration(threads, args, tokenizer_dir) for threads in args.threads]
    import torch

    machine = {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
               "torch": torch.__version__}
    print(f"machine: {machine['nproc']} CPUs, {machine['cpu']}, python {machine['python']}, "
          f"torch {machine['torch']}")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
