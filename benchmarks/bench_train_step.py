"""One UniBrain training step on CPU, ours against the unmodified reference: same weights, same pack.

Workload (the "bench preset"): MoT decoder hidden 512, 4 layers, 8 query / 2 KV heads,
intermediate 1376, vocabulary 1024; SigLIP hidden 256, 4 layers; FLUX-shaped VAE with 64 base
channels; one pack of 4 interleaved image-editing samples (1664 tokens):

    [instruction text, no loss] [128×128 input image: clean VAE + ViT] [think text, CE loss]
    [128×128 target image: noisy VAE (MSE loss) + clean VAE + ViT] [answer text, CE loss]

Identical weights: the reference builds its seeded random model with its own classes and writes
it as a BAGEL-format directory; ours converts that directory (``convert_bagel_checkpoint``).
Identical batch: ours packs the samples (the parity tool checks our packing equals the
reference's, field by field) and the reference receives the same tensors under its own names,
with the attention masks built by its own ``prepare_attention_mask_per_sample``.

Modes, each run in a fresh process (so peak RSS, ``ru_maxrss``, is its own) and interleaved:

* ``reference``: the reference step in fp32 — ``vae.encode`` of every padded image (no grad),
  ``Bagel.forward`` with per-sample masks, ``ce.sum()/N_ce + mse.mean(-1).sum()/N_mse``, backward;
* ``ours``: our exact-parity fp32 step with the latent cache — posterior parameters looked up in
  the cache (filled before timing, as ``unibrain cache-latents`` does), ε drawn, forward, backward;
* ``ours-encode``: the same without the cache (every distinct image encoded every step);
* ``ours-bf16``: ``ours`` under CPU bf16 autocast (fp32 weights); its worker also runs the same
  step in fp32 (same seeds) and reports the loss and gradient drift.

Every worker does ``--warmup`` untimed steps, then ``--repeats`` timed ones (wall and process CPU
time), then counts the step's FLOPs with ``torch.utils.flop_counter`` (matmuls, convolutions,
attention; attention counted on its matmul form) in one more untimed step. Achieved GFLOP/s is
FLOPs / median wall time, against the peak measured here: a 2048³ matmul (fp32 and bf16, best of
8) at each thread count, in its own process. The 1-minute load average is recorded around every
worker.

The reference runs in its own environment (torch 2.13 CPU, transformers 4.49, einops, safetensors,
pillow) from a checkout of its repository; nothing of it is part of this repository. To run it on
CPU the worker, at import time only: stubs ``flash_attn.flash_attn_varlen_func`` (one SDPA call
per ``cu_seqlens`` segment), makes its ``sdpa_kernel(EFFICIENT_ATTENTION)`` pin a no-op (no CPU
kernel exists for it) and aliases ``torch.bfloat16`` to float32 inside its two attention modules
(its hard-coded casts would otherwise mix dtypes with fp32 weights); everything else is its code.

Run from the repository root (about 12 minutes on an idle 2-core machine):

    python benchmarks/bench_train_step.py --reference-dir REF_CHECKOUT --reference-python REF_ENV/bin/python \\
        --threads 1 2 --rounds 2 --repeats 5 --warmup 2 --json runs/bench/train_step.json

Without ``--reference-dir`` only our modes run. ``--modes`` picks modes, ``--attn`` our attention
backend (``sdpa`` default; ``eager``).
"""

from __future__ import annotations

import argparse
import contextlib
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURE = REPO / "tests" / "fixtures" / "bagel_tiny"
SEED = 20261122
NUM_SAMPLES = 4
IMAGE_SIZE = 128
TEXTS = {
    # token counts with the fixture tokenizer (special tokens excluded): 15, 21, 10
    "instruction": "Translate the T1 to T2.",
    "think": "<think>T1 to T2 image</think>",
    "answer": "Dx: Glioma",
}
MODES = ("ours", "ours-encode", "ours-bf16", "reference")

# BAGEL-format configuration of the bench preset (what the reference reads; ours converts it).
LLM_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 1024, "hidden_size": 512,
    "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
    "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
    "rope_scaling": None, "tie_word_embeddings": False, "layer_module": "Qwen2MoTDecoderLayer", "qk_norm": True,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 28, "bos_token_id": 291, "eos_token_id": 292,
    "freeze_und": False, "freeze_gen": False, "is_causal": True,
}
VIT_CONFIG = {  # num_hidden_layers stored as effective + 1 (BAGEL convention with vit_select_layer -2)
    "model_type": "siglip_vision_model", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 5,
    "num_attention_heads": 4, "num_channels": 3, "image_size": 70 * 14, "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0, "rope": False,
}
MODEL_CONFIG = {
    "visual_gen": True, "visual_und": True, "layer_module": "Qwen2MoTDecoderLayer", "llm_qk_norm": True,
    "tie_word_embeddings": False, "vit_select_layer": -2, "vit_rope": False, "latent_patch_size": 2,
    "max_latent_size": 64, "vit_max_num_patch_per_side": 70, "connector_act": "gelu_pytorch_tanh",
    "interpolate_pos": False, "timestep_shift": 1.0,
    "vae": {"resolution": 128, "in_channels": 3, "downsample": 8, "ch": 64, "out_ch": 3, "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 1, "z_channels": 16, "scale_factor": 0.3611, "shift_factor": 0.1159},
    "vae_transform": {"max_image_size": 128, "min_image_size": 128, "image_stride": 16},
    "vit_transform": {"max_image_size": 126, "min_image_size": 126, "image_stride": 14},
    "special_token_ids": {"bos_token_id": 291, "eos_token_id": 292, "start_of_image": 293, "end_of_image": 294},
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def timed_steps(step, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        step()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"times_s": walls, "cpu_times_s": cpus, "median_s": statistics.median(walls), "min_s": min(walls),
            "max_s": max(walls), "median_cpu_s": statistics.median(cpus)}


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# Our side (this repository's environment)
# ---------------------------------------------------------------------------------------------
def build_samples(rng_seed: int = SEED):
    import numpy as np

    from unibrain_hf.processing.sequence_plan import image_items, text_item

    rng = np.random.default_rng(rng_seed)
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
    return samples


def build_batch(converted: Path):
    from unibrain_hf.processing.processor import UniBrainProcessor

    processor = UniBrainProcessor.from_pretrained(converted / "processor")
    return processor, processor.pack(build_samples(), rng=SEED)


def layout_summary(batch) -> dict:
    return {
        "sequence_length": int(batch.sequence_length), "sample_lens": [int(s) for s in batch.sample_lens],
        "text_tokens": int(batch.input_ids.numel()),
        "vit_tokens": 0 if batch.vit_seqlens is None else int(batch.vit_seqlens.sum()),
        "vae_tokens": 0 if batch.vae_token_indexes is None else int(batch.vae_token_indexes.numel()),
        "ce_tokens": batch.num_ce_tokens, "mse_tokens": batch.num_mse_tokens,
        "vae_images": int(batch.padded_images.shape[0]),
    }


def write_reference_batch(batch, path: Path) -> None:
    """Our pack under the reference's ``forward_normal`` argument names (tensors + a JSON of lists)."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        "packed_text_ids": batch.input_ids, "packed_text_indexes": batch.text_indexes,
        "packed_position_ids": batch.position_ids, "ce_loss_indexes": batch.ce_loss_indexes,
        "packed_label_ids": batch.labels, "packed_vit_tokens": batch.vit_pixel_patches,
        "packed_vit_token_indexes": batch.vit_token_indexes, "packed_vit_position_ids": batch.vit_position_ids,
        "vit_token_seqlens": batch.vit_seqlens.to(dtype=torch.int32),
        "padded_images": batch.padded_images, "packed_latent_position_ids": batch.latent_position_ids,
        "packed_vae_token_indexes": batch.vae_token_indexes, "packed_timesteps": batch.timesteps,
        "mse_loss_indexes": batch.mse_loss_indexes,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({
        "sequence_length": int(batch.sequence_length), "sample_lens": [int(s) for s in batch.sample_lens],
        "split_lens": [int(s) for s in batch.split_lens], "attn_modes": list(batch.attn_modes),
        "patchified_vae_latent_shapes": [list(map(int, s)) for s in batch.latent_shapes]}))


def fill_latent_cache(converted: Path, cache_dir: Path) -> int:
    import torch
    from diffusers import AutoencoderKL

    from unibrain_hf.data.latent_cache import LatentCache, pack_distributions

    vae = AutoencoderKL.from_pretrained(str(converted / "vae")).eval().requires_grad_(False)
    processor, batch = build_batch(converted)
    cache = LatentCache.open(cache_dir, vae, processor.vae_resize)
    with torch.no_grad():
        pack_distributions(vae, batch.padded_images, cache)
    return cache.writes


def run_ours(mode: str, threads: int, attn: str, repeats: int, warmup: int, converted: Path, cache_dir: Path,
             compile_decoder: bool = False) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from unibrain_hf.data.latent_cache import LatentCache, pack_distributions, sample_latents
    from unibrain_hf.modeling import UniBrainForConditionalGeneration

    torch.set_num_threads(threads)
    model = UniBrainForConditionalGeneration.from_pretrained(str(converted / "model"), attn_implementation=attn,
                                                             dtype=torch.float32).train()
    vae = AutoencoderKL.from_pretrained(str(converted / "vae")).eval().requires_grad_(False)
    if compile_decoder:
        from unibrain_hf.train.compile import compile_decoder as compile_blocks

        compile_blocks(model)
    processor, batch = build_batch(converted)
    cache = LatentCache.open(cache_dir, vae, processor.vae_resize, create=False) if mode != "ours-encode" else None
    rss_after_setup = peak_rss_mib()
    bf16 = mode == "ours-bf16"

    def step(autocast: bool = bf16):
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            found = cache.lookup(batch.padded_images) if cache is not None else None  # the packed dataset's read
            mean, logvar = pack_distributions(vae, batch.padded_images, cache, found)
            latents = sample_latents(vae, mean, logvar)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch.model_inputs(latents)).loss
        loss.backward()
        return loss.detach()

    timing = timed_steps(step, warmup, repeats)
    if cache is not None and cache.misses:
        raise RuntimeError(f"the latent cache missed {cache.misses} images during the timed steps")
    result = {"implementation": "ours", "mode": mode, "attn_implementation": attn, "compile": compile_decoder,
              "threads": threads,
              "torch_threads": torch.get_num_threads(), **timing, "peak_rss_mib": peak_rss_mib(),
              "rss_after_setup_mib": rss_after_setup, "num_parameters": model.num_parameters(),
              "layout": layout_summary(batch), "torch": torch.__version__}

    # Drift of the bf16 step against the fp32 step on identical inputs and noise (same seeds).
    if bf16:
        def seeded(autocast):
            torch.manual_seed(SEED)
            loss = step(autocast)
            return float(loss), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                 if p.grad is not None}

        loss32, grads32 = seeded(False)
        loss16, grads16 = seeded(True)
        diff = sum(float((grads16[n] - grads32[n]).pow(2).sum()) for n in grads32) ** 0.5
        norm = sum(float(g.pow(2).sum()) for g in grads32.values()) ** 0.5
        # Worst relative error among parameters whose fp32 gradient is not rounding noise (e.g. key biases,
        # whose exact gradient is zero because softmax ignores a shift of all keys).
        floor = 1e-4 * norm / len(grads32) ** 0.5
        relevant = [n for n in grads32 if float(grads32[n].norm()) > floor]
        worst = max(relevant, key=lambda n: float((grads16[n] - grads32[n]).norm() / grads32[n].norm()))
        result["drift"] = {
            "loss_fp32": loss32, "loss_bf16": loss16, "loss_abs": abs(loss16 - loss32),
            "loss_rel": abs(loss16 - loss32) / abs(loss32), "grad_global_rel": diff / norm,
            "grad_worst_param": worst,
            "grad_worst_param_rel": float((grads16[worst] - grads32[worst]).norm() / grads32[worst].norm()),
            "cosine": float(sum(float((grads16[n] * grads32[n]).sum()) for n in grads32)
                            / (norm * sum(float(g.pow(2).sum()) for g in grads16.values()) ** 0.5)),
        }

    # FLOPs of one step (attention counted through its matmul form: the fused CPU kernels are not
    # known to the counter).
    for layer in model.modules():
        if getattr(layer, "config", None) is not None and hasattr(layer.config, "_attn_implementation"):
            layer.config._attn_implementation = "eager"
    model.config._attn_implementation = "eager"
    result["flops"] = count_flops(step)
    return result


# ---------------------------------------------------------------------------------------------
# The reference side (its own environment; nothing from this repository is imported)
# ---------------------------------------------------------------------------------------------
def _reference_imports(reference_dir: str):
    """Import the reference with the three CPU stand-ins described in the module docstring."""
    import importlib.machinery
    import types

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, reference_dir)
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                               dropout_p=0.0, softmax_scale=None, causal=False, **_):
        outputs = []
        groups = q.shape[1] // k.shape[1]
        for index in range(len(cu_seqlens_q) - 1):
            qs = q[cu_seqlens_q[index]:cu_seqlens_q[index + 1]].transpose(0, 1)
            ks = k[cu_seqlens_k[index]:cu_seqlens_k[index + 1]].transpose(0, 1).repeat_interleave(groups, 0)
            vs = v[cu_seqlens_k[index]:cu_seqlens_k[index + 1]].transpose(0, 1).repeat_interleave(groups, 0)
            mask = None
            if causal:  # bottom-right aligned, as flash-attn >= 2.1
                lq, lk = qs.shape[1], ks.shape[1]
                mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
            outputs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale)
                           .transpose(0, 1))
        return torch.cat(outputs)

    stub = types.ModuleType("flash_attn")
    # A spec without a distribution: transformers' availability probe then reports no flash-attn, as on any CPU.
    stub.__spec__ = importlib.machinery.ModuleSpec("flash_attn", loader=None)
    stub.flash_attn_varlen_func = flash_attn_varlen_func
    sys.modules["flash_attn"] = stub

    class _Float32AsBfloat16(types.ModuleType):
        def __getattr__(self, name):
            return torch.float32 if name == "bfloat16" else getattr(torch, name)

    import modeling.bagel.qwen2_navit as qwen2_navit
    import modeling.bagel.siglip_navit as siglip_navit

    for module in (qwen2_navit, siglip_navit):
        module.torch = _Float32AsBfloat16("torch")
    qwen2_navit.sdpa_kernel = lambda *args, **kwargs: contextlib.nullcontext()
    from data.data_utils import prepare_attention_mask_per_sample
    from modeling.autoencoder import AutoEncoder, AutoEncoderParams
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    return types.SimpleNamespace(**locals())


def _reference_model(ref, bagel_dir: Path, load: bool):
    import torch

    llm_config = ref.Qwen2Config.from_json_file(str(bagel_dir / "llm_config.json"))
    for key in ("layer_module", "qk_norm", "tie_word_embeddings", "freeze_und", "freeze_gen"):
        setattr(llm_config, key, LLM_CONFIG[key])
    torch.manual_seed(SEED)
    language_model = ref.Qwen2ForCausalLM(llm_config)
    language_model.init_moe()
    vit_config = ref.SiglipVisionConfig.from_json_file(str(bagel_dir / "vit_config.json"))
    vit_config.num_hidden_layers = vit_config.num_hidden_layers + 1 + MODEL_CONFIG["vit_select_layer"]
    vit_config.rope = False
    vit_model = ref.SiglipVisionModel(vit_config)
    vae_params = ref.AutoEncoderParams(**MODEL_CONFIG["vae"])
    vae = ref.AutoEncoder(vae_params)
    config = ref.BagelConfig(
        visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config, vae_config=vae_params,
        latent_patch_size=MODEL_CONFIG["latent_patch_size"], max_latent_size=MODEL_CONFIG["max_latent_size"],
        vit_max_num_patch_per_side=MODEL_CONFIG["vit_max_num_patch_per_side"],
        connector_act=MODEL_CONFIG["connector_act"], interpolate_pos=False, timestep_shift=1.0)
    model = ref.Bagel(language_model, vit_model, config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    if load:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(bagel_dir / "ema.safetensors")), strict=True)
        vae.load_state_dict(load_file(str(bagel_dir / "ae.safetensors")), strict=True)
    return model.float(), vae.float().eval().requires_grad_(False)


def reference_build(reference_dir: str, bagel_dir: Path, fixture: Path) -> None:
    """Write the reference's seeded random model as a BAGEL-format directory (ours converts it)."""
    from safetensors.torch import save_file

    ref = _reference_imports(reference_dir)
    bagel_dir.mkdir(parents=True, exist_ok=True)
    (bagel_dir / "llm_config.json").write_text(json.dumps(LLM_CONFIG, indent=2))
    (bagel_dir / "vit_config.json").write_text(json.dumps(VIT_CONFIG, indent=2))
    (bagel_dir / "model_config.json").write_text(json.dumps(MODEL_CONFIG, indent=2))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(fixture / name, bagel_dir / name)
    model, vae = _reference_model(ref, bagel_dir, load=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bagel_dir / "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(bagel_dir / "ae.safetensors"))


def run_reference(reference_dir: str, bagel_dir: Path, batch_path: Path, threads: int, repeats: int,
                  warmup: int) -> dict:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    ref = _reference_imports(reference_dir)
    model, vae = _reference_model(ref, bagel_dir, load=True)
    model.train()
    tensors = load_file(str(batch_path.with_suffix(".safetensors")))
    lists = json.loads(batch_path.with_suffix(".json").read_text())
    masks, start = [], 0
    modes, splits = lists["attn_modes"], lists["split_lens"]
    for sample_len in lists["sample_lens"]:  # the reference's own nested masks (use_flex=False)
        count, covered = 0, 0
        while covered < sample_len:
            covered += splits[start + count]
            count += 1
        masks.append(ref.prepare_attention_mask_per_sample(splits[start:start + count], modes[start:start + count]))
        start += count
    images = tensors.pop("padded_images")
    inputs = dict(tensors, sequence_length=lists["sequence_length"], sample_lens=lists["sample_lens"],
                  split_lens=splits, attn_modes=modes, nested_attention_masks=masks,
                  patchified_vae_latent_shapes=[tuple(s) for s in lists["patchified_vae_latent_shapes"]])
    n_ce, n_mse = len(inputs["ce_loss_indexes"]), len(inputs["mse_loss_indexes"])
    rss_after_setup = peak_rss_mib()

    def step():
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            padded_latent = vae.encode(images)
        out = model(**inputs, padded_latent=padded_latent)
        loss = out["ce"].sum() / n_ce + out["mse"].mean(dim=-1).sum() / n_mse
        loss.backward()

    timing = timed_steps(step, warmup, repeats)
    result = {"implementation": "reference", "mode": "reference", "attn_implementation": "nested sdpa",
              "threads": threads, "torch_threads": torch.get_num_threads(), **timing,
              "peak_rss_mib": peak_rss_mib(), "rss_after_setup_mib": rss_after_setup,
              "num_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "torch": torch.__version__}
    result["flops"] = count_flops(step)
    return result


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


def measure_peak(threads: int) -> dict:
    """GFLOP/s of a 2048³ matmul, fp32 and bf16, in a fresh process with ``threads`` threads.

    ``fp32`` / ``bf16``: best of 8 by wall time. ``*_per_core_cpu``: best of 8 by process CPU time per
    thread, which time lost to other jobs does not inflate (the 1-thread reference for CPU-time rates).
    """
    code = ("import time, torch, json\n"
            f"torch.set_num_threads({threads})\n"
            "out = {}\n"
            "for name, dtype in (('fp32', torch.float32), ('bf16', torch.bfloat16)):\n"
            "    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)\n"
            "    a @ b; a @ b\n"
            "    wall = cpu = 1e9\n"
            "    for _ in range(8):\n"
            "        t, c = time.perf_counter(), time.process_time(); a @ b\n"
            "        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)\n"
            "    out[name] = 2 * 2048 ** 3 / wall / 1e9\n"
            "    out[name + '_per_core_cpu'] = 2 * 2048 ** 3 / cpu / 1e9\n"
            "print(json.dumps(out))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def worker_command(args, mode: str, threads: int, work: Path) -> list[str]:
    python = args.reference_python if mode == "reference" else sys.executable
    return [python, os.path.abspath(__file__), "--worker", mode, "--threads", str(threads), "--attn", args.attn,
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--work-dir", str(work),
            "--reference-dir", str(args.reference_dir or ""), *(["--compile"] if args.compile else [])]


def run_worker_process(args, mode: str, threads: int, work: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if mode == "reference":  # its own environment: nothing of ours on the path
        env.pop("PYTHONPATH", None)
    load_before = load_average()
    completed = subprocess.run(worker_command(args, mode, threads, work), capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-6000:])
        raise SystemExit(f"{mode} worker ({threads} thread(s)) failed with exit code {completed.returncode}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result.update(load_before=load_before, load_after=load_average())
    return result


def summarise(results: list[dict], peaks: dict) -> list[dict]:
    rows = []
    for threads in sorted({r["threads"] for r in results}):
        reference = [r for r in results if r["threads"] == threads and r["mode"] == "reference"]
        ref_median = statistics.median(t for r in reference for t in r["times_s"]) if reference else None
        ref_cpu = statistics.median(t for r in reference for t in r["cpu_times_s"]) if reference else None
        for mode in MODES:
            runs = [r for r in results if r["threads"] == threads and r["mode"] == mode]
            if not runs:
                continue
            times = [t for r in runs for t in r["times_s"]]
            cpus = [t for r in runs for t in r["cpu_times_s"]]
            median, cpu = statistics.median(times), statistics.median(cpus)
            flops = runs[0]["flops"]
            tokens = runs[0].get("layout", {}).get("sequence_length") or results[0]["layout"]["sequence_length"]
            peak_cpu = peaks[threads][("bf16" if mode == "ours-bf16" else "fp32") + "_per_core_cpu"]
            rows.append({
                "mode": mode, "threads": threads, "steps": len(times), "median_s": median, "min_s": min(times),
                "round_medians_s": [r["median_s"] for r in runs], "median_cpu_s": cpu,
                "round_medians_cpu_s": [r["median_cpu_s"] for r in runs],
                "tokens_per_s": tokens / median, "tokens_per_cpu_s": tokens / cpu,
                "gflop_per_step": flops / 1e9, "gflops": flops / median / 1e9,
                # per core, by CPU time: what the cores did while this process ran on them, against the
                # matmul's own rate measured the same way (time lost to other jobs counts in neither)
                "gflops_per_core_cpu": flops / cpu / 1e9, "peak_per_core_cpu": peak_cpu,
                "fraction_of_peak_cpu": flops / cpu / 1e9 / peak_cpu,
                "ratio_to_reference": median / ref_median if ref_median else None,
                "cpu_ratio_to_reference": cpu / ref_cpu if ref_cpu else None,
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                "load": [round(r["load_before"], 2) for r in runs] + [round(runs[-1]["load_after"], 2)],
                "drift": runs[0].get("drift"),
            })
    return rows


def print_table(rows: list[dict], layout: dict) -> None:
    print(f"packed sequence: {layout['sequence_length']} tokens ({layout['sample_lens']} per sample; text "
          f"{layout['text_tokens']}, ViT {layout['vit_tokens']}, VAE {layout['vae_tokens']}; CE {layout['ce_tokens']}, "
          f"MSE {layout['mse_tokens']}; {layout['vae_images']} VAE images)")
    header = (f"{'mode':12} {'thr':>3} {'n':>3} {'wall s':>7} {'min s':>6} {'CPU s':>6} {'tok/s':>6} {'tok/CPU-s':>9} "
              f"{'GFLOP':>6} {'GFLOP/CPU-s':>11} {'%peak':>6} {'x ref':>6} {'CPU x ref':>9} {'RSS MiB':>8}  load")
    print(header)
    for r in rows:
        ratio = f"{r['ratio_to_reference']:.2f}" if r["ratio_to_reference"] else "-"
        cpu_ratio = f"{r['cpu_ratio_to_reference']:.2f}" if r["cpu_ratio_to_reference"] else "-"
        print(f"{r['mode']:12} {r['threads']:>3} {r['steps']:>3} {r['median_s']:>7.3f} {r['min_s']:>6.3f} "
              f"{r['median_cpu_s']:>6.2f} {r['tokens_per_s']:>6.0f} {r['tokens_per_cpu_s']:>9.0f} "
              f"{r['gflop_per_step']:>6.1f} {r['gflops_per_core_cpu']:>11.1f} {100 * r['fraction_of_peak_cpu']:>5.0f}% "
              f"{ratio:>6} {cpu_ratio:>9} {r['peak_rss_mib']:>8.0f}  {r['load']}")
    for r in rows:
        if r["drift"]:
            d = r["drift"]
            print(f"bf16 drift ({r['threads']} thr): loss {d['loss_bf16']:.6f} vs fp32 {d['loss_fp32']:.6f} "
                  f"(rel {d['loss_rel']:.2e}); gradients: global rel {d['grad_global_rel']:.2e}, cosine "
                  f"{d['cosine']:.6f}, worst {d['grad_worst_param']} rel {d['grad_worst_param_rel']:.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None, help="default: all (reference only "
                                                                                "with --reference-dir)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over (threads, mode)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="our attention backend")
    parser.add_argument("--compile", action="store_true", help="our modes with train.compile (decoder blocks)")
    parser.add_argument("--reference-dir", default=None, help="checkout of the reference repository")
    parser.add_argument("--reference-python", default=None, help="python of the reference's environment")
    parser.add_argument("--fixture", default=str(DEFAULT_FIXTURE), help="BAGEL fixture holding the tokenizer files")
    parser.add_argument("--work-dir", default=None, help="keep the model, batch and cache here")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--summarise", default=None, metavar="JSON", help="print the tables of an earlier --json run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.summarise:
        saved = json.loads(Path(args.summarise).read_text())
        peaks = {int(k): v for k, v in saved["peaks"].items()}
        print_table(summarise(saved["results"], peaks), next(r["layout"] for r in saved["results"] if "layout" in r))
        return
    if args.repeats < 1 or args.warmup < 0 or min(args.threads) < 1 or args.rounds < 1:
        parser.error("--repeats, --rounds and --threads must be positive and --warmup non-negative")

    if args.worker:
        work = Path(args.work_dir)
        if args.worker == "reference-build":
            reference_build(args.reference_dir, work / "bagel", Path(args.fixture))
            return
        if args.worker == "reference":
            result = run_reference(args.reference_dir, work / "bagel", work / "reference_batch", args.threads[0],
                                   args.repeats, args.warmup)
        else:
            result = run_ours(args.worker, args.threads[0], args.attn, args.repeats, args.warmup,
                              work / "converted", work / "latent_cache", args.compile)
        print(json.dumps(result))
        return

    modes = args.modes or [m for m in MODES if m != "reference" or args.reference_dir]
    if "reference" in modes and not (args.reference_dir and args.reference_python):
        parser.error("the reference mode needs --reference-dir and --reference-python")
    temporary = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="bench_train_step_") if temporary else args.work_dir)
    try:
        if args.reference_dir and not (work / "bagel" / "ema.safetensors").exists():
            subprocess.run([args.reference_python, os.path.abspath(__file__), "--worker", "reference-build",
                            "--work-dir", str(work), "--reference-dir", args.reference_dir, "--fixture",
                            args.fixture], check=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        if not (work / "converted" / "model_index.json").exists():
            if args.reference_dir:
                from unibrain_hf.convert.convert_bagel import convert_bagel_checkpoint

                convert_bagel_checkpoint(work / "bagel", work / "converted")
            else:
                build_converted_without_reference(work / "converted", Path(args.fixture))
        _, batch = build_batch(work / "converted")
        write_reference_batch(batch, work / "reference_batch")
        written = fill_latent_cache(work / "converted", work / "latent_cache")
        print(f"work dir {work}; latent cache: {written} entries written", flush=True)
        peaks = {t: measure_peak(t) for t in args.threads}
        print(f"measured peak (2048^3 matmul, best of 8): {peaks}", flush=True)
        results = []
        for round_number in range(args.rounds):
            for threads in args.threads:
                order = modes if round_number % 2 == 0 else list(reversed(modes))
                for mode in order:
                    result = run_worker_process(args, mode, threads, work)
                    print(f"round {round_number + 1} {mode} {threads} thread(s): median {result['median_s']:.3f} s, "
                          f"CPU {result['median_cpu_s']:.3f} s, load {result['load_before']:.2f}", flush=True)
                    results.append(result)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    machine = {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
               "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(f"machine: {machine['nproc']} CPUs, {machine['cpu']} ({machine['cpu_capability']}), python "
          f"{machine['python']}, torch {machine['torch']}")
    layout = next(r["layout"] for r in results if "layout" in r)
    rows = summarise(results, peaks)
    print_table(rows, layout)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "peaks": peaks, "rows": rows,
                                               "results": results}, indent=2))


def build_converted_without_reference(converted: Path, fixture: Path) -> None:
    """Without the reference: our own seeded random model of the same sizes, saved as a pipeline directory."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer

    from unibrain_hf.convert.convert_bagel import build_config_from_bagel, load_bagel_tokenizer
    from unibrain_hf.modeling import UniBrainForConditionalGeneration
    from unibrain_hf.modeling.vae import flux_vae_config
    from unibrain_hf.pipelines.components import write_pipeline_index
    from unibrain_hf.processing.processor import UniBrainProcessor

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name, content in (("llm_config.json", LLM_CONFIG), ("vit_config.json", VIT_CONFIG),
                              ("model_config.json", MODEL_CONFIG)):
            (scratch / name).write_text(json.dumps(content))
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(fixture / name, scratch / name)
        tokenizer, special = load_bagel_tokenizer(scratch)
        config = build_config_from_bagel(scratch, special)
    torch.manual_seed(SEED)
    model = UniBrainForConditionalGeneration(config)
    vae = AutoencoderKL(**flux_vae_config(64, (1, 2, 4, 4), 1, 16, 128))
    processor = UniBrainProcessor.for_model(config, tokenizer, vae_max_size=128, vae_min_size=128, vit_max_size=126,
                                            vit_min_size=126)
    model.save_pretrained(str(converted / "model"))
    vae.save_pretrained(str(converted / "vae"))
    tokenizer.save_pretrained(str(converted / "tokenizer"))
    processor.save_pretrained(converted / "processor", save_tokenizer=False)
    write_pipeline_index(converted)
    AutoTokenizer.from_pretrained(str(converted / "tokenizer"))  # fails here, not in a worker, if unreadable


if __name__ == "__main__":
    main()
