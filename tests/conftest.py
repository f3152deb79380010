"""Shared test setup: offline hub, few threads, the reference fixture and a converted copy of it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

FIXTURE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "bagel_tiny"
if not FIXTURE_DIR.exists():  # CI clones the repository next to shared/
    FIXTURE_DIR = Path(os.environ.get("UNIBRAIN_FIXTURE_DIR", "/work/shared/fixtures/bagel_tiny"))


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE_DIR / "README.json").exists():
        pytest.fail(f"reference fixture not found at {FIXTURE_DIR} (set UNIBRAIN_FIXTURE_DIR)")
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def converted_fixture(fixture_dir, tmp_path_factory) -> Path:
    from unibrain_hf.convert import convert_bagel_checkpoint

    destination = tmp_path_factory.mktemp("converted") / "bagel_tiny"
    convert_bagel_checkpoint(fixture_dir, destination)
    return destination
