"""Peak accelerator memory and time per imputed slice of ``UniBrainPipeline`` in every memory mode.

Workload: the ``generation`` task on one input slice with ``--targets`` targets (default 3) at
``--size``² (default 256), ``--steps`` sampler grid points, both guidance branches on. Each mode
builds a fresh pipeline whose model has the same random weights (seeded, initialised on the device
in bf16 — no download; the time embedder is float32 as ``from_pretrained(dtype=torch.bfloat16)``
keeps it), applies the mode, resets the peak counters, runs the call and records:

* ``peak_gib``: ``torch.cuda.max_memory_allocated`` during the call (weights the mode keeps on the
  device + KV caches + activations); on the CPU, the peak resident parameter bytes instead;
* ``s_per_slice``: wall time of the call divided by the number of imputed slices;
* ``max_abs_diff``: the largest difference of the imputed images (0–1 scale) from the plain run.

Modes: ``plain`` (bf16, everything on the device), ``model_offload``, ``sequential_offload``,
``group_block``, ``group_leaf`` (diffusers group offload, 1 block per group), ``expert_offload``
(:mod:`unibrain_hf.pipelines.offload`), ``device_map`` (``from_pretrained(device_map="auto",
max_memory=...)`` with the rest in host memory), ``bnb8`` / ``bnb4`` (bitsandbytes, through
``from_pretrained(quantization_config=...)``; these and ``device_map`` save the random weights to
``--workdir`` first). The expert offload also reports the parameter bytes resident per phase.

On a GPU (the measured table of docs/MEMORY.md; BAGEL-7B-MoT sizes, about 10 minutes on an H200):

    python benchmarks/bench_memory.py --device cuda --json runs/bench/memory_cuda.json

A CPU dry run (a reduced configuration, every mode, outputs compared, resident bytes per phase):

    python benchmarks/bench_memory.py --device cpu

The tokenizer comes from the BAGEL fixture (``--fixture``), converted into ``--workdir``.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SEED = 0
GIB = 2 ** 30
MODES = ("plain", "model_offload", "sequential_offload", "group_block", "group_leaf", "expert_offload", "device_map",
         "bnb8", "bnb4")
REPO = Path(__file__).resolve().parents[1]


def default_fixture() -> str | None:
    for candidate in (REPO / "tests" / "fixtures" / "bagel_tiny", REPO.parent / "shared" / "fixtures" / "bagel_tiny"):
        if (candidate / "README.json").exists():
            return str(candidate)
    return None


def reduced_config(special: list[int]):
    """A CPU-sized model with BAGEL's structure (widths multiples of 64 for bitsandbytes' CPU 4-bit kernel)."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from unibrain_hf import UniBrainConfig

    text = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=8192,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    vision = SiglipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                num_channels=3, image_size=70 * 14, patch_size=14, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6)
    return UniBrainConfig(text_config=text, vision_config=vision, max_latent_size=64, vit_max_num_patch_per_side=70,
                          bos_token_id=special[0], eos_token_id=special[1], start_of_image_token_id=special[2],
                          end_of_image_token_id=special[3])


def full_config(special: list[int]):
    from unibrain_hf import UniBrainConfig

    return UniBrainConfig.bagel_7b_mot(bos_token_id=special[0], eos_token_id=special[1],
                                       start_of_image_token_id=special[2], end_of_image_token_id=special[3])


def random_model(config, device):
    """Seeded random weights, initialised on ``device`` in bf16; the time embedder float32."""
    from unibrain_hf import UniBrainForConditionalGeneration

    torch.manual_seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = UniBrainForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # the velocity head is zero-initialised; give it weights so outputs vary
        model.llm2vae.weight.normal_(0, 0.02)
    model.time_embedder.float()
    return model.eval()


def make_vae(reduced: bool, device):
    from diffusers import AutoencoderKL

    from unibrain_hf.modeling.vae import flux_vae_config

    torch.manual_seed(SEED + 1)
    config = flux_vae_config(32, (1, 1, 2, 2), 1, 16, 256) if reduced else flux_vae_config()
    with torch.device(device):
        return AutoencoderKL(**config).eval()


def pipeline_for(model, vae, tokenizer, size: int):
    from unibrain_hf import UniBrainPipeline, UniBrainProcessor
    from unibrain_hf.pipelines.components import flow_match_scheduler

    vit = size - size % model.config.vit_patch_size
    processor = UniBrainProcessor.for_model(model.config, tokenizer, vae_max_size=size, vae_min_size=size,
                                            vit_max_size=vit, vit_min_size=vit)
    pipe = UniBrainPipeline(model=model, vae=vae, scheduler=flow_match_scheduler(), tokenizer=tokenizer,
                            processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def input_slice(size: int) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    image = rng.normal(100, 30, size=(size, size)).astype(np.float32)
    image[: size // 10] = 0  # background rows, like a brain slice
    return image


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.reduced = args.config == "reduced"
        from transformers import AutoTokenizer

        from unibrain_hf.convert.convert_bagel import convert_bagel_checkpoint

        self.workdir = Path(args.workdir)
        converted = self.workdir / "converted"
        if not converted.exists():
            convert_bagel_checkpoint(args.fixture, converted)
        self.tokenizer = AutoTokenizer.from_pretrained(str(converted / "tokenizer"))
        special = [self.tokenizer.convert_tokens_to_ids(t)
                   for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")]
        self.config = reduced_config(special) if self.reduced else full_config(special)
        self.checkpoint = self.workdir / "random_model"
        self.reference = None

    # ------------------------------------------------------------------ building one mode
    def _saved_checkpoint(self) -> Path:
        if not (self.checkpoint / "config.json").exists():
            model = random_model(self.config, self.device)
            model.save_pretrained(self.checkpoint)
            del model
            self._free()
        return self.checkpoint

    def _free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def build(self, mode: str):
        from unibrain_hf import UniBrainForConditionalGeneration as Model

        device, cpu = self.device, torch.device("cpu")
        vae = make_vae(self.reduced, device)
        offload = None
        if mode in ("bnb8", "bnb4", "device_map"):
            path = self._saved_checkpoint()
            if mode == "device_map":
                budget = self.args.device_map_budget
                max_memory = {self.device.index or 0: budget, "cpu": "400GiB"} if self.cuda else {"cpu": budget}
                model = Model.from_pretrained(path, dtype=torch.bfloat16, device_map="auto", max_memory=max_memory,
                                              offload_folder=str(self.workdir / "device_map_offload"))
            else:
                from transformers import BitsAndBytesConfig

                quantization = BitsAndBytesConfig(load_in_8bit=True) if mode == "bnb8" else BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
                model = Model.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quantization,
                                              device_map={"": self.device.index or 0} if self.cuda else None)
            return pipeline_for(model.eval(), vae, self.tokenizer, self.args.size), None
        model = random_model(self.config, device)
        pipe = pipeline_for(model, vae, self.tokenizer, self.args.size)
        if mode == "plain":
            return pipe, None
        pipe.to(cpu)  # every offload mode starts from host memory
        self._free()
        if mode == "model_offload":
            pipe.enable_model_cpu_offload(device=device)
        elif mode == "sequential_offload":
            pipe.enable_sequential_cpu_offload(device=device)
        elif mode in ("group_block", "group_leaf"):
            pipe.enable_group_offload(onload_device=device, offload_type=mode.replace("group_", "") + "_level",
                                      num_blocks_per_group=1)
        elif mode == "expert_offload":
            offload = pipe.enable_expert_offload(device=device)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return pipe, offload

    # ------------------------------------------------------------------ one measurement
    def run(self, mode: str) -> dict:
        args = self.args
        pipe, offload = self.build(mode)
        targets = ["t2w", "t2f", "t1c", "t1n", "SWI"][: args.targets]
        call = dict(images={"t1": input_slice(args.size)}, target_modalities=targets, task="generation",
                    num_inference_steps=args.steps, output_type="np")
        phase_bytes: dict[str, int] = {}
        if offload is not None:  # accounting: resident parameter bytes at every weight-holding call, per phase
            from accelerate.hooks import ModelHook, add_hook_to_module

            class Accounting(ModelHook):
                def pre_forward(self, module, *a, **k):
                    phase_bytes[offload.phase] = max(phase_bytes.get(offload.phase, 0), offload.resident_bytes())
                    return a, k

            for module in pipe.model.modules():
                if any(p is not None for p in module._parameters.values()):
                    add_hook_to_module(module, Accounting(), append=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        out = pipe(generator=torch.Generator().manual_seed(SEED), **call)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        images = np.stack([out.images[code][0] for code in targets])
        row = {"mode": mode, "s_per_slice": round(seconds / len(targets), 3), "targets": len(targets)}
        if self.cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 3)
        if self.reference is None and mode == "plain":
            self.reference = images
        if self.reference is not None:
            row["max_abs_diff"] = float(np.abs(images - self.reference).max())
        if offload is not None:
            row["resident_bytes_per_phase"] = phase_bytes
            row["swaps"], row["streamed_calls"] = offload.swaps, offload.streamed_calls
            row["design_bytes"] = {"shared": offload.shared_bytes(), "und": offload.expert_bytes("und"),
                                   "gen": offload.expert_bytes("gen")}
            offload.remove()
        del pipe, out
        self._free()
        return row


def computed_expert_offload_bytes(config) -> dict:
    """Shared / expert parameter bytes of ``config`` in bf16, from a meta-device model (computed)."""
    from unibrain_hf import UniBrainForConditionalGeneration

    with torch.device("meta"):
        model = UniBrainForConditionalGeneration(config)
    expert = {kind: sum(p.numel() for layer in model.language_model.layers for p in getattr(layer, kind).parameters())
              for kind in ("und", "gen")}
    total = sum(p.numel() for p in model.parameters())
    return {"shared_gib": round((total - expert["und"] - expert["gen"]) * 2 / GIB, 2),
            "expert_gib": round(expert["gen"] * 2 / GIB, 2), "all_gib": round(total * 2 / GIB, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=("bagel_7b_mot", "reduced"), default=None,
                        help="model sizes (default: bagel_7b_mot on a GPU, reduced on the CPU)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--size", type=int, default=256, help="slice side in pixels")
    parser.add_argument("--targets", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="sampler grid points (default 10 GPU, 3 CPU)")
    parser.add_argument("--device-map-budget", default=None,
                        help="device_map mode: max_memory for the device (default 12GiB GPU, 2MB CPU)")
    parser.add_argument("--fixture", default=default_fixture(), help="BAGEL fixture directory (tokenizer)")
    parser.add_argument("--workdir", default=None, help="scratch directory (converted tokenizer, saved weights)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu for the dry run")
    args.config = args.config or ("bagel_7b_mot" if cuda else "reduced")
    args.steps = args.steps or (10 if cuda else 3)
    args.device_map_budget = args.device_map_budget or ("12GiB" if cuda else "2MB")
    if args.fixture is None:
        parser.error("--fixture: no BAGEL fixture found; pass the directory holding README.json and the tokenizer")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {MODES}")
    if "plain" in modes:
        modes = ["plain"] + [m for m in modes if m != "plain"]
    with tempfile.TemporaryDirectory() as scratch:
        args.workdir = args.workdir or scratch
        bench = Bench(args)
        rows = []
        for mode in modes:
            try:
                rows.append(bench.run(mode))
            except Exception as error:  # a mode that fails is reported, the others still run
                rows.append({"mode": mode, "error": f"{type(error).__name__}: {error}"[:400]})
            print(json.dumps(rows[-1]), flush=True)
        computed = computed_expert_offload_bytes(full_config([0, 1, 2, 3]))
    print(f"\ndevice={args.device} config={args.config} size={args.size} targets={args.targets} steps={args.steps} "
          f"torch={torch.__version__}")
    print("| mode | peak GiB | s per slice | max abs diff vs plain |")
    print("|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['mode']} | failed: {row['error']} | | |")
            continue
        print(f"| {row['mode']} | {row.get('peak_gib', '—')} | {row['s_per_slice']} | "
              f"{row.get('max_abs_diff', '—')} |")
    print(f"computed for BAGEL-7B-MoT in bf16: {computed}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump({"device": args.device, "config": args.config, "size": args.size, "targets": args.targets,
                       "steps": args.steps, "torch": torch.__version__, "rows": rows, "computed": computed},
                      handle, indent=2)


if __name__ == "__main__":
    main()
