"""Mixed-precision training: refused where it cannot run as asked, and bf16 stays within the documented drift."""

from __future__ import annotations

import pytest
import torch
from train_helpers import make_config
from train_helpers import train_workspace  # noqa: F401  (a fixture)

from unibrain_hf.errors import ConfigError
from unibrain_hf.train import precision
from unibrain_hf.train.precision import check_mixed_precision, cpu_bf16_support

# Documented in benchmarks/README.md ("bf16 autocast drift"): over the first steps of this tiny run
# the loss stays within 1e-3 and the gradient norm within 1e-2 of fp32 (relative; measured ≤ 6e-6
# and ≤ 6e-4).
LOSS_RTOL, GRAD_NORM_RTOL = 1e-3, 1e-2


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; each run here asks for its own precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16 needs a GPU.*silently stay fp32"):
        check_mixed_precision("fp16", "cpu")
    check_mixed_precision("no", "cpu")


def test_bf16_on_a_cpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: None)
    with pytest.raises(ConfigError, match="no native bf16.*train.mixed_precision=no"):
        check_mixed_precision("bf16", "cpu")


def test_trainer_refuses_before_loading(train_workspace, fresh_accelerate_state, monkeypatch):  # noqa: F811
    from unibrain_hf.train import trainer

    loaded = []
    monkeypatch.setattr(trainer, "load_components", lambda *a, **k: loaded.append(1))
    with pytest.raises(ConfigError, match="fp16"):
        trainer.Trainer(make_config(train_workspace, **{"train.mixed_precision": "fp16"}), progress=False)
    assert not loaded


def _losses(workspace, tmp_path, mode):
    from unibrain_hf.train.trainer import train

    config = make_config(workspace, **{"train.output_dir": tmp_path / mode, "train.max_steps": 3,
                                       "train.save_every": 0, "train.export_pipeline": "false",
                                       "train.mixed_precision": mode})
    return train(config, progress=False).losses


@pytest.mark.skipif(cpu_bf16_support() is None, reason="this CPU has no native bf16")
def test_bf16_autocast_stays_within_the_documented_drift(train_workspace, tmp_path,  # noqa: F811
                                                         fresh_accelerate_state):
    from accelerate.state import AcceleratorState, GradientState

    fp32 = _losses(train_workspace, tmp_path, "no")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    bf16 = _losses(train_workspace, tmp_path, "bf16")
    assert len(fp32) == len(bf16) == 3
    for ours, reference in zip(bf16, fp32):
        assert ours["loss"] != reference["loss"]  # autocast really ran in bf16
        assert abs(ours["loss"] - reference["loss"]) <= LOSS_RTOL * abs(reference["loss"]), (ours, reference)
        assert abs(ours["grad_norm"] - reference["grad_norm"]) <= GRAD_NORM_RTOL * reference["grad_norm"]
