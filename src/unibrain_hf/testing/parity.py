"""Replay a reference fixture through the public API and report how closely we match it.

A fixture (any directory of the format: a ``README.json`` describing every tensor, plus the
safetensors files recorded by running the reference BAGEL/UniBrain code) holds a tiny BAGEL checkpoint, the
sequence plan of a packed training batch with its images, the noise that was drawn, every
output, the gradient of every parameter, and an inference trace. This tool

1. converts the checkpoint with :func:`unibrain_hf.convert.convert_bagel_checkpoint`,
2. loads it with ``from_pretrained``,
3. rebuilds the training samples from their plan with the package's own tokenisation and packing,
4. feeds the recorded VAE posterior ε, flow noise and timesteps, runs forward + backward,
5. compares the packed inputs, CE / MSE (per token and means), logits, velocities, the LLM input
   sequence, every layer's output, the last hidden state and all gradients,
6. replays the inference trace through ``UniBrainPipeline`` (KV cache after prefill, every step's
   conditional / CFG velocities, final latents, decoded image, greedy text ids and logits),

and prints a JSON report of max |difference| per quantity. The exit code is 0 only if every
quantity is within tolerance.

    python -m unibrain_hf.testing.parity path/to/fixture_dir [--json report.json] [--attn sdpa|eager]
    python -m unibrain_hf.testing.parity path/to/fixture_dir --latent-cache DIR   # the batch's latents via the cache

The training batch's latents go through the trainer's own path (posterior parameters, one image
per encoder call, then the recorded ε). With ``--latent-cache`` the parameters are first written
to that cache and then read back from disk, as a training run with ``data.latent_cache`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

# Tolerances (fp32). Losses and activations are compared absolutely; integer layouts exactly.
TOLERANCES = {"loss": 1e-5, "activation": 1e-4, "grad": 1e-4, "exact": 0.0, "latent": 1e-4}

_INPUT_PAIRS = [  # (our PackedBatch field, fixture tensor name)
    ("input_ids", "packed_text_ids"), ("text_indexes", "packed_text_indexes"),
    ("position_ids", "packed_position_ids"), ("ce_loss_indexes", "ce_loss_indexes"),
    ("labels", "packed_label_ids"), ("vit_position_ids", "packed_vit_position_ids"),
    ("vit_token_indexes", "packed_vit_token_indexes"), ("latent_position_ids", "packed_latent_position_ids"),
    ("vae_token_indexes", "packed_vae_token_indexes"), ("mse_loss_indexes", "mse_loss_indexes"),
]


def _max_diff(ours, reference) -> float:
    if ours is None or reference is None:
        return float("inf")
    ours, reference = torch.as_tensor(ours).detach().float(), torch.as_tensor(reference).detach().float()
    if ours.shape != reference.shape:
        if ours.numel() == reference.numel():
            ours = ours.reshape(reference.shape)
        else:
            return float("inf")
    if ours.numel() == 0:
        return 0.0
    both_inf = torch.isinf(ours) & torch.isinf(reference) & (torch.sign(ours) == torch.sign(reference))
    return float((ours - reference).abs().masked_fill(both_inf, 0.0).max())


class Report:
    def __init__(self):
        self.rows: dict[str, dict] = {}

    def add(self, name: str, difference: float, tolerance: float) -> None:
        self.rows[name] = {"max_abs_diff": difference, "tolerance": tolerance,
                           "ok": bool(difference <= tolerance)}

    def skip(self, name: str, reason: str) -> None:
        self.rows[name] = {"max_abs_diff": None, "tolerance": None, "ok": True, "skipped": reason}

    @property
    def ok(self) -> bool:
        return all(row["ok"] for row in self.rows.values())

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked": sum("skipped" not in r for r in self.rows.values()),
                "failed": [k for k, r in self.rows.items() if not r["ok"]], "results": self.rows}


def load_fixture(fixture_dir: Path) -> dict:
    readme_path = fixture_dir / "README.json"
    if not readme_path.exists():
        raise FileNotFoundError(f"{fixture_dir} has no README.json; is it a reference fixture?")
    return json.loads(readme_path.read_text())


def build_training_samples(readme: dict, fixture_dir: Path):
    """The recorded sequence plans as lists of ``PlanItem`` (images read from the fixture's PNGs)."""
    from ..processing.sequence_plan import image_items, text_item

    samples = []
    for plan in readme["train_batch"]["samples"]:
        items = []
        for entry in plan:
            if entry[0] == "text":
                items.append(text_item(entry[1], loss=bool(entry[2])))
            elif entry[0] == "image":
                image = Image.open(fixture_dir / f"train_image_{entry[1]}.png").convert("RGB")
                flags = entry[2]
                items.extend(image_items(image, need_loss=bool(flags.get("need_loss")),
                                         need_vae=bool(flags.get("need_vae")), need_vit=bool(flags.get("need_vit"))))
            else:
                raise ValueError(f"unknown plan entry kind {entry[0]!r}")
        samples.append(items)
    return samples


def recorded_timesteps(samples, raw_timesteps: torch.Tensor, latent_token_counts: list[int]):
    """Split the fixture's per-token raw timesteps back into one value per noisy target, per sample."""
    per_image, start = [], 0
    for count in latent_token_counts:
        per_image.append(float(raw_timesteps[start]))
        start += count
    values, image_cursor = [], 0
    for items in samples:
        mine = []
        for item in items:
            if item.kind == "vae_image":
                if item.loss:
                    mine.append(per_image[image_cursor])
                image_cursor += 1
        values.append(mine)
    return values


def check_training(fixture_dir: Path, converted: Path, report: Report, attn: str = "sdpa",
                   latent_cache: str | Path | None = None) -> dict:
    """Replay the training batch; returns our loss and every parameter's gradient (for path comparisons)."""
    from diffusers import AutoencoderKL

    from .. import UniBrainForConditionalGeneration, UniBrainProcessor
    from ..convert.bagel_keys import rename_bagel_key
    from ..data.latent_cache import LatentCache, pack_distributions, sample_latents

    readme = load_fixture(fixture_dir)
    recorded = load_file(str(fixture_dir / "train_batch.safetensors"))
    processor = UniBrainProcessor.from_pretrained(converted / "processor")
    samples = build_training_samples(readme, fixture_dir)
    latent_shapes = recorded["input.patchified_vae_latent_shapes"].tolist()
    timesteps = recorded_timesteps(samples, recorded["input.packed_timesteps"], [h * w for h, w in latent_shapes])
    batch = processor.pack(samples, rng=0, timesteps=timesteps)

    for ours, theirs in _INPUT_PAIRS:
        report.add(f"train.input.{ours}", _max_diff(getattr(batch, ours), recorded[f"input.{theirs}"]),
                   TOLERANCES["exact"])
    report.add("train.input.vit_pixel_patches", _max_diff(batch.vit_pixel_patches, recorded["input.packed_vit_tokens"]),
               1e-6)
    report.add("train.input.padded_images", _max_diff(batch.padded_images, recorded["input.padded_images"]), 1e-6)
    report.add("train.input.timesteps", _max_diff(batch.timesteps, recorded["input.packed_timesteps"]),
               TOLERANCES["exact"])
    recorded_splits = recorded["input.split_lens"].tolist()
    recorded_samples = recorded["input.sample_lens"].tolist()
    # The reference's flex path appends one padding pseudo-sample; ours needs none.
    if sum(recorded_samples) > int(readme["train_batch"]["meta"]["sequence_length"]):
        recorded_splits, recorded_samples = recorded_splits[:-1], recorded_samples[:-1]
    report.add("train.input.split_lens", 0.0 if batch.split_lens == recorded_splits else float("inf"), 0.0)
    report.add("train.input.sample_lens", 0.0 if batch.sample_lens == recorded_samples else float("inf"), 0.0)

    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(str(converted / "vae"))
    model = UniBrainForConditionalGeneration.from_pretrained(str(converted / "model"), attn_implementation=attn,
                                                             dtype=torch.float32)
    model.train()
    with torch.no_grad():
        cache = None
        if latent_cache is not None:  # fill it, then read every row back from disk through a fresh handle
            pack_distributions(vae, batch.padded_images, LatentCache.open(latent_cache, vae, processor.vae_resize))
            cache = LatentCache.open(latent_cache, vae, processor.vae_resize, create=False)
            found = cache.lookup(batch.padded_images)
            report.add("train.latent_cache.missing_after_fill", float(len(found.missing)), TOLERANCES["exact"])
        mean, logvar = pack_distributions(vae, batch.padded_images, cache,
                                          cache.lookup(batch.padded_images) if cache is not None else None)
        if cache is not None:
            report.add("train.latent_cache.encoded_while_cached", float(cache.misses), TOLERANCES["exact"])
        latents = sample_latents(vae, mean, logvar, posterior_eps=recorded["input.vae_posterior_eps"])
    report.add("train.padded_latent", _max_diff(latents, recorded["output.padded_latent"]), TOLERANCES["latent"])
    output = model(**batch.model_inputs(latents), flow_noise=recorded["input.flow_noise"], output_hidden_states=True)
    loss_pairs = [("ce_loss", output.ce_loss), ("mse_loss", output.mse_loss), ("loss", output.loss)]
    for name, value in loss_pairs:
        report.add(f"train.{name}", _max_diff(value.reshape(1), recorded[f"output.{name}"]), TOLERANCES["loss"])
    activations = [
        ("ce_per_token", output.ce_per_token), ("ce_logits", output.logits),
        ("mse_per_element", output.mse_per_element), ("mse_pred", output.velocity),
        ("llm_input_sequence", output.inputs_embeds), ("llm_last_hidden_state", output.last_hidden_state),
        ("vit_last_hidden_state", output.vision_hidden_state), ("connector_out", output.connector_output),
        ("flow_x_t", output.flow_inputs), ("flow_t_effective", output.flow_timesteps),
    ]
    for name, value in activations:
        if f"output.{name}" in recorded:
            report.add(f"train.{name}", _max_diff(value, recorded[f"output.{name}"]), TOLERANCES["activation"])
    for index, hidden in enumerate(output.hidden_states or ()):
        key = f"output.llm_layer_out.{index}"
        if key in recorded:
            report.add(f"train.llm_layer_out.{index}", _max_diff(hidden, recorded[key]), TOLERANCES["activation"])

    output.loss.backward()
    grads = load_file(str(fixture_dir / "train_grads.safetensors"))
    parameters = dict(model.named_parameters())
    worst, worst_name, missing = 0.0, None, []
    for key, reference in grads.items():
        name = rename_bagel_key(key[len("grad."):])
        if name is None or name not in parameters:
            missing.append(key)
            continue
        parameter = parameters[name]
        grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        if reference.dim() == 4 and grad.dim() == 2:  # conv-form patch embedding in the fixture
            reference = reference.permute(0, 2, 3, 1).reshape(grad.shape)
        difference = _max_diff(grad, reference)
        if difference > worst:
            worst, worst_name = difference, name
    report.add(f"train.grads({len(grads)} params; max at {worst_name})", worst if not missing else float("inf"),
               TOLERANCES["grad"])
    if missing:
        report.rows["train.grads.missing"] = {"ok": False, "missing": missing[:10]}
    return {"loss": output.loss.detach(), "latents": latents,
            "grads": {n: p.grad.detach().clone() for n, p in parameters.items() if p.grad is not None}}


def run(fixture_dir: str | Path, attn: str = "sdpa", work_dir: str | Path | None = None,
        latent_cache: str | Path | None = None) -> dict:
    from ..convert import convert_bagel_checkpoint

    fixture_dir = Path(fixture_dir)
    report = Report()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        converted = Path(tmp) / "converted"
        convert_bagel_checkpoint(fixture_dir, converted)
        check_training(fixture_dir, converted, report, attn=attn, latent_cache=latent_cache)
        from .inference_parity import check_inference, tolerance_for

        for name, difference in check_inference(fixture_dir, converted).items():
            report.add(f"infer.{name}", float(difference), tolerance_for(name))
    return report.to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unibrain_hf.testing.parity", description=__doc__.split("\n")[0])
    parser.add_argument("fixture_dir", help="directory with README.json and the recorded safetensors files")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention backend to check")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--latent-cache", default=None, metavar="DIR",
                        help="take the training batch's latents through a latent cache in DIR (created if absent)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(args.fixture_dir, attn=args.attn, latent_cache=args.latent_cache)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
