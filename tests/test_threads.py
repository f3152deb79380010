"""Thread count from the CPU affinity: the helper, the ``unibrain`` CLI flag and the training entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from train_helpers import make_config
from train_helpers import train_workspace  # noqa: F401  (a fixture)

from unibrain_hf.errors import InvalidInputError
from unibrain_hf.utils.threads import configure_threads, default_threads, usable_cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_follows_affinity_and_local_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert usable_cores() == 4 and default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # three training processes share the four cores
    assert default_threads() == 1


def test_configure_threads(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    # Without an explicit count it never raises torch's own setting (a caller's choice stays in force).
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert configure_threads() == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert configure_threads() == 1 and torch.get_num_threads() == 1  # pinned to one core
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert configure_threads() == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidInputError, match="--threads"):
            configure_threads(bad)


def _probe(args: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    """Run a CLI with torch.set_num_threads recorded (the command itself fails fast on purpose)."""
    code = ("import sys, torch, runpy; calls = []; real = torch.set_num_threads\n"
            "def spy(n): calls.append(n); real(n)\n"
            "torch.set_num_threads = spy\n"
            f"sys.argv = {args!r}\n"
            "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('THREADS', torch.get_num_threads(), calls)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)


def test_cli_threads_flag(tmp_path):
    # `unibrain phantom --threads 1 ...` sets one thread before the command runs.
    done = _probe(["unibrain_hf.cli", "phantom", str(tmp_path / "cohort"), "--subjects", "1", "--size", "2",
                   "--threads", "1"], {})
    assert "THREADS 1" in done.stdout, done.stdout + done.stderr
    bad = _probe(["unibrain_hf.cli", "phantom", str(tmp_path / "c2"), "--threads", "0"], {})
    assert "--threads must be a positive integer" in bad.stderr


def test_training_entry_point_threads(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  vae: v\n  tokenizer: t\ntrain:\n  max_steps: 300\n")
    shown = subprocess.run([sys.executable, "-m", "unibrain_hf.train", "--config", str(config), "--threads", "1",
                            "--print-config"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert '"threads": 1' in shown.stdout
    bad = subprocess.run([sys.executable, "-m", "unibrain_hf.train", "--config", str(config), "--threads", "0"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "--threads" in bad.stderr


def test_trainer_sets_train_threads(train_workspace, restore_threads):  # noqa: F811
    from unibrain_hf.train.trainer import Trainer

    torch.set_num_threads(2)
    Trainer(make_config(train_workspace, **{"train.threads": 1}), progress=False)
    assert torch.get_num_threads() == 1
