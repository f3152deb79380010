"""Replay a reference fixture's inference run through ``UniBrainPipeline`` and measure the differences.

A parity fixture (any directory of the format: a ``README.json`` describing each recorded tensor)
records one ``InterleaveInferencer.interleave_inference([image, prompt])`` call for an image and one
for text, with the VAE posterior noise and the initial noise. This module rebuilds the same context with
the pipeline's own code path — ``pipe(..., latents=..., posterior_eps=...)`` for the image and
the pipeline's context/text building blocks for the greedy text — and returns the maximum
absolute difference of every recorded quantity: the KV cache after prefill, kv lengths and
RoPE positions of all three contexts, each step's branch velocities, the final latents, the
VAE decoder output, the uint8 image and the greedy ids/logits. Sizes and settings are read
from README.json, never assumed.

    python -m unibrain_hf.testing.parity FIXTURE_DIR     # converts the fixture and runs this replay
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

#: Tolerances (fp32) the parity CLI and tests apply; keys are prefixes of the result names.
TOLERANCES = {"kv": 1e-4, "context": 0.0, "flow": 1e-4, "latents": 1e-4, "vae_decode": 1e-4,
              "image_uint8": 1.0, "text_ids": 0.0, "text_logits": 1e-4, "vae_encode": 1e-4}


def _max_diff(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def tolerance_for(name: str) -> float:
    for prefix, value in TOLERANCES.items():
        if name.startswith(prefix):
            return value
    return 1e-4


def check_inference(fixture_dir, converted_dir) -> dict[str, float]:
    """Max-abs differences between the pipeline and the fixture's recorded inference run."""
    from ..pipelines.pipeline_unibrain import UniBrainPipeline

    fixture_dir = Path(fixture_dir)
    readme = json.loads((fixture_dir / "README.json").read_text())
    spec = readme["inference"]
    settings = spec["settings"]
    ref = load_file(str(fixture_dir / "inference.safetensors"))
    pipe = UniBrainPipeline.from_pretrained(str(converted_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    image = ref["input.image_uint8"].numpy().astype(np.uint8)
    eps = ref["input.vae_posterior_eps"]
    init_noise = ref["input.init_noise"]
    prompt = spec.get("prompt", settings["prompt"])
    num_layers = pipe.model.config.text_config.num_hidden_layers
    diffs: dict[str, float] = {}

    # ---- image run: pipeline call with the recorded noises; the callback records every step.
    steps = []

    def record(pipeline, step, timestep, kwargs):
        # The model's time of this step is the scheduler's sigma (its timestep is sigma × 1000).
        t = float(pipeline.scheduler.sigmas[step])
        steps.append({"t": t, **{k: kwargs[k] for k in ("x_t", "v_cond", "v_uncond_text", "v_uncond_image",
                                                          "velocity")}})
        if step == 0:
            steps[0]["context"] = kwargs["context"]
        return {}

    # The reference counts grid points (``num_timesteps``); the pipeline takes them as ``num_grid_points``.
    call = dict(images={"input": image}, target_modalities="output", task="generation", prompt=prompt,
                num_grid_points=int(settings["num_timesteps"]), timestep_shift=float(settings["timestep_shift"]),
                guidance_scale=float(settings["cfg_text_scale"]), image_guidance_scale=float(settings["cfg_img_scale"]),
                cfg_interval=tuple(settings["cfg_interval"]), cfg_renorm_type=settings["cfg_renorm_type"],
                cfg_renorm_min=float(settings["cfg_renorm_min"]), think=False,
                latents=init_noise, posterior_eps={"input": eps})
    latent_out = pipe(**call, output_type="latent", callback_on_step_end=record,
                      callback_on_step_end_tensor_inputs=["x_t", "v_cond", "v_uncond_text", "v_uncond_image",
                                                          "velocity", "context"]).images[0]

    context = steps[0]["context"]
    for name in ("gen", "cfg_text", "cfg_img"):
        branch = getattr(context, name)
        diffs[f"context.{name}.kv_lens"] = abs(branch.kv_len - int(ref[f"img.context.{name}.kv_lens"][0]))
        diffs[f"context.{name}.ropes"] = abs(branch.rope - int(ref[f"img.context.{name}.ropes"][0]))
    for layer in range(num_layers):
        keys, values = context.gen.cache.layer(layer)
        # ours (B, H_kv, L, d) → the reference's packed (L, H_kv, d)
        diffs[f"kv.key.{layer}"] = _max_diff(keys[0].transpose(0, 1), ref[f"img.context.gen.key_cache.{layer}"])
        diffs[f"kv.value.{layer}"] = _max_diff(values[0].transpose(0, 1), ref[f"img.context.gen.value_cache.{layer}"])

    for i, step in enumerate(steps):
        if f"img.flow.{i}.t" not in ref:
            diffs[f"flow.{i}.missing_in_fixture"] = float("inf")
            continue
        diffs[f"flow.{i}.t"] = abs(step["t"] - float(ref[f"img.flow.{i}.t"][0]))
        diffs[f"flow.{i}.x_t"] = _max_diff(step["x_t"][0], ref[f"img.flow.{i}.x_t"])
        diffs[f"flow.{i}.v_cond"] = _max_diff(step["v_cond"][0], ref[f"img.flow.{i}.v_cond"])
        for ours, theirs in (("v_uncond_text", "v_cfg_text"), ("v_uncond_image", "v_cfg_img")):
            key = f"img.flow.{i}.{theirs}"
            # A guidance branch must run exactly where the reference ran it (e.g. not on the interval's bound).
            diffs[f"flow.{i}.{theirs}.evaluated"] = 0.0 if (step[ours] is not None) == (key in ref) else float("inf")
            if step[ours] is not None and key in ref:
                diffs[f"flow.{i}.{theirs}"] = _max_diff(step[ours][0], ref[key])
        diffs[f"flow.{i}.v_t"] = _max_diff(step["velocity"][0], ref[f"img.flow.{i}.v_t"])
    recorded_steps = sum(1 for k in ref if k.startswith("img.flow.") and k.endswith(".v_t"))
    diffs["flow.num_steps"] = abs(len(steps) - recorded_steps)

    height, width = (int(s) for s in ref["img.image_shape"].tolist())
    config = pipe.model.config
    tokens = latent_grid_to_tokens(latent_out, config)
    diffs["latents.output_tokens"] = _max_diff(tokens, ref["img.generate_image.output_latent_tokens"])
    diffs["latents.vae_decode_input"] = _max_diff(latent_out[None], ref["img.vae_decode_input"])
    decoded = pipe.decode_latent_tokens(tokens[None], height, width)
    diffs["vae_decode.output"] = _max_diff(decoded, ref["img.vae_decode_output"])
    generated = pipe(**call, output_type="np").images[0]
    diffs["image_uint8.generated"] = _max_diff(np.round(generated * 255), ref["output.generated_image_uint8"])

    # ---- the VAE encoding of the context image (input tensor and sampled latent).
    from ..modeling.vae import encode_latents
    from ..pipelines.mri_io import load_slice
    from ..processing.image_transforms import to_model_tensor

    prepared = load_slice(image, "input", pipe.processor.vae_resize)
    vae_input = to_model_tensor(prepared.image())[None]
    diffs["vae_encode.input"] = _max_diff(vae_input, ref["img.vae_encode_input"])
    with torch.no_grad():
        diffs["vae_encode.output"] = _max_diff(encode_latents(pipe.vae, vae_input, posterior_eps=eps),
                                               ref["img.vae_encode_output"])

    # ---- text run: the same context built by the pipeline's blocks, then greedy decoding.
    text_context = pipe.new_context()
    text_context.add_image(pipe.encode_images([prepared.rgb], eps))
    text_context.add_instruction(pipe.tokenize(prompt))
    ref_ids = ref["txt.generate_text.output_ids"][:, 0]
    max_length = int(settings.get("text_max_length", ref_ids.numel()))
    ids, logits = text_context.generate_text(max_length, return_logits=True)
    diffs["text_ids.output_ids"] = 0.0 if torch.equal(ids[0], ref_ids) else float("inf")
    diffs["text_logits.logits"] = _max_diff(logits[0], ref["txt.generate_text.logits"])
    diffs["context.text.kv_len"] = abs(text_context.gen.kv_len - int(ref["txt.generate_text.key_values_lens"][0]))
    diffs["context.text.start_position"] = abs(
        text_context.gen.rope - int(ref["txt.generate_text.packed_query_position_ids"][0]))
    return diffs


def latent_grid_to_tokens(latent_grid: torch.Tensor, config) -> torch.Tensor:
    """(C, h·p, w·p) latent grid → (h·w, p·p·C) tokens."""
    from ..modeling.modeling_unibrain import UniBrainForConditionalGeneration

    patch = config.latent_patch_size
    rows, cols = latent_grid.shape[1] // patch, latent_grid.shape[2] // patch
    return UniBrainForConditionalGeneration.patchify_latents(latent_grid[None], [(rows, cols)], patch)


def failures(diffs: dict[str, float]) -> dict[str, float]:
    """The entries above their tolerance."""
    return {k: v for k, v in diffs.items() if not v <= tolerance_for(k)}
