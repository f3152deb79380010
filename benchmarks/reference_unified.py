"""Drive the reference UniBrain/BAGEL implementation through the unified task, for ``bench_pipeline.py``.

This script runs in the *reference's* environment (its own virtualenv: torch, transformers 4.49,
einops, safetensors, pillow, numpy), with a checkout of the reference repository on
``--reference-repo`` (``zhiyuns/UniBrain``; nothing of it is copied here). It imports the
reference's own modules unmodified and only supplies, from outside, what a CPU run lacks:

* ``flash_attn.flash_attn_varlen_func`` → one fused ``scaled_dot_product_attention`` call per
  varlen segment (GQA without repeating keys; causal segments with fewer queries than keys
  aligned bottom-right, as flash-attn ≥ 2.1 does) — the reference's fastest CPU form;
* the hard-coded ``torch.bfloat16`` casts → float32 (``--dtype float32``, the default), so the
  whole run is fp32 like ours; ``--dtype bfloat16`` keeps them (bf16 attention inputs and caches);
* ``data.transforms.ImageTransform`` (torchvision) → the same resize rule with PIL (bicubic),
  ToTensor and Normalize(0.5).

Two modes:

    python benchmarks/reference_unified.py --reference-repo REPO --make-weights DIR --fixture FIXTURE
        builds the reference model at the bench sizes from a seed and writes a BAGEL-format
        directory (ema.safetensors, ae.safetensors, configs, the fixture's tokenizer files) that
        ``bench_pipeline.py --bagel-dir DIR`` converts, so both run identical weights;
    python benchmarks/reference_unified.py --reference-repo REPO --bagel-dir DIR --spec SPEC.json
        runs the unified flow of the reference's ``evaluate_metrics.run_unified_inference`` step by
        step (system prompt, input image, instruction; per target gen_text → update_context_text →
        gen_image → cfg_img = deepcopy(gen) → update_context_image → cfg_text = deepcopy(gen) →
        next instruction; then impression and diagnosis) with the prompts, image, thread count and
        text budget in SPEC.json, and prints one JSON line of timings (warm-up, then k = 1, 2, 3).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import types
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from part_clock import PartClock  # this folder (the script's own) is on sys.path

SEED = 0
SIZES = dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=2, vocab=1024, vit_hidden=256,
             vit_intermediate=512, vit_layers=4, vit_heads=4, vae_ch=64, max_latent_size=64)


# ---------------------------------------------------------------------------------------------
# What a CPU run of the reference needs from outside
# ---------------------------------------------------------------------------------------------
def _varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                 **unused):
    """flash-attn's varlen API with SDPA: q (Nq, H, d), k/v (Nk, H_kv, d), per-segment attention."""
    outputs = []
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(starts_q[:-1], starts_q[1:]), zip(starts_k[:-1], starts_k[1:])):
        query = q[q0:q1].transpose(0, 1)[None]
        key, value = k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None]
        q_len, k_len = q1 - q0, k1 - k0
        mask = None
        if causal and q_len > 1:
            allowed = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
            mask = allowed
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                             enable_gqa=key.shape[1] != query.shape[1])
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs, dim=0)


class _Resize:
    """The reference's max-long-edge / min-short-edge / stride resize rule, with PIL (bicubic)."""

    def __init__(self, max_size, min_size, stride, max_pixels=14 * 14 * 9 * 1024):
        self.max_size, self.min_size, self.stride, self.max_pixels = max_size, min_size, stride, max_pixels

    def _scaled(self, width, height, scale):
        def divisible(value):
            return max(self.stride, int(round(value / self.stride) * self.stride))

        return divisible(round(width * scale)), divisible(round(height * scale))

    def __call__(self, image, img_num=1):
        from PIL import Image

        width, height = image.size
        scale = max(min(self.max_size / max(width, height), 1.0), self.min_size / min(width, height))
        new_width, new_height = self._scaled(width, height, scale)
        if new_width * new_height > self.max_pixels / img_num:
            new_width, new_height = self._scaled(new_width, new_height,
                                                 self.max_pixels / img_num / (new_width * new_height))
        if max(new_width, new_height) > self.max_size:
            new_width, new_height = self._scaled(new_width, new_height, self.max_size / max(new_width, new_height))
        if (new_width, new_height) == (width, height):
            return image
        return image.resize((new_width, new_height), Image.BICUBIC)


class _ImageTransform:
    def __init__(self, max_size, min_size, stride):
        self.stride = stride
        self.resize_transform = _Resize(max_size, min_size, stride)

    def __call__(self, image, img_num=1):
        image = self.resize_transform(image, img_num=img_num)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (tensor - 0.5) / 0.5


def install_cpu_stand_ins(reference_repo: str, dtype: str) -> None:
    import importlib.machinery

    flash_attn = types.ModuleType("flash_attn")
    # transformers probes the package (spec + installed metadata): it finds no installed flash-attn.
    flash_attn.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    flash_attn.flash_attn_varlen_func = _varlen_sdpa
    sys.modules["flash_attn"] = flash_attn
    if dtype == "float32":
        # Libraries that build dtype tables at import time are imported before the alias.
        import safetensors.torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401

        torch.bfloat16 = torch.float32  # the reference's hard-coded casts become no-ops
    sys.path.insert(0, os.path.abspath(reference_repo))


# ---------------------------------------------------------------------------------------------
# The model at the bench sizes, written as a BAGEL-format directory
# ---------------------------------------------------------------------------------------------
def _configs():
    from modeling.bagel import Qwen2Config, SiglipVisionConfig

    s = SIZES
    llm = Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], hidden_act="silu", max_position_embeddings=8192,
                      rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False)
    llm.qk_norm, llm.layer_module, llm.freeze_und, llm.freeze_gen = True, "Qwen2MoTDecoderLayer", False, False
    vit = SiglipVisionConfig(hidden_size=s["vit_hidden"], intermediate_size=s["vit_intermediate"],
                             num_hidden_layers=s["vit_layers"], num_attention_heads=s["vit_heads"], num_channels=3,
                             image_size=70 * 14, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    vit.rope = False
    return llm, vit


def _vae_params():
    from modeling.autoencoder import AutoEncoderParams

    return AutoEncoderParams(resolution=128, in_channels=3, downsample=8, ch=SIZES["vae_ch"], out_ch=3,
                             ch_mult=[1, 2, 4, 4], num_res_blocks=1, z_channels=16, scale_factor=0.3611,
                             shift_factor=0.1159)


def build_model(llm_config, vit_config):
    from modeling.autoencoder import AutoEncoder
    from modeling.bagel import Bagel, BagelConfig, Qwen2ForCausalLM, SiglipVisionModel

    vae_params = _vae_params()
    language_model = Qwen2ForCausalLM(llm_config)
    language_model.init_moe()
    vit_model = SiglipVisionModel(vit_config)
    vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    config = BagelConfig(visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
                         vae_config=vae_params, latent_patch_size=2, max_latent_size=SIZES["max_latent_size"],
                         vit_max_num_patch_per_side=70, connector_act="gelu_pytorch_tanh", timestep_shift=1.0)
    model = Bagel(language_model, vit_model, config)
    return model.eval(), AutoEncoder(vae_params).eval()


def make_weights(destination: str, fixture: str) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    llm_config, vit_config = _configs()
    model, vae = build_model(llm_config, vit_config)
    with torch.no_grad():  # the velocity head starts at zero; give it weights so outputs vary
        model.llm2vae.weight.normal_(0, 0.02)
    out = Path(destination)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(out / "ae.safetensors"))
    llm = llm_config.to_dict()
    (out / "llm_config.json").write_text(json.dumps(llm, indent=2))
    vit = vit_config.to_dict()
    vit["num_hidden_layers"] = vit_config.num_hidden_layers + 1  # BAGEL stores effective + 1
    (out / "vit_config.json").write_text(json.dumps(vit, indent=2))
    fixture_config = json.loads((Path(fixture) / "model_config.json").read_text())
    vae = vars(_vae_params())
    model_config = dict(fixture_config, max_latent_size=SIZES["max_latent_size"], vit_max_num_patch_per_side=70,
                        vae=vae, vae_transform={"max_image_size": 128, "min_image_size": 128, "image_stride": 16},
                        vit_transform={"max_image_size": 126, "min_image_size": 126, "image_stride": 14})
    (out / "model_config.json").write_text(json.dumps(model_config, indent=2))
    for name in ("vocab.json", "merges.txt"):
        (out / name).write_bytes((Path(fixture) / name).read_bytes())


def load_model(bagel_dir: str):
    from safetensors.torch import load_file

    from data.data_utils import add_special_tokens
    from modeling.qwen2 import Qwen2Tokenizer

    llm_config, vit_config = _configs()
    model, vae = build_model(llm_config, vit_config)
    model.load_state_dict(load_file(os.path.join(bagel_dir, "ema.safetensors")), strict=True)
    vae.load_state_dict(load_file(os.path.join(bagel_dir, "ae.safetensors")), strict=True)
    tokenizer = Qwen2Tokenizer.from_pretrained(bagel_dir)
    tokenizer, new_token_ids, _ = add_special_tokens(tokenizer)
    # Random weights pick ids beyond the small tokenizer, on which the slow tokenizer raises; skip
    # them, as the fast tokenizer ours uses does.
    decode, known = tokenizer.decode, len(tokenizer)

    def decode_known(ids, *args, **kwargs):
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return decode([i for i in ids if i < known], *args, **kwargs)

    tokenizer.decode = decode_known
    return model, vae, tokenizer, new_token_ids


# ---------------------------------------------------------------------------------------------
# The unified flow, timed
# ---------------------------------------------------------------------------------------------
def _status_mib(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def _reset_peak():
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_unified(inferencer, spec, targets, max_new_tokens, clock):
    from PIL import Image

    from data.data_utils import pil_img2rgb

    image = Image.fromarray(np.asarray(spec["image_rgb"], dtype=np.uint8), mode="RGB")
    instructions = spec["instructions"][:targets]
    settings = dict(cfg_text_scale=3.0, cfg_img_scale=1.2, cfg_interval=[0.4, 1.0], timestep_shift=1.0,
                    num_timesteps=spec["num_grid_points"], cfg_renorm_min=0.0, cfg_renorm_type="text_channel")
    torch.manual_seed(SEED)
    clock.parts.clear()
    texts, context_at_image = {}, []
    peak_ok = _reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    gen = inferencer.init_gen_context()
    cfg_text, cfg_img = deepcopy(gen), deepcopy(gen)
    gen = inferencer.update_context_text(spec["system_prompt"], gen)
    cfg_img = inferencer.update_context_text(spec["system_prompt"], cfg_img)
    resized = inferencer.vae_transform.resize_transform(pil_img2rgb(image))
    gen = inferencer.update_context_image(resized, gen, vae=True)
    cfg_text = deepcopy(gen)  # after an input image ...
    cfg_text = deepcopy(gen)  # ... and again before the instruction that follows it, as the reference does
    gen = inferencer.update_context_text(instructions[0], gen)
    cfg_img = inferencer.update_context_text(instructions[0], cfg_img)
    shape = resized.size[::-1]
    for index in range(targets):
        think = inferencer.gen_text(gen, do_sample=False, temperature=0.0, max_length=max_new_tokens + 1)
        texts[f"think{index}"] = think
        gen = inferencer.update_context_text(think, gen)
        context_at_image.append({name: int(c["kv_lens"][0]) for name, c in
                                 (("gen", gen), ("cfg_text", cfg_text), ("cfg_img", cfg_img))})
        generated = inferencer.gen_image(shape, gen, cfg_text_precontext=cfg_text, cfg_img_precontext=cfg_img,
                                         **settings)
        cfg_img = deepcopy(gen)
        gen = inferencer.update_context_image(inferencer.vae_transform.resize_transform(pil_img2rgb(generated)),
                                              gen, vae=True)
        cfg_text = deepcopy(gen)
        if index + 1 < targets:
            cfg_text = deepcopy(gen)
            gen = inferencer.update_context_text(instructions[index + 1], gen)
            cfg_img = inferencer.update_context_text(instructions[index + 1], cfg_img)
    impression_context = inferencer.update_context_text(spec["impression_prompt"], gen)
    texts["impression"] = inferencer.gen_text(impression_context, do_sample=False, temperature=0.0,
                                              max_length=max_new_tokens + 1)
    diagnosis_context = inferencer.update_context_text(spec["diagnosis_prompt"], impression_context)
    texts["diagnosis"] = inferencer.gen_text(diagnosis_context, do_sample=False, temperature=0.0,
                                             max_length=max_new_tokens + 1)
    total, total_cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status_mib("VmHWM") if peak_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"targets": targets, "total_s": round(total, 3), "cpu_s": round(total_cpu, 3),
            "peak_rss_mib": round(peak, 1), "parts": deepcopy(clock.parts),
            "text_tokens": {k: len(inferencer.tokenizer.encode(v)) for k, v in texts.items()},
            "context_at_image": context_at_image, "final_kv_len": int(diagnosis_context["kv_lens"][0])}


def run(args) -> dict:
    spec = json.loads(Path(args.spec).read_text())
    torch.set_num_threads(spec["threads"])
    from inferencer import InterleaveInferencer

    model, vae, tokenizer, new_token_ids = load_model(args.bagel_dir)
    rss_after_setup = _status_mib("VmRSS")
    vae_transform, vit_transform = _ImageTransform(128, 128, 16), _ImageTransform(126, 126, 14)
    inferencer = InterleaveInferencer(model, vae, tokenizer, vae_transform, vit_transform, new_token_ids,
                                      device="cpu")
    clock = PartClock()
    clock.wrap(inferencer, "gen_text", "text")
    clock.wrap(model, "generate_image", "denoise")
    clock.wrap(inferencer, "decode_image", "vae_decode")
    clock.wrap(inferencer, "update_context_image", "image_prefill")
    clock.wrap(inferencer, "update_context_text", "text_prefill")
    run_unified(inferencer, spec, 1, 2, clock)  # warm-up
    results = [run_unified(inferencer, spec, k, spec["max_new_tokens"], clock) for k in spec["targets"]]
    return {"implementation": "reference", "threads": torch.get_num_threads(), "dtype": args.dtype,
            "rss_after_setup_mib": round(rss_after_setup, 1), "results": results, "torch": torch.__version__}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference-repo", required=True, help="checkout of the reference repository")
    parser.add_argument("--make-weights", help="write the bench-size reference model to this BAGEL-format dir")
    parser.add_argument("--fixture", help="BAGEL fixture providing the tokenizer files and model_config.json")
    parser.add_argument("--bagel-dir", help="BAGEL-format weights to run")
    parser.add_argument("--spec", help="JSON: threads, max_new_tokens, targets, prompts, image")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    install_cpu_stand_ins(args.reference_repo, args.dtype)
    if args.make_weights:
        make_weights(args.make_weights, args.fixture)
        return
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
