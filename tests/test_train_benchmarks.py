"""The GPU MFU benchmark runs unchanged on the CPU in its dry-run mode and reports a consistent result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mfu_benchmark_dry_run(tmp_path):
    out = tmp_path / "mfu.json"
    env = {**os.environ, "UNIBRAIN_PEAK_TFLOPS": "2"}
    completed = subprocess.run([sys.executable, "benchmarks/bench_train_mfu.py", "--dry-run", "--json", str(out)],
                               cwd=REPO, capture_output=True, text=True, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu") and result["optimizer"]
    assert result["pack_tokens"] == sum(result["sample_lens"]) > 0
    assert result["flops_per_step"] > 0 and result["active_parameters_per_token"] < result["parameters"]
    assert result["peak_tflops"] == 2.0
    expected = result["flops_per_step"] / result["median_step_s"] / 2e12
    assert abs(result["mfu"] - expected) <= 1e-12 and result["mfu"] > 0
    assert all(loss == loss for loss in result["losses"])  # finite
    assert "MFU" in completed.stderr
