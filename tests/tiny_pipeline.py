"""A tiny random ``UniBrainPipeline`` (and MRI-like inputs) for the pipeline tests.

    from tiny_pipeline import tiny_pipeline; pipe = tiny_pipeline(converted_fixture / "tokenizer")
"""

import numpy as np

from helpers import tiny_model
from unibrain_hf import UniBrainPipeline, UniBrainProcessor
from unibrain_hf.modeling.vae import tiny_vae
from unibrain_hf.pipelines.components import flow_match_scheduler

SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def tiny_components(tokenizer_dir, seed: int = 0) -> dict:
    """model / vae / scheduler / tokenizer / processor of a random tiny pipeline (64-pixel VAE limit)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL]
    model = tiny_model(seed, vocab_size=len(tokenizer) + 9, bos_token_id=ids[0], eos_token_id=ids[1],
                       start_of_image_token_id=ids[2], end_of_image_token_id=ids[3])
    processor = UniBrainProcessor.for_model(model.config, tokenizer, vae_max_size=64, vae_min_size=32,
                                            vit_max_size=56, vit_min_size=28)
    return dict(model=model, vae=tiny_vae(seed), scheduler=flow_match_scheduler(), tokenizer=tokenizer,
                processor=processor)


def tiny_pipeline(tokenizer_dir, seed: int = 0) -> UniBrainPipeline:
    pipe = UniBrainPipeline(**tiny_components(tokenizer_dir, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mri_slice(seed=0, shape=(30, 40)) -> np.ndarray:
    """A float32 slice with a background band, like a brain MRI slice."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 30, size=shape).astype(np.float32)
    image[:3] = 0
    return image


def mri_volume(seed=0, shape=(6, 30, 40)) -> np.ndarray:
    """A float32 (z, y, x) training-frame volume whose slices all differ; the first slice is empty."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(100, 30, size=shape).astype(np.float32).clip(1, None)
    volume[0] = 0
    return volume
