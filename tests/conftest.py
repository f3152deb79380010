"""Shared test setup: offline hub, few threads, the two reference fixtures and a converted copy of the first.

The fixtures ship with the repository (``tests/fixtures/bagel_tiny{,_b}``, each described by its
``README.json``), so a clone anywhere runs the suite.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: on a loaded machine spin-waiting for a descheduled
# partner made tiny calls 40x slower. Read once when OpenMP starts, so set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Remote code loaded with trust_remote_code is copied into a modules cache; keep the suite's own copy
# (set before transformers/diffusers are imported, which read it once).
if "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="unibrain-test-modules-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from unibrain_hf.utils.threads import usable_cores  # noqa: E402

torch.set_num_threads(min(2, usable_cores()))  # the cores this process may use, not the machine's

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "README.json").exists():
        pytest.fail(f"reference fixture {name} not found at {path}; it is part of the repository "
                    f"(tests/fixtures/{name}), check out the whole tree")
    return path


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The main reference fixture (tiny BAGEL checkpoint, a packed batch, an inference trace)."""
    return _fixture("bagel_tiny")


@pytest.fixture(scope="session")
def fixture_dir_b() -> Path:
    """The second reference fixture (other sampler settings, GQA 3:1, 8 latent channels, other sizes)."""
    return _fixture("bagel_tiny_b")


@pytest.fixture(scope="session")
def converted_fixture(fixture_dir, tmp_path_factory) -> Path:
    from unibrain_hf.convert import convert_bagel_checkpoint

    destination = tmp_path_factory.mktemp("converted") / "bagel_tiny"
    convert_bagel_checkpoint(fixture_dir, destination)
    return destination
