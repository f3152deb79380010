"""The parity tool replays both shipped reference fixtures through the public API and passes.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_parity.py -q
"""

import json

import pytest

from unibrain_hf.testing import parity

FIXTURES = ("bagel_tiny", "bagel_tiny_b")


def shipped_fixture(fixture_dir, name: str):
    """The shipped reference fixtures live side by side; ``fixture_dir`` is the first one."""
    directory = fixture_dir.parent / name
    if not (directory / "README.json").exists():
        pytest.fail(f"reference fixture {name} not found next to {fixture_dir}")
    return directory


@pytest.mark.parametrize("name", FIXTURES)
def test_parity_on_shipped_fixture(fixture_dir, name, tmp_path, capsys):
    code = parity.main([str(shipped_fixture(fixture_dir, name)), "--json", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, report["failed"]
    assert report["ok"] and report["checked"] >= 30
    results = report["results"]
    assert results["train.loss"]["max_abs_diff"] <= 1e-5
    assert any(k.startswith("train.grads(") and v["max_abs_diff"] <= 1e-4 for k, v in results.items())
    assert any(k.endswith(".v_cfg_text.evaluated") for k in results)  # where guidance ran was checked
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_parity_detects_a_wrong_model(fixture_dir, tmp_path, monkeypatch):
    """A deliberately broken model must make the tool fail (the check is not vacuous)."""
    from unibrain_hf.modeling import modeling_unibrain

    original = modeling_unibrain.UniBrainForConditionalGeneration.flow_time

    def shifted(self, raw, shift=None):
        return original(self, raw, shift) * 0.9

    monkeypatch.setattr(modeling_unibrain.UniBrainForConditionalGeneration, "flow_time", shifted)
    result = parity.run(fixture_dir)
    assert not result["ok"]
    assert "train.mse_loss" in result["failed"]


def test_parity_detects_guidance_on_the_bound(fixture_dir, monkeypatch):
    """Applying guidance on the interval's float32 bound (the old float64 comparison) fails bagel_tiny_b."""
    from unibrain_hf.pipelines import sampler

    monkeypatch.setattr(sampler.GuidanceSettings, "in_interval",
                        lambda self, t: self.interval[0] < float(t) <= self.interval[1])
    result = parity.run(shipped_fixture(fixture_dir, "bagel_tiny_b"))
    assert not result["ok"]
    assert "infer.flow.3.v_cfg_text.evaluated" in result["failed"]
