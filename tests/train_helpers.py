"""Shared pieces of the training tests: a small cohort + starting pipeline, configs, launching runs.

The workspace fixture is session-scoped and imported by tests/test_train*.py, so the phantom
cohort and the bootstrap pipeline are built once per test session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=48", "data.vae_max_size=48", "data.vae_min_size=32", "data.vit_max_size=42",
        "data.vit_min_size=28", "data.expected_num_tokens=256", "data.max_num_tokens=512",
        "data.max_num_tokens_per_sample=512", "data.prefer_buffer_before=128", "train.warmup_steps=1",
        "train.learning_rate=1e-3", "train.log_every=1"]


@pytest.fixture(scope="session")
def train_workspace(tmp_path_factory):
    """A 6-subject phantom cohort and a small starting pipeline (random VAE: tests need speed, not images)."""
    from unibrain_hf.data.phantom.generator import generate_cohort
    from unibrain_hf.train.bootstrap import bootstrap_pipeline

    root = tmp_path_factory.mktemp("train")
    cohort = generate_cohort(root / "cohort", 6, seed=3, voxel_size=6.0)
    init = bootstrap_pipeline(cohort, root / "init", image_size=48, hidden_size=32, layers=2, vae_steps=0,
                              vocab_size=400, log=lambda *_: None)
    return root, cohort, init


def config_values(workspace, stage="unified", **overrides) -> list[str]:
    root, cohort, init = workspace
    values = [f"stage={stage}", f"model.pretrained={init}", f"data.path={cohort}", *TINY, "train.max_steps=4",
              "train.save_every=2", f"train.output_dir={root / 'runs' / stage}"]
    return values + [f"{k}={v}" for k, v in overrides.items()]


def make_config(workspace, stage="unified", **overrides):
    from unibrain_hf.train.config import load_config

    return load_config(None, config_values(workspace, stage, **overrides))


def write_yaml(path: Path, config) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_module(args: list[str]) -> subprocess.Popen:
    """``python -m ...`` in its own session (so a test can kill the whole process tree)."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def accelerate_launch(accelerate_config: str, config_file: Path, *train_args: str,
                      num_processes: int | None = None) -> subprocess.Popen:
    """``accelerate launch --config_file configs/accelerate/<name> -m unibrain_hf.train --config ...``, as a user runs it."""
    script = Path(sys.executable).parent / "accelerate"
    launcher = [str(script), "launch"] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    command = [*launcher, "--config_file", str(REPO / "configs" / "accelerate" / accelerate_config)]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    command += ["-m", "unibrain_hf.train", "--config", str(config_file), *train_args]
    return subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    return output


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process it started (``kill -9`` on the whole run)."""
    import psutil

    try:
        tree = psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.communicate(timeout=60)


def read_metrics(output_dir: Path) -> list[dict]:
    """Per-step records of ``logs/metrics.jsonl``; a line cut short by a kill is skipped."""
    records = []
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def wait_for(condition, process: subprocess.Popen, timeout: float = 300, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{process.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def tree_snapshot(path: Path) -> dict:
    """Every file and folder under ``path`` with its size and modification time (to prove nothing was written)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}
