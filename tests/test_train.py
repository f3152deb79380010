"""Training in one process: config validation, stages, exact resume, checkpoints, LoRA, faults, schedules.

Multi-process runs (DDP, FSDP2) are in tests/test_train_distributed.py.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_train.py -q
"""

import json
import signal

import pytest
import torch

from unibrain_hf.errors import CheckpointError, ConfigError, CorruptFileError, InputFileNotFoundError
from unibrain_hf.train.config import load_config
from unibrain_hf.train.stages import configure_stage, is_trainable

from train_helpers import (  # noqa: F401  (train_workspace is a fixture)
    config_values,
    make_config,
    read_metrics,
    run_module,
    train_workspace,
    tree_snapshot,
    wait_for,
    write_yaml,
)


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, key", [
    ("train.max_steps=true", "train.max_steps"),  # a bool is not an int here
    ("train.max_steps=2.5", "train.max_steps"),
    ("train.learning_rate=-0.001", "train.learning_rate"),
    ("train.learning_rate=fast", "train.learning_rate"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("data.vit_dropout=1.5", "data.vit_dropout"),
    ("data.num_workers=-1", "data.num_workers"),
    ("lora.projections=[q_proj, qq_proj]", "lora.projections"),
    ("train.lr_scheduler=exponential", "train.lr_scheduler"),
    ("train.learning_rat=1", "train.learning_rat"),  # unknown keys are refused
    ("stage=pretrain", "stage"),
    ("data.expected_num_tokens=999999", "expected_num_tokens"),  # cross-field: budget
    ("train.warmup_steps=99", "warmup_steps"),  # cross-field: warm-up longer than the run
])
def test_config_values_are_validated_by_type_range_and_rule(train_workspace, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, config_values(train_workspace) + [override])


def test_config_cross_section_rules(train_workspace):
    with pytest.raises(ConfigError, match="lora.preset must be 'gen'"):
        load_config(None, config_values(train_workspace, "align") + ["lora.enabled=true", "lora.preset=both"])
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        load_config(None, config_values(train_workspace) + ["train.min_lr_ratio=0.1"])  # constant has no floor
    config = load_config(None, config_values(train_workspace) + ["train.lr_scheduler=cosine",
                                                                 "train.min_lr_ratio=0.1", "train.learning_rate=2e-4"])
    assert config.train.learning_rate == 2e-4  # YAML 1.1 reads "2e-4" as a string; it is still a number here


def test_config_file_errors_name_the_file(train_workspace, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage: unified\ntrain:\n  max_steps: [4\n")
    with pytest.raises(CorruptFileError, match=r"broken\.yaml.*line \d+"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- stage\n")
    with pytest.raises(ConfigError, match=r"list\.yaml.*mapping"):
        load_config(listed)
    with pytest.raises(InputFileNotFoundError, match="data.path"):
        make_config(train_workspace, **{"data.path": tmp_path / "nowhere"})
    with pytest.raises(InputFileNotFoundError, match="--config"):
        load_config(tmp_path / "missing.yaml")


def test_cli_config_error_exits_2_before_loading(train_workspace, tmp_path):
    config = write_yaml(tmp_path / "bad.yaml", make_config(train_workspace))
    text = config.read_text().replace("max_steps: 4", "max_steps: true")
    config.write_text(text)
    process = run_module(["-m", "unibrain_hf.train", "--config", str(config)])
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output[-2000:]
    assert "train.max_steps" in output and "valid integer" in output


# ------------------------------------------------------------------------------------- stages
def test_stage_parameter_sets(train_workspace):
    from unibrain_hf import UniBrainForConditionalGeneration

    model = UniBrainForConditionalGeneration.from_pretrained(train_workspace[2])
    align = set(configure_stage(model, "align"))
    assert model.frozen_experts == {"und": True, "gen": False}  # stage 1 gradient-stops the understanding expert
    assert align and all(".gen." in n or n.startswith(("language_model.norm_gen", "time_embedder")) for n in align)
    assert "time_embedder.embedding.linear_1.weight" in align
    unified = set(configure_stage(model, "unified"))
    assert len(unified) == len(list(model.parameters()))
    assert model.frozen_experts == {"und": False, "gen": False}
    dhs = set(configure_stage(model, "dhs"))
    assert not any(n.startswith(("vision_model", "connector", "vae2llm", "llm2vae")) for n in dhs)
    assert "lm_head.weight" in dhs and "language_model.layers.0.und.q_proj.weight" in dhs


@pytest.mark.parametrize("stage", ["align", "unified", "dhs"])
def test_each_stage_trains(train_workspace, stage):
    from PIL import Image
    from safetensors.torch import load_file

    from unibrain_hf.train.trainer import train

    config = make_config(train_workspace, stage, **{"train.sample_every": 2})
    result = train(config, progress=False)
    assert result.steps == 4 and len(result.losses) == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 for r in result.losses)
    if stage == "align":
        assert all(r["ce"] is None for r in result.losses)  # self-alignment has no text loss
        assert all(r["mse"] is not None for r in result.losses)
    assert (result.export_dir / "model_index.json").exists()
    assert (result.output_dir / "checkpoints" / "latest").read_text() == "step-0000004"
    panels = sorted((result.output_dir / "samples").glob("step-*.png"))
    assert [p.name for p in panels] == ["step-0000002.png", "step-0000004.png"]
    assert Image.open(panels[0]).size[0] > 4 * 48
    # The training-only gradient-stop flags never reach the exported model.
    exported = json.loads((result.export_dir / "model" / "config.json").read_text())
    assert not exported.get("freeze_und") and not exported.get("freeze_gen")
    # Only the weights the stage trains move.
    before = load_file(str(train_workspace[2] / "model" / "model.safetensors"))
    after = load_file(str(result.export_dir / "model" / "model.safetensors"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(is_trainable(stage, k) for k in moved)


# ------------------------------------------------------------------------------------- resume
def test_resume_reproduces_the_uninterrupted_run(train_workspace):
    from unibrain_hf.train.trainer import train

    root = train_workspace[0]
    straight = train(make_config(train_workspace, **{"train.output_dir": root / "straight",
                                                     "train.lr_scheduler": "cosine", "train.min_lr_ratio": 0.1}),
                     progress=False)
    split = make_config(train_workspace, **{"train.output_dir": root / "split", "train.lr_scheduler": "cosine",
                                            "train.min_lr_ratio": 0.1})
    first = train(split, max_steps=2, progress=False)
    assert first.steps == 2
    orphan = root / "split" / "checkpoints" / ".step-0000003.tmp-0badcafe"  # what a kill during a save leaves
    orphan.mkdir()
    (orphan / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"half")
    second = train(split, resume="auto", progress=False)
    assert not orphan.exists()
    resumed = first.losses + second.losses
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight.losses, resumed):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])  # bit-exact
    # The cosine schedule decays towards its floor after the warm-up.
    lrs = [r["lr"] for r in straight.losses]
    assert lrs[0] == pytest.approx(1e-3) and lrs[0] > lrs[1] > lrs[2] > lrs[3] >= 1e-4


def test_learning_rate_schedules(train_workspace):
    from unibrain_hf.train.trainer import build_scheduler

    def lrs(**overrides):
        config = make_config(train_workspace, **{"train.max_steps": 10, "train.warmup_steps": 2, **overrides})
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.train.learning_rate)
        scheduler = build_scheduler(optimizer, config.train)
        values = []
        for _ in range(10):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values

    constant = lrs()
    assert constant[0] == 0 and constant[1] == pytest.approx(5e-4) and set(constant[2:]) == {1e-3}
    cosine = lrs(**{"train.lr_scheduler": "cosine", "train.min_lr_ratio": 0.2})
    linear = lrs(**{"train.lr_scheduler": "linear", "train.min_lr_ratio": 0.2})
    for values in (cosine, linear):
        assert values[2] == pytest.approx(1e-3) and all(a >= b for a, b in zip(values[2:], values[3:]))
        assert values[-1] > 2e-4 - 1e-12 and values[-1] < 1e-3
    assert linear[6] == pytest.approx(1e-3 - (1e-3 - 2e-4) * 4 / 8)  # a straight line from peak to floor


def test_checkpoint_holds_only_safetensors_and_json(train_workspace):
    from unibrain_hf.train.checkpoint import read_full_tensors
    from unibrain_hf.train.trainer import train

    result = train(make_config(train_workspace, "align", **{"train.output_dir": train_workspace[0] / "ckpt"}),
                   max_steps=2, progress=False)
    path = result.last_checkpoint
    assert {p.suffix for p in path.iterdir()} == {".safetensors", ".json"}
    assert result.checkpoints[-1]["disk_bytes"] > 0
    assert json.loads((path / "trainer_state.json").read_text())["disk_bytes"] == result.checkpoints[-1]["disk_bytes"]
    # Only what the stage trains is saved (frozen weights come from model.pretrained).
    saved = read_full_tensors(path, "model.")
    assert saved and all(".gen." in k or k.startswith(("language_model.norm_gen", "time_embedder")) for k in saved)
    assert set(read_full_tensors(path, "ema.")) == set(saved)


def test_checkpoint_from_another_config_and_corrupt_checkpoint(train_workspace):
    from unibrain_hf.train.trainer import train

    out = train_workspace[0] / "mismatch"
    train(make_config(train_workspace, "unified", **{"train.output_dir": out}), max_steps=2, progress=False)
    before = tree_snapshot(out)
    with pytest.raises(CheckpointError, match="different configuration"):
        train(make_config(train_workspace, "align", **{"train.output_dir": out}), resume="auto", progress=False)
    with pytest.raises(CheckpointError, match="another process layout.*num_workers"):
        train(make_config(train_workspace, "unified", **{"train.output_dir": out, "data.num_workers": 1}),
              resume="auto", progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(make_config(train_workspace, "unified", **{"train.output_dir": out}), resume=out / "no-such-step",
              progress=False)
    assert tree_snapshot(out) == before  # refused before anything was written
    shard = next((out / "checkpoints" / "step-0000002").glob("*.safetensors"))
    shard.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(make_config(train_workspace, "unified", **{"train.output_dir": out}), resume="auto", progress=False)


def test_lora_matching_no_module_is_refused_before_anything_is_written(train_workspace):
    from unibrain_hf.train.trainer import train

    out = train_workspace[0] / "lora_none"
    config = make_config(train_workspace, **{"train.output_dir": out, "lora.enabled": True,
                                             "lora.target_modules": "[no_such_proj]"})
    with pytest.raises(ConfigError, match="lora.target_modules matches no module"):
        train(config, progress=False)
    assert not out.exists()


def test_running_out_of_data_saves_and_stops(train_workspace):
    from unibrain_hf.train.trainer import train

    config = make_config(train_workspace, "unified", **{"data.num_epochs": 1, "train.max_steps": 1000,
                                                        "train.save_every": 1000,
                                                        "train.output_dir": train_workspace[0] / "finite"})
    result = train(config, progress=False)
    assert result.stopped_early and 0 < result.steps < 1000
    assert result.last_checkpoint.name == f"step-{result.steps:07d}"
    assert (result.last_checkpoint / "trainer_state.json").exists()


def test_lora_adapters_save_load_merge(train_workspace):
    from peft import PeftModel
    from safetensors.torch import load_file

    from unibrain_hf import UniBrainForConditionalGeneration
    from unibrain_hf.train.checkpoint import read_full_tensors
    from unibrain_hf.train.lora import load_lora
    from unibrain_hf.train.trainer import train

    config = make_config(train_workspace, "unified", **{"lora.enabled": True, "lora.preset": "gen",
                                                        "lora.dropout": 0.0,
                                                        "train.output_dir": train_workspace[0] / "lora"})
    result = train(config, progress=False)
    adapter = result.output_dir / "lora_adapter"
    assert (adapter / "adapter_config.json").exists()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert r"\.gen\." in saved["target_modules"] and "und" not in saved["target_modules"]
    # The checkpoint holds the adapters only, and the exported adapter is their EMA.
    trained = read_full_tensors(result.last_checkpoint, "model.")
    ema = read_full_tensors(result.last_checkpoint, "ema.")
    assert trained and all("lora_" in k for k in trained)
    exported = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(exported) == len(ema)
    for name, value in ema.items():
        assert torch.equal(exported[name.replace(".default.", ".")], value)
    base = UniBrainForConditionalGeneration.from_pretrained(train_workspace[2])
    wrapped = PeftModel.from_pretrained(base, str(adapter))
    names = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
    assert names and all(".gen." in n for n in names)
    # Adapters change generation-token outputs only; merging reproduces the adapted model exactly.
    ids = torch.tensor([[base.config.bos_token_id, 5, 6, base.config.eos_token_id]])
    with torch.no_grad():
        adapted = wrapped.base_model.model.prefill_text_cached(wrapped.base_model.model.new_cache(), ids, 0)
        merged_model = load_lora(UniBrainForConditionalGeneration.from_pretrained(train_workspace[2]), adapter,
                                 merge=True)
        merged = merged_model.prefill_text_cached(merged_model.new_cache(), ids, 0)
        latents = torch.randn(1, 4, merged_model.config.patch_latent_dim)
        pos = torch.arange(4)
        v_adapted = wrapped.base_model.model.velocity_cached(adapted, latents, 0.5, pos, 4)
        v_merged = merged_model.velocity_cached(merged, latents, 0.5, pos, 4)
    assert torch.allclose(v_adapted, v_merged, atol=1e-5)
    assert torch.allclose(adapted.keys[0], merged.keys[0], atol=1e-6)  # text path untouched by gen adapters
    # The exported pipeline is the base with the (EMA) adapters merged.
    pipeline = load_file(str(result.export_dir / "model" / "model.safetensors"))
    assert torch.allclose(pipeline["language_model.layers.0.gen.q_proj.weight"],
                          merged_model.state_dict()["language_model.layers.0.gen.q_proj.weight"], atol=1e-6)


def test_sigterm_finishes_the_step_and_saves(train_workspace):
    out = train_workspace[0] / "sigterm"
    config = make_config(train_workspace, "unified", **{"train.max_steps": 100000, "train.save_every": 100000,
                                                        "train.output_dir": out})
    config_file = write_yaml(train_workspace[0] / "sigterm.yaml", config)
    process = run_module(["-m", "unibrain_hf.train", "--config", str(config_file)])
    wait_for(lambda: len(read_metrics(out)) >= 2, process, what="two steps")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]
    assert "stop requested" in output
    latest = (out / "checkpoints" / "latest").read_text()
    assert int(latest.removeprefix("step-")) >= 2 and (out / "checkpoints" / latest / "trainer_state.json").exists()


def test_pipeline_loads_lora(train_workspace):
    from unibrain_hf import UniBrainPipeline
    from unibrain_hf.train.trainer import train

    out = train_workspace[0] / "lora_pipe"
    train(make_config(train_workspace, "unified", **{"lora.enabled": True, "lora.preset": "both",
                                                     "lora.dropout": 0.0, "train.max_steps": 2,
                                                     "train.output_dir": out}), progress=False)

    def run(pipe):  # the text context the pipeline builds (the fresh velocity head is still zero)
        ids = torch.tensor([pipe.tokenize("Translate the T1 image into T2.")])
        cache = pipe.model.prefill_text_cached(pipe.model.new_cache(), ids, 0)
        return torch.cat([k for k in cache.keys])

    pipe = UniBrainPipeline.from_pretrained(train_workspace[2])
    base = run(pipe)
    pipe.load_lora(out / "lora_adapter")
    adapted = run(pipe)
    pipe.unload_lora()
    assert torch.allclose(run(pipe), base)
    merged_pipe = UniBrainPipeline.from_pretrained(train_workspace[2])
    merged_pipe.load_lora(out / "lora_adapter", merge=True)
    assert torch.allclose(run(merged_pipe), adapted, atol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-6)


def test_stage_two_starts_from_stage_one_checkpoint(train_workspace):
    """``model.weights`` may name a checkpoint folder: its trained weights go over ``model.pretrained``."""
    from unibrain_hf.train.checkpoint import read_full_tensors
    from unibrain_hf.train.trainer import load_components, train

    align = train(make_config(train_workspace, "align", **{"train.output_dir": train_workspace[0] / "align_w",
                                                           "train.export_pipeline": False}),
                  max_steps=2, progress=False)
    config = make_config(train_workspace, "unified", **{"model.weights": align.last_checkpoint})
    model, _, _ = load_components(config)
    trained = read_full_tensors(align.last_checkpoint, "model.")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
