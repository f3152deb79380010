"""The MoT model: config, save/load, Auto classes, routing, masks, backends, freezing, KV cache."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel

from helpers import random_latents, tiny_model, tiny_packer, toy_samples
from unibrain_hf import UniBrainConfig, UniBrainForConditionalGeneration
from unibrain_hf.modeling.attention import PackedAttentionLayout
from unibrain_hf.modeling.checkpointing import enable_activation_checkpointing


@pytest.fixture(scope="module")
def batch_and_latents():
    model = tiny_model()
    batch = tiny_packer(model.config).pack(toy_samples(), rng=0)
    return batch, random_latents(batch)


def run(model, batch, latents, **kwargs):
    noise = torch.randn(batch.vae_token_indexes.numel(), model.config.patch_latent_dim,
                        generator=torch.Generator().manual_seed(1))
    return model(**batch.model_inputs(latents), flow_noise=noise, output_hidden_states=True, **kwargs)


def test_config_round_trip(tmp_path):
    config = UniBrainConfig.tiny(timestep_shift=2.0, freeze_und=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, UniBrainConfig)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(config.to_dict())
    assert loaded.text_config.num_key_value_heads == 2 and loaded.vision_config.num_hidden_layers == 2
    assert loaded.text_config.tie_word_embeddings is False


def test_bagel_preset_sizes():
    config = UniBrainConfig.bagel_7b_mot()
    assert (config.hidden_size, config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers) == (
        3584, 28, 26)
    assert config.patch_latent_dim == 64 and config.latent_downsample == 16
    with torch.device("meta"):
        model = UniBrainForConditionalGeneration(config)
    assert 14.0e9 < model.num_parameters() < 14.8e9


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="vit_max_num_patch_per_side"):
        UniBrainConfig.tiny(vit_max_num_patch_per_side=12)


def test_save_load_sharded_and_dtype(tmp_path, batch_and_latents):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not any("pos_embed" in k or "rotary" in k for k in index["weight_map"])  # fixed tables are recomputed
    loaded = UniBrainForConditionalGeneration.from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    batch, latents = batch_and_latents
    assert torch.allclose(run(model, batch, latents).loss, run(loaded, batch, latents).loss)
    half = UniBrainForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert torch.isfinite(run(half, batch, latents).loss)


def test_auto_model_and_remote_code(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "UniBrainForConditionalGeneration"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_unibrain.UniBrainForConditionalGeneration"
    # A user without this package installed loads the saved code with trust_remote_code.
    code = (f"import os, sys; os.environ['HF_HUB_OFFLINE'] = '1'; sys.modules['unibrain_hf'] = None\n"
            f"from transformers import AutoModel\n"
            f"m = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
            f"print(type(m).__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "transformers_modules" in result.stdout


def test_routing_generation_weights_only_touch_latent_tokens(batch_and_latents):
    batch, latents = batch_and_latents
    model = tiny_model()
    before = run(model, batch, latents).last_hidden_state
    with torch.no_grad():
        model.language_model.layers[1].gen.mlp.down_proj.weight.add_(0.5)
    after = run(model, batch, latents).last_hidden_state
    is_latent = torch.zeros(batch.sequence_length, dtype=torch.bool)
    is_latent[batch.vae_token_indexes] = True
    changed = (before - after).abs().amax(dim=-1) > 1e-6
    assert changed[is_latent].all()
    # Layer 1 is the last layer: its generation MLP cannot reach text/ViT tokens.
    assert not changed[~is_latent].any()


def test_later_tokens_cannot_see_noisy_latents(batch_and_latents):
    batch, latents = batch_and_latents
    model = tiny_model()
    base = run(model, batch, latents).last_hidden_state
    # Replace the noisy targets' noise: only the noisy splits themselves may change.
    noise = torch.randn(batch.vae_token_indexes.numel(), model.config.patch_latent_dim)
    changed_out = model(**batch.model_inputs(latents), flow_noise=noise, output_hidden_states=True).last_hidden_state
    changed = (base - changed_out).abs().amax(dim=-1) > 1e-6
    noisy = torch.zeros(batch.sequence_length, dtype=torch.bool)  # the noisy splits, markers included
    start = 0
    for length, mode in zip(batch.split_lens, batch.attn_modes):
        noisy[start:start + length] = mode == "noise"
        start += length
    assert noisy[batch.mse_loss_indexes].all()
    assert changed[batch.mse_loss_indexes].all()
    assert not changed[~noisy].any()


def test_mask_rules():
    layout = PackedAttentionLayout([9, 3], [2, 3, 2, 2, 3], ["causal", "noise", "full", "causal", "full"])
    first, second = [m == 0 for m in layout.dense_masks()]
    assert first[1, 0] and not first[0, 1]  # causal text
    assert first[2, 4] and first[4, 2]  # the noisy split is bidirectional inside
    assert not first[5:, 2:5].any()  # nobody after it sees it
    assert first[5, 6] and first[6, 5]  # full split
    assert first[8, 0] and first[8, 5] and not first[7, 8]
    assert second.all()  # a single full split sees itself; samples are isolated by construction


def test_attention_backends_agree(batch_and_latents):
    batch, latents = batch_and_latents
    outputs = {}
    for backend in ("sdpa", "eager"):
        model = tiny_model()
        model.set_attn_implementation(backend)
        outputs[backend] = run(model, batch, latents)
    assert torch.allclose(outputs["sdpa"].last_hidden_state, outputs["eager"].last_hidden_state, atol=1e-5)
    assert torch.allclose(outputs["sdpa"].loss, outputs["eager"].loss, atol=1e-6)
    # flex attention (one BlockMask over the whole pack) runs forward-only on CPU in torch 2.13.
    model = tiny_model()
    model.set_attn_implementation("flex_attention")
    with torch.no_grad():
        flex = run(model, batch, latents)
    assert torch.allclose(outputs["sdpa"].last_hidden_state, flex.last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("how", ["config", "freeze_experts"])
def test_freeze_und_blocks_understanding_gradients(batch_and_latents, how):
    batch, latents = batch_and_latents
    model = tiny_model(freeze_und=True) if how == "config" else tiny_model()
    if how == "freeze_experts":  # the flags live on the decoder; the config only gives their initial values
        model.freeze_experts(und=True)
    model.train()
    output = run(model, batch, latents)
    output.mse_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None or not grads[n].any() for n in grads if ".und." in n or n.startswith(
        ("vision_model", "connector", "lm_head", "language_model.embed_tokens", "language_model.norm.")))
    assert grads["language_model.layers.0.gen.q_proj.weight"].abs().sum() > 0
    assert grads["time_embedder.embedding.linear_1.weight"].abs().sum() > 0


def test_gradient_checkpointing_matches(batch_and_latents):
    batch, latents = batch_and_latents
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            enable_activation_checkpointing(model)
        run(model, batch, latents).loss.backward()
        grads.append(model.language_model.layers[0].und.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_kv_cache_matches_packed_forward():
    """Prefill text + clean latents with the cache, then a noisy block: same as the packed forward."""
    model = tiny_model()
    config = model.config
    ids = torch.tensor([[config.bos_token_id, 5, 6, 7, config.eos_token_id]])
    grid = torch.arange(2)[:, None] * config.max_latent_size + torch.arange(3)[None, :]
    latent_pos = grid.flatten()
    clean = torch.randn(1, 6, config.patch_latent_dim)
    noisy = torch.randn(1, 6, config.patch_latent_dim)
    t = 0.7
    cache = model.prefill_text_cached(model.new_cache(), ids, 0)
    cache = model.prefill_latents_cached(cache, clean, latent_pos, position=5)
    assert cache.length == 5 + 8
    velocity = model.velocity_cached(cache, noisy, t, latent_pos, position=6)
    assert cache.length == 13  # denoising never writes the cache

    # The same thing as one packed sequence: [text][clean full][noisy noise] (raw timestep = logit(t)).
    soi, eoi = config.start_of_image_token_id, config.end_of_image_token_id
    input_ids = torch.tensor(ids[0].tolist() + [soi, eoi, soi, eoi])
    text_indexes = torch.tensor([0, 1, 2, 3, 4, 5, 12, 13, 20])
    vae_indexes = torch.tensor(list(range(6, 12)) + list(range(14, 20)))
    position_ids = torch.tensor([0, 1, 2, 3, 4] + [5] * 8 + [6] * 8)
    padded = torch.zeros(2, 16, 4, 6)
    from unibrain_hf import UniBrainForConditionalGeneration as M
    padded[0] = M.unpatchify_latents(clean, 2, 3, 2, 16)[0]
    padded[1] = M.unpatchify_latents(torch.zeros(1, 6, 64), 2, 3, 2, 16)[0]
    raw = torch.tensor([float("-inf")] * 6 + [float(torch.logit(torch.tensor(t)))] * 6)
    out = model(input_ids=input_ids, text_indexes=text_indexes, position_ids=position_ids, sample_lens=[21],
                split_lens=[5, 8, 8], attn_modes=["causal", "full", "noise"], padded_latents=padded,
                latent_shapes=[(2, 3), (2, 3)], latent_position_ids=torch.cat([latent_pos, latent_pos]),
                vae_token_indexes=vae_indexes, timesteps=raw, flow_noise=torch.cat([clean[0], noisy[0] / t]),
                mse_loss_indexes=torch.arange(14, 20))
    # x_t = (1-t)·0 + t·(noisy/t) = noisy, so the packed forward sees the same noisy latents.
    assert torch.allclose(out.velocity, velocity[0], atol=1e-5)


def test_greedy_decoding_matches_packed_logits():
    model = tiny_model()
    config = model.config
    ids = [config.bos_token_id, 9, 10, 11, 12]
    cache = model.new_cache()
    logits = []
    for position, token in enumerate(ids):
        step_logits, cache = model.next_token_logits_cached(cache, torch.tensor([token]), position)
        logits.append(step_logits[0])
    out = model(input_ids=torch.tensor(ids), text_indexes=torch.arange(5), position_ids=torch.arange(5),
                sample_lens=[5], split_lens=[5], attn_modes=["causal"], ce_loss_indexes=torch.arange(5),
                labels=torch.tensor(ids[1:] + [config.eos_token_id]))
    assert torch.allclose(torch.stack(logits), out.logits, atol=1e-5)


def test_vae_deduplicated_encoding_matches():
    from unibrain_hf.modeling.vae import encode_latents, tiny_vae

    vae = tiny_vae()
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    batch = torch.stack([images[0], images[1], images[0]])  # a noisy target and its clean copy
    eps = torch.randn(3, 16, 4, 6)
    with torch.no_grad():
        fast = encode_latents(vae, batch, eps)
        slow = encode_latents(vae, batch, eps, deduplicate=False)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert not torch.allclose(fast[0], fast[2])  # each copy keeps its own posterior sample


def test_missing_bias_does_not_reinitialise_loaded_weight(tmp_path):
    """transformers' guarded initialisation: only what the checkpoint lacks is initialised."""
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["connector.fc1.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = UniBrainForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.connector.fc1.weight, model.connector.fc1.weight)
    assert torch.count_nonzero(loaded.connector.fc1.bias) == 0  # the missing tensor gets the model's init
    assert torch.equal(loaded.llm2vae.weight, model.llm2vae.weight)  # zero-init head: loaded values kept
