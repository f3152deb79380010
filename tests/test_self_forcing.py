"""Stage 3's self-forcing rollout in lockstep: a common call schedule, padding calls that add exactly zero.

Under parameter sharding every rank must make the same decoder calls; the rollout pads its own
calls to a schedule agreed by all ranks. Here, in one process, two packs of the phantom cohort
with different rollouts stand for two ranks (the agreement is replaced by its result): the
padded rollout must give bit-identical losses and gradients, and both "ranks" must call the same
modules in the same order and gradient mode. The two-process FSDP2 run is in
tests/test_train_distributed.py.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_self_forcing.py -q
"""

import dataclasses
import random

import pytest
import torch

from unibrain_hf.train import self_forcing
from unibrain_hf.train.lockstep import common_schedule, merge_sequences, place
from unibrain_hf.train.self_forcing import IMAGE, PREDICT, TEXT, rollout_calls, self_forcing_forward

from train_helpers import make_config, train_workspace  # noqa: F401  (train_workspace is a fixture)


def _lcs(a, b) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_common_schedule_holds_every_ranks_calls_in_order():
    rng = random.Random(0)
    for _ in range(200):
        sequences = [[rng.randrange(3) for _ in range(rng.randrange(0, 9))] for _ in range(rng.randrange(1, 6))]
        merged = merge_sequences(sequences)
        assert len(merged) <= sum(map(len, sequences))
        for sequence in sequences:
            filled = place(sequence, merged)
            assert [kind for kind, mine in zip(merged, filled) if mine] == sequence
        if len(sequences) == 2:  # two ranks: a shortest common supersequence
            assert len(merged) == len(sequences[0]) + len(sequences[1]) - _lcs(*sequences)
    assert merge_sequences([[TEXT, PREDICT, TEXT, IMAGE], [TEXT, IMAGE, TEXT, IMAGE]]) in (
        [TEXT, PREDICT, IMAGE, TEXT, IMAGE], [TEXT, IMAGE, PREDICT, TEXT, IMAGE])
    # One process: the rank's own calls, unchanged.
    assert common_schedule([TEXT, PREDICT, IMAGE]) == [(TEXT, True), (PREDICT, True), (IMAGE, True)]
    with pytest.raises(RuntimeError, match="lacks"):
        place([PREDICT], [TEXT])


@pytest.fixture(scope="module")
def packs(train_workspace):
    """The tiny model (stage dhs), two packs whose rollouts both need padding to a common schedule (as two
    ranks would hold them, with their latents) and a pack without images."""
    from unibrain_hf.data.packed_dataset import packed_dataloader
    from unibrain_hf.modeling.vae import encode_latents
    from unibrain_hf.train.data import build_dataset, training_processor
    from unibrain_hf.train.trainer import load_components

    config = make_config(train_workspace, "dhs")
    model, vae, tokenizer = load_components(config)
    processor = training_processor(model.config, tokenizer, config.data)
    streams = [iter(packed_dataloader(build_dataset(config, processor, rank, 2))) for rank in range(2)]
    pair = text_only = None
    for _ in range(20):
        step = [next(stream) for stream in streams]
        kinds = [[call.kind for call in rollout_calls(pack)] for pack in step]
        both_pad = len(merge_sequences(kinds)) > max(map(len, kinds))  # neither rollout contains the other
        if pair is None and both_pad and all(PREDICT in k and pack.num_ce_tokens for k, pack in zip(kinds, step)):
            pair = step
        text_only = text_only or next((pack for pack in step if pack.padded_images is None), None)
        if pair and text_only:
            break
    else:
        pytest.fail("the phantom cohort gave no two packs with different rollouts, or no pack without images")
    torch.manual_seed(0)
    with torch.no_grad():
        latents = [encode_latents(vae, pack.padded_images) for pack in pair]
    return model, list(zip(pair, latents)), text_only


def _configure(model, lora_dropout: float | None):
    from unibrain_hf.train.lora import apply_lora
    from unibrain_hf.train.stages import configure_stage

    configure_stage(model, "dhs")
    if lora_dropout is not None:
        model.requires_grad_(False)
        model = apply_lora(model, "both", rank=4, alpha=8, dropout=lora_dropout)
    return model.train()


def _rollout(model, pack, latents, schedule=None, monkeypatch=None):
    """Loss (as the trainer forms it) and every gradient, with the agreed schedule replaced by ``schedule``."""
    from unibrain_hf.train.stages import unwrap_peft

    if schedule is not None:
        monkeypatch.setattr(self_forcing, "common_schedule", schedule)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    output = self_forcing_forward(unwrap_peft(model), pack, latents, lockstep=schedule is not None)
    loss = output.ce_per_token.sum() / 100 + output.mse_per_element.mean(dim=-1).sum() / 30
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
             for n, p in model.named_parameters() if p.requires_grad}
    monkeypatch.undo() if monkeypatch is not None else None
    return output, grads


@pytest.mark.parametrize("lora_dropout", [None, 0.5], ids=["full", "lora-dropout"])
def test_padding_calls_add_exactly_zero(packs, monkeypatch, lora_dropout):
    """Padding of every kind, anywhere in the schedule: the same losses and gradients, bit for bit.

    With LoRA dropout the real calls draw random numbers; padding calls must not shift them.
    """
    model, [(pack, latents), _], _ = packs
    model = _configure(model, lora_dropout)

    def schedule(kinds):  # a padding call before, between and after this rank's calls, of every kind
        slots = [(PREDICT, False), (IMAGE, False), (TEXT, False)]
        for kind in kinds:
            slots += [((kind + 1) % 3, False), (kind, True)]
        return slots + [(TEXT, False), (IMAGE, False), (PREDICT, False)]

    try:
        plain, plain_grads = _rollout(model, pack, latents)
        padded, padded_grads = _rollout(model, pack, latents, schedule, monkeypatch)
    finally:
        if lora_dropout is not None:
            model.unload()  # the module's model without adapters again
    assert torch.equal(plain.ce_per_token, padded.ce_per_token)
    assert torch.equal(plain.mse_per_element, padded.mse_per_element)
    assert plain.mse_loss == padded.mse_loss and plain.ce_loss == padded.ce_loss
    assert plain_grads.keys() == padded_grads.keys()
    assert sum(bool(g.abs().sum()) for g in plain_grads.values()) >= len(plain_grads) // 2  # (LoRA: B only)
    for name, grad in plain_grads.items():
        assert torch.equal(grad, padded_grads[name]), name


def test_ranks_with_different_packs_make_the_same_module_calls(packs, monkeypatch):
    """What FSDP2 (per decoder layer) and ZeRO-3 (per module) need: the same calls, order and grad mode."""
    model, pairs, text_only = packs
    model = _configure(model, None)
    assert not any("lora_" in name for name, _ in model.named_parameters())
    ranks = pairs + [(text_only, None)]  # the third rank pads every call
    kinds = [[call.kind for call in rollout_calls(pack)] for pack, _ in ranks]
    merged = merge_sequences(kinds)
    names = {module: name for name, module in model.named_modules()}
    calls, recording = [], [True]

    def record(module, args):
        name = names[module]
        if recording[0] and any(True for _ in module.parameters(recurse=False)) \
                and not name.startswith(("vision_model", "connector")):  # the ViT prelude runs once per pack
            calls.append((name, torch.is_grad_enabled()))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if m is not model]
    hooks.append(model.register_forward_pre_hook(lambda *_: recording.__setitem__(0, False)))  # the final pass
    try:
        sequences = []
        for pack, latents in ranks:
            calls.clear()
            recording[0] = True
            _rollout(model, pack, latents, lambda k: list(zip(merged, place(k, merged))), monkeypatch)
            sequences.append(list(calls))
    finally:
        for hook in hooks:
            hook.remove()
    assert kinds[2] == [] and len(merged) > max(map(len, kinds[:2]))
    assert sequences[0] == sequences[1] == sequences[2]
    assert any(grad for _, grad in sequences[0]) and any(not grad for _, grad in sequences[0])
    assert any(".gen." in name for name, _ in sequences[0]) and "llm2vae" in {name for name, _ in sequences[0]}


def test_pack_without_text_loss_keeps_the_final_pass_in_the_backward(packs):
    """Under lockstep a pack with no CE token still back-propagates through its final pass (times zero)."""
    model, [(pack, latents), _], _ = packs
    model = _configure(model, None)
    empty = torch.empty(0, dtype=torch.long)
    no_text = dataclasses.replace(pack, ce_loss_indexes=empty, labels=empty)
    torch.manual_seed(0)
    plain = self_forcing_forward(model, no_text, latents)
    assert plain.ce_per_token is None
    torch.manual_seed(0)
    lockstep = self_forcing_forward(model, no_text, latents, lockstep=True)
    assert lockstep.ce_loss is None and lockstep.logits is None
    assert lockstep.ce_per_token.requires_grad and not lockstep.ce_per_token.abs().sum()
    assert torch.equal(plain.mse_per_element, lockstep.mse_per_element)
    model.zero_grad(set_to_none=True)
    lockstep.ce_per_token.sum().backward()
    assert model.lm_head.weight.grad is not None and not model.lm_head.weight.grad.abs().sum()


def test_pack_without_images_runs(packs, monkeypatch):
    """A pack whose images were all dropped has no latents: alone its rollout is just the final pass;
    next to a rank with images it pads every call."""
    model, [(other, _), _], text_only = packs
    model = _configure(model, None)
    assert rollout_calls(text_only) == []
    output = self_forcing_forward(model, text_only, None)
    assert output.mse_per_element is None and torch.isfinite(output.ce_loss)
    other_kinds = [call.kind for call in rollout_calls(other)]
    padded, _ = _rollout(model, text_only, None, lambda kinds: [(kind, False) for kind in other_kinds], monkeypatch)
    assert torch.equal(padded.ce_per_token, output.ce_per_token)
    assert padded.mse_per_element.shape == (1, 1) and not padded.mse_per_element.abs().sum()
