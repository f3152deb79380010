"""Expert-aware offload: at each phase only the shared parts plus one expert are on the execution device.

The execution device is the CPU and off-device weights are ``meta`` placeholders, so the bytes of
parameters "on the device" are the bytes of non-meta parameters; a hook appended to every
weight-holding module records them at each call, after the offload hook placed the weights.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_memory_expert_offload.py -q
"""

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module

from test_memory import assert_same, load, run
from unibrain_hf.errors import InvalidInputError
from unibrain_hf.pipelines.offload import RESIDENT_EXPERT, enable_expert_offload


@pytest.fixture(scope="module")
def reference(converted_fixture):
    return run(load(converted_fixture))


def _bytes(params):
    return sum(p.numel() * p.element_size() for p in params if p.device.type != "meta")


def test_expert_offload_accounting_per_phase(converted_fixture, reference):
    pipe = load(converted_fixture)
    offload = pipe.enable_expert_offload(device="cpu")
    model = pipe.model
    assert pipe._execution_device == torch.device("cpu")
    expert_of = {}
    for layer in model.language_model.layers:
        for kind in ("und", "gen"):
            for module in getattr(layer, kind).modules():
                expert_of[id(module)] = kind
    records = []

    def expert_params(kind):
        return [p for layer in model.language_model.layers for p in getattr(layer, kind).parameters()]

    class Accounting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            records.append(dict(phase=offload.phase, resident=offload.resident, leaf=expert_of.get(id(module), "shared"),
                                total=offload.resident_bytes(), und=_bytes(expert_params("und")),
                                gen=_bytes(expert_params("gen"))))
            return args, kwargs

    for module in model.modules():
        if any(p is not None for p in module._parameters.values()):
            add_hook_to_module(module, Accounting(), append=True)
    phases = []
    original = model.forward
    model.forward = lambda *a, **k: phases.append(k.get("phase")) or original(*a, **k)

    assert_same(run(pipe), reference)  # exactly the plain run's output

    und_bytes, gen_bytes = offload.expert_bytes("und"), offload.expert_bytes("gen")
    shared = offload.shared_bytes()
    assert shared > 0 and und_bytes > 0 and gen_bytes > 0
    assert {r["phase"] for r in records} == set(RESIDENT_EXPERT)
    for r in records:
        # Never more than the shared parts + one expert + one streamed weight of the other expert.
        assert r["total"] <= offload.expected_bytes(r["resident"]) < shared + und_bytes + gen_bytes
        assert r["total"] == shared + r["und"] + r["gen"]  # the shared parts are always there
        if r["phase"] in ("prefill_text", "prefill_vit", "decode"):
            # Text decoding and understanding prefill run only understanding-expert weights.
            assert (r["und"], r["gen"]) == (und_bytes, 0), r
        if r["phase"] == "velocity":
            # The generation expert is resident; the understanding expert appears only for its own
            # (marker-row) calls, one weight matrix at a time.
            assert r["gen"] == gen_bytes, r
            assert r["und"] <= offload.largest_leaf_bytes("und")
            assert r["und"] == 0 or r["leaf"] == "und"
    # The velocity block's two marker rows are routed to the understanding expert: it does stream there.
    assert any(r["und"] > 0 for r in records if r["phase"] == "velocity")
    # Experts swap once per phase change, not per denoising step.
    wanted = [RESIDENT_EXPERT[p] for p in phases if RESIDENT_EXPERT.get(p)]
    changes = sum(1 for before, after in zip(["und"] + wanted, wanted) if before != after)
    assert offload.swaps == changes
    # One velocity call per denoising step (a step's guidance branches share it): more steps than swaps.
    assert phases.count("velocity") > offload.swaps


def test_expert_offload_bf16_matches_plain_bf16(converted_fixture):
    expected = run(load(converted_fixture, dtype=torch.bfloat16))
    pipe = load(converted_fixture, dtype=torch.bfloat16)
    offload = enable_expert_offload(pipe, device="cpu")
    assert_same(run(pipe), expected)
    offload.remove()
    assert all(p.device.type == "cpu" for p in pipe.model.parameters())
    assert_same(run(pipe), expected)


def test_expert_offload_needs_an_accelerator_or_a_device(converted_fixture):
    if torch.cuda.is_available():
        pytest.skip("this machine has an accelerator")
    pipe = load(converted_fixture)
    with pytest.raises(InvalidInputError, match="device='cpu'"):
        enable_expert_offload(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(InvalidInputError, match="remove_all_hooks"):
        enable_expert_offload(pipe, device="cpu")
