"""The growable, snapshot-sharing KV cache equals appending by concatenation, and copies little.

A tiny concatenating cache (what the model used before: every append makes new tensors) is the
model of correctness: every phase, snapshot and fork must give the same outputs with both.
"""

import numpy as np
import pytest
import torch

from helpers import tiny_model
from unibrain_hf.modeling.cache import CAPACITY_QUANTUM, UniBrainKVCache


class ConcatKVCache:
    """The old behaviour: immutable per-layer tensors, appended by ``torch.cat``."""

    def __init__(self, num_layers: int):
        self.keys, self.values = [None] * num_layers, [None] * num_layers
        self.bytes_copied = 0

    @property
    def num_layers(self):
        return len(self.keys)

    @property
    def length(self):
        return 0 if self.keys[0] is None else int(self.keys[0].shape[2])

    @property
    def batch_size(self):
        return 0 if self.keys[0] is None else int(self.keys[0].shape[0])

    def layer(self, index):
        return self.keys[index], self.values[index]

    def copy(self):
        clone = ConcatKVCache(self.num_layers)
        clone.keys, clone.values = list(self.keys), list(self.values)
        return clone

    def extended(self, index, keys, values):
        past_keys, past_values = self.layer(index)
        if past_keys is None:
            return keys, values
        self.bytes_copied += 2 * past_keys.numel() * past_keys.element_size()
        return torch.cat([past_keys, keys.to(past_keys)], 2), torch.cat([past_values, values.to(past_values)], 2)

    def append(self, index, keys, values):
        self.keys[index], self.values[index] = self.extended(index, keys, values)
        return self.layer(index)


def _phases(model, new_cache, batch=1, seed=0):
    """Prefill text / latents / ViT, snapshots, three velocity branches and greedy decoding with forks."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    text = torch.tensor([[config.bos_token_id, 5, 6, 7, 8, config.eos_token_id]]).expand(batch, -1)
    latents = torch.randn(batch, 6, config.patch_latent_dim, generator=generator)
    positions = torch.arange(6)
    patches = torch.randn(batch * 4, config.vit_patch_size ** 2 * 3, generator=generator)
    noisy = torch.randn(batch, 6, config.patch_latent_dim, generator=generator)
    outputs = []
    gen = model.prefill_text_cached(new_cache(), text, 0)
    cfg_img = gen.copy()  # shares gen's storage from here on
    gen = model.prefill_latents_cached(gen, latents, positions, 6)
    gen = model.prefill_vit_cached(gen, patches, torch.arange(4).repeat(batch), [4] * batch, 7)
    cfg_text = gen.copy()
    gen = model.prefill_text_cached(gen, text, 8)
    cfg_img = model.prefill_text_cached(cfg_img, text, 6)  # diverges from gen: copy-on-write
    for cache, position in ((gen, 14), (cfg_text, 8), (cfg_img, 12)):  # read-only queries
        outputs.append(model.velocity_cached(cache, noisy, 0.5, positions, position))
    # Decoding on a copy, twice from the same start (the first copy is dropped in between).
    for _ in range(2):
        cache, token = gen, torch.full((batch,), config.bos_token_id)
        for step in range(40):
            logits, cache = model.next_token_logits_cached(cache, token, 14 + step)
            outputs.append(logits)
            token = logits.argmax(-1)
        del cache
    # The contexts were not changed by any of it.
    outputs.append(model.velocity_cached(gen, noisy, 0.25, positions, 14))
    outputs.append(model.velocity_cached(cfg_text, noisy, 0.25, positions, 8))
    for cache in (gen, cfg_text, cfg_img):
        for index in range(cache.num_layers):
            outputs.extend(cache.layer(index))
    return outputs


@pytest.mark.parametrize("batch", [1, 2])
def test_matches_concatenating_cache_exactly(batch):
    model = tiny_model()
    layers = model.config.text_config.num_hidden_layers
    ours = _phases(model, lambda: UniBrainKVCache(layers), batch)
    theirs = _phases(model, lambda: ConcatKVCache(layers), batch)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.equal(a, b)


def test_small_capacity_grows_and_still_matches():
    model = tiny_model()
    layers = model.config.text_config.num_hidden_layers
    ours = _phases(model, lambda: UniBrainKVCache(layers, capacity=1))
    theirs = _phases(model, lambda: ConcatKVCache(layers))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def _block(length, value=0.0, batch=1):
    keys = torch.arange(length, dtype=torch.float32).reshape(1, 1, length, 1).expand(batch, 2, length, 3) + value
    return keys.contiguous(), -keys.contiguous()


@torch.no_grad()
def test_snapshots_see_their_own_prefix_and_diverge_by_copy_on_write():
    cache = UniBrainKVCache(1)
    cache.append(0, *_block(5))
    snapshot = cache.copy()
    cache.append(0, *_block(3, 100))  # in place: the snapshot's 5 tokens are untouched
    assert snapshot.length == 5 and cache.length == 8
    assert snapshot.layer(0)[0].data_ptr() == cache.layer(0)[0].data_ptr()  # one storage
    before = cache.layer(0)[0].clone()
    snapshot.append(0, *_block(2, 200))  # writing where `cache` reads: the snapshot copies first
    assert torch.equal(cache.layer(0)[0], before)
    assert snapshot.layer(0)[0][0, 0, 5:, 0].tolist() == [200.0, 201.0]
    assert snapshot.layer(0)[0].data_ptr() != cache.layer(0)[0].data_ptr()
    # A read-only query against the shorter snapshot never writes into the longer view.
    keys, _ = cache.copy().extended(0, *_block(1, 300))
    assert keys.shape[2] == 9 and torch.equal(cache.layer(0)[0], before)


@torch.no_grad()
def test_dropped_views_stop_blocking_in_place_writes():
    cache = UniBrainKVCache(1)
    cache.append(0, *_block(4))
    decoding = cache.copy()
    for step in range(10):
        decoding.append(0, *_block(1, step))
    storage = cache.layer(0)[0].data_ptr()
    del decoding  # a finished decoding copy: its tokens are scratch now
    cache.append(0, *_block(2, 50))
    assert cache.layer(0)[0].data_ptr() == storage
    assert cache.layer(0)[0][0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 50.0, 51.0]


@torch.no_grad()
def test_growth_beyond_capacity_copies_linearly_not_quadratically():
    steps = 3 * CAPACITY_QUANTUM + 7
    cache, concat = UniBrainKVCache(2), ConcatKVCache(2)
    cache.append(0, *_block(3)), cache.append(1, *_block(3))
    concat.append(0, *_block(3)), concat.append(1, *_block(3))
    token_bytes = 2 * 2 * 3 * 4  # keys + values, 2 heads, 3 dims, fp32
    for step in range(steps):
        block = _block(1, step)
        for index in range(2):
            cache = cache if index else cache.copy()  # the model appends to a fresh view per forward
            cache.append(index, *block)
            concat.append(index, *block)
    assert cache.length == concat.length == steps + 3
    assert torch.equal(cache.layer(1)[0], concat.layer(1)[0]) and torch.equal(cache.layer(0)[1], concat.layer(0)[1])
    final_bytes = 2 * (steps + 3) * token_bytes
    # Geometric growth: everything copied adds up to less than the final size; concatenation is quadratic.
    assert cache.bytes_copied < final_bytes
    assert concat.bytes_copied > steps / 4 * final_bytes
    assert cache.allocations <= 2 * 3  # per layer: 256 → 512 → 1024 tokens
    assert cache.reserved_bytes() <= 2 * 2 * 4 * CAPACITY_QUANTUM * token_bytes


def test_decoding_writes_only_new_tokens():
    model = tiny_model()
    config = model.config
    cache = model.prefill_text_cached(model.new_cache(), torch.tensor([[config.bos_token_id] + [5] * 30]), 0)
    copied = cache.bytes_copied
    token = torch.tensor([config.bos_token_id])
    for step in range(100):
        logits, cache = model.next_token_logits_cached(cache, token, 31 + step)
        token = logits.argmax(-1)
    assert cache.length == 131
    assert cache.bytes_copied == copied  # 131 tokens fit the first buffer: no cache copy at all


def test_with_grad_enabled_nothing_is_written_in_place():
    cache = UniBrainKVCache(1)
    with torch.no_grad():
        cache.append(0, *_block(4))
    view_before = cache.layer(0)[0]
    storage, version = view_before.data_ptr(), view_before._version
    grown = cache.copy()
    grown.append(0, *_block(2, 10))  # grad mode: a new tensor, the buffer untouched
    assert grown.layer(0)[0].data_ptr() != storage and grown.length == 6
    keys, _ = cache.extended(0, *_block(1, 20))
    assert keys.data_ptr() != storage and cache.length == 4
    assert view_before._version == version  # the buffer was not modified in place


def test_backward_through_a_query_while_the_cache_keeps_growing():
    """Self-forcing's pattern: a grad-tracking query, then no-grad appends, then backward."""
    model = tiny_model().train()
    config = model.config
    cache = model.new_cache()
    embeds = model.language_model.embed_tokens(torch.tensor([[config.bos_token_id, 5, 6]]))
    with torch.no_grad():
        _, _, cache = model.forward_cached(cache, embeds.detach(), None, None, None, torch.arange(3), True, True)
    latents = torch.randn(1, 4, config.hidden_size, requires_grad=True)
    markers = model.language_model.embed_tokens(torch.tensor([[config.start_of_image_token_id,
                                                               config.end_of_image_token_id]]))
    und_index, gen_index = torch.tensor([0, 5]), torch.arange(1, 5)
    _, gen_out, _ = model.forward_cached(cache, markers, latents, und_index, gen_index, torch.full((6,), 3),
                                         False, False)
    with torch.no_grad():  # the cache grows in place after the query
        _, _, cache = model.forward_cached(cache, markers.detach(), latents.detach(), und_index, gen_index,
                                           torch.full((6,), 3), False, True)
    gen_out.sum().backward()
    assert latents.grad is not None and torch.isfinite(latents.grad).all()


def test_pipeline_outputs_equal_with_the_concatenating_cache(converted_fixture):
    from tiny_pipeline import mri_slice, tiny_pipeline

    def run(pipe, task):  # unified: snapshots and decoding copies; generation: a fork per target
        return pipe(images={"t1n": mri_slice()}, target_modalities=["t2w", "t1c"], task=task, think=True,
                    num_grid_points=4, max_new_tokens=6, generator=torch.Generator().manual_seed(0))

    pipe = tiny_pipeline(converted_fixture / "tokenizer")
    ours = {task: run(pipe, task) for task in ("unified", "generation")}
    layers = pipe.model.config.text_config.num_hidden_layers
    pipe.model.new_cache = lambda: ConcatKVCache(layers)
    theirs = {task: run(pipe, task) for task in ("unified", "generation")}
    for task in ("unified", "generation"):
        for code in ("t2w", "t1c"):
            assert np.array_equal(np.asarray(ours[task].images[code][0]), np.asarray(theirs[task].images[code][0]))
        assert ours[task].thinking == theirs[task].thinking
    assert ours["unified"].impression == theirs["unified"].impression
    assert ours["unified"].diagnosis == theirs["unified"].diagnosis


@pytest.mark.parametrize("batch", [1, 2])
def test_guidance_branches_in_one_call_match_separate_calls(batch):
    model = tiny_model()
    config = model.config
    generator = torch.Generator().manual_seed(1)
    text = torch.tensor([[config.bos_token_id, 5, 6, 7, config.eos_token_id]]).expand(batch, -1)
    latents = torch.randn(batch, 6, config.patch_latent_dim, generator=generator)
    noisy = torch.randn(batch, 6, config.patch_latent_dim, generator=generator)
    positions = torch.arange(6)
    gen = model.prefill_text_cached(model.new_cache(), text, 0)
    cfg_img = model.prefill_text_cached(model.new_cache(), text[:, :3], 0)  # a separate, shorter context
    cfg_text = gen.copy()
    gen = model.prefill_latents_cached(gen, latents, positions, 5)
    gen = model.prefill_text_cached(gen, text, 6)
    caches, ropes = [gen, cfg_text, cfg_img], [11, 5, 3]
    lengths = [c.length for c in caches]
    separate = [model.velocity_cached(c, noisy, 0.3, positions, r) for c, r in zip(caches, ropes)]
    together = model.velocities_cached(caches, noisy, 0.3, positions, ropes)
    assert [c.length for c in caches] == lengths  # read-only
    for a, b in zip(separate, together):
        assert a.shape == b.shape == (batch, 6, config.patch_latent_dim)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together[0], together[1])  # each branch saw its own context
    with pytest.raises(ValueError, match="RoPE positions"):
        model(phase="velocity", cache=tuple(caches), position=(11, 5), latent_tokens=noisy,
              latent_position_ids=positions, timesteps=torch.tensor([0.3]))


def test_pipeline_branch_batching_matches_one_call_per_branch(converted_fixture, monkeypatch):
    from tiny_pipeline import mri_slice, tiny_pipeline
    from unibrain_hf.pipelines.context import InterleavedContext

    pipe = tiny_pipeline(converted_fixture / "tokenizer")
    calls = []
    original = pipe.model.forward
    monkeypatch.setattr(pipe.model, "forward", lambda *a, **k: calls.append(k.get("phase")) or original(*a, **k))

    def run():
        calls.clear()
        out = pipe(images={"t1n": mri_slice()}, target_modalities=["t2w"], task="generation", num_grid_points=6,
                   output_type="latent", generator=torch.Generator().manual_seed(0))
        return out.images["t2w"][0], calls.count("velocity")

    batched, batched_calls = run()
    original_init = InterleavedContext.__init__
    monkeypatch.setattr(InterleavedContext, "__init__",
                        lambda self, *a, **k: original_init(self, *a, **{**k, "batch_branches": False}))
    separate, separate_calls = run()
    assert batched_calls == 5 and separate_calls > batched_calls  # one call per step instead of one per branch
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
