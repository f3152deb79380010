"""Create a small *starting* pipeline for CPU experiments when no pretrained BAGEL is at hand.

The real recipe starts from BAGEL-7B-MoT (a pretrained Qwen2.5 tokenizer, LLM, SigLIP and the
FLUX VAE). On a laptop there is no such thing at small scale, so this builds the three
ingredients the tiny model needs from a cohort:

1. a byte-level BPE tokenizer trained on the cohort's reports and UniBrain's prompt templates,
   with the four special tokens;
2. a small FLUX-shaped VAE fitted for a few hundred steps to reconstruct the cohort's slices
   (the generation path needs a VAE that actually reconstructs images);
3. a randomly initialised UniBrain model of the requested width, with the generation expert
   initialised as a copy of the understanding expert, as BAGEL does.

    python -m unibrain_hf.train.bootstrap out/cohort out/init --hidden-size 128 --layers 4 --vae-steps 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


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


def slice_images(records, image_size: int, per_record: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, H, W) axial slices, intensity-scaled and padded like the training data."""
    from ..data.intensity import pad_to_size, rescale_intensity

    slices = []
    for record in records:
        for volume in record.volumes.values():
            scaled = rescale_intensity(volume)
            for index in rng.choice(scaled.shape[0], size=min(per_record, scaled.shape[0]), replace=False):
                slices.append(pad_to_size(scaled[index], image_size))
    return np.stack(slices)


def fit_vae(images: np.ndarray, steps: int = 200, batch_size: int = 8, base_channels: int = 16, seed: int = 0,
            learning_rate: float = 1e-3, kl_weight: float = 1e-6, log=print):
    """Fit a small FLUX-shaped ``AutoencoderKL`` to reconstruct ``images`` (uint8 (N, H, W))."""
    from diffusers import AutoencoderKL

    from ..modeling.vae import flux_vae_config

    torch.manual_seed(seed)
    # FLUX's layout (3 downsamplings, 16 latent channels) at a width a CPU can fit in minutes.
    vae = AutoencoderKL(**flux_vae_config(base_channels, (1, 2, 2, 2), 1, 16, images.shape[-1],
                                          norm_num_groups=8))
    data = torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None].repeat(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(steps):
        batch = data[torch.randint(0, data.shape[0], (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    # Normalise latents to unit variance like FLUX's scale/shift do for its own VAE.
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(data[i:i + 64]).latent_dist.mean for i in range(0, min(len(data), 256), 64)])
    vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=float(1.0 / means.std()))
    return vae


def build_model(tokenizer, hidden_size: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                vit_hidden: int = 64, vit_layers: int = 2, max_image_size: int = 128, seed: int = 0):
    from transformers import Qwen2Config, SiglipVisionConfig

    from ..modeling import UniBrainConfig, UniBrainForConditionalGeneration

    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL]
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    grid_vit = max_image_size // 14 + 1
    vision = SiglipVisionConfig(hidden_size=vit_hidden, intermediate_size=vit_hidden * 2, num_hidden_layers=vit_layers,
                                num_attention_heads=max(1, vit_hidden // 32), image_size=grid_vit * 14, patch_size=14)
    config = UniBrainConfig(text_config=text, vision_config=vision, max_latent_size=max_image_size // 16,
                            vit_max_num_patch_per_side=grid_vit, bos_token_id=ids[0], eos_token_id=ids[1],
                            start_of_image_token_id=ids[2], end_of_image_token_id=ids[3])
    torch.manual_seed(seed)
    model = UniBrainForConditionalGeneration(config)
    model.init_generation_expert_from_understanding()
    # A fresh BAGEL build zero-initialises the velocity head; its checkpoints have a trained one.
    # Stage 1 freezes llm2vae, so a zero head would make self-alignment unable to learn at all.
    with torch.no_grad():
        model.llm2vae.weight.normal_(0.0, config.text_config.initializer_range)
    return model


def bootstrap_pipeline(cohort_dir: str | Path, out_dir: str | Path, image_size: int = 64, hidden_size: int = 128,
                       layers: int = 4, vae_steps: int = 200, vocab_size: int = 1024, seed: int = 0,
                       log=print) -> Path:
    """Write a starting pipeline directory (model / vae / tokenizer / processor / scheduler) to ``out_dir``."""
    from ..data.radgenome import iter_subject_records
    from ..pipelines.components import save_pipeline_components
    from ..processing.processor import UniBrainProcessor

    out_dir = Path(out_dir)
    records = list(iter_subject_records(cohort_dir, split="train"))
    if not records:
        raise ValueError(f"no training subjects in {cohort_dir}")
    tokenizer = train_tokenizer(cohort_texts(records), vocab_size)
    log(f"tokenizer: {len(tokenizer)} tokens")
    images = slice_images(records, image_size, per_record=6, rng=np.random.default_rng(seed))
    vae = fit_vae(images, steps=vae_steps, seed=seed, log=log)
    model = build_model(tokenizer, hidden_size=hidden_size, layers=layers, max_image_size=image_size * 2, seed=seed)
    # The minimum VAE size equals the training slice size, so that inference pads a smaller slice to
    # the same square canvas the model was trained on (as UniBrain pads 240² slices to 256²).
    processor = UniBrainProcessor.for_model(model.config, tokenizer, vae_max_size=image_size,
                                            vae_min_size=image_size, vit_max_size=image_size - image_size % 14,
                                            vit_min_size=28)
    from ..utils.atomic import atomic_directory

    with atomic_directory(out_dir) as tmp:
        save_pipeline_components(tmp, model, vae, tokenizer, processor)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unibrain_hf.train.bootstrap", description=__doc__.split("\n")[0])
    parser.add_argument("cohort_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vae-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = bootstrap_pipeline(args.cohort_dir, args.out_dir, image_size=args.image_size, hidden_size=args.hidden_size,
                              layers=args.layers, vae_steps=args.vae_steps, seed=args.seed)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
