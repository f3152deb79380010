"""The latent cache: keys, hit / miss / stale, bit-identical training losses, and parity replay through it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from train_helpers import REPO, config_values, make_config  # noqa: F401
from train_helpers import train_workspace  # noqa: F401  (a fixture)

from unibrain_hf.data.latent_cache import (
    LatentCache,
    StaleLatentCacheError,
    image_key,
    pack_distributions,
    sample_latents,
)
from unibrain_hf.errors import ConfigError
from unibrain_hf.modeling.vae import encode_latents, tiny_vae
from unibrain_hf.processing.image_transforms import StrideResize

RESIZE = StrideResize(64, 32, 16)


def _images(seed=0, n=3, size=32):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


def test_keys_follow_the_exact_encoder_input():
    image = _images(n=1)[0]
    assert image_key(image) == image_key(image.clone())
    padded = torch.zeros(3, 48, 48)
    padded[:, :32, :32] = image  # the same picture on a larger pack canvas is another encoder input
    assert image_key(padded) != image_key(image)
    changed = image.clone()
    changed[0, 0, 0] += 1e-3
    assert image_key(changed) != image_key(image)


def test_hit_miss_and_values_equal_fresh_encoding(tmp_path):
    vae = tiny_vae(0).eval()
    images = _images()
    images = torch.cat([images, images[1:2]])  # a noisy target and its clean copy: one distinct image
    cache = LatentCache.open(tmp_path / "cache", vae, RESIZE)
    plain_mean, plain_logvar = pack_distributions(vae, images)

    first = pack_distributions(vae, images, cache)
    assert (cache.hits, cache.misses, cache.writes) == (0, 3, 3)
    reopened = LatentCache.open(tmp_path / "cache", vae, RESIZE, create=False)
    found = reopened.lookup(images)
    assert found.missing == [] and len(found.keys) == 4
    second = pack_distributions(vae, images, reopened, found)
    assert (reopened.hits, reopened.misses, reopened.writes) == (3, 0, 0)
    for mean, logvar in (first, second):
        assert torch.equal(mean, plain_mean) and torch.equal(logvar, plain_logvar)

    # Sampling from the parameters is the VAE's own posterior sample, ε for ε.
    eps = torch.randn(plain_mean.shape, generator=torch.Generator().manual_seed(1))
    ours = sample_latents(vae, *second, posterior_eps=eps)
    with torch.no_grad():
        reference = encode_latents(vae, images, posterior_eps=eps)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_stale_cache_is_refused(tmp_path):
    vae = tiny_vae(0).eval()
    LatentCache.open(tmp_path / "cache", vae, RESIZE)
    with pytest.raises(StaleLatentCacheError, match="another VAE.*vae_sha256"):
        LatentCache.open(tmp_path / "cache", tiny_vae(1).eval(), RESIZE)
    with pytest.raises(StaleLatentCacheError, match="another image transform.*transform"):
        LatentCache.open(tmp_path / "cache", vae, StrideResize(128, 32, 16))
    assert issubclass(StaleLatentCacheError, ConfigError)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StaleLatentCacheError, match="not a latent cache"):
        LatentCache.open(tmp_path / "other", vae, RESIZE)


def _train_losses(workspace, tmp_path, name, **overrides):
    from unibrain_hf.train.trainer import train

    config = make_config(workspace, **{"train.output_dir": tmp_path / name, "train.max_steps": 3,
                                       "train.save_every": 0, "train.export_pipeline": "false",
                                       "data.vae_dropout": 0.0, **overrides})
    result = train(config, progress=False)
    return result.losses


def test_training_with_the_cache_gives_identical_losses(train_workspace, tmp_path, monkeypatch):  # noqa: F811
    plain = _train_losses(train_workspace, tmp_path, "plain")
    cache_dir = tmp_path / "cache"
    filled = _train_losses(train_workspace, tmp_path, "filling", **{"data.latent_cache": cache_dir})
    reused = _train_losses(train_workspace, tmp_path, "reusing", **{"data.latent_cache": cache_dir})
    keys = ("loss", "ce", "mse", "grad_norm")
    assert [[r[k] for k in keys] for r in filled] == [[r[k] for k in keys] for r in plain]
    assert [[r[k] for k in keys] for r in reused] == [[r[k] for k in keys] for r in plain]
    assert filled[-1]["latent_cache_misses"] > 0  # the first run encoded and stored
    assert reused[-1]["latent_cache_misses"] == 0 and reused[-1]["latent_cache_hits"] > 0  # the second only read

    # Another VAE (here: other weights in the same directory layout) → refused before training.
    from diffusers import AutoencoderKL

    other_vae = tmp_path / "other_vae"
    vae = AutoencoderKL.from_pretrained(str(train_workspace[2] / "vae"))
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    vae.save_pretrained(str(other_vae))
    from unibrain_hf.train import trainer

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the stale cache was refused")

    monkeypatch.setattr(trainer, "load_components", must_not_load)
    with pytest.raises(StaleLatentCacheError, match="stale"):
        _train_losses(train_workspace, tmp_path, "stale", **{"data.latent_cache": cache_dir,
                                                            "model.vae": other_vae})


def test_offline_pass_then_training_encodes_nothing(train_workspace, tmp_path):  # noqa: F811
    cache_dir = tmp_path / "offline"
    values = config_values(train_workspace, **{"data.latent_cache": cache_dir})
    completed = subprocess.run([sys.executable, "-m", "unibrain_hf.cli", "cache-latents", *values, "--threads", "1"],
                               cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "entries written" in completed.stdout
    written = len(LatentCache(cache_dir, {}))
    assert written > 0
    losses = _train_losses(train_workspace, tmp_path, "offline", **{"data.latent_cache": cache_dir})
    assert losses[-1]["latent_cache_misses"] == 0 and losses[-1]["latent_cache_hits"] > 0
    assert len(LatentCache(cache_dir, {})) == written  # nothing had to be added

    # A second pass finds everything present and writes nothing.
    again = subprocess.run([sys.executable, "-m", "unibrain_hf.cli", "cache-latents", *values],
                           cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and " 0 entries written" in again.stdout


def test_parity_replay_through_the_cache_is_identical(fixture_dir, tmp_path):
    from unibrain_hf.convert import convert_bagel_checkpoint
    from unibrain_hf.testing.parity import Report, check_training

    converted = tmp_path / "converted"
    convert_bagel_checkpoint(fixture_dir, converted)
    plain_report, cached_report = Report(), Report()
    plain = check_training(fixture_dir, converted, plain_report)
    cached = check_training(fixture_dir, converted, cached_report, latent_cache=tmp_path / "cache")
    assert plain_report.ok and cached_report.ok, (plain_report.to_dict()["failed"], cached_report.to_dict()["failed"])
    assert cached_report.rows["train.latent_cache.missing_after_fill"]["max_abs_diff"] == 0
    assert torch.equal(plain["latents"], cached["latents"])
    assert torch.equal(plain["loss"], cached["loss"])
    assert plain["grads"].keys() == cached["grads"].keys() and len(plain["grads"]) > 50
    assert all(torch.equal(plain["grads"][n], cached["grads"][n]) for n in plain["grads"])
