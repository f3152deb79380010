"""Two CPU processes (gloo), launched with ``accelerate launch`` as a user would: DDP and FSDP2.

Each mode trains the tiny model for a few steps and must match one process that sees the same
global batch (two packs per step through two DataLoader workers, which split the cohort exactly
as two ranks do), within 1e-5 relative per step; a kill -9 mid-run followed by ``--resume``
must repeat the uninterrupted run's losses bit for bit. Bad launches are refused before any step.

Modes: stage ``unified`` under DDP and FSDP2, and stage ``dhs`` (the self-forcing rollout, whose
decoder calls depend on the pack) under FSDP2, where the ranks pad to a common call schedule.
Kill and resume run under DDP and FSDP2 + ``dhs`` (the FSDP2 checkpoint path with the rollout on
top), to keep the number of launches small.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_train_distributed.py -q
"""

import json
import re
from pathlib import Path

import pytest
import torch

from unibrain_hf.errors import CheckpointError

from train_helpers import (  # noqa: F401  (train_workspace is a fixture)
    accelerate_launch,
    finish,
    kill_tree,
    make_config,
    read_metrics,
    train_workspace,
    tree_snapshot,
    wait_for,
    write_yaml,
)

STEPS = 6
# mode: (accelerate config, --num_processes, sharding recorded in checkpoints, stage)
MODES = {"ddp": ("cpu_2proc.yaml", None, "replicated", "unified"),
         "fsdp2": ("fsdp2.yaml", 2, "fsdp2", "unified"),
         "fsdp2-dhs": ("fsdp2.yaml", 2, "fsdp2", "dhs")}
KILLED = ["ddp", "fsdp2-dhs"]


def run_config(workspace, name, stage="unified", **overrides):
    return make_config(workspace, stage, **{"train.max_steps": STEPS, "train.save_every": 2,
                                            "train.output_dir": workspace[0] / name, **overrides})


@pytest.fixture(scope="module")
def one_process_reference(train_workspace):
    """One process, two packs per step through two DataLoader workers: the global batch of two ranks (per stage)."""
    from unibrain_hf.train.trainer import train

    results = {}

    def reference(stage):
        if stage not in results:
            config = run_config(train_workspace, f"reference-{stage}", stage,
                                **{"data.num_workers": 2, "train.packs_per_step": 2})
            results[stage] = train(config, progress=False)
        return results[stage]

    return reference


@pytest.fixture(scope="module", params=list(MODES))
def two_process_run(request, train_workspace):
    mode = request.param
    accelerate_config, num_processes, _, stage = MODES[mode]
    config = run_config(train_workspace, mode, stage)
    config_file = write_yaml(train_workspace[0] / f"{mode}.yaml", config)
    output = finish(accelerate_launch(accelerate_config, config_file, num_processes=num_processes))
    return mode, config, config_file, output


def test_two_processes_train_like_one_process_with_the_same_global_batch(two_process_run, one_process_reference,
                                                                         train_workspace):
    from safetensors.torch import load_file

    from unibrain_hf.train.checkpoint import read_full_tensors

    mode, config, _, output = two_process_run
    sharding, stage = MODES[mode][2:]
    reference_run = one_process_reference(stage)
    out = Path(config.train.output_dir)
    assert "finished at step 6" in output, output[-4000:]
    # World size 2 and distinct ranks, as seen from inside the run.
    ranks = sorted(re.findall(r"\[rank (\d)/(\d)\]", output))
    assert ranks == [("0", "2"), ("1", "2")], output[-4000:]
    last = out / "checkpoints" / "step-0000006"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["layout"]["world_size"] == 2 and state["layout"]["sharding"] == sharding
    assert [json.loads((last / f"rank-0000{r}.json").read_text())["rank"] for r in (0, 1)] == [0, 1]
    # Same losses as one process seeing the same global batch.
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert len(reference_run.losses) == STEPS
    for ours, reference in zip(records, reference_run.losses):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5), (mode, ours["step"])
        assert ours["grad_norm"] > 0 and ours["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
    # The EMA moved away from both the initial and the trained weights; the export holds exactly the EMA.
    ema = read_full_tensors(last, "ema.")
    trained = read_full_tensors(last, "model.")
    initial = load_file(str(train_workspace[2] / "model" / "model.safetensors"))
    exported = load_file(str(out / "pipeline" / "model" / "model.safetensors"))
    assert set(ema) == set(trained) and set(ema) <= set(exported)
    assert sum(not torch.equal(ema[k], initial[k]) for k in ema) > len(ema) // 2
    assert all(not torch.equal(ema[k], trained[k]) for k in ema if not torch.equal(trained[k], initial[k]))
    for name, value in ema.items():
        assert torch.equal(exported[name], value), name


def test_the_dhs_ranks_need_padding(train_workspace):
    """The FSDP2 ``dhs`` run above is a real test of the lockstep rollout: in its steps the two ranks'
    packs need different decoder calls (neither rank's calls contain the other's), one rank's pack
    has no image at all and one has no text-loss token."""
    from unibrain_hf.data.packed_dataset import packed_dataloader
    from unibrain_hf.train.data import build_dataset, training_processor
    from unibrain_hf.train.lockstep import merge_sequences
    from unibrain_hf.train.self_forcing import rollout_calls
    from unibrain_hf.train.trainer import load_components

    config = run_config(train_workspace, "fsdp2-dhs", "dhs")
    model, _, tokenizer = load_components(config)
    processor = training_processor(model.config, tokenizer, config.data)
    streams = [iter(packed_dataloader(build_dataset(config, processor, rank, 2))) for rank in range(2)]
    steps = [[next(stream) for stream in streams] for _ in range(STEPS)]
    kinds = [[[call.kind for call in rollout_calls(pack)] for pack in step] for step in steps]
    assert any(len(merge_sequences(k)) > max(map(len, k)) for k in kinds)
    assert any(pack.padded_images is None for step in steps for pack in step)
    assert any(pack.num_ce_tokens == 0 for step in steps for pack in step)


def test_kill_nine_then_resume_repeats_the_uninterrupted_run(two_process_run):
    mode, config, config_file, _ = two_process_run
    if mode not in KILLED:  # (an indirect parametrization would launch the module's runs twice)
        pytest.skip(f"kill -9 and resume are tested under {KILLED}, which cover the checkpoint code of {mode}")
    accelerate_config, num_processes, _, _ = MODES[mode]
    reference = {r["step"]: r for r in read_metrics(Path(config.train.output_dir))}
    out = Path(config.train.output_dir).parent / f"{mode}-killed"
    killed_config = write_yaml(config_file.with_name(f"{mode}-killed.yaml"),
                               config.model_copy(update={"train": config.train.model_copy(update={"output_dir": str(out)})}))
    process = accelerate_launch(accelerate_config, killed_config, num_processes=num_processes)
    wait_for(lambda: len(read_metrics(out)) >= 3, process, what="step 3")
    kill_tree(process)  # kill -9, launcher and both ranks
    checkpoints = out / "checkpoints"
    orphan = checkpoints / ".step-0000099.tmp-deadbeef"
    orphan.mkdir(parents=True, exist_ok=True)
    output = finish(accelerate_launch(accelerate_config, killed_config, "--resume", num_processes=num_processes))
    assert "finished at step 6" in output, output[-4000:]
    resumed_from = int(re.search(r"resumed from \S+ at step (\d+)", output).group(1))
    assert resumed_from >= 2 and not orphan.exists()
    assert not list(checkpoints.glob(".step-*.tmp-*"))
    records = read_metrics(out)
    resumed = records[-(STEPS - resumed_from):]
    assert [r["step"] for r in resumed] == list(range(resumed_from + 1, STEPS + 1))
    for record in resumed:  # bit-exact: the same floats as the uninterrupted run
        expected = reference[record["step"]]
        assert (record["loss"], record["grad_norm"], record["lr"]) == \
            (expected["loss"], expected["grad_norm"], expected["lr"]), (mode, record["step"])


def test_checkpoint_from_another_layout_is_refused_before_anything_is_written(two_process_run, train_workspace):
    from unibrain_hf.train.trainer import train

    mode, config, _, _ = two_process_run
    out = Path(config.train.output_dir)
    before = tree_snapshot(out)
    sharding, stage = MODES[mode][2:]
    expected = "world_size 2 .checkpoint. vs 1" + (".*sharding 'fsdp2'" if sharding == "fsdp2" else "")
    with pytest.raises(CheckpointError, match=expected):
        train(run_config(train_workspace, mode, stage), resume="auto", progress=False)
    assert tree_snapshot(out) == before


def test_fsdp_with_one_process_is_refused_before_anything_is_written(train_workspace):
    config = run_config(train_workspace, "fsdp-one")
    config_file = write_yaml(train_workspace[0] / "fsdp-one.yaml", config)
    process = accelerate_launch("fsdp2.yaml", config_file, num_processes=1)
    output = finish(process)
    assert process.returncode != 0
    assert "FSDP but the launch has 1 process" in output, output[-3000:]
    assert not Path(config.train.output_dir).exists()
