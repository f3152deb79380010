"""Saved and converted pipeline directories load anywhere: shipped code, model card, Hub upload.

The "fresh environment" here is a real one, built cheaply: a folder of links to only the
installed distributions that torch, transformers, diffusers and peft need (plus the saved
directory's ``requirements.txt``), run with ``python -S`` so that nothing else — this package
included — can be imported.

    python -m pytest tests/test_hub.py -q
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from unibrain_hf.pipelines import hub
from unibrain_hf.pipelines.hub import PackageSource, module_graph, ship_module, shipped_modules

HUB_STACK = ("torch", "transformers", "diffusers", "peft")
SITE_PACKAGES = Path(torch.__file__).resolve().parents[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dependency_closure(names) -> set[str]:
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen, pending = set(), list(names)
    while pending:
        name = _canonical(pending.pop())
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen.add(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen


def fresh_site(folder: Path, distributions) -> Path:
    """Links to the installed files of ``distributions`` (and their dependencies) only."""
    from importlib.metadata import distribution

    site = folder / "site"
    site.mkdir(parents=True)
    for name in sorted(_dependency_closure(distributions)):
        dist = distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if top.endswith((".pth", ".virtualenv")) or not source.exists() or (site / top).exists():
                continue
            (site / top).symlink_to(source)
    return site


def run_fresh(tmp_path: Path, code: str, extra_requirements=()) -> subprocess.CompletedProcess:
    site = fresh_site(tmp_path / "env", (*HUB_STACK, *extra_requirements))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


GENERATE = """
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(2)
    from diffusers import DiffusionPipeline
    from transformers import AutoModel
    assert "unibrain_hf" not in sys.modules
    try:
        import unibrain_hf
        raise SystemExit("unibrain_hf is importable in the fresh environment")
    except ImportError:
        pass
    model = AutoModel.from_pretrained(sys.argv[1] + "/model", trust_remote_code=True)
    pipe = DiffusionPipeline.from_pretrained(sys.argv[2], trust_remote_code=True)
    image = (np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)
    out = pipe(images={"t1n": image}, target_modalities=["t2w"], task="generation", num_inference_steps=2,
               max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    print(json.dumps({"model": type(model).__module__, "pipeline": type(pipe).__module__,
                      "component": type(pipe.model).__module__, "size": list(out.images["t2w"][0].size),
                      "nibabel": "nibabel" in sys.modules}))
"""


def _requirements(directory: Path) -> list[str]:
    return [line for line in (directory / "requirements.txt").read_text().split() if line]


def hub_download_shape(directory: Path, destination: Path) -> Path:
    """What diffusers' Hub download fetches of a pipeline repository: from a folder with weights only the
    weights, configs and the component file named in model_index.json (the root's modules arrive
    through pipeline.py's imports)."""
    import shutil

    shutil.copytree(directory, destination)
    index = json.loads((directory / "model_index.json").read_text())
    for component, value in index.items():
        folder = destination / component
        if component.startswith("_") or not folder.is_dir() or not list(folder.glob("*.safetensors")):
            continue
        for path in folder.glob("*.py"):
            if path.stem != value[0]:
                path.unlink()
    return destination


def test_converter_output_loads_and_generates_without_the_package(converted_fixture, tmp_path):
    hub_like = hub_download_shape(converted_fixture, tmp_path / "hub_like")
    assert not (hub_like / "model" / "modeling_unibrain.py").exists()
    code = GENERATE.replace("sys.argv[1]", repr(str(converted_fixture))).replace("sys.argv[2]", repr(str(hub_like)))
    result = run_fresh(tmp_path, code, extra_requirements=_requirements(converted_fixture))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"].startswith("transformers_modules.")
    assert report["pipeline"].startswith("diffusers_modules.") and report["component"].startswith("diffusers_modules.")
    assert report["size"] == [40, 48]
    assert not report["nibabel"]  # NIfTI support is imported only when a NIfTI is given


def test_shipped_code_needs_only_the_hub_stack(converted_fixture):
    allowed = _dependency_closure(HUB_STACK)
    assert {_canonical(r) for r in _requirements(converted_fixture)} <= allowed


def test_every_package_module_the_pipeline_imports_is_shipped(converted_fixture, tmp_path):
    """Runs the pipeline like a user and compares what it imported with what a saved directory carries."""
    code = f"""
        import json, sys
        import numpy as np, torch
        from unibrain_hf import UniBrainPipeline
        pipe = UniBrainPipeline.from_pretrained({str(converted_fixture)!r})
        image = (np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)
        pipe(images={{"t1n": image}}, target_modalities=["t2w"], num_inference_steps=2, max_new_tokens=3)
        pipe(images={{"t1n": image}}, task="diagnosis", max_new_tokens=3)
        pipe.save_pretrained({str(tmp_path / "saved")!r})
        print(json.dumps(sorted(name for name, module in sys.modules.items()
                                if name.startswith("unibrain_hf.") and module is not None
                                and not getattr(module, "__path__", None))))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = set(json.loads(result.stdout.strip().splitlines()[-1]))
    shipped = set(shipped_modules())
    assert "unibrain_hf.pipelines.pipeline_unibrain" in imported
    assert imported <= shipped, f"imported but not shipped: {sorted(imported - shipped)}"
    files = {p.name for p in (tmp_path / "saved").glob("*.py")}
    assert {Path(name).name for name in shipped_modules().values()} | {"pipeline.py"} == files


def test_import_graph_flattening_on_a_synthetic_package(tmp_path):
    """Relative/absolute/lazy/guarded imports, a name clash, a package attribute and a data file."""
    root = tmp_path / "src" / "pkg"
    files = {
        "__init__.py": "",
        "sub/__init__.py": "NAME = 'from-init'\n",
        "sub/helper.py": ("from pathlib import Path\n"
                          "VALUE = Path(__file__).with_name('words.txt').read_text().strip()\n"),
        "sub/words.txt": "hello\n",
        "other/__init__.py": "",
        "other/helper.py": "OTHER = 4\n",
        "other/lazy.py": "LAZY = 5\n",
        "unused.py": "raise RuntimeError('never imported')\n",
        "main.py": ("from .sub import helper\n"
                    "from .sub import NAME\n"
                    "from pkg.other.helper import OTHER\n"
                    "try:\n    from ..outside import nothing\nexcept (ImportError, ValueError):\n    nothing = None\n"
                    "def lazy():\n    from .other.lazy import LAZY\n    return LAZY\n"),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    with pytest.raises(hub.ShippingError, match="climbs above the package"):
        ship_module(PackageSource("pkg", root), "pkg.main")
    (root / "main.py").write_text(files["main.py"].replace("from ..outside import nothing", "import json as nothing"))
    code = ship_module(PackageSource("pkg", root), "pkg.main")
    assert set(code.names) == {"pkg.main", "pkg.sub", "pkg.sub.helper", "pkg.other.helper", "pkg.other.lazy"}
    assert len(set(code.names.values())) == 5  # the two "helper" modules get distinct file names
    assert code.data_files == {"words.txt": "hello\n"}
    flat = tmp_path / "flat" / "shipped"
    flat.mkdir(parents=True)
    (flat / "__init__.py").write_text("")
    (flat / "words.txt").write_text("hello\n")
    for name, text in code.files.items():
        assert "from .." not in text and "pkg." not in text, name
        (flat / name).write_text(text)
    check = ("import shipped.main as m; print(m.helper.VALUE, m.NAME, m.OTHER, m.lazy())")
    result = subprocess.run([sys.executable, "-S", "-c", check], capture_output=True, text=True,
                            cwd=tmp_path / "flat", timeout=60)
    assert result.stdout.split() == ["hello", "from-init", "4", "5"], result.stderr


def test_installed_package_loads_a_directory_with_its_own_code(converted_fixture):
    from diffusers import DiffusionPipeline

    from unibrain_hf import UniBrainPipeline, UniBrainProcessor
    from unibrain_hf.modeling.modeling_unibrain import UniBrainForConditionalGeneration

    index = json.loads((converted_fixture / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "UniBrainPipeline"]
    assert index["model"] == ["unibrain_model", "UniBrainForConditionalGeneration"]
    pipe = UniBrainPipeline.from_pretrained(converted_fixture)  # no trust_remote_code needed
    assert type(pipe) is UniBrainPipeline
    assert type(pipe.model) is UniBrainForConditionalGeneration and type(pipe.processor) is UniBrainProcessor
    # diffusers' generic loader runs the shipped code only when asked to.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(converted_fixture)
    remote = DiffusionPipeline.from_pretrained(converted_fixture, trust_remote_code=True)
    assert type(remote).__name__ == "UniBrainPipeline" and type(remote).__module__.startswith("diffusers_modules.")


def _shipped_files(directory: Path) -> dict[str, str]:
    wanted = [p for p in directory.rglob("*") if p.is_file() and (
        p.suffix == ".py" or p.name in ("model_index.json", "requirements.txt", "README.md"))]
    return {str(p.relative_to(directory)): p.read_text() for p in wanted}


def test_save_pretrained_writes_what_the_converter_writes(converted_fixture, tmp_path):
    from unibrain_hf import UniBrainPipeline

    UniBrainPipeline.from_pretrained(converted_fixture).save_pretrained(tmp_path / "saved")
    assert _shipped_files(tmp_path / "saved") == _shipped_files(converted_fixture)
    for directory in (converted_fixture, tmp_path / "saved"):
        config = json.loads((directory / "model" / "config.json").read_text())
        assert config["auto_map"] == {"AutoConfig": "configuration_unibrain.UniBrainConfig",
                                      "AutoModel": "modeling_unibrain.UniBrainForConditionalGeneration"}


def test_a_failed_save_leaves_the_destination_as_it_was(converted_fixture, tmp_path, monkeypatch):
    from unibrain_hf import UniBrainPipeline

    pipe = UniBrainPipeline.from_pretrained(converted_fixture)
    destination = tmp_path / "saved"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub, "complete_pipeline_directory", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        pipe.save_pretrained(destination)
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary folder left behind
    assert [p.name for p in destination.iterdir()] == ["notes.txt"]


def test_model_card_and_push_to_hub_upload_this_projects_card(converted_fixture, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import ModelCard

    from unibrain_hf import UniBrainPipeline

    uploads = []

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def create_repo(repo_id, private=None, token=None, exist_ok=False, **_):
        assert exist_ok
        uploads.append({"created": repo_id, "private": private})
        return Repo(repo_id)

    def upload_folder(repo_id, folder_path, commit_message=None, create_pr=False, path_in_repo=None, **_):
        folder = Path(folder_path)
        uploads.append({"repo_id": repo_id, "message": commit_message, "create_pr": create_pr,
                        "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
                        "card": (folder / "README.md").read_text()})
        return "https://huggingface.co/me/unibrain-test/commit/0"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    pipe = UniBrainPipeline.from_pretrained(converted_fixture)
    pipe.push_to_hub("me/unibrain-test", private=True, create_pr=True)
    created, upload = uploads
    assert created == {"created": "me/unibrain-test", "private": True}
    assert upload["create_pr"] and upload["message"] == "Upload UniBrainPipeline"
    assert {"README.md", "pipeline.py", "requirements.txt", "model_index.json", "model/unibrain_model.py",
            "model/modeling_unibrain.py", "model/config.json", "model/model.safetensors",
            "processor/unibrain_processor.py"} <= set(upload["files"])
    card = ModelCard(upload["card"])
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == "ByteDance-Seed/BAGEL-7B-MoT"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "image-to-image"
    assert {"unibrain-hf", "custom_code", "brain-mri"} <= set(card.data.tags)
    from safetensors.torch import load_file

    stored = sum(t.numel() for t in load_file(converted_fixture / "model" / "model.safetensors").values())
    assert f"| parameters | {stored:,} |" in card.text  # filled from the saved weights
    hidden = pipe.model.config.text_config.hidden_size
    assert f"hidden {hidden}, {pipe.model.config.text_config.num_hidden_layers} layers" in card.text
    assert "<!-- checkpoint -->" not in card.text

    # save_pretrained(push_to_hub=True) uploads the same completed folder; a Hub base model is recorded.
    uploads.clear()
    pipe.register_to_config(_name_or_path="someone/unibrain-s3")
    pipe.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/other")
    assert uploads[1]["repo_id"] == "me/other" and "pipeline.py" in uploads[1]["files"]
    assert ModelCard((tmp_path / "local" / "README.md").read_text()).data.base_model == "someone/unibrain-s3"


def test_shipped_modules_are_derived_from_the_pipeline_source():
    graph = module_graph(PackageSource.installed(), hub.DEFAULT_PIPELINE[0])
    shipped = shipped_modules()
    assert set(graph) == set(shipped)
    for required in ("unibrain_hf.pipelines.pipeline_unibrain", "unibrain_hf.modeling.modeling_unibrain",
                     "unibrain_hf.processing.processor", "unibrain_hf.pipelines.hub"):
        assert required in shipped
    assert shipped["unibrain_hf.modeling.modeling_unibrain"] == "modeling_unibrain.py"


def test_package_data_covers_every_data_file():
    """A wheel carries every non-Python file of the package and the metric modules (not packages)."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["unibrain_hf"]
    package = root / "src" / "unibrain_hf"
    needed = [p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts and (
        p.suffix != ".py" or not (p.parent / "__init__.py").exists())]
    missing = [str(p.relative_to(package)) for p in needed
               if not any(fnmatch.fnmatch(str(p.relative_to(package)), pattern) for pattern in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
