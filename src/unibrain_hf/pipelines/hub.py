"""Saved UniBrain pipeline directories that load anywhere: shipped code, model card, Hub upload.

A saved or converted directory is a diffusers custom pipeline (diffusers' ``trust_remote_code``
convention), so a machine with only torch, transformers, diffusers and peft loads it::

    DiffusionPipeline.from_pretrained(directory, trust_remote_code=True)   # no unibrain-hf needed
    AutoModel.from_pretrained(f"{directory}/model", trust_remote_code=True)

What :func:`complete_pipeline_directory` adds next to the components (the converter, the
training export and :meth:`UniBrainHubMixin.save_pretrained` all call it, so they write the same):

* ``pipeline.py`` plus the pipeline's modules, flattened into the directory with their package
  imports made relative. The set is the pipeline module's import graph, read from the source at
  save time — nothing lists files by hand. ``model_index.json`` names ``["pipeline", class]``.
* ``model/``: the modeling modules and ``auto_map`` entries for ``AutoConfig`` / ``AutoModel``;
  ``processor/``: the processor's modules. Components written by this package are named in
  ``model_index.json`` by their shipped module (diffusers' custom-component convention).
* ``README.md``: this project's model card (``model_card.md`` in the package) with its metadata
  filled from the model config; ``requirements.txt``: the third-party packages the shipped code
  imports when loaded.

With the package installed, ``UniBrainPipeline.from_pretrained(directory)`` uses the installed
code and needs no ``trust_remote_code`` (see :meth:`UniBrainHubMixin.load_config`).

    python -c "from unibrain_hf.pipelines.hub import shipped_modules; print(*shipped_modules(), sep='\\n')"
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import pprint
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from diffusers.utils import logging

from ..errors import ConfigError, InvalidInputError

logger = logging.get_logger(__name__)

#: The file ``model_index.json``'s ``_class_name`` points at (diffusers' name for a custom pipeline file).
ENTRY_MODULE = "pipeline"
#: Prefix of the file that names a shipped component's class in ``model_index.json`` (``unibrain_model.py``).
COMPONENT_PREFIX = "unibrain_"
#: The pipeline class a converted directory is written for (read from source, not imported).
DEFAULT_PIPELINE = ("unibrain_hf.pipelines.pipeline_unibrain", "UniBrainPipeline")
PACKAGE = "unibrain_hf"
MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card.md")
DEFAULT_BASE_MODEL = "ByteDance-Seed/BAGEL-7B-MoT"
#: Import names whose distribution is named differently (used when the package metadata is unavailable).
_DISTRIBUTION_NAMES = {"PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image", "sklearn": "scikit-learn"}


class ShippingError(ConfigError):
    """The pipeline's code cannot be shipped as remote code (the message names the module and line)."""


# ------------------------------------------------------------------------------------------ import graph
@dataclass
class Module:
    """One module of the package as shipped: where its source is and which package modules it imports."""

    name: str
    path: Path
    is_package: bool
    source: str
    imports: list = field(default_factory=list)  # [(ast node, [(module, asname or None, kind)])]
    module_level_third_party: set = field(default_factory=set)
    data_files: list = field(default_factory=list)


class PackageSource:
    """The source tree of the package the pipeline lives in (installed, or flattened remote code)."""

    def __init__(self, root: str, root_dir: Path):
        self.root, self.root_dir = root, Path(root_dir)

    @classmethod
    def of_module(cls, module_name: str, module_file: str | os.PathLike) -> "PackageSource":
        """The package holding ``module_name``: ``unibrain_hf``, or the flat folder remote code runs from."""
        parts = module_name.split(".")
        root = PACKAGE if parts[0] == PACKAGE else ".".join(parts[:-1])
        depth = len(parts) - len(root.split(".")) - 1
        return cls(root, Path(module_file).resolve().parents[depth])

    @classmethod
    def installed(cls) -> "PackageSource":
        return cls(PACKAGE, Path(__file__).resolve().parents[1])

    def path_of(self, name: str) -> tuple[Path, bool] | None:
        if name != self.root and not name.startswith(self.root + "."):
            return None
        relative = name[len(self.root):].lstrip(".")
        base = self.root_dir.joinpath(*relative.split(".")) if relative else self.root_dir
        if (base / "__init__.py").is_file():
            return base / "__init__.py", True
        if relative and base.with_suffix(".py").is_file():
            return base.with_suffix(".py"), False
        return None

    def contains(self, name: str | None) -> bool:
        return bool(name) and (name == self.root or name.startswith(self.root + "."))


def _is_optional(node: ast.AST, parents: dict) -> bool:
    """Inside ``try: ... except ImportError`` (a guarded optional import) or ``if TYPE_CHECKING:``."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                names = []
                if handler.type is None:
                    return True
                for item in (handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]):
                    names.append(getattr(item, "id", getattr(item, "attr", "")))
                if {"ImportError", "ModuleNotFoundError", "Exception"} & set(names):
                    return True
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test) and child in parent.body:
            return True
        child, parent = parent, parents.get(parent)
    return False


def _in_function(node: ast.AST, parents: dict) -> bool:
    parent = parents.get(node)
    while parent is not None:
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
        parent = parents.get(parent)
    return False


def _read_module(source: PackageSource, name: str) -> Module:
    path, is_package = source.path_of(name)
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if is_package else name.rpartition(".")[0]
    module = Module(name, path, is_package, text)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        optional = _is_optional(node, parents)
        targets = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            if node.level - 1 > len(base) - 1:
                raise ShippingError(f"{path}:{node.lineno}: relative import climbs above the package")
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom):
            target = node.module
        else:
            target = None
        if isinstance(node, ast.ImportFrom):
            if source.contains(target):
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if source.path_of(submodule) is not None:
                        targets.append((submodule, alias.asname or alias.name, "module"))
                    else:
                        targets.append((target, alias, "attribute"))
            elif not optional and not _in_function(node, parents) and not node.level:
                module.module_level_third_party.add(target.split(".")[0])
        else:
            for alias in node.names:
                if source.contains(alias.name):
                    if alias.asname is None and "." in alias.name:
                        raise ShippingError(f"{path}:{node.lineno}: `import {alias.name}` cannot be shipped as "
                                            f"remote code; use `from ... import ...`")
                    targets.append((alias.name, alias.asname or alias.name.rpartition(".")[2], "module"))
                elif not optional and not _in_function(node, parents):
                    module.module_level_third_party.add(alias.name.split(".")[0])
        # Guarded package imports are shipped and rewritten too: diffusers' and transformers' loaders scan
        # every ``from .x import`` line (guarded or not), and a ``from ..x`` line breaks them.
        if targets:
            module.imports.append((node, targets))
    # Data files read next to the module (``Path(__file__).with_name("x.json")``): any sibling non-Python
    # file whose name appears as a string constant in the source.
    siblings = {p.name for p in path.parent.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in siblings:
            module.data_files.append(path.parent / node.value)
    return module


def module_graph(source: PackageSource, *root_modules: str) -> dict[str, Module]:
    """Every package module the roots import, directly or not, at module level or inside functions.

    A package's ``__init__`` is included only when a name (not a submodule) is imported from it.
    """
    modules: dict[str, Module] = {}
    pending = list(root_modules)
    while pending:
        name = pending.pop()
        if name in modules:
            continue
        if source.path_of(name) is None:
            raise ShippingError(f"{name} is imported but has no source file under {source.root_dir}")
        module = modules[name] = _read_module(source, name)
        for _, targets in module.imports:
            pending.extend(target for target, _, _ in targets)
    return modules


def flat_names(modules: dict[str, Module], source: PackageSource) -> dict[str, str]:
    """Module → file stem in the shipped (flat) directory: its own name, or its path when two share a name.

    Modeling modules always keep their names: they are the model's remote code, named in ``auto_map``.
    """
    def stem(name: str, depth: int) -> str:
        relative = name[len(source.root):].lstrip(".").split(".") if name != source.root else [source.root]
        return "_".join(relative[-depth:]) if relative != [""] else source.root.rpartition(".")[2]

    ordered = sorted(modules, key=lambda n: (".modeling." not in f".{n}.", n))
    taken, names = {ENTRY_MODULE}, {}
    for name in ordered:
        depth = 1
        candidate = stem(name, depth)
        while candidate in taken:
            depth += 1
            longer = stem(name, depth)
            if longer == candidate:
                raise ShippingError(f"cannot give {name} a unique file name in the shipped code")
            candidate = longer
        taken.add(candidate)
        names[name] = candidate
    return names


def _rewrite(module: Module, names: dict[str, str]) -> str:
    """The module's source with every package import pointing at its flat sibling (``from .x import y``)."""
    lines = module.source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits = []
    for node, targets in module.imports:
        statements = []
        attributes: dict[str, list] = {}
        for target, alias, kind in targets:
            if kind == "module":
                flat = names[target]
                statements.append(f"from . import {flat}" + (f" as {alias}" if alias != flat else ""))
            else:
                attributes.setdefault(names[target], []).append(alias)
        for flat, aliases in attributes.items():
            parts = [a.name + (f" as {a.asname}" if a.asname else "") for a in aliases]
            statements.append(f"from .{flat} import {', '.join(parts)}")
        start = offsets[node.lineno - 1] + len(lines[node.lineno - 1].encode()[:node.col_offset].decode())
        end = offsets[node.end_lineno - 1] + len(lines[node.end_lineno - 1].encode()[:node.end_col_offset].decode())
        edits.append((start, end, "; ".join(statements)))
    text = module.source
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _requirements(modules: dict[str, Module]) -> list[str]:
    """Third-party distributions the shipped modules import at module level (beyond the standard library)."""
    try:
        from importlib.metadata import packages_distributions

        distributions = packages_distributions()
    except Exception:  # metadata may be unavailable in unusual installs; fall back to import names
        distributions = {}
    wanted = set()
    for module in modules.values():
        for top in module.module_level_third_party:
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            dist = (distributions.get(top) or [_DISTRIBUTION_NAMES.get(top, top)])[0]
            wanted.add(dist.lower())
    return sorted(wanted)


@dataclass
class ShippedCode:
    """The flattened code of one entry module: file name → text, plus the data files it reads."""

    files: dict[str, str]
    names: dict[str, str]
    data_files: dict[str, str]
    requirements: list[str]


def ship_module(source: PackageSource, *root_modules: str) -> ShippedCode:
    """The flattened code of the roots' import graph."""
    modules = module_graph(source, *root_modules)
    names = flat_names(modules, source)
    files = {f"{names[name]}.py": _rewrite(module, names) for name, module in modules.items()}
    data: dict[str, str] = {}
    for module in modules.values():
        for path in module.data_files:
            text = path.read_text(encoding="utf-8")
            if data.get(path.name, text) != text:
                raise ShippingError(f"two different data files are called {path.name}; rename one")
            data[path.name] = text
    return ShippedCode(files, names, data, _requirements(modules))


def shipped_modules(pipeline: tuple[str, str] = DEFAULT_PIPELINE) -> dict[str, str]:
    """Package module → shipped file name, for the pipeline's import graph."""
    code = ship_module(PackageSource.installed(), pipeline[0])
    return {name: f"{flat}.py" for name, flat in sorted(code.names.items())}


def _entry_source(code: ShippedCode, root_module: str, class_name: str) -> str:
    """``pipeline.py``: the file diffusers imports; it names every shipped module so that diffusers copies them."""
    package_version = _package_version()
    modules = sorted(set(code.names.values()))
    listing = "\n".join(f"    from .{name} import __name__ as _  # noqa: F401" for name in modules)
    requirements = ", ".join(code.requirements) or "none"
    return f'''"""{class_name} as remote code: ``DiffusionPipeline.from_pretrained(<this directory>, trust_remote_code=True)``.

Written by unibrain-hf {package_version} when this directory was saved. The modules next to this file
are that package's pipeline code, with the package's imports made relative so that they run
without it. Third-party packages they import when loaded: {requirements} (``requirements.txt``).
"""

import os
import tempfile
from pathlib import Path

#: Data files the modules read next to themselves. diffusers copies only Python files into its
#: module cache, so their text travels here and is written beside this file before the imports.
_DATA_FILES = {pprint.pformat(code.data_files, width=100)}


def _restore_data_files() -> None:
    here = Path(__file__).resolve().parent
    for name, text in _DATA_FILES.items():
        target = here / name
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        handle, temporary = tempfile.mkstemp(dir=here, prefix=f".{{name}}.")
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)  # mkstemp makes the file owner-only; the module cache is shared
        os.replace(temporary, target)


_restore_data_files()

from .{code.names[root_module]} import {class_name}  # noqa: E402


def _modules_for_diffusers() -> None:  # pragma: no cover - never called
    """diffusers copies the modules this file imports relatively, not their imports in turn: all are named here."""
{listing}


__all__ = ["{class_name}"]
'''


def _component_source(component: str, module: str, class_name: str) -> str:
    """``<component>/unibrain_<component>.py``: the file ``model_index.json`` names for a shipped component.

    It takes the class from the module ``pipeline.py`` already loaded, so diffusers (which executes the
    named file again) does not define the class a second time. The import is written ``from . import``
    on purpose: diffusers copies the ``from .x import`` modules of a component file from the component
    folder, and a Hub download of a weights folder fetches only the weights, configs and this file.
    """
    return (f'"""The ``{component}`` component of this pipeline for diffusers\' custom-component loading '
            f'(``model_index.json``).\n\nTakes the class from the module ``pipeline.py`` loaded, so that it is '
            f'defined once.\n"""\n\nfrom . import {module} as _module\n\n'
            f'{class_name} = _module.{class_name}\n\n__all__ = ["{class_name}"]\n')


# ------------------------------------------------------------------------------------------ the directory
def _write_text(path: Path, text: str) -> None:
    from ..utils.atomic import atomic_file

    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _write_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        _write_text(directory / name, text)


def complete_pipeline_directory(directory: str | os.PathLike, pipeline: tuple[str, str] = DEFAULT_PIPELINE,
                                source: PackageSource | None = None, base_model: str | None = None) -> None:
    """Ship the code, point ``model_index.json`` / ``model/config.json`` at it, write the card and requirements.

    ``directory`` already holds the components and a ``model_index.json`` as diffusers writes it
    (components of this package named by their module path). Idempotent.
    """
    directory = Path(directory)
    source = source or PackageSource.installed()
    index_file = directory / "model_index.json"
    index = json.loads(index_file.read_text())
    module_name, class_name = pipeline
    components = {component: value for component, value in index.items()
                  if not component.startswith("_") and isinstance(value, list) and len(value) == 2
                  and source.contains(value[0])}
    # The root holds every module, components' included: their files in the component folders take
    # their classes from what pipeline.py loaded.
    code = ship_module(source, module_name, *(library for library, _ in components.values()))
    _write_files(directory, {**code.files, f"{ENTRY_MODULE}.py": _entry_source(code, module_name, class_name)})
    index["_class_name"] = [ENTRY_MODULE, class_name]
    # diffusers records where the pipeline was loaded from: a local path means nothing to the next user.
    index.pop("_name_or_path", None)
    for component, (library, component_class) in components.items():
        # diffusers' custom component: <component>/<file>.py names the class; the folder also holds the
        # class's own modules (transformers' trust_remote_code loads model/ on its own).
        alias = f"{COMPONENT_PREFIX}{component}"
        if alias in code.names.values():
            raise ShippingError(f"the component file {alias}.py would shadow a module of the same name")
        shipped = {f"{code.names[name]}.py": code.files[f"{code.names[name]}.py"]
                   for name in module_graph(source, library)}
        shipped[f"{alias}.py"] = _component_source(component, code.names[library], component_class)
        _write_files(directory / component, shipped)
        index[component] = [alias, component_class]
        config_file = directory / component / "config.json"
        if config_file.is_file():
            _write_auto_map(config_file, library, component_class, code.names)
    _write_text(index_file, json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_text(directory / "requirements.txt", "\n".join(code.requirements) + "\n")
    _write_text(directory / "README.md", render_model_card(directory, base_model=base_model))


def _write_auto_map(config_file: Path, library: str, class_name: str, names: dict[str, str]) -> None:
    """``auto_map`` so that transformers' ``trust_remote_code`` loading finds the shipped model code."""
    model_class = getattr(importlib.import_module(library), class_name)
    config_class = model_class.config_class
    config = json.loads(config_file.read_text())
    config["auto_map"] = {**(config.get("auto_map") or {}),
                          "AutoConfig": f"{names[config_class.__module__]}.{config_class.__name__}",
                          "AutoModel": f"{names[library]}.{class_name}"}
    _write_text(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("unibrain-hf")
    except Exception:  # running as remote code without the package installed
        return "(version unknown)"


# ------------------------------------------------------------------------------------------ model card
def render_model_card(directory: str | os.PathLike, base_model: str | None = None) -> str:
    """This project's model card with its Hub metadata filled from the directory's model config."""
    from huggingface_hub import ModelCard

    directory = Path(directory)
    card = ModelCard(MODEL_CARD_TEMPLATE.read_text(encoding="utf-8"))
    config_file = directory / "model" / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    card.data.license = "apache-2.0"
    card.data.library_name = "diffusers"
    card.data.pipeline_tag = "image-to-image"
    card.data.base_model = base_model or DEFAULT_BASE_MODEL
    tags = list(card.data.tags or [])
    for tag in ("unibrain-hf", "custom_code"):
        if tag not in tags:
            tags.append(tag)
    card.data.tags = tags
    table = _checkpoint_table(directory, config)
    card.text = card.text.replace("<!-- checkpoint -->", table)
    return str(card)


def _checkpoint_table(directory: Path, config: dict) -> str:
    """Sizes of this checkpoint, read from ``model/config.json`` and the safetensors headers."""
    if not config:
        return ""
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    rows = [("parameters", _parameter_count(directory / "model")),
            ("weights dtype", config.get("dtype") or config.get("torch_dtype") or "float32"),
            ("decoder (per expert)", f"hidden {text.get('hidden_size')}, {text.get('num_hidden_layers')} layers, "
                                     f"{text.get('num_attention_heads')} heads / {text.get('num_key_value_heads')} KV heads, "
                                     f"vocabulary {text.get('vocab_size')}"),
            ("ViT", f"hidden {vision.get('hidden_size')}, {vision.get('num_hidden_layers')} layers, "
                    f"patch {vision.get('patch_size')}"),
            ("latents", f"{config.get('latent_channels')} channels, patch {config.get('latent_patch_size')}, "
                        f"VAE downsample {config.get('vae_downsample')}")]
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def _parameter_count(model_dir: Path) -> str:
    try:
        from safetensors import safe_open

        total = 0
        for path in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="np") as handle:
                for key in handle.keys():
                    count = 1
                    for size in handle.get_slice(key).get_shape():
                        count *= size
                    total += count
    except Exception:  # a card is still useful without the count
        return "unknown"
    return f"{total / 1e9:.2f} B" if total >= 1e8 else f"{total:,}"


# ------------------------------------------------------------------------------------------ the mixin
class UniBrainHubMixin:
    """``save_pretrained`` / ``push_to_hub`` / loading for a ``DiffusionPipeline`` that ships its own code.

    Sits before ``DiffusionPipeline`` in the bases and chains with ``super()``, so other mixins
    (LoRA) can wrap ``save_pretrained`` in turn.
    """

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs):
        """diffusers' ``save_pretrained``, then the shipped code, ``auto_map``, model card and requirements.

        The directory is written under a temporary name and moved into place, so an interrupted
        save leaves no half-written component. ``push_to_hub=True`` uploads the completed folder
        (``repo_id``, ``token``, ``private``, ``commit_message``, ``create_pr`` as in diffusers).
        """
        hub_kwargs = {key: kwargs.pop(key) for key in ("repo_id", "token", "private", "commit_message", "create_pr")
                      if key in kwargs}
        if kwargs.get("safe_serialization", True) is False:
            # A pickle-format save could never be loaded again (loading refuses pickles), so the save
            # stays safetensors: lossless, and what every loader of this package reads.
            logger.warning("save_pretrained(safe_serialization=False): UniBrain pipelines are saved as safetensors "
                           "only (pickle files are never loaded); writing safetensors")
            kwargs["safe_serialization"] = True
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise InvalidInputError(f"save_directory {save_directory} is a file; pass a directory")
        with _staging(save_directory) as staging:
            super().save_pretrained(str(staging), *args, **kwargs)
            complete_pipeline_directory(staging, pipeline=self._shipped_pipeline(), source=self._package_source(),
                                        base_model=self._base_model())
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", save_directory.name)
            return _upload(save_directory, repo_id, default_message=f"Upload {type(self).__name__}", **hub_kwargs)
        return None

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, subfolder: str | None = None):
        """Save into a temporary folder with :meth:`save_pretrained` (this project's card) and upload it.

        diffusers' own ``push_to_hub`` writes its blank card over the saved one, so this does the
        same steps (create the repository, save, upload) with ``huggingface_hub`` directly.
        """
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "pipeline"
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return _upload(folder, repo_id, default_message=f"Upload {type(self).__name__}",
                           commit_message=commit_message, private=private, token=token, create_pr=create_pr,
                           subfolder=subfolder)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config``; for a concrete pipeline class, the shipped code is not needed.

        ``model_index.json`` names the shipped files (``["pipeline", "UniBrainPipeline"]``,
        ``["modeling_unibrain", ...]``), which diffusers would only import with
        ``trust_remote_code=True``. ``UniBrainPipeline.from_pretrained`` already has the code: the
        entries are pointed back at this class and its own modules.
        """
        result = super().load_config(*args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if isinstance(config, dict) and isinstance(config.get("_class_name"), list):
            config["_class_name"] = cls.__name__
            defined_in = _local_modules(cls)
            for component, value in config.items():
                if (not component.startswith("_") and isinstance(value, list) and len(value) == 2
                        and isinstance(value[0], str) and value[0].startswith(COMPONENT_PREFIX)
                        and value[1] in defined_in):
                    module = importlib.import_module(defined_in[value[1]])  # this package's own module
                    config[component] = [module.__name__, value[1]]
        return result

    # ------------------------------------------------------------------ helpers
    @classmethod
    def _shipped_pipeline(cls) -> tuple[str, str]:
        """The class the shipped code exports: the nearest base defined in this package (not a user subclass)."""
        source = cls._package_source()
        for klass in cls.__mro__:
            if source.contains(klass.__module__) and "DiffusionPipeline" in {b.__name__ for b in klass.__mro__[1:]}:
                return klass.__module__, klass.__name__
        raise ShippingError(f"{cls.__name__} has no base class in {source.root} to ship")

    @classmethod
    def _package_source(cls) -> PackageSource:
        module = sys.modules[UniBrainHubMixin.__module__]
        return PackageSource.of_module(module.__name__, module.__file__)

    def _base_model(self) -> str | None:
        """The Hub repository this pipeline was loaded from, if any (a fine-tune's base model)."""
        name = getattr(getattr(self, "config", None), "_name_or_path", None)
        if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
            return name
        return None


def _local_modules(cls) -> dict[str, str]:
    """Shipped component file stem → this installation's module defining the component's class."""
    source = cls._package_source()
    modules = module_graph(source, cls._shipped_pipeline()[0])
    local = {}
    for name, module in modules.items():
        for node in ast.parse(module.source).body:
            if isinstance(node, ast.ClassDef):
                local.setdefault(node.name, name)
    return local


class _staging:
    """Write into a temporary sibling; on success move each written entry into ``final`` (replacing it)."""

    def __init__(self, final: Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                if not self.final.exists():
                    self.final.mkdir()
                for entry in sorted(self.tmp.iterdir()):
                    target = self.final / entry.name
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
                    os.replace(entry, target)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _upload(folder: Path, repo_id: str, default_message: str, commit_message: str | None = None,
            private: bool | None = None, token: str | None = None, create_pr: bool = False,
            subfolder: str | None = None):
    """Create the Hub repository if needed and upload ``folder`` (huggingface_hub's public API)."""
    import huggingface_hub

    repo_id = huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                                         commit_message=commit_message or default_message, create_pr=create_pr,
                                         path_in_repo=subfolder)
