"""The parity tool replays the shipped reference fixture through the public API and passes."""

import json

from unibrain_hf.testing import parity


def test_parity_on_shipped_fixture(fixture_dir, tmp_path, capsys):
    code = parity.main([str(fixture_dir), "--json", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, report["failed"]
    assert report["ok"] and report["checked"] >= 30
    results = report["results"]
    assert results["train.loss"]["max_abs_diff"] <= 1e-5
    assert any(k.startswith("train.grads(") and v["max_abs_diff"] <= 1e-4 for k, v in results.items())
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
