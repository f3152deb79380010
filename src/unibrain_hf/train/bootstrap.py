"""Create a small *starting* pipeline for CPU experiments when no pretrained BAGEL is at hand.

The real recipe starts from BAGEL-7B-MoT (a pretrained Qwen2.5 tokenizer, LLM, SigLIP and the
FLUX VAE). On a laptop there is no such thing at small scale, so this builds the three
ingredients the tiny model needs from a cohort:

1. a byte-level BPE tokenizer trained on the cohort's reports and UniBrain's prompt templates,
   with the four special tokens;
2. a small FLUX-shaped VAE fitted to reconstruct the cohort's slices (the generation path needs a
   VAE that actually reconstructs images: its reconstruction PSNR/SSIM on held-out slices is the
   ceiling of every imputation, so it is measured and written to ``vae_fit.json``);
3. a randomly initialised UniBrain model of the requested width, with the generation expert
   initialised as a copy of the understanding expert, as BAGEL does.

    python -m unibrain_hf.train.bootstrap out/cohort out/init --hidden-size 128 --layers 4 --vae-steps 200
    python -m unibrain_hf.train.bootstrap out/cohort out/init --vae-downsample 4 --latent-patch-size 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
#: Name of the VAE-fit record (losses, settings, held-out reconstruction scores) in the output folder.
VAE_FIT_FILE = "vae_fit.json"


@dataclass(frozen=True)
class VaeRecipe:
    """How the small VAE is built and fitted.

    ``downsample`` is a power of two (FLUX: 8); the encoder then has log2(downsample) + 1 levels.
    The schedule is linear warm-up then cosine decay to ``min_lr_ratio`` × ``learning_rate``.
    ``latent_noise`` is the posterior's standard deviation relative to the spread of the latent means
    (see :func:`fit_vae`).
    """

    steps: int = 200
    downsample: int = 8
    base_channels: int = 16
    latent_channels: int = 16
    batch_size: int = 8
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    latent_noise: float = 0.1

    def channel_multipliers(self) -> tuple[int, ...]:
        levels = int(round(math.log2(self.downsample)))
        if self.downsample < 1 or 2 ** levels != self.downsample:
            raise ValueError(f"VAE downsample must be a power of two, got {self.downsample}")
        return (1,) + (2,) * levels


def cohort_texts(records) -> list[str]:
    from ..data import templates

    texts = []
    for record in records:
        texts.extend(t for t in record.findings.values() if t)
        texts.append(record.impression)
        texts.extend(record.disease)
    for value in vars(templates).values():
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, (list, tuple)):
            texts.extend(v for v in value if isinstance(v, str))
        elif isinstance(value, dict):
            for item in value.values():
                if isinstance(item, (list, tuple)):
                    texts.extend(v for v in item if isinstance(v, str))
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """Byte-level BPE (Qwen2-style pre-tokenisation) + the four UniBrain special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
    wrapped.add_tokens(list(SPECIAL))
    return wrapped


def _on_canvas(plane: np.ndarray, image_size: int) -> np.ndarray:
    """A slice on the ``image_size``² canvas: zero-padded, and first shrunk (aspect kept, bicubic, as the
    processor resizes) when a side is larger, so every fit image has the size the VAE is built for."""
    from PIL import Image

    from ..data.intensity import pad_to_size

    height, width = plane.shape
    if max(height, width) > image_size:
        scale = image_size / max(height, width)
        size = (max(1, min(image_size, round(width * scale))), max(1, min(image_size, round(height * scale))))
        plane = np.asarray(Image.fromarray(plane).resize(size, resample=Image.BICUBIC))
    return pad_to_size(plane, image_size)


def slice_images(records, image_size: int, per_record: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, image_size, image_size) axial slices, intensity-scaled and padded like the training data."""
    from ..data.intensity import rescale_intensity

    slices = []
    for record in records:
        for volume in record.volumes.values():
            scaled = rescale_intensity(volume)
            for index in rng.choice(scaled.shape[0], size=min(per_record, scaled.shape[0]), replace=False):
                slices.append(_on_canvas(scaled[index], image_size))
    return np.stack(slices)


def evaluation_slices(records) -> list[np.ndarray]:
    """The slices the evaluation scores (middle lesion slice of every sequence), uncropped and unpadded."""
    from ..data.intensity import middle_lesion_slice, rescale_intensity

    slices = []
    for record in records:
        index = middle_lesion_slice(record.mask, record.shape_zyx[0])
        slices.extend(rescale_intensity(volume)[index] for volume in record.volumes.values())
    return slices


def _to_model_range(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images)).float().div(127.5).sub(1.0)[:, None].repeat(1, 3, 1, 1)


def fit_vae(images: np.ndarray, steps: int = 200, batch_size: int = 8, base_channels: int = 16, seed: int = 0,
            learning_rate: float = 1e-3, log=print, recipe: VaeRecipe | None = None, progress: bool = False):
    """Fit a small FLUX-shaped ``AutoencoderKL`` to reconstruct ``images`` (uint8 (N, H, W)).

    The posterior has a *fixed, small* standard deviation: the decoder is trained on
    ``mean + σ·ε`` with σ = ``latent_noise`` × the batch's spread of latent means, and after fitting
    the encoder's log-variance output is set to that σ. UniBrain samples the posterior, in training
    and at inference, and the flow model must predict those samples: a posterior as wide as the
    latent signal (what a plain KL-regularised fit with a negligible KL weight drifts to on a small
    budget) turns most of every latent into unpredictable noise, which caps the flow loss far above
    zero and makes every generated image a blur. FLUX's own VAE has a narrow posterior too.

    ``recipe`` (a :class:`VaeRecipe`) overrides the keyword sizes. Returns the VAE with FLUX-style
    latent normalisation (shift and scale so that latent means have zero mean and unit variance)
    and its loss history as ``vae.fit_losses``.
    """
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from ..modeling.vae import flux_vae_config

    if recipe is None:
        recipe = VaeRecipe(steps=steps, base_channels=base_channels, batch_size=batch_size,
                           learning_rate=learning_rate)
    torch.manual_seed(seed)
    # FLUX's layout (16 latent channels, mid attention) at a width a CPU can fit in minutes.
    vae = AutoencoderKL(**flux_vae_config(recipe.base_channels, recipe.channel_multipliers(), 1,
                                          recipe.latent_channels, images.shape[-1], norm_num_groups=8))
    data = _to_model_range(images)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(recipe.warmup_steps, recipe.steps, recipe.min_lr_ratio))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    vae.train()
    bar = tqdm(total=recipe.steps, desc="vae fit", unit="step", disable=not progress)
    for step in range(recipe.steps):
        batch = data[torch.randint(0, data.shape[0], (recipe.batch_size,), generator=generator)]
        mean = vae.encode(batch).latent_dist.mean
        sigma = recipe.latent_noise * mean.detach().std()
        noise = torch.randn(mean.shape, generator=generator)
        reconstruction = vae.decode(mean + sigma * noise).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if not progress and (step % 100 == 0 or step == recipe.steps - 1):
            log(f"vae step {step}: loss {loss.item():.4f}")
    bar.close()
    # Normalise latents to unit variance like FLUX's scale/shift do for its own VAE, from a spread-out
    # sample of the slices (the array is ordered by subject).
    vae.eval()
    sample = data[torch.linspace(0, len(data) - 1, min(len(data), 256)).long()]
    with torch.no_grad():
        means = torch.cat([vae.encode(sample[i:i + 64]).latent_dist.mean for i in range(0, len(sample), 64)])
        spread = means.std()
        # Fix the posterior's log-variance to the noise the decoder was trained with (see above).
        conv_out = vae.encoder.conv_out
        channels = recipe.latent_channels
        conv_out.weight[channels:].zero_()
        conv_out.bias[channels:].fill_(float(2.0 * torch.log(recipe.latent_noise * spread)))
    vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=float(1.0 / spread))
    vae.fit_losses = losses
    return vae


def _warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def reconstruction_scores(vae, slices: list[np.ndarray], image_size: int, stride: int) -> dict:
    """Mean PSNR/SSIM of VAE encode (posterior mean) → decode of uint8 slices: the ceiling of any imputation.

    Each slice is padded to the model canvas (as the pipeline does) and the decoded image is cropped
    back before scoring, so the numbers are on the same footing as the evaluation's.
    """
    from ..data.intensity import center_crop, pad_to_size
    from ..evaluation.metrics import psnr, ssim
    from ..modeling.vae import decode_latents, encode_latents

    if not slices:
        return {"psnr": float("nan"), "ssim": float("nan"), "num_slices": 0}
    psnrs, ssims = [], []
    for plane in slices:
        size = max(image_size, -(-max(plane.shape) // stride) * stride)
        canvas = pad_to_size(plane, size)
        decoded = decode_latents(vae, encode_latents(vae, _to_model_range(canvas[None]), sample=False))
        decoded = ((decoded.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)[0, 0].numpy()
        restored = center_crop(decoded, plane.shape)
        psnrs.append(psnr(plane, restored))
        ssims.append(ssim(plane, restored))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "num_slices": len(slices)}


def model_config(vocab_size: int, special_ids: list[int], hidden_size: int = 128, layers: int = 4, heads: int = 4,
                 kv_heads: int = 2, vit_hidden: int = 64, vit_layers: int = 2, max_image_size: int = 128,
                 vae_downsample: int = 8, latent_patch_size: int = 2, latent_channels: int = 16,
                 intermediate_size: int | None = None):
    """The :class:`UniBrainConfig` of a fresh toy model (``special_ids``: bos, eos, start and end of image).

    Building it validates the sizes (``ConfigError`` naming each problem), so callers check a plan with it
    before any data or weights exist.
    """
    from transformers import Qwen2Config, SiglipVisionConfig

    from ..modeling import UniBrainConfig

    text = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size,
                       intermediate_size=intermediate_size or hidden_size * 2, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    grid_vit = max_image_size // 14 + 1
    vision = SiglipVisionConfig(hidden_size=vit_hidden, intermediate_size=vit_hidden * 2, num_hidden_layers=vit_layers,
                                num_attention_heads=max(1, vit_hidden // 32), image_size=grid_vit * 14, patch_size=14)
    bos, eos, start_of_image, end_of_image = special_ids
    return UniBrainConfig(text_config=text, vision_config=vision, latent_patch_size=latent_patch_size,
                          latent_channels=latent_channels, vae_downsample=vae_downsample,
                          max_latent_size=max_image_size // (vae_downsample * latent_patch_size),
                          vit_max_num_patch_per_side=grid_vit, bos_token_id=bos, eos_token_id=eos,
                          start_of_image_token_id=start_of_image, end_of_image_token_id=end_of_image)


def build_model(tokenizer, hidden_size: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                vit_hidden: int = 64, vit_layers: int = 2, max_image_size: int = 128, seed: int = 0,
                vae_downsample: int = 8, latent_patch_size: int = 2, latent_channels: int = 16,
                intermediate_size: int | None = None, velocity_head_std: float | None = None,
                copy_head_gain: float | None = None):
    """A randomly initialised UniBrain model; the latent geometry must match the VAE it will be used with.

    ``velocity_head_std`` is the initial standard deviation of ``llm2vae`` (default: the text config's
    ``initializer_range``); ``1/sqrt(hidden_size)`` makes a unit-RMS hidden state give unit-scale
    velocities, the scale a pretrained head has. ``copy_head_gain`` (default: none) starts the generation
    expert with a head that reads the same grid position of earlier images (:mod:`.copy_head`).
    """
    from ..modeling import UniBrainForConditionalGeneration

    config = model_config(len(tokenizer), [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL],
                          hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads, vit_hidden=vit_hidden,
                          vit_layers=vit_layers, max_image_size=max_image_size, vae_downsample=vae_downsample,
                          latent_patch_size=latent_patch_size, latent_channels=latent_channels,
                          intermediate_size=intermediate_size)
    torch.manual_seed(seed)
    model = UniBrainForConditionalGeneration(config)
    model.init_generation_expert_from_understanding()
    # A fresh BAGEL build zero-initialises the velocity head; its checkpoints have a trained one.
    # Stage 1 freezes llm2vae, so a zero head would make self-alignment unable to learn at all.
    with torch.no_grad():
        model.llm2vae.weight.normal_(0.0, velocity_head_std or config.text_config.initializer_range)
    if copy_head_gain:
        from .copy_head import seed_copy_head

        seed_copy_head(model, gain=copy_head_gain)
    return model


def vit_resize_bounds(image_size: int, vit_image_size: int | None = None) -> tuple[int, int]:
    """(max, min) side the processor resizes an ``image_size`` slice to for the ViT.

    ``vit_image_size`` fixes both; by default the largest multiple of the 14-pixel patch not above
    ``image_size``, smaller slices no smaller than 28 (or that multiple, when it is below 28). A size off the
    patch grid, or beyond the position grid :func:`build_model` gives the ViT (twice the slice size), is a
    ``ValueError``, as is an ``image_size`` below one patch.
    """
    if vit_image_size is None:
        if image_size < 14:
            raise ValueError(f"image_size must be at least the ViT's 14-pixel patch; got {image_size!r}")
        largest = image_size - image_size % 14
        return largest, min(28, largest)
    if not (isinstance(vit_image_size, int) and 0 < vit_image_size <= 2 * image_size and vit_image_size % 14 == 0):
        raise ValueError(f"vit_image_size must be a positive multiple of the ViT's 14-pixel patch, at most "
                         f"2 × image_size = {2 * image_size}; got {vit_image_size!r}")
    return vit_image_size, vit_image_size


def bootstrap_pipeline(cohort_dir: str | Path, out_dir: str | Path, image_size: int = 64, hidden_size: int = 128,
                       layers: int = 4, vae_steps: int = 200, vocab_size: int = 1024, seed: int = 0,
                       log=print, vae: VaeRecipe | None = None, latent_patch_size: int = 2, heads: int = 4,
                       kv_heads: int = 2, intermediate_size: int | None = None, progress: bool = False,
                       slices_per_sequence: int = 6, velocity_head_std: float | None = None,
                       copy_head_gain: float | None = None,
                       vit_image_size: int | None = None) -> Path:
    """Write a starting pipeline directory (model / vae / tokenizer / processor / scheduler) to ``out_dir``.

    ``vae`` (a :class:`VaeRecipe`) sets the VAE's size and fit (default: ``vae_steps`` steps of FLUX's
    8× layout); the model's latent geometry (``vae_downsample``, ``latent_channels``) follows it.
    ``out_dir/vae_fit.json`` records the fit: settings, losses and the reconstruction PSNR/SSIM of the
    validation split's evaluation slices (the ceiling of every imputation). ``vit_image_size``: the side
    of the ViT's copy of a slice (:func:`vit_resize_bounds`).
    """
    from ..data.radgenome import iter_subject_records
    from ..pipelines.components import save_pipeline_components
    from ..processing.processor import UniBrainProcessor
    from ..utils.atomic import atomic_directory

    recipe = vae or VaeRecipe(steps=vae_steps)
    stride = recipe.downsample * latent_patch_size
    if not (isinstance(image_size, int) and image_size > 0 and image_size % stride == 0):
        # checked before any work: the VAE and the latent patches tile the canvas exactly or not at all
        raise ValueError(f"image_size must be a positive multiple of the VAE's downsampling × the latent patch "
                         f"size ({recipe.downsample} × {latent_patch_size} = {stride}); got {image_size!r}")
    vit_max, vit_min = vit_resize_bounds(image_size, vit_image_size)  # checked before any work
    # so are the model's sizes (the tokenizer's ids are not known yet; placeholders do for the check)
    model_config(vocab_size, [0, 1, 2, 3], hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads,
                 max_image_size=image_size * 2, vae_downsample=recipe.downsample, latent_patch_size=latent_patch_size,
                 latent_channels=recipe.latent_channels, intermediate_size=intermediate_size)
    if copy_head_gain is not None:  # so is the copy head (seed_copy_head would refuse it after the VAE fit)
        from .copy_head import check_copy_head

        check_copy_head(hidden_size, heads, copy_head_gain)
    out_dir = Path(out_dir)
    records = list(iter_subject_records(cohort_dir, split="train"))
    if not records:
        raise ValueError(f"no training subjects in {cohort_dir}")
    tokenizer = train_tokenizer(cohort_texts(records), vocab_size)
    log(f"tokenizer: {len(tokenizer)} tokens")
    images = slice_images(records, image_size, per_record=slices_per_sequence, rng=np.random.default_rng(seed))
    fitted = fit_vae(images, seed=seed, log=log, recipe=recipe, progress=progress)
    held_out = evaluation_slices(iter_subject_records(cohort_dir, split="val")) if recipe.steps else []
    ceiling = reconstruction_scores(fitted, held_out, image_size, stride)
    if recipe.steps:
        log(f"vae reconstruction of the val split's evaluation slices: PSNR {ceiling['psnr']:.2f} dB, "
            f"SSIM {ceiling['ssim']:.3f} ({ceiling['num_slices']} slices)")
    model = build_model(tokenizer, hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads,
                        max_image_size=image_size * 2, seed=seed, vae_downsample=recipe.downsample,
                        latent_patch_size=latent_patch_size, latent_channels=recipe.latent_channels,
                        intermediate_size=intermediate_size, velocity_head_std=velocity_head_std,
                        copy_head_gain=copy_head_gain)
    # The minimum VAE size equals the training slice size, so that inference pads a smaller slice to
    # the same square canvas the model was trained on (as UniBrain pads 240² slices to 256²).
    processor = UniBrainProcessor.for_model(model.config, tokenizer, vae_max_size=image_size,
                                            vae_min_size=image_size, vit_max_size=vit_max, vit_min_size=vit_min)
    record = {"recipe": asdict(recipe), "training_slices": int(len(images)), "image_size": image_size,
              "losses": [round(v, 6) for v in getattr(fitted, "fit_losses", [])],
              "val_reconstruction": ceiling}
    with atomic_directory(out_dir) as tmp:
        save_pipeline_components(tmp, model, fitted, tokenizer, processor)
        (Path(tmp) / VAE_FIT_FILE).write_text(json.dumps(record, indent=1))
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unibrain_hf.train.bootstrap", description=__doc__.split("\n")[0])
    parser.add_argument("cohort_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vae-steps", type=int, default=200)
    parser.add_argument("--vae-downsample", type=int, default=8, help="VAE spatial downsampling (power of two)")
    parser.add_argument("--vae-channels", type=int, default=16, help="VAE base width")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--latent-patch-size", type=int, default=2, help="latent pixels per side per token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy-head-gain", type=float, default=None,
                        help="start the generation expert with a same-position head of this QK-norm gain "
                             "(train/copy_head.py; needs heads of at least 32 channels)")
    args = parser.parse_args(argv)
    recipe = VaeRecipe(steps=args.vae_steps, downsample=args.vae_downsample, base_channels=args.vae_channels,
                       learning_rate=args.vae_lr)
    path = bootstrap_pipeline(args.cohort_dir, args.out_dir, image_size=args.image_size, hidden_size=args.hidden_size,
                              layers=args.layers, seed=args.seed, vae=recipe, latent_patch_size=args.latent_patch_size,
                              progress=True, copy_head_gain=args.copy_head_gain)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
