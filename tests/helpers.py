"""Small builders shared by the tests: a tiny random model and a hand-made packed batch."""

import numpy as np
import torch

from unibrain_hf import UniBrainConfig, UniBrainForConditionalGeneration
from unibrain_hf.processing.image_transforms import StrideResize
from unibrain_hf.processing.packing import PackingSpec, SequencePacker
from unibrain_hf.processing.sequence_plan import image_items, text_item


def tiny_model(seed: int = 0, **overrides) -> UniBrainForConditionalGeneration:
    torch.manual_seed(seed)
    model = UniBrainForConditionalGeneration(UniBrainConfig.tiny(**overrides))
    with torch.no_grad():  # a non-zero velocity head so that generation outputs depend on the weights
        model.llm2vae.weight.normal_(0, 0.02)
    return model.eval()


def tiny_packer(config) -> SequencePacker:
    spec = PackingSpec.from_config(config, StrideResize(64, 32, config.latent_downsample),
                                   StrideResize(56, 28, config.vit_patch_size))
    vocab = config.text_config.vocab_size - 4
    return SequencePacker(spec, tokenize=lambda text: [3 + (ord(c) % (vocab - 3)) for c in text])


def toy_image(seed: int, height: int = 32, width: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)


def toy_samples():
    """Two interleaved samples: context image, instruction, think text, noisy target + copies, answer."""
    first = [text_item("translate t1 to t2"), *image_items(toy_image(0), need_vae=True, need_vit=True),
             text_item("<think>plan</think>", loss=True),
             *image_items(toy_image(1), need_loss=True, need_vae=True, need_vit=True),
             text_item("Final Diagnosis: Glioma", loss=True)]
    second = [*image_items(toy_image(2, 48, 32), need_vit=True), text_item("describe"),
              *image_items(toy_image(2, 48, 32), need_loss=True)]
    return [first, second]


def random_latents(batch, channels: int = 16, seed: int = 0) -> torch.Tensor:
    """Stand-in VAE latents with the shape the packed images imply (downsample 8)."""
    generator = torch.Generator().manual_seed(seed)
    n, _, height, width = batch.padded_images.shape
    return torch.randn(n, channels, height // 8, width // 8, generator=generator)
