"""How far bf16 inference drifts from float32: generated uint8 images, velocities and greedy text ids.

Same pipeline, same seeds, the model in float32 and then in bf16 (``enable_fast_inference``; the VAE,
latents and Euler update stay float32). Workloads:

* ``fixture`` — each reference fixture's model (``tests/fixtures/bagel_tiny``, ``bagel_tiny_b``) in
  its recorded setting: image generation from the recorded input, and greedy text of 32 tokens;
* ``bench`` — the benchmark model of ``bench_pipeline.py`` (random weights, hidden 512, 4 layers;
  or ``--bagel-dir``) in the unified task, 1 input → 3 targets + impression + diagnosis.

Reported per workload: max and mean |Δ| of the generated uint8 images (grey levels), the relative
L2 difference of the first conditional velocity, and how many greedy text ids agree before the
first difference. Random weights give flat logits, so text ids are a harsh test there.

    python benchmarks/bench_bf16_drift.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _ids_agreement(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{same}/{max(len(a), len(b))}"


def _run(pipe, call: dict) -> dict:
    first = {}

    def record(pipeline, step, t, kwargs):
        first.setdefault(kwargs["target_modality"], kwargs["v_cond"].float().clone())
        return {}

    out = pipe(**call, generator=torch.Generator().manual_seed(0), callback_on_step_end=record,
               callback_on_step_end_tensor_inputs=["v_cond", "target_modality"])
    return {"out": out, "v_cond": first}


def _text_ids(pipe, image, prompt, max_length=33):
    from unibrain_hf.pipelines.mri_io import load_slice

    prepared = load_slice(image, "input", pipe.processor.vae_resize)
    context = pipe.new_context()
    context.add_image(pipe.encode_images([prepared.rgb], None, torch.Generator().manual_seed(0)))
    context.add_instruction(pipe.tokenize(prompt))
    return context.generate_text(max_length)[0].tolist()


VARIANTS = {"bf16": dict(dtype=torch.bfloat16, vae_dtype=torch.float32),
            "bf16 + VAE bf16": dict(dtype=torch.bfloat16, vae_dtype=torch.bfloat16)}


def _rows_against(fp32: dict, other: dict, call: dict) -> dict:
    row = {"images": {}, "v_cond_rel_l2": {}}

    def by_target(images):  # a single target given as a string comes back as a plain batch
        return images if isinstance(images, dict) else {call["target_modalities"]: images}

    for code, images in by_target(fp32["run"]["out"].images).items():
        a = np.asarray(images[0], dtype=np.int16)
        b = np.asarray(by_target(other["run"]["out"].images)[code][0], dtype=np.int16)
        row["images"][code] = {"max": int(np.abs(a - b).max()), "mean": round(float(np.abs(a - b).mean()), 3)}
        va, vb = fp32["run"]["v_cond"][code], other["run"]["v_cond"][code]
        row["v_cond_rel_l2"][code] = float((va - vb).norm() / va.norm())
    texts = {}
    for name in ("thinking", "impression", "diagnosis"):
        value_a, value_b = getattr(fp32["run"]["out"], name), getattr(other["run"]["out"], name)
        if name == "thinking" and isinstance(value_a, dict):
            for code in value_a:
                texts[f"think {code}"] = _ids_agreement(fp32["tok"](value_a[code][0]), fp32["tok"](value_b[code][0]))
        elif value_a and name != "thinking":
            texts[name] = _ids_agreement(fp32["tok"](value_a[0]), fp32["tok"](value_b[0]))
    if fp32["ids"] is not None:
        texts["greedy ids"] = _ids_agreement(fp32["ids"], other["ids"])
    row["text_ids_agree"] = texts
    return row


def compare(pipe, call: dict, text=None) -> dict:
    """Each variant of VARIANTS against float32 (model and VAE)."""
    results = {}
    for name, dtypes in {"fp32": dict(dtype=torch.float32, vae_dtype=torch.float32), **VARIANTS}.items():
        state = pipe.enable_fast_inference(**dtypes, device="cpu")
        if state.notes:
            raise SystemExit(f"cannot run {name} here: {state.notes}")
        results[name] = {"run": _run(pipe, call), "ids": None if text is None else _text_ids(pipe, *text),
                         "tok": pipe.tokenize}
    return {name: _rows_against(results["fp32"], results[name], call) for name in VARIANTS}


def fixture_workload(name: str, workdir: str) -> dict:
    from unibrain_hf import UniBrainPipeline
    from unibrain_hf.convert.convert_bagel import convert_bagel_checkpoint
    from safetensors.torch import load_file

    fixture = ROOT / "tests" / "fixtures" / name
    convert_bagel_checkpoint(fixture, f"{workdir}/{name}")
    pipe = UniBrainPipeline.from_pretrained(f"{workdir}/{name}")
    pipe.set_progress_bar_config(disable=True)
    spec = json.loads((fixture / "README.json").read_text())["inference"]
    settings = spec["settings"]
    ref = load_file(str(fixture / "inference.safetensors"))
    image = ref["input.image_uint8"].numpy().astype(np.uint8)
    prompt = spec.get("prompt", settings["prompt"])
    call = dict(images={"input": image}, target_modalities="output", task="generation", prompt=prompt,
                num_grid_points=int(settings["num_timesteps"]), timestep_shift=float(settings["timestep_shift"]),
                guidance_scale=float(settings["cfg_text_scale"]), image_guidance_scale=float(settings["cfg_img_scale"]),
                cfg_interval=tuple(settings["cfg_interval"]), cfg_renorm_type=settings["cfg_renorm_type"],
                think=False, latents=ref["input.init_noise"], posterior_eps={"input": ref["input.vae_posterior_eps"]})
    return compare(pipe, call, text=(image, prompt))


def bench_workload(args, workdir: str) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_pipeline

    run_args = argparse.Namespace(bagel_dir=args.bagel_dir, fixture=str(ROOT / "tests" / "fixtures" / "bagel_tiny"),
                                  dtype="float32")
    pipe = bench_pipeline._load_for_run(run_args, workdir)
    call = dict(images={"t1n": bench_pipeline.input_slice()}, target_modalities=list(bench_pipeline.TARGETS),
                task="unified", num_grid_points=10, max_new_tokens=args.max_new_tokens)
    return compare(pipe, call)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--bagel-dir", help="bench workload weights (BAGEL format); default: random")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        workloads = {f"fixture {name}": fixture_workload(name, workdir) for name in ("bagel_tiny", "bagel_tiny_b")}
        workloads["bench unified"] = bench_workload(args, workdir)
    for workload, variants in workloads.items():
        for variant, row in variants.items():
            rows[f"{workload}, {variant}"] = row
    print("| workload, variant | uint8 |Δ| max / mean per image | first v_cond rel. L2 | text ids equal before the first difference |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        images = ", ".join(f"{c}: {v['max']} / {v['mean']}" for c, v in row["images"].items())
        velocity = ", ".join(f"{v:.1e}" for v in row["v_cond_rel_l2"].values())
        texts = ", ".join(f"{k} {v}" for k, v in row["text_ids_agree"].items())
        print(f"| {name} | {images} | {velocity} | {texts} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
