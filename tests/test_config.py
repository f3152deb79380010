"""UniBrainConfig as transformers' own config checks (ConfigTester) exercise it, plus its refusals.

Each check below is one that transformers' ``ConfigTester.run_common_tests`` makes of every config
class (defaults, JSON round trips, sub-configs loading alone, ``from_pretrained`` overrides,
``num_labels``) or a bad config that must be refused by name.

    python -m pytest tests/test_config.py -q
"""

import json

import pytest
from transformers import AutoConfig, AutoModel, Qwen2Config, SiglipVisionConfig

from unibrain_hf import UniBrainConfig
from unibrain_hf.errors import ConfigError


def test_default_config_is_bagel_7b_mot_and_auto_config_builds_it():
    config = UniBrainConfig()
    assert config.to_dict() == UniBrainConfig.bagel_7b_mot().to_dict()
    assert (config.hidden_size, config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers) == (
        3584, 28, 26)
    assert isinstance(AutoConfig.for_model("unibrain"), UniBrainConfig)


@pytest.mark.parametrize("make", [UniBrainConfig, UniBrainConfig.tiny], ids=["default", "tiny"])
def test_json_and_directory_round_trips(make, tmp_path):
    config = make(latent_channels=8, timestep_shift=3.0)
    assert json.loads(config.to_json_string())["latent_channels"] == 8
    config.to_json_file(tmp_path / "config.json")
    assert UniBrainConfig.from_json_file(tmp_path / "config.json").to_dict() == config.to_dict()
    config.save_pretrained(tmp_path / "saved" / "sub")
    assert UniBrainConfig.from_pretrained(tmp_path / "saved", subfolder="sub").to_dict() == config.to_dict()
    auto = AutoConfig.from_pretrained(tmp_path / "saved" / "sub").to_dict()
    assert {**auto, "_name_or_path": ""} == config.to_dict()
    with pytest.raises(OSError):
        UniBrainConfig.from_pretrained(tmp_path / "no-such-directory")


def test_sub_configs_load_alone_from_the_composite_file(tmp_path):
    config = UniBrainConfig.tiny()
    config.save_pretrained(tmp_path)
    text = Qwen2Config.from_pretrained(tmp_path).to_dict()
    vision = SiglipVisionConfig.from_pretrained(tmp_path).to_dict()
    expected_text, expected_vision = config.to_dict()["text_config"], config.to_dict()["vision_config"]
    for loaded, expected in ((text, expected_text), (vision, expected_vision)):
        loaded.pop("transformers_version", None)
        expected.pop("transformers_version", None)
        assert loaded == expected


def test_from_pretrained_overrides_one_sub_config_value(tmp_path):
    config = UniBrainConfig.tiny()
    config.save_pretrained(tmp_path)
    reloaded = UniBrainConfig.from_pretrained(tmp_path, text_config={"vocab_size": 20})
    expected = {**config.text_config.to_dict(), "vocab_size": 20}
    assert reloaded.text_config.to_dict() == expected


def test_vocab_size_and_num_labels_like_a_text_model():
    config = UniBrainConfig.tiny()
    assert config.vocab_size == config.text_config.vocab_size == 320
    config.vocab_size = 0
    assert config.text_config.vocab_size == 0
    assert UniBrainConfig(vocab_size=7).text_config.vocab_size == 7
    labelled = UniBrainConfig.tiny(num_labels=5)
    assert len(labelled.id2label) == len(labelled.label2id) == 5
    labelled.num_labels = 3
    assert len(labelled.id2label) == 3


@pytest.mark.parametrize("kwargs, where", [
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
     "text_config.tie_word_embeddings"),
])
def test_tied_embeddings_are_refused(kwargs, where):
    with pytest.raises(ConfigError, match=rf"{where}=True is not supported"):
        UniBrainConfig(**kwargs)


@pytest.mark.parametrize("missing", ["text_config", "vision_config"])
def test_config_file_without_a_sub_config_is_refused_by_name(missing, tmp_path):
    UniBrainConfig.tiny().save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    del stored[missing]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    file_name = str(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=rf"{file_name} has no '{missing}'"):
        UniBrainConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=rf"{file_name} has no '{missing}'"):
        UniBrainConfig.from_json_file(tmp_path / "config.json")
    # The Auto classes name the directory and the key, and build nothing (no 22.9 B default model).
    with pytest.raises(ConfigError, match=rf"{tmp_path}.*'{missing}'"):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=rf"'{missing}'"):
        AutoModel.from_pretrained(tmp_path)


def test_invalid_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        UniBrainConfig.tiny(text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=3))
    assert issubclass(ConfigError, ValueError)
