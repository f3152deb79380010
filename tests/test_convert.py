"""BAGEL checkpoint conversion: round trip at other sizes, the CLI, and clear errors on bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from unibrain_hf import UniBrainForConditionalGeneration
from unibrain_hf.cli import main as cli_main
from unibrain_hf.convert import ConversionError, convert_bagel_checkpoint
from unibrain_hf.testing.synthetic_bagel import write_bagel_directory


def make_bagel_dir(tmp_path, fixture_dir, drop=()):
    """A BAGEL directory at other sizes than the fixture: wider, 3 layers, GQA 8:2, another ViT."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from unibrain_hf import UniBrainConfig

    text = Qwen2Config(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    vision = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                image_size=14 * 10, patch_size=14)
    config = UniBrainConfig(text_config=text, vision_config=vision, max_latent_size=12, vit_max_num_patch_per_side=10,
                            bos_token_id=291, eos_token_id=292, start_of_image_token_id=293, end_of_image_token_id=294)
    torch.manual_seed(5)
    model = UniBrainForConditionalGeneration(config)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
    return model, write_bagel_directory(model, fixture_dir, tmp_path / "bagel", drop=drop)


def test_round_trip_other_sizes(tmp_path, fixture_dir):
    model, src = make_bagel_dir(tmp_path, fixture_dir)
    report = convert_bagel_checkpoint(src, tmp_path / "out", max_shard_size=60_000)
    assert report.special_token_ids == {"bos_token_id": 291, "eos_token_id": 292, "start_of_image": 293,
                                        "end_of_image": 294}
    assert len(list((tmp_path / "out" / "model").glob("model-*.safetensors"))) > 1  # streamed into shards
    # The pipeline directory is loadable directly and through its model sub-folder.
    loaded = UniBrainForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.lm_head.weight,
                       UniBrainForConditionalGeneration.from_pretrained(tmp_path / "out", subfolder="model").lm_head.weight)
    assert loaded.config.text_config.num_key_value_heads == 2 and loaded.config.vision_config.num_hidden_layers == 3
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    for name in ("model_index.json", "vae/config.json", "scheduler/scheduler_config.json",
                 "tokenizer/tokenizer_config.json", "processor/processor_config.json"):
        assert (tmp_path / "out" / name).exists(), name


def test_cli_and_dtype(tmp_path, fixture_dir, capsys):
    assert cli_main(["convert", str(fixture_dir), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    weights = load_file(str(tmp_path / "bf16" / "model" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    capsys.readouterr()
    assert cli_main(["convert", str(fixture_dir), str(tmp_path / "bf16")]) == 1  # exists, no --overwrite
    error = capsys.readouterr().err
    assert "already exists; pass --overwrite" in error and "overwrite=True" not in error
    # The Python API names its own argument.
    with pytest.raises(ConversionError, match=r"pass overwrite=True") as caught:
        convert_bagel_checkpoint(fixture_dir, tmp_path / "bf16")
    assert caught.value.option == "overwrite"


def test_cli_names_the_weights_flag(tmp_path, fixture_dir, capsys):
    src = tmp_path / "no_weights"
    shutil.copytree(fixture_dir, src)
    (src / "ema.safetensors").unlink()
    assert cli_main(["convert", str(src), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "pass --weights FILE" in error and "weights=" not in error
    with pytest.raises(ConversionError, match=r"pass weights=<safetensors file>"):
        convert_bagel_checkpoint(src, tmp_path / "out")


def test_conversion_error_is_part_of_the_error_hierarchy():
    from unibrain_hf import errors

    assert ConversionError is errors.ConversionError
    assert issubclass(ConversionError, errors.InvalidInputError) and issubclass(ConversionError, ValueError)


def test_missing_tensor_is_named(tmp_path, fixture_dir):
    _, src = make_bagel_dir(tmp_path, fixture_dir, drop=("language_model.model.layers.1.mlp_moe_gen.up_proj.weight",))
    with pytest.raises(ConversionError, match="missing tensor.*layers.1.gen.mlp.up_proj"):
        convert_bagel_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written


def _edit_weights(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_unexpected_and_misshaped_tensors(tmp_path, fixture_dir):
    _, src = make_bagel_dir(tmp_path, fixture_dir)
    _edit_weights(src / "ema.safetensors", lambda t: t.update({"language_model.model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ConversionError, match="unexpected tensor.*extra"):
        convert_bagel_checkpoint(src, tmp_path / "a")
    _, src = make_bagel_dir(tmp_path / "b", fixture_dir)
    _edit_weights(src / "ema.safetensors",
                  lambda t: t.update({"vae2llm.bias": torch.zeros(7)}))
    with pytest.raises(ConversionError, match="wrong shape.*vae2llm.bias"):
        convert_bagel_checkpoint(src, tmp_path / "c")


def test_corrupt_and_incomplete_sources(tmp_path, fixture_dir):
    src = tmp_path / "src"
    shutil.copytree(fixture_dir, src)
    (src / "ema.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConversionError, match="not a readable safetensors"):
        convert_bagel_checkpoint(src, tmp_path / "out")
    shutil.copy(fixture_dir / "ema.safetensors", src / "ema.safetensors")
    llm = json.loads((src / "llm_config.json").read_text())
    del llm["hidden_size"]
    (src / "llm_config.json").write_text(json.dumps(llm))
    with pytest.raises(ConversionError, match="llm_config.json lacks required key.*hidden_size"):
        convert_bagel_checkpoint(src, tmp_path / "out")
    shutil.copy(fixture_dir / "llm_config.json", src / "llm_config.json")
    (src / "vocab.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer files"):
        convert_bagel_checkpoint(src, tmp_path / "out")


def test_unibrain_release_weights_with_bagel_configs(tmp_path, fixture_dir, converted_fixture):
    # A UniBrain stage checkpoint: only a safetensors file; configs/tokenizer/VAE come from BAGEL.
    release = tmp_path / "checkpoints_s3" / "0000200"
    release.mkdir(parents=True)
    tensors = load_file(str(fixture_dir / "ema.safetensors"))
    tensors["llm2vae.bias"] = tensors["llm2vae.bias"] + 1.0
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(release / "ema.safetensors"))
    convert_bagel_checkpoint(fixture_dir, tmp_path / "out", weights=release / "ema.safetensors")
    loaded = UniBrainForConditionalGeneration.from_pretrained(tmp_path / "out", subfolder="model")
    base = UniBrainForConditionalGeneration.from_pretrained(converted_fixture, subfolder="model")
    assert torch.allclose(loaded.llm2vae.bias.float(), base.llm2vae.bias + 1.0, atol=1e-2)
