"""The packed training stream: token budget policy, sharding, determinism, resume, dropout, positions.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_packed_dataset.py -q
"""

import functools
from collections import deque
from itertools import islice

import numpy as np
import pytest
import torch

from unibrain_hf import UniBrainConfig, UniBrainProcessor
from unibrain_hf.data.packed_dataset import (
    PackedDataset,
    TokenBudget,
    concatenate_packs,
    packed_dataloader,
)
from unibrain_hf.data.schema import SubjectRecord
from unibrain_hf.data.sequence_builder import BuiltSample, build_unified_sample
from unibrain_hf.processing.packing import DropoutProbabilities
from unibrain_hf.processing.sequence_plan import text_item

from helpers import toy_samples

CODES = ("t1n", "t1c", "t2w", "t2f")
UNIFIED_40 = functools.partial(build_unified_sample, image_size=40)  # no padding work for 40×40 slices
# Same proportions as UniBrain's defaults: prefer_buffer_before + per-sample cap <= max.
BUDGET = TokenBudget(expected_num_tokens=600, max_num_tokens=800, max_num_tokens_per_sample=500,
                     max_buffer_size=50, prefer_buffer_before=300)
UNIBRAIN_DROPOUT = DropoutProbabilities(text=0.1, vit=0.3, vae=0.3)


@pytest.fixture(scope="module")
def processor(converted_fixture):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(converted_fixture / "tokenizer"))
    return UniBrainProcessor.for_model(UniBrainConfig.tiny(vocab_size=295), tokenizer, vae_max_size=64,
                                       vae_min_size=32, vit_max_size=56, vit_min_size=28)


def make_record(number: int, num_modalities: int | None = None, empty: bool = False) -> SubjectRecord:
    rng = np.random.default_rng(number)
    codes = CODES[:num_modalities or 2 + number % 3]
    volumes = {}
    for code in codes:
        volume = (rng.random((8, 40, 40)) * 100 + 1).astype(np.float32)
        volume[:, :4] = 0  # background rows
        volumes[code] = np.zeros_like(volume) if empty else volume
    mask = np.zeros((8, 40, 40), np.float32)
    mask[3:6, 12:18, 20:26] = 1  # a 3×6×6 cube lesion
    return SubjectRecord(f"sub-{number:03d}", volumes, findings={c: f"{c}: mass 6 x 6 x 3 mm." for c in codes},
                         impression="Left frontal mass.", disease=["Glioma"], mask=mask)


RECORDS = [make_record(i) for i in range(16)]


def keys_of(packs):
    return [tuple(key) for pack in packs for key in pack.sample_ids]


def same_pack(a, b) -> bool:
    def equal(x, y):  # a pack whose images were all dropped has no image tensors
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return (a.sample_ids == b.sample_ids and a.sample_lens == b.sample_lens and a.attn_modes == b.attn_modes
            and equal(a.input_ids, b.input_ids) and equal(a.timesteps, b.timesteps)
            and equal(a.padded_images, b.padded_images))


# ------------------------------------------------------------------------------------- budget
def test_token_budget_defaults_and_validation():
    assert (TokenBudget().expected_num_tokens, TokenBudget().max_num_tokens, TokenBudget().max_num_tokens_per_sample,
            TokenBudget().max_buffer_size, TokenBudget().prefer_buffer_before) == (32768, 36864, 16384, 50, 16384)
    TokenBudget().validate()
    TokenBudget(10240, 13408, 10240).validate()  # stage 3: prefer_buffer_before 16384 above the maximum is allowed
    for bad in (dict(expected_num_tokens=40000), dict(max_num_tokens_per_sample=40000), dict(max_buffer_size=-1),
                dict(expected_num_tokens=0), dict(max_num_tokens=36864.0), dict(max_buffer_size=True)):
        with pytest.raises(ValueError):
            TokenBudget(**bad).validate()


def test_constructor_rejects_bad_arguments(processor):
    with pytest.raises(ValueError, match="empty"):
        PackedDataset([], "unified", processor)
    with pytest.raises(ValueError, match="SubjectRecord"):
        PackedDataset([{"subject_id": "x"}], "unified", processor)
    with pytest.raises(ValueError, match="task"):
        PackedDataset(RECORDS, "pretrain", processor)
    with pytest.raises(ValueError, match="rank"):
        PackedDataset(RECORDS, "unified", processor, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_epochs"):
        PackedDataset(RECORDS, "unified", processor, num_epochs=0)


# ------------------------------------------------------------------------------------- merging
def test_concatenated_single_sample_packs_equal_a_joint_pack(processor):
    samples = toy_samples()  # two samples with differently sized images (re-padding is exercised)
    packer = processor.packer()
    timesteps = [[0.3], [-1.2]]
    joint = packer.pack(samples, timesteps=timesteps, sample_ids=["a", "b"])
    merged = concatenate_packs([packer.pack([s], timesteps=[t], sample_ids=[i])
                                for s, t, i in zip(samples, timesteps, "ab")])
    for name, value in vars(joint).items():
        other = getattr(merged, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        else:
            assert value == other, name


# ------------------------------------------------------------------------------------- packing policy
def test_packs_respect_budget_and_reach_expected_tokens(processor):
    dataset = PackedDataset(RECORDS, UNIFIED_40, processor, UNIBRAIN_DROPOUT, BUDGET, seed=3, num_epochs=2)
    packs = list(packed_dataloader(dataset))
    assert len(packs) >= 5
    for pack in packs:
        assert pack.sequence_length == sum(pack.sample_lens) <= BUDGET.max_num_tokens
        assert max(pack.sample_lens) <= BUDGET.max_num_tokens_per_sample
    # Only the packs made while draining the buffer at the very end may stay below the expected size.
    short = [p.sequence_length < BUDGET.expected_num_tokens for p in packs]
    assert short[-1] and short == sorted(short) and sum(short) <= 3, [p.sequence_length for p in packs]
    stats = dataset.stats
    # Nothing is lost: every record read is packed or counted as skipped.
    assert stats["records_read"] == 2 * len(RECORDS)
    assert stats["samples_packed"] + stats["samples_too_long"] + stats["invalid_records"] == stats["records_read"]
    assert stats["samples_packed"] == sum(p.num_samples for p in packs)
    assert stats["samples_too_long"] > 0  # the cohort has samples above the 600-token cap
    assert len(set(keys_of(packs))) == stats["samples_packed"]


def _text_builder(record, rng):
    """Text-only samples of a record-dependent length (exact counts, no dropout → lengths are known)."""
    words = int(record.subject_id.split("-")[1]) * 37 % 140 + 5  # "a a a" is one token per "a": 7..146 tokens
    return BuiltSample(items=[text_item(" ".join(["a"] * words))], task="test", subject_id=record.subject_id,
                       slice_index=0, input_modality="t1n")


def _reference_policy(stream, budget):
    """The packing policy written out plainly: stream = [(key, tokens)] in arrival order."""
    packs, buffer, pack, fill, exhausted = [], deque(), [], 0, False
    stream = iter(stream)
    while True:
        if buffer and (fill < budget.prefer_buffer_before or exhausted):
            (key, tokens), from_buffer = buffer.popleft(), True
        else:
            item = next(stream, None)
            if item is None:
                exhausted = True
                if buffer:
                    continue
                break
            (key, tokens), from_buffer = item, False
            if tokens > budget.max_num_tokens_per_sample:
                continue
        if fill + tokens > budget.max_num_tokens:
            if not from_buffer and not exhausted and len(buffer) < budget.max_buffer_size:
                buffer.append((key, tokens))
                continue
            packs.append(pack)
            pack, fill = [], 0
        pack.append(key)
        fill += tokens
        if fill >= budget.expected_num_tokens:
            packs.append(pack)
            pack, fill = [], 0
    if pack:
        packs.append(pack)
    return packs


@pytest.mark.parametrize("buffer_size", [0, 2, 50])
def test_overflow_buffer_policy_matches_the_reference_rules(processor, buffer_size):
    records = [SubjectRecord(f"s-{i}", {"t1n": np.ones((2, 4, 4), np.float32)}) for i in range(40)]
    # Arrival order and lengths: with expected=1 every sample is its own pack.
    one_each = PackedDataset(records, _text_builder, processor, budget=TokenBudget(1, 400, 400, 0, 0), num_epochs=1)
    arrivals = [(tuple(p.sample_ids[0]), p.sequence_length) for p in one_each]
    budget = TokenBudget(expected_num_tokens=300, max_num_tokens=360, max_num_tokens_per_sample=130,
                         max_buffer_size=buffer_size, prefer_buffer_before=150)
    dataset = PackedDataset(records, _text_builder, processor, budget=budget, num_epochs=1)
    packs = list(dataset)
    assert [[tuple(k) for k in p.sample_ids] for p in packs] == _reference_policy(arrivals, budget)
    assert dataset.stats["samples_too_long"] == sum(tokens > 130 for _, tokens in arrivals) > 0
    if buffer_size:  # the buffer really was used: some pack holds a sample that arrived before one of an earlier pack
        order = {key: i for i, (key, _) in enumerate(arrivals)}
        first_arrivals = [min(order[tuple(k)] for k in p.sample_ids) for p in packs]
        latest = np.maximum.accumulate([max(order[tuple(k)] for k in p.sample_ids) for p in packs])
        assert any(first < latest[i - 1] for i, first in enumerate(first_arrivals) if i)


def test_final_partial_pack_is_yielded(processor):
    budget = TokenBudget(expected_num_tokens=100000, max_num_tokens=100000, max_num_tokens_per_sample=100000)
    packs = list(PackedDataset(RECORDS[:3], UNIFIED_40, processor, budget=budget, num_epochs=1))
    assert len(packs) == 1 and packs[0].num_samples == 3


def test_bad_records_are_counted_and_skipped(processor, caplog):
    nan_record = make_record(90)
    nan_record.volumes["t1n"][0, 0, 0] = np.nan
    records = RECORDS[:4] + [make_record(91, empty=True), nan_record]
    dataset = PackedDataset(records, UNIFIED_40, processor, budget=TokenBudget(1, 2000, 2000), num_epochs=1)
    with caplog.at_level("WARNING"):
        packs = list(dataset)
    assert dataset.stats["invalid_records"] == 2
    assert {k.subject_id for p in packs for k in p.sample_ids} == {r.subject_id for r in RECORDS[:4]}
    assert "sub-091" in caplog.text and "sub-090" in caplog.text


def test_infinite_stream_of_only_bad_records_raises(processor):
    dataset = PackedDataset([make_record(91, empty=True)], UNIFIED_40, processor, budget=BUDGET)
    with pytest.raises(ValueError, match="no usable sample"):
        next(iter(dataset))


# ------------------------------------------------------------------------------------- determinism & sharding
def test_same_seed_same_packs_other_seed_other_packs(processor):
    def first_packs(seed):
        dataset = PackedDataset(RECORDS, UNIFIED_40, processor, UNIBRAIN_DROPOUT, BUDGET, seed=seed)
        return list(islice(dataset, 4))

    a, b, c = first_packs(7), first_packs(7), first_packs(8)
    assert all(same_pack(x, y) for x, y in zip(a, b))
    assert keys_of(a) != keys_of(c)


def test_infinite_mode_reshuffles_every_epoch(processor):
    dataset = PackedDataset(RECORDS, UNIFIED_40, processor, budget=TokenBudget(1, 2000, 2000, 0, 0), seed=1)
    keys = keys_of(islice(dataset, 3 * len(RECORDS)))
    epochs = [[k[1] for k in keys if k[0] == e] for e in range(3)]
    assert all(sorted(order) == list(range(len(RECORDS))) for order in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_two_workers_cover_every_record_once(processor):
    dataset = PackedDataset(RECORDS, UNIFIED_40, processor, UNIBRAIN_DROPOUT, BUDGET, seed=5, num_epochs=1)
    worker_packs = list(packed_dataloader(dataset, num_workers=2))
    single = PackedDataset(RECORDS, UNIFIED_40, processor, UNIBRAIN_DROPOUT, BUDGET, seed=5, num_epochs=1)
    single_packs = list(single)
    keys = keys_of(worker_packs)
    assert len(keys) == len(set(keys))  # no duplicates within the epoch
    too_long = dataset.stats["samples_too_long"]
    assert len(keys) + too_long == len(RECORDS)
    # The samples themselves do not depend on the number of workers.
    assert set(keys) == set(keys_of(single_packs))
    tokens = lambda packs: sum(p.sequence_length for p in packs)  # noqa: E731
    assert tokens(worker_packs) == tokens(single_packs)


def test_ranks_take_disjoint_shares(processor):
    shares = []
    for rank in range(2):
        dataset = PackedDataset(RECORDS, UNIFIED_40, processor, budget=TokenBudget(1, 2000, 2000), num_epochs=1,
                                rank=rank, world_size=2)
        shares.append({k.subject_id for p in dataset for k in p.sample_ids})
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == {r.subject_id for r in RECORDS}


def test_streamed_source_is_sharded_and_shuffled(processor):
    dataset = PackedDataset(lambda: iter(RECORDS), UNIFIED_40, processor, budget=TokenBudget(1, 2000, 2000),
                            num_epochs=2, stream_shuffle_buffer=4)
    keys = keys_of(dataset)
    epochs = [[k[1] for k in keys if k[0] == e] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(len(RECORDS)))
    assert epochs[0] != list(range(len(RECORDS))) and epochs[0] != epochs[1]


# ------------------------------------------------------------------------------------- resume
def test_resume_continues_the_uninterrupted_sequence(processor):
    budget = TokenBudget(expected_num_tokens=600, max_num_tokens=700, max_num_tokens_per_sample=600,
                         max_buffer_size=3, prefer_buffer_before=300)
    make = lambda: PackedDataset(lambda: iter(RECORDS[:10]), UNIFIED_40, processor, UNIBRAIN_DROPOUT,  # noqa: E731
                                 budget, seed=11, stream_shuffle_buffer=3)
    reference, states = make(), []
    packs = []
    for pack in islice(reference, 16):
        packs.append(pack)
        states.append(reference.state_dict())
    # Resume points where the saved position holds buffered or carried-over samples, plus an epoch change.
    interesting = [i for i, s in enumerate(states[:-3]) if s["shards"][0]["buffer"] or s["shards"][0]["pending"]]
    assert interesting, "the budget should exercise the buffer"
    epoch_change = next(i for i in range(1, len(states)) if states[i]["shards"][0]["epoch"] > 0)
    for stop in sorted({interesting[0], interesting[-1], epoch_change}):
        resumed = make()
        resumed.load_state_dict(states[stop])
        continued = list(islice(resumed, 3))
        assert all(same_pack(a, b) for a, b in zip(continued, packs[stop + 1:stop + 4])), stop
        assert resumed.stats == states[stop + 3]["shards"][0]["stats"]


def test_resume_with_two_workers_continues_the_round_robin(processor):
    make = lambda: PackedDataset(RECORDS, UNIFIED_40, processor, UNIBRAIN_DROPOUT, BUDGET, seed=2)  # noqa: E731
    reference = make()
    loader = iter(packed_dataloader(reference, num_workers=2))
    packs = [next(loader) for _ in range(5)]
    state = reference.state_dict()
    packs += [next(loader) for _ in range(4)]
    del loader
    resumed = make()
    resumed.load_state_dict(state)
    continued = list(islice(packed_dataloader(resumed, num_workers=2), 4))
    assert all(same_pack(a, b) for a, b in zip(continued, packs[5:]))
    with pytest.raises(ValueError, match="same number"):
        next(iter(packed_dataloader(resumed, num_workers=0)))


def test_load_state_rejects_other_settings(processor):
    dataset = PackedDataset(RECORDS, UNIFIED_40, processor, budget=BUDGET, seed=1)
    next(iter(dataset))
    other = PackedDataset(RECORDS, UNIFIED_40, processor, budget=BUDGET, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(dataset.state_dict())
    with pytest.raises(ValueError, match="state"):
        other.load_state_dict({"epoch": 3})


# ------------------------------------------------------------------------------------- dropout & positions
def test_condition_dropout_rates_match_the_configuration(processor):
    dataset = PackedDataset(RECORDS, UNIFIED_40, processor, UNIBRAIN_DROPOUT, BUDGET, seed=4)
    packs = list(islice(dataset, 60))
    # An endless stream never drains its buffer, so every pack is within [expected, max].
    assert all(BUDGET.expected_num_tokens <= p.sequence_length <= BUDGET.max_num_tokens for p in packs)
    stats = dataset.stats
    for kind, probability in (("text", 0.1), ("vit", 0.3), ("vae", 0.3)):
        eligible, dropped = stats[f"{kind}_cfg_eligible"], stats[f"{kind}_cfg_dropped"]
        assert eligible > 150, kind
        tolerance = 4 * np.sqrt(probability * (1 - probability) / eligible)
        assert abs(dropped / eligible - probability) < tolerance, (kind, dropped, eligible)
    # Cross-check the counters against the packs: in unified samples every ViT copy may be dropped.
    vit_images = sum(len(p.vit_seqlens) for p in packs if p.vit_seqlens is not None)
    assert vit_images == stats["vit_cfg_eligible"] - stats["vit_cfg_dropped"]
    no_dropout = PackedDataset(RECORDS, UNIFIED_40, processor, DropoutProbabilities(), BUDGET, seed=4)
    list(islice(no_dropout, 5))
    assert no_dropout.stats["text_cfg_dropped"] == no_dropout.stats["vit_cfg_dropped"] == 0


@pytest.mark.parametrize("dropout", [DropoutProbabilities(), UNIBRAIN_DROPOUT])
@pytest.mark.parametrize("task", ["unified", "recon"])
def test_position_ids_restart_per_sample_and_images_share_one(processor, task, dropout):
    records = [make_record(i) for i in range(3)] if task == "unified" else RECORDS[:6]
    budget = TokenBudget(2000, 4000, 4000) if task == "unified" else BUDGET
    packs = list(PackedDataset(records, task, processor, dropout, budget, num_epochs=1))
    assert sum(p.num_samples for p in packs) == len(records)
    for pack in packs:
        positions = pack.position_ids.tolist()
        assert len(positions) == pack.sequence_length
        is_text = torch.zeros(pack.sequence_length, dtype=torch.bool)
        is_text[pack.text_indexes] = True
        is_vae = torch.zeros(pack.sequence_length, dtype=torch.bool)
        if pack.vae_token_indexes is not None:
            is_vae[pack.vae_token_indexes] = True
        start, split = 0, 0
        for length in pack.sample_lens:
            if dropout == DropoutProbabilities():
                assert positions[start] == 0  # (with dropout, images dropped before the first token shift it)
            end, expected_next, previous_mode = start + length, 0, None
            while start < end:
                size, mode = pack.split_lens[split], pack.attn_modes[split]
                block = positions[start:start + size]
                if mode == "causal":  # text: consecutive positions
                    assert is_text[start:start + size].all()
                    assert block[0] >= expected_next and block == list(range(block[0], block[0] + size))
                    expected_next = block[-1] + 1
                else:  # image: one shared position, framed by the two marker tokens
                    assert len(set(block)) == 1 and is_text[start] and is_text[start + size - 1]
                    assert block[0] >= expected_next  # a dropped image still used up its position
                    if previous_mode == "noise" and is_vae[start + 1]:
                        assert block[0] == expected_next  # the clean copy after a target shares its id
                    expected_next = block[0] + (0 if mode == "noise" else 1)  # a noisy target does not advance
                previous_mode = mode
                start, split = start + size, split + 1
        assert split == len(pack.split_lens)
        # CE labels line up with loss positions; noisy targets carry a finite timestep, clean copies -inf.
        assert pack.labels.numel() == pack.ce_loss_indexes.numel()
        if pack.timesteps is not None:
            noisy = torch.isin(pack.vae_token_indexes, pack.mse_loss_indexes)
            assert torch.isfinite(pack.timesteps[noisy]).all() and torch.isinf(pack.timesteps[~noisy]).all()


# ------------------------------------------------------------------------------------- streamed parquet cohorts
@pytest.fixture(scope="module", params=[5, 4], ids=["files-not-dividing-shards", "files-dividing-shards"])
def streamed_cohort(request, tmp_path_factory):
    """RECORDS on disk as parquet: 16 subjects in 4 files (5/file) or 4 files (4/file, divisible by 2 shards)."""
    from unibrain_hf.data.schema import write_cohort

    path = tmp_path_factory.mktemp("stream") / "cohort"
    write_cohort(RECORDS, path, split={"train": [r.subject_id for r in RECORDS]}, subjects_per_file=request.param)
    return path


def streamed(path, processor, **kwargs):
    from unibrain_hf.data.radgenome import load_radgenome

    rows = load_radgenome(path, split="train", streaming=True, decode=False)
    return PackedDataset(rows, UNIFIED_40, processor, UNIBRAIN_DROPOUT, kwargs.pop("budget", BUDGET), seed=7,
                         stream_shuffle_buffer=3, **kwargs)


def test_streamed_cohort_is_split_by_rank_and_worker(processor, streamed_cohort):
    budget = TokenBudget(1, 2000, 2000)  # one sample per pack: the packs list the shard's records
    ranks = [keys_of(streamed(streamed_cohort, processor, budget=budget, num_epochs=1, rank=r, world_size=2))
             for r in range(2)]
    subjects = [{k[2] for k in keys} for keys in ranks]
    assert not subjects[0] & subjects[1]
    assert subjects[0] | subjects[1] == {r.subject_id for r in RECORDS}
    # Two DataLoader workers of one process are the same two shards as two ranks of one worker each.
    one_process = streamed(streamed_cohort, processor, budget=budget, num_epochs=1)
    packs = list(packed_dataloader(one_process, num_workers=2))
    for worker in range(2):
        assert keys_of([p for p in packs if p.stream_position["slot"] == worker]) == ranks[worker]


def test_streamed_cohort_packs_equal_the_in_memory_samples(processor, streamed_cohort):
    """Decoding rows on the fly gives the same samples as records decoded up front (same keys → same pack)."""
    dataset = streamed(streamed_cohort, processor, budget=TokenBudget(1, 2000, 2000), num_epochs=1)
    by_subject = {r.subject_id: r for r in RECORDS}
    for pack in dataset:
        (epoch, index, subject), = pack.sample_ids
        build_rng, pack_rng = dataset._sample_generators(epoch, index)
        sample = UNIFIED_40(by_subject[subject], build_rng)
        expected = processor.packer(UNIBRAIN_DROPOUT).pack([sample.items], rng=pack_rng, sample_ids=[pack.sample_ids[0]])
        assert same_pack(pack, expected)


def test_streamed_cohort_resumes_exactly(processor, streamed_cohort):
    reference = streamed(streamed_cohort, processor, rank=1, world_size=2)
    packs, states = [], []
    for pack in islice(reference, 8):
        packs.append(pack)
        states.append(reference.state_dict())
    resumed = streamed(streamed_cohort, processor, rank=1, world_size=2)
    resumed.load_state_dict(states[4])
    assert all(same_pack(a, b) for a, b in zip(islice(resumed, 3), packs[5:8]))
