"""Every ``python`` / ``bash`` block of README.md runs as written, on what the main job produces.

The working directory is laid out like a checkout after ``unibrain demo --out runs/demo``, built
cheaply: a small phantom cohort at ``runs/demo/cohort`` and a tiny pipeline (the converted reference
fixture) at ``runs/demo/runs/dhs/pipeline``; ``tests/fixtures`` is the repository's. The two set-up
commands are checked against what CI runs instead of being run here (CI runs them).

    python -m pytest tests/test_readme.py -q
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_blocks() -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced block, in order."""
    text = README.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        headings = re.findall(r"^## (.+)$", text[:match.start()], flags=re.MULTILINE)
        blocks.append((headings[-1] if headings else "", match.group(1), match.group(2)))
    return blocks


def test_setup_keeps_exactly_the_two_commands_ci_runs():
    setup = [code.strip() for section, language, code in readme_blocks() if section == "Set up"]
    assert len(setup) == 2
    demo, tests = setup
    assert demo.endswith("unibrain demo --out runs/demo") and demo.startswith("pip install -c constraints.txt")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


@pytest.fixture(scope="module")
def demo_checkout(tmp_path_factory, converted_fixture):
    from unibrain_hf.data.phantom.generator import generate_cohort

    work = tmp_path_factory.mktemp("readme")
    (work / "tests").mkdir()
    (work / "tests" / "fixtures").symlink_to(ROOT / "tests" / "fixtures")
    (work / "configs").symlink_to(ROOT / "configs")
    generate_cohort(work / "runs" / "demo" / "cohort", 6, seed=0, voxel_size=4.0, overwrite=True)
    shutil.copytree(converted_fixture, work / "runs" / "demo" / "runs" / "dhs" / "pipeline")
    return work


def _run(command: list[str], cwd: Path, what: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, f"README block failed ({what}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_every_readme_snippet_runs(demo_checkout):
    blocks = [(section, language, code) for section, language, code in readme_blocks() if section != "Set up"]
    assert {language for _, language, _ in blocks} <= {"python", "bash", "text"}
    # Consecutive python blocks run in one interpreter, each in a fresh namespace, in README order.
    groups = []
    for section, language, code in blocks:
        if language == "python" and groups and groups[-1][0] == "python":
            groups[-1][1].append((section, code))
        elif language in ("python", "bash"):
            groups.append((language, [(section, code)]))
    for language, items in groups:
        if language == "bash":
            (section, code), = items
            _run(["bash", "-euo", "pipefail", "-c", code], demo_checkout, f"{section}: {code.splitlines()[0]}")
        else:
            runner = textwrap.dedent(f"""
                for section, code in {items!r}:
                    exec(compile(code, f"README.md ({{section}})", "exec"), {{"__name__": "__main__"}})
            """)
            _run([sys.executable, "-c", runner], demo_checkout, ", ".join(section for section, _ in items))
    assert (demo_checkout / "checkpoints" / "bagel-tiny" / "pipeline.py").is_file()
    assert (demo_checkout / "runs" / "demo" / "shared" / "README.md").is_file()
    assert (demo_checkout / "runs" / "eval_unified" / "metrics.json").is_file()


def test_no_machine_paths_or_missing_documents_in_tracked_files():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    pattern = re.compile(r"(/work/|/root/|/home/\w|REFERENCE\.md|shared/fixtures)")
    for name in files:
        path = ROOT / name
        if (not path.is_file() or name.startswith("tests/fixtures/") or path.suffix in (".png", ".safetensors")
                or name == "tests/test_readme.py"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not offenders, offenders
