"""CPU benchmark of ``UniBrainPipeline``'s unified task: 1 input slice → k targets + impression + diagnosis.

Workload: a small but realistically shaped random model (MoT decoder hidden 512, 4 layers,
8 query / 2 KV heads, intermediate 1376; SigLIP hidden 256, 4 layers; FLUX-shaped VAE with 64
base channels), 128×128 slices, 10 sampler grid points (9 Euler steps), both guidance branches
on (text 3, image 1.2, interval [0.4, 1], text_channel), thinking before every image. Random
weights never emit ``<|im_end|>``, so every text runs to ``--max-new-tokens`` decode steps (most
ids drawn fall outside the small test tokenizer and decode to nothing, so the text that re-enters
the context is much shorter than the budget). After a short warm-up, runs k = 1, 2, 3 targets in
one process and reports wall time, time per target, the denoising time of each target (the rest
is text, VAE decode/re-encode, ViT and prefill), the peak RSS of each run (``VmHWM``, reset after
setup and before each run; Linux) and the peak RSS of the setup. ``--json`` also records the
context lengths each image is denoised against and the token counts of the generated texts.

Run from the repository root (under half a minute on an idle 2-core machine):

    python benchmarks/bench_pipeline.py --threads 2 --max-new-tokens 32

The tokenizer is converted from the BAGEL fixture (``--fixture``) into a temporary directory.
``--bagel-dir DIR`` instead converts a BAGEL-format directory of the same sizes (configs,
``ema.safetensors``, ``ae.safetensors``, tokenizer; its ``model_config.json`` sets the image sizes,
here 128 for the VAE and 126 for the ViT) and benchmarks its weights, e.g. to run the very weights
the reference implementation is timed with.
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


def run_unified(pipe, targets, max_new_tokens: int) -> dict:
    rng = np.random.default_rng(SEED)
    image = rng.normal(100, 25, size=(128, 128)).astype(np.float32)
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

    reset_ok = _reset_peak_rss()
    start = time.perf_counter()
    output = pipe(images={"t1n": image}, target_modalities=list(targets), task="unified", num_grid_points=10,
                  max_new_tokens=max_new_tokens, generator=torch.Generator().manual_seed(SEED),
                  callback_on_step_end=timer, callback_on_step_end_tensor_inputs=["target_modality", "context"])
    total = time.perf_counter() - start
    peak = _peak_rss_mib(reset_ok)
    for code, times in marks.items():
        # first mark is after step 0; extrapolate the first step with the mean of the others
        mean_step = (times[-1] - times[0]) / max(len(times) - 1, 1)
        denoise_seconds[code] = round(times[-1] - times[0] + mean_step, 3)
    return {"targets": len(targets), "total_s": round(total, 2), "denoise_s_per_target": denoise_seconds,
            "peak_rss_mib": round(peak, 1), "context_at_image": context_lengths,
            "thinking_tokens": {code: len(pipe.tokenize(texts[0])) for code, texts in output.thinking.items()},
            "impression_tokens": len(pipe.tokenize(output.impression[0])),
            "diagnosis_tokens": len(pipe.tokenize(output.diagnosis[0]))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="text budget per generated text")
    parser.add_argument("--fixture", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "bagel_tiny"),
                        help="BAGEL fixture (tokenizer)")
    parser.add_argument("--bagel-dir", help="benchmark the weights of this BAGEL-format directory (converted "
                                            "first) instead of the random model")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from unibrain_hf.convert.convert_bagel import convert_bagel_checkpoint

    with tempfile.TemporaryDirectory() as workdir:
        if args.bagel_dir:
            convert_bagel_checkpoint(args.bagel_dir, f"{workdir}/converted")
            pipe = load_pipeline(f"{workdir}/converted")
        else:
            convert_bagel_checkpoint(args.fixture, f"{workdir}/converted")
            pipe = build_pipeline(f"{workdir}/converted/tokenizer")
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run_unified(pipe, ["t2w"], 2)  # warm-up (allocator, kernels)
    results = [run_unified(pipe, ["t2w", "t2f", "t1c"][:k], args.max_new_tokens) for k in (1, 2, 3)]
    weights = f"weights={args.bagel_dir}" if args.bagel_dir else "weights=random"
    print(f"threads={args.threads} max_new_tokens={args.max_new_tokens} {weights} "
          f"setup_peak_rss_mib={setup_peak:.1f}")
    print("| targets | total s | s per target | denoise s per target | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for row in results:
        per_target = row["total_s"] / row["targets"]
        print(f"| {row['targets']} | {row['total_s']} | {per_target:.2f} | {row['denoise_s_per_target']} | "
              f"{row['peak_rss_mib']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": args.threads, "max_new_tokens": args.max_new_tokens,
                       "bagel_dir": args.bagel_dir, "setup_peak_rss_mib": round(setup_peak, 1),
                       "torch": torch.__version__, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
