"""Training MFU of the BAGEL-7B-MoT ("14B", two 7B experts) decoder layer shapes on one GPU.

The model is ``UniBrainConfig.bagel_7b_mot`` (Qwen2.5-7B decoder: hidden 3584, intermediate
18944, 28 query / 4 KV heads, head dim 128, vocabulary 152064, two experts per layer; SigLIP-so400m
ViT) with ``--layers`` decoder layers and ``--vit-layers`` ViT layers, so it fits one GPU with its
optimizer; every layer has the full 14B-model shapes, and MFU per layer is what the full model
gets per layer (the full model adds more identical layers). Training as the trainer does it:
fp32 master weights, bf16 autocast (``--mixed-precision``), AdamW, global-norm clipping; the VAE
is not run (its latents come from the latent cache in training), so the step is: forward (CE +
rectified-flow MSE) → backward → clip → AdamW.

The pack: ``--samples`` interleaved image-editing samples, each [instruction] [input image: ViT
``--vit-size`` px + clean VAE latents] [thinking text, CE] [target: noisy VAE latents (MSE) + clean
VAE latents] [answer, CE], VAE images ``--vae-size`` px (16 px per latent token), packed by the
package's own processor. FLOPs are counted once with ``torch.utils.flop_counter`` (every matmul,
attention included) on a separate step; MFU = counted FLOPs / median step time / peak, the peak
being the GPU's dense bf16 peak (H100 / H200 SXM: 989 TFLOP/s; ``UNIBRAIN_PEAK_TFLOPS`` overrides).

On one H100/H200 (a few minutes, most of it building the model):

    python benchmarks/bench_train_mfu.py --layers 4 --samples 4 --steps 10 --json runs/bench/train_mfu.json
    python benchmarks/bench_train_mfu.py --attn flex_attention --compile      # other backends

``--dry-run`` runs the same code on the CPU with a tiny configuration (used by the test suite):

    python benchmarks/bench_train_mfu.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "bagel_tiny"
SEED = 20261201


def build_tokenizer(workdir: Path):
    """The fixture's byte-level BPE with BAGEL's special tokens (ids are all the pack needs)."""
    from unibrain_hf.convert.convert_bagel import load_bagel_tokenizer

    tokenizer, special = load_bagel_tokenizer(FIXTURE)
    return tokenizer, special


def build_model(args, special: dict, device):
    import torch

    from unibrain_hf.modeling import UniBrainConfig, UniBrainForConditionalGeneration

    ids = dict(bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
               start_of_image_token_id=special["start_of_image"], end_of_image_token_id=special["end_of_image"])
    if args.dry_run:
        config = UniBrainConfig.tiny(vocab_size=320, **ids)
    else:
        config = UniBrainConfig.bagel_7b_mot(**ids)
        config.text_config.num_hidden_layers = args.layers
        config.vision_config.num_hidden_layers = args.vit_layers
    config._attn_implementation = args.attn
    torch.manual_seed(SEED)
    with torch.device(device):
        model = UniBrainForConditionalGeneration(config)
    return model.float().train()


def build_pack(args, tokenizer, config):
    import numpy as np

    from unibrain_hf.processing.processor import UniBrainProcessor
    from unibrain_hf.processing.sequence_plan import image_items, text_item

    processor = UniBrainProcessor.for_model(config, tokenizer, vae_max_size=args.vae_size, vae_min_size=args.vae_size,
                                            vit_max_size=args.vit_size, vit_min_size=args.vit_size)
    rng = np.random.default_rng(SEED)
    words = "the lesion in the left frontal lobe shows T2 hyperintensity with mild mass effect".split()

    def text(count):
        return " ".join(rng.choice(words, size=count))

    samples = []
    for _ in range(args.samples):
        source = rng.integers(0, 256, size=(args.vae_size, args.vae_size, 3), dtype=np.uint8)
        target = rng.integers(0, 256, size=(args.vae_size, args.vae_size, 3), dtype=np.uint8)
        samples.append([text_item(text(20), loss=False),
                        *image_items(source, need_loss=False, need_vae=True, need_vit=True),
                        text_item(text(60), loss=True),
                        *image_items(target, need_loss=True, need_vae=True, need_vit=False),
                        text_item(text(30), loss=True)])
    return processor.pack(samples, rng=SEED)


def set_attention(model, implementation: str) -> None:
    for module in [model, *model.modules()]:
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = implementation
    for config in (model.config, model.config.text_config, model.config.vision_config):
        config._attn_implementation = implementation


def to_device(batch, device):
    import torch

    for name in batch.model_input_names():
        value = getattr(batch, name)
        if torch.is_tensor(value):
            setattr(batch, name, value.to(device))
    return batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (full 14B shapes each)")
    parser.add_argument("--vit-layers", type=int, default=2, help="ViT layers (SigLIP-so400m shapes)")
    parser.add_argument("--samples", type=int, default=4, help="samples in the pack")
    parser.add_argument("--vae-size", type=int, default=512, help="VAE image side in px (16 px per latent token)")
    parser.add_argument("--vit-size", type=int, default=448, help="ViT image side in px (14 px per patch)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--mixed-precision", choices=("bf16", "fp16", "no"), default="bf16")
    parser.add_argument("--attn", choices=("sdpa", "eager", "flex_attention", "flash_attention_2"), default="sdpa")
    parser.add_argument("--compile", action="store_true", help="train.compile: compile the decoder's dense blocks")
    parser.add_argument("--no-optimizer", action="store_true", help="time forward + backward only")
    parser.add_argument("--dry-run", action="store_true", help="tiny configuration on the CPU (a check of this script)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)

    import torch

    from unibrain_hf.train.precision import check_mixed_precision
    from unibrain_hf.train.trainer import _peak_flops

    if args.dry_run:
        device = torch.device("cpu")
        args.samples, args.vae_size, args.vit_size, args.steps, args.warmup = 2, 32, 28, 1, 1
        if args.mixed_precision == "fp16":
            args.mixed_precision = "no"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here; use --dry-run to check the script on the CPU")
        device = torch.device("cuda")
    check_mixed_precision(args.mixed_precision, device, what="--mixed-precision")
    if args.mixed_precision == "bf16" and device.type == "cpu":
        from unibrain_hf.train.precision import cpu_bf16_support

        if cpu_bf16_support() is None:
            args.mixed_precision = "no"

    with tempfile.TemporaryDirectory() as workdir:
        tokenizer, special = build_tokenizer(Path(workdir))
    started = time.perf_counter()
    model = build_model(args, special, device)
    batch = to_device(build_pack(args, tokenizer, model.config), device)
    shapes = batch.latent_shapes
    patch, channels = model.config.latent_patch_size, model.config.latent_channels
    height = max(h for h, _ in shapes) * patch
    width = max(w for _, w in shapes) * patch
    generator = torch.Generator(device=device).manual_seed(SEED)
    latents = torch.randn(len(shapes), channels, height, width, device=device, generator=generator)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if args.no_optimizer else torch.optim.AdamW(
        parameters, lr=1e-5, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    setup_s = time.perf_counter() - started

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            output = model(**batch.model_inputs(latents))
        loss = output.ce_per_token.mean() + output.mse_per_element.mean(dim=-1).mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if optimizer is not None:
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    from torch.utils.flop_counter import FlopCounterMode

    # FLOPs first, eagerly and with SDPA: the counter knows SDPA's kernels (not flex's block-sparse one,
    # nor compiled graphs), and MFU counts the model's dense per-sample attention whatever runs it.
    set_attention(model, "sdpa" if args.attn != "eager" else "eager")
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    set_attention(model, args.attn)
    if args.compile:
        from unibrain_hf.train.compile import compile_decoder

        compile_decoder(model, device, what="--compile")
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        synchronize()
        begin = time.perf_counter()
        losses.append(float(step()))
        synchronize()
        times.append(time.perf_counter() - begin)
    median = statistics.median(times)
    peak = _peak_flops(device) or (1e12 if args.dry_run else None)
    tokens = int(batch.sequence_length)
    # Parameters a token's matmuls use: one expert per token; embeddings are lookups, lm_head runs on CE rows only.
    active = sum(p.numel() for n, p in model.named_parameters()
                 if ".gen." not in n and "embed_tokens" not in n and "lm_head" not in n)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__, "layers": model.config.text_config.num_hidden_layers,
        "vit_layers": model.config.vision_config.num_hidden_layers, "hidden": model.config.text_config.hidden_size,
        "mixed_precision": args.mixed_precision, "attn": args.attn, "compile": args.compile,
        "optimizer": optimizer is not None, "pack_tokens": tokens, "sample_lens": [int(s) for s in batch.sample_lens],
        "parameters": sum(p.numel() for p in model.parameters()), "active_parameters_per_token": active,
        "setup_s": setup_s, "step_times_s": times, "median_step_s": median, "tokens_per_s": tokens / median,
        "flops_per_step": flops, "achieved_tflops": flops / median / 1e12,
        "analytic_6nt_tflop": 6 * active * tokens / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else flops / median / peak,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses": losses,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    if result["mfu"] is not None:
        print(f"MFU {100 * result['mfu']:.1f} % ({result['achieved_tflops']:.1f} of {result['peak_tflops']:.0f} "
              f"TFLOP/s), {result['tokens_per_s']:.0f} tokens/s, {tokens} tokens per pack", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
