"""Training: stage parameter sets, every stage runs, exact resume, LoRA, faults, two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unibrain_hf.train.checkpoint import CheckpointError
from unibrain_hf.train.config import load_config
from unibrain_hf.train.stages import configure_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 6-subject phantom cohort and a small starting pipeline (random VAE: tests need speed, not images)."""
    from unibrain_hf.data.phantom.generator import generate_cohort
    from unibrain_hf.train.bootstrap import bootstrap_pipeline

    root = tmp_path_factory.mktemp("train")
    cohort = generate_cohort(root / "cohort", 6, seed=3, voxel_size=6.0)
    init = bootstrap_pipeline(cohort, root / "init", image_size=48, hidden_size=32, layers=2, vae_steps=0,
                              vocab_size=400, log=lambda *_: None)
    return root, cohort, init


def make_config(workspace, stage="unified", **overrides):
    root, cohort, init = workspace
    values = [f"stage={stage}", f"model.pretrained={init}", f"data.path={cohort}", "data.image_size=48",
              "data.vae_max_size=48", "data.vae_min_size=32", "data.vit_max_size=42", "data.vit_min_size=28",
              "data.expected_num_tokens=256", "data.max_num_tokens=512", "data.max_num_tokens_per_sample=512",
              "data.prefer_buffer_before=128", "train.max_steps=4", "train.save_every=2", "train.warmup_steps=1",
              "train.learning_rate=1e-3", f"train.output_dir={root / 'runs' / stage}", "train.log_every=1"]
    values += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, values)


def test_stage_parameter_sets(workspace):
    from unibrain_hf import UniBrainForConditionalGeneration

    model = UniBrainForConditionalGeneration.from_pretrained(workspace[2])
    align = set(configure_stage(model, "align"))
    assert model.config.freeze_und
    assert align and all(".gen." in n or n.startswith(("language_model.norm_gen", "time_embedder")) for n in align)
    assert "time_embedder.embedding.linear_1.weight" in align
    unified = set(configure_stage(model, "unified"))
    assert not model.config.freeze_und and len(unified) == len(list(model.parameters()))
    dhs = set(configure_stage(model, "dhs"))
    assert not any(n.startswith(("vision_model", "connector", "vae2llm", "llm2vae")) for n in dhs)
    assert "lm_head.weight" in dhs and "language_model.layers.0.und.q_proj.weight" in dhs


@pytest.mark.parametrize("stage", ["align", "unified", "dhs"])
def test_each_stage_trains(workspace, stage):
    from PIL import Image

    from unibrain_hf.train.trainer import train

    config = make_config(workspace, stage, **{"train.sample_every": 2})
    result = train(config, progress=False)
    assert result.steps == 4 and len(result.losses) == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.losses)
    if stage == "align":
        assert all(r["ce"] is None for r in result.losses)  # self-alignment has no text loss
        assert all(r["mse"] is not None for r in result.losses)
    assert (result.export_dir / "model_index.json").exists()
    assert (result.output_dir / "checkpoints" / "latest").read_text() == "step-0000004"
    panels = sorted((result.output_dir / "samples").glob("step-*.png"))
    assert [p.name for p in panels] == ["step-0000002.png", "step-0000004.png"]
    assert Image.open(panels[0]).size[0] > 4 * 48


def test_resume_reproduces_the_uninterrupted_run(workspace):
    from unibrain_hf.train.trainer import train

    straight = train(make_config(workspace, "unified", **{"train.output_dir": workspace[0] / "straight"}),
                     progress=False)
    split_dir = workspace[0] / "split"
    first = train(make_config(workspace, "unified", **{"train.output_dir": split_dir}), max_steps=2, progress=False)
    assert first.steps == 2
    second = train(make_config(workspace, "unified", **{"train.output_dir": split_dir}), resume="auto",
                   progress=False)
    resumed = first.losses + second.losses
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight.losses, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), ([r["loss"] for r in straight.losses], [r["loss"] for r in resumed])


def test_checkpoint_from_another_config_and_corrupt_checkpoint(workspace):
    from unibrain_hf.train.trainer import train

    out = workspace[0] / "mismatch"
    train(make_config(workspace, "unified", **{"train.output_dir": out}), max_steps=2, progress=False)
    with pytest.raises(CheckpointError, match="different configuration"):
        train(make_config(workspace, "align", **{"train.output_dir": out}), resume="auto", progress=False)
    (out / "checkpoints" / "step-0000002" / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(make_config(workspace, "unified", **{"train.output_dir": out}), resume="auto", progress=False)


def test_config_errors(workspace, tmp_path):
    with pytest.raises(ValueError, match="unknown config key"):
        make_config(workspace, **{"train.learning_rat": 1})
    with pytest.raises(FileNotFoundError, match="data.path"):
        make_config(workspace, **{"data.path": tmp_path / "nowhere"})
    with pytest.raises(ValueError, match="stage must be one of"):
        make_config(workspace, stage="pretrain")


def test_running_out_of_data_saves_and_stops(workspace):
    from unibrain_hf.train.trainer import train

    config = make_config(workspace, "unified", **{"data.num_epochs": 1, "train.max_steps": 1000,
                                                  "train.save_every": 1000,
                                                  "train.output_dir": workspace[0] / "finite"})
    result = train(config, progress=False)
    assert result.stopped_early and 0 < result.steps < 1000
    assert (result.output_dir / "checkpoints" / f"step-{result.steps:07d}" / "model.safetensors").exists()


def test_lora_adapters_save_load_merge(workspace):
    from peft import PeftModel

    from unibrain_hf import UniBrainForConditionalGeneration
    from unibrain_hf.train.lora import load_lora
    from unibrain_hf.train.trainer import train

    config = make_config(workspace, "unified", **{"lora.enabled": True, "lora.preset": "gen", "lora.dropout": 0.0,
                                                  "train.output_dir": workspace[0] / "lora"})
    result = train(config, progress=False)
    adapter = result.output_dir / "lora_adapter"
    assert (adapter / "adapter_config.json").exists()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert r"\.gen\." in saved["target_modules"] and "und" not in saved["target_modules"]
    base = UniBrainForConditionalGeneration.from_pretrained(workspace[2])
    wrapped = PeftModel.from_pretrained(base, str(adapter))
    names = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
    assert names and all(".gen." in n for n in names)
    # Adapters change generation-token outputs only; merging reproduces the adapted model exactly.
    ids = torch.tensor([[base.config.bos_token_id, 5, 6, base.config.eos_token_id]])
    with torch.no_grad():
        adapted = wrapped.base_model.model.prefill_text_cached(wrapped.base_model.model.new_cache(), ids, 0)
        merged_model = load_lora(UniBrainForConditionalGeneration.from_pretrained(workspace[2]), adapter, merge=True)
        merged = merged_model.prefill_text_cached(merged_model.new_cache(), ids, 0)
        latents = torch.randn(1, 4, merged_model.config.patch_latent_dim)
        pos = torch.arange(4)
        v_adapted = wrapped.base_model.model.velocity_cached(adapted, latents, 0.5, pos, 4)
        v_merged = merged_model.velocity_cached(merged, latents, 0.5, pos, 4)
    assert torch.allclose(v_adapted, v_merged, atol=1e-5)
    assert torch.allclose(adapted.keys[0], merged.keys[0], atol=1e-6)  # text path untouched by gen adapters


def _cli(args, env_extra=None, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _write_yaml(path, config):
    import yaml

    path.write_text(yaml.safe_dump(json.loads(json.dumps(config.to_dict(), default=str))))
    return path


def test_sigterm_finishes_the_step_and_saves(workspace):
    out = workspace[0] / "sigterm"
    config = make_config(workspace, "unified", **{"train.max_steps": 100000, "train.save_every": 100000,
                                                  "train.output_dir": out})
    config_file = _write_yaml(workspace[0] / "sigterm.yaml", config)
    process = _cli(["-m", "unibrain_hf.train", "--config", str(config_file)])
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "logs").glob("**/events.*")) and process.poll() is None:
        time.sleep(0.5)
    time.sleep(3)  # let a few steps run
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]
    assert "stop requested" in output
    latest = (out / "checkpoints" / "latest").read_text()
    assert (out / "checkpoints" / latest / "model.safetensors").exists()


def test_two_cpu_processes(workspace):
    out = workspace[0] / "ddp"
    config = make_config(workspace, "unified", **{"train.max_steps": 2, "train.output_dir": out})
    config_file = _write_yaml(workspace[0] / "ddp.yaml", config)
    process = _cli(["-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "unibrain_hf.train", "--config",
                    str(config_file)])
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    assert (out / "pipeline" / "model_index.json").exists()
    assert (out / "checkpoints" / "step-0000002" / "trainer_state.json").exists()


def test_pipeline_loads_lora(workspace):
    from unibrain_hf import UniBrainPipeline
    from unibrain_hf.train.trainer import train

    out = workspace[0] / "lora_pipe"
    train(make_config(workspace, "unified", **{"lora.enabled": True, "lora.preset": "both", "lora.dropout": 0.0,
                                               "train.max_steps": 2, "train.output_dir": out}), progress=False)
    def run(pipe):  # the text context the pipeline builds (the fresh velocity head is still zero)
        ids = torch.tensor([pipe.tokenize("Translate the T1 image into T2.")])
        cache = pipe.model.prefill_text_cached(pipe.model.new_cache(), ids, 0)
        return torch.cat([k for k in cache.keys])

    pipe = UniBrainPipeline.from_pretrained(workspace[2])
    base = run(pipe)
    pipe.load_lora(out / "lora_adapter")
    adapted = run(pipe)
    pipe.unload_lora()
    assert torch.allclose(run(pipe), base)
    merged_pipe = UniBrainPipeline.from_pretrained(workspace[2])
    merged_pipe.load_lora(out / "lora_adapter", merge=True)
    assert torch.allclose(run(merged_pipe), adapted, atol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-6)
