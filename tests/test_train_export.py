"""A LoRA run's export: ``lora_adapter`` is the adapter of exactly the weights ``pipeline`` holds.

The run's starting pipeline + ``load_lora_weights(<output_dir>/lora_adapter)`` + ``fuse_lora()``
must hold the exported pipeline's weights and give its outputs, whether the export is the EMA
(default) or the trained weights (``train.export_weights: trained``).

    HF_HUB_OFFLINE=1 python -m pytest tests/test_train_export.py -q
"""

import json

import numpy as np
import pytest
import torch

from train_helpers import make_config, train_workspace  # noqa: F401  (train_workspace is a fixture)


def _generate(pipe):
    t1 = np.random.default_rng(0).normal(100, 30, size=(48, 48)).astype(np.float32)
    return pipe(images={"t1n": t1}, target_modalities=["t2f"], output_type="np", num_inference_steps=2,
                generator=torch.Generator().manual_seed(0)).images["t2f"]


@pytest.mark.parametrize("export_weights", ["ema", "trained"])
def test_base_plus_exported_adapter_is_the_exported_pipeline(train_workspace, export_weights):
    from safetensors.torch import load_file

    from unibrain_hf import UniBrainPipeline
    from unibrain_hf.train.checkpoint import read_full_tensors
    from unibrain_hf.train.export import write_export
    from unibrain_hf.train.trainer import train

    out = train_workspace[0] / f"lora-export-{export_weights}"
    result = train(make_config(train_workspace, "unified", **{
        "lora.enabled": True, "lora.preset": "both", "lora.dropout": 0.0, "train.max_steps": 2,
        "train.save_every": 2, "train.ema_decay": 0.5, "train.export_weights": export_weights,
        "train.output_dir": out}), progress=False)
    adapter_dir = out / "lora_adapter"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary folders left
    # The adapter holds the weights the export was asked for, from the same state as the pipeline.
    expected = read_full_tensors(result.last_checkpoint, "ema." if export_weights == "ema" else "model.")
    other = read_full_tensors(result.last_checkpoint, "model." if export_weights == "ema" else "ema.")
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert len(adapter) == len(expected) > 0
    for name, value in expected.items():
        assert torch.equal(adapter[name.replace(".default.", ".")], value), name
    assert any(not torch.equal(expected[k], other[k]) for k in expected)  # EMA and trained differ
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(train_workspace[2])

    exported = UniBrainPipeline.from_pretrained(result.export_dir)
    pipe = UniBrainPipeline.from_pretrained(train_workspace[2])
    base_output = _generate(pipe)
    pipe.load_lora_weights(adapter_dir, adapter_name="run")
    adapted_output = _generate(pipe)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # fused weights stay, the LoRA layers go: a plain model, like the export
    fused, merged = pipe.model.state_dict(), exported.model.state_dict()
    assert fused.keys() == merged.keys()
    changed = [k for k in merged if not torch.equal(merged[k], load_file(
        str(train_workspace[2] / "model" / "model.safetensors")).get(k, merged[k]))]
    assert changed and all("lora" not in k for k in changed)
    for name, value in merged.items():
        assert torch.equal(fused[name], value), name
    exported_output = _generate(exported)
    assert np.array_equal(_generate(pipe), exported_output)
    # Unfused adapters compute W x + B A x instead of (W + B A) x: the same up to rounding (8-bit output levels).
    assert np.allclose(adapted_output, exported_output, atol=1.5 / 255)
    assert not np.array_equal(base_output, exported_output)

    # A full fine-tune exported into the same folder replaces the pipeline and drops the stale adapter.
    write_export(exported.model.state_dict(), exported.model, exported.vae, exported.tokenizer, exported.processor,
                 out)
    assert not adapter_dir.exists() and (out / "pipeline" / "model_index.json").exists()


def test_a_finished_run_resumed_at_its_last_step_exports_its_trained_weights(train_workspace):
    """docs/DEMO_RUN.md (rows AI-raw...): a finished run's pipeline re-exported from its trained, not averaged,
    weights by resuming at its last step with ``train.export_weights: trained`` (no step is taken)."""
    from safetensors.torch import load_file

    from unibrain_hf.train.checkpoint import read_full_tensors
    from unibrain_hf.train.trainer import train

    out = train_workspace[0] / "re-export"
    settings = {"train.max_steps": 2, "train.save_every": 2, "train.ema_decay": 0.5, "train.output_dir": out}
    first = train(make_config(train_workspace, "unified", **settings), progress=False)
    averaged = load_file(str(next((first.export_dir / "model").glob("*.safetensors"))))
    again = train(make_config(train_workspace, "unified", **settings, **{"train.export_weights": "trained"}),
                  resume="auto", progress=False)
    assert again.steps == 2 and again.losses == []  # resumed at the end: nothing trained
    trained = load_file(str(next((again.export_dir / "model").glob("*.safetensors"))))
    expected = read_full_tensors(first.last_checkpoint, "model.")
    for name, value in expected.items():
        assert torch.equal(trained[name], value), name
    assert any(not torch.equal(averaged[k], trained[k]) for k in expected)  # the first export was the EMA
