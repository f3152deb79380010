"""Bad inputs, one case per class of defect: a package error naming the input, before heavy work, nothing written.

Every case builds its bad input under ``tmp_path``, then calls the public API or a command line.
It checks that the error is one of :mod:`unibrain_hf.errors` (still a ``ValueError`` / ``OSError``),
or, for a command line, exit status 2 with one ``error:`` line and no traceback; that the message
names the input (file, key, flag); that no heavy work started (building the model, ``torch.load``,
``datasets.load_dataset``, the pipeline's image encoding all fail the test if reached); and that
nothing was written next to the input or at the output location.

Cases marked ``xfail(strict=True, reason="owned elsewhere: ...")`` describe how another part of
the package must behave; when they start passing, pytest reports them as XPASS(strict) failures:
remove the mark.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_bad_inputs.py -q
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import tiny_model
from unibrain_hf import UniBrainForConditionalGeneration, UniBrainProcessor
from unibrain_hf.data.schema import RADGENOME_ARROW_SCHEMA, SPLIT_FILE_NAME, SubjectRecord, write_cohort
from unibrain_hf.errors import (ConfigError, CorruptFileError, InputFileNotFoundError, InvalidInputError,
                                OutputExistsError, UniBrainError, UnsafeFileError)

CLI = "exit status 2"  # the expected outcome of a command-line case
FAST = dict(num_inference_steps=2, max_new_tokens=2)
PIPELINE = "pipeline contract (pipelines/)"
# diffusers loads components in an order that varies between runs, so a damaged vae/ or tokenizer/
# must be found by a check of the whole directory before the first component is loaded
# (utils.readers.check_pipeline_directory), not by whichever component loader happens to run first.
PIPELINE_DIR = f"{PIPELINE}: check the directory before loading any component"
HUB = "Hub loading and conversion (modeling/configuration_unibrain.py, convert/)"
TRAINING = "training configs and checkpoints (train/)"
LORA = "LoRA loading (pipelines/lora.py, train/lora.py)"


# --------------------------------------------------------------------------- shared inputs
class Env:
    """Good inputs, built once per module; cases copy what they damage into their own tmp_path."""

    def __init__(self, root: Path, pipeline_dir: Path, fixture_dir: Path):
        self.root, self.pipeline_dir, self.fixture_dir = root, pipeline_dir, fixture_dir
        model = tiny_model()
        self.model_dir = root / "model"
        model.save_pretrained(self.model_dir)
        self.shards_dir = root / "shards"
        model.save_pretrained(self.shards_dir, max_shard_size="600KB")
        assert (self.shards_dir / "model.safetensors.index.json").exists()
        rng = np.random.default_rng(0)
        records = [SubjectRecord(f"S-{i}", {c: rng.uniform(0.1, 1, (4, 16, 16)).astype(np.float32)
                                            for c in ("t1n", "t2f")}, impression="x", disease=["glioma"])
                   for i in range(4)]
        self.cohort = write_cohort(records, root / "cohort", subjects_per_file=2,
                                   split={"train": ["S-0", "S-1"], "val": ["S-2"], "test": ["S-3"]})
        self.nifti = root / "nifti"
        for subject in ("A-1", "B-2"):
            (self.nifti / subject).mkdir(parents=True)
            for code in ("t1n", "t2f"):
                volume = rng.uniform(1, 100, (12, 12, 6)).astype(np.float32)
                nib.save(nib.Nifti1Image(volume, np.eye(4)), self.nifti / subject / f"{subject}-{code}.nii.gz")
        self.reports = root / "reports.csv"
        self.reports.write_text("subject_id,impression,diagnosis\nA-1,mass,glioma\nB-2,normal,normal\n")
        self.volume = root / "volume.nii.gz"
        nib.save(nib.Nifti1Image(rng.uniform(1, 100, (16, 16, 6)).astype(np.float32), np.eye(4)), self.volume)
        self.cache = root / "hf-cache"  # outside every case's tmp_path
        self._pipe = None

    @property
    def pipe(self):
        if self._pipe is None:
            from unibrain_hf import UniBrainPipeline

            self._pipe = UniBrainPipeline.from_pretrained(str(self.pipeline_dir))
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe


@pytest.fixture(scope="module")
def env(tmp_path_factory, converted_fixture, fixture_dir):
    return Env(tmp_path_factory.mktemp("bad-inputs"), converted_fixture, fixture_dir)


def copy(source: Path, tmp: Path, name: str | None = None) -> Path:
    destination = tmp / (name or source.name)
    (shutil.copytree if source.is_dir() else shutil.copy)(source, destination)
    return destination


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def damaged_gzip(path: Path) -> Path:
    path.write_bytes(b"\x1f\x8b\x08\x00" + np.random.default_rng(0).bytes(2000))
    return path


class RunsCode:
    """Unpickling this runs ``touch <sentinel>``: a pickle that must never be opened."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def malicious_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps(RunsCode(path.parent / "PWNED")))
    return path


def pickled_state_dict(path: Path) -> Path:
    torch.save({"weight": torch.zeros(2)}, path)
    return path


def run_cli(main: Callable | None, *argv) -> tuple[int, str]:
    """A command line run in-process: (exit status, stderr + stdout)."""
    if main is None:
        from unibrain_hf.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue() + out.getvalue()


def unibrain(*argv):
    return lambda: run_cli(None, *argv)


def train_cli(*argv):
    from unibrain_hf.train.__main__ import main

    return lambda: run_cli(main, *argv)


# --------------------------------------------------------------------------- the case table
@dataclass
class Case:
    setup: Callable  # (env, tmp_path) -> a thunk that triggers the bad input
    error: type | str  # the package error expected, or CLI
    names: tuple[str, ...]  # what the message must name
    heavy_ok: bool = False  # the failure legitimately comes after datasets/pipeline work (data errors on access)
    before_components: bool = False  # a pipeline directory must be checked before any component is loaded
    code: int | None = 2  # CLI exit status (None: any non-zero)


CASES: list = []


def case(case_id: str, error, *names: str, owner: str | None = None, **options):
    def register(setup):
        marks = [pytest.mark.xfail(strict=True, reason=f"owned elsewhere: {owner}")] if owner else []
        CASES.append(pytest.param(Case(setup, error, names, **options), id=case_id, marks=marks))
        return setup
    return register


# ---- loading weights: UniBrainForConditionalGeneration.from_pretrained
@case("model-dir-missing", InputFileNotFoundError, "no_model")
def _(env, tmp):
    return lambda: UniBrainForConditionalGeneration.from_pretrained(tmp / "no_model")


@case("model-path-is-a-file", InvalidInputError, "model.safetensors")
def _(env, tmp):
    path = copy(env.model_dir / "model.safetensors", tmp)
    return lambda: UniBrainForConditionalGeneration.from_pretrained(path)


@case("model-pickle-only", UnsafeFileError, "pytorch_model.bin", "safetensors")
def _(env, tmp):
    model_dir = copy(env.model_dir, tmp)
    (model_dir / "model.safetensors").unlink()
    pickled_state_dict(model_dir / "pytorch_model.bin")
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


@case("model-malicious-pickle", UnsafeFileError, "pytorch_model.bin")
def _(env, tmp):
    model_dir = copy(env.model_dir, tmp)
    (model_dir / "model.safetensors").unlink()
    malicious_pickle(model_dir / "pytorch_model.bin")
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


@case("model-pickle-named-safetensors", UnsafeFileError, "model.safetensors", "pickle")
def _(env, tmp):
    model_dir = copy(env.model_dir, tmp)
    malicious_pickle(model_dir / "model.safetensors")
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


@case("model-safetensors-truncated", CorruptFileError, "model.safetensors", "truncated")
def _(env, tmp):
    model_dir = copy(env.model_dir, tmp)
    truncate(model_dir / "model.safetensors")
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


@case("model-shard-missing", InputFileNotFoundError, "model-00002-of-00002.safetensors")
def _(env, tmp):
    model_dir = copy(env.shards_dir, tmp)
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


@case("model-shard-truncated", CorruptFileError, "model-00001-of-00002.safetensors")
def _(env, tmp):
    model_dir = copy(env.shards_dir, tmp)
    truncate(model_dir / "model-00001-of-00002.safetensors")
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


@case("model-shard-index-not-json", CorruptFileError, "model.safetensors.index.json", "line 1")
def _(env, tmp):
    model_dir = copy(env.shards_dir, tmp)
    (model_dir / "model.safetensors.index.json").write_text("{not json")
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


@case("model-config-not-json", CorruptFileError, "config.json", "line 1")
def _(env, tmp):
    model_dir = copy(env.model_dir, tmp)
    (model_dir / "config.json").write_text('{"model_type": "unibrain",,}')
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


@case("model-config-duplicate-key", CorruptFileError, "config.json", "duplicate key 'model_type'")
def _(env, tmp):
    model_dir = copy(env.model_dir, tmp)
    text = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(text.replace("{", '{"model_type": "llama",', 1))
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


@case("model-config-missing", InputFileNotFoundError, "config.json")
def _(env, tmp):
    model_dir = copy(env.model_dir, tmp)
    (model_dir / "config.json").unlink()
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


@case("model-use-safetensors-false", InvalidInputError, "use_safetensors")
def _(env, tmp):
    return lambda: UniBrainForConditionalGeneration.from_pretrained(env.model_dir, use_safetensors=False)


@case("model-config-without-text-config", ConfigError, "text_config")
def _(env, tmp):
    model_dir = copy(env.model_dir, tmp)
    config = json.loads((model_dir / "config.json").read_text())
    del config["text_config"]  # today: the default 22.9 B-parameter text model is built
    (model_dir / "config.json").write_text(json.dumps(config))
    return lambda: UniBrainForConditionalGeneration.from_pretrained(model_dir)


# ---- loading a pipeline directory (the model folder goes through the classmethod above)
def load_pipeline(path):
    from unibrain_hf import UniBrainPipeline

    return lambda: UniBrainPipeline.from_pretrained(str(path))


@case("pipeline-model-truncated", CorruptFileError, "model.safetensors")
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    truncate(pipeline_dir / "model" / "model.safetensors")
    return load_pipeline(pipeline_dir)


@case("pipeline-model-pickle-only", UnsafeFileError, "pytorch_model.bin")
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    (pipeline_dir / "model" / "model.safetensors").unlink()
    malicious_pickle(pipeline_dir / "model" / "pytorch_model.bin")
    return load_pipeline(pipeline_dir)


@case("pipeline-dir-missing", InputFileNotFoundError, "no_pipeline", before_components=True)
def _(env, tmp):
    return load_pipeline(tmp / "no_pipeline")


@case("pipeline-vae-pickle-only", UnsafeFileError, "diffusion_pytorch_model.bin",
      before_components=True)
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    (pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    malicious_pickle(pipeline_dir / "vae" / "diffusion_pytorch_model.bin")
    return load_pipeline(pipeline_dir)


@case("pipeline-vae-truncated", CorruptFileError, "diffusion_pytorch_model.safetensors",
      before_components=True)
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    truncate(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors")
    return load_pipeline(pipeline_dir)


@case("pipeline-index-not-json", CorruptFileError, "model_index.json", before_components=True)
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    (pipeline_dir / "model_index.json").write_text("{oops")
    return load_pipeline(pipeline_dir)


@case("pipeline-tokenizer-damaged", CorruptFileError, "tokenizer.json", before_components=True)
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    truncate(pipeline_dir / "tokenizer" / "tokenizer.json")
    return load_pipeline(pipeline_dir)


# ---- UniBrainProcessor.from_pretrained (processor_config.json and the tokenizer next to it)
def processor_with(env, tmp, **changes):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    config_file = pipeline_dir / "processor" / "processor_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))
    return lambda: UniBrainProcessor.from_pretrained(pipeline_dir / "processor")


@case("processor-dir-missing", InputFileNotFoundError, "no_processor")
def _(env, tmp):
    return lambda: UniBrainProcessor.from_pretrained(tmp / "no_processor")


@case("processor-config-missing", InputFileNotFoundError, "processor_config.json")
def _(env, tmp):
    (tmp / "processor").mkdir()
    return lambda: UniBrainProcessor.from_pretrained(tmp / "processor")


@case("processor-config-not-json", CorruptFileError, "processor_config.json", "line 1")
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    (pipeline_dir / "processor" / "processor_config.json").write_text("{")
    return lambda: UniBrainProcessor.from_pretrained(pipeline_dir / "processor")


@case("processor-config-unknown-key", ConfigError, "processor_config.json", "vae_max_szie")
def _(env, tmp):
    return processor_with(env, tmp, vae_max_szie=512)


@case("processor-config-wrong-type", ConfigError, "processor_config.json", "vae_stride")
def _(env, tmp):
    return processor_with(env, tmp, vae_stride="sixteen")


@case("processor-config-bool-for-int", ConfigError, "processor_config.json", "vit_patch_size")
def _(env, tmp):
    return processor_with(env, tmp, vit_patch_size=True)


@case("processor-config-min-above-max", ConfigError, "vae_min_size", "vae_max_size")
def _(env, tmp):
    return processor_with(env, tmp, vae_min_size=1024, vae_max_size=64)


@case("processor-config-other-class", ConfigError, "processor_class", "CLIPProcessor")
def _(env, tmp):
    return processor_with(env, tmp, processor_class="CLIPProcessor")


@case("processor-tokenizer-damaged", CorruptFileError, "tokenizer.json", "line")
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    truncate(pipeline_dir / "tokenizer" / "tokenizer.json")
    return lambda: UniBrainProcessor.from_pretrained(pipeline_dir / "processor")


@case("processor-argument-out-of-range", InvalidInputError, "vae_stride")
def _(env, tmp):
    return lambda: UniBrainProcessor(None, vae_stride=0)


# ---- the readers themselves (every file format has one)
@case("yaml-syntax-error", CorruptFileError, "cfg.yaml", "line 4")
def _(env, tmp):
    from unibrain_hf.utils.readers import read_yaml

    (tmp / "cfg.yaml").write_text("train:\n  max_steps: 3\n  lr: [1,\n")
    return lambda: read_yaml(tmp / "cfg.yaml")


@case("yaml-duplicate-key", CorruptFileError, "cfg.yaml", "duplicate key 'train'")
def _(env, tmp):
    from unibrain_hf.utils.readers import read_yaml

    (tmp / "cfg.yaml").write_text("train:\n  max_steps: 3\ndata:\n  path: x\ntrain:\n  seed: 1\n")
    return lambda: read_yaml(tmp / "cfg.yaml")


@case("json-not-utf8", CorruptFileError, "settings.json", "UTF-8")
def _(env, tmp):
    from unibrain_hf.utils.readers import read_json

    (tmp / "settings.json").write_bytes(b'{"a": "\xff\xfe"}')
    return lambda: read_json(tmp / "settings.json")


@case("nifti-damaged", CorruptFileError, "images['t1n']", "bad.nii.gz")
def _(env, tmp):
    from unibrain_hf.utils.readers import read_nifti

    path = damaged_gzip(tmp / "bad.nii.gz")
    return lambda: read_nifti(path, "images['t1n']")


@case("nifti-truncated", CorruptFileError, "short.nii.gz", "truncated")
def _(env, tmp):
    from unibrain_hf.utils.readers import read_nifti

    path = truncate(copy(env.volume, tmp, "short.nii.gz"), 0.6)
    return lambda: read_nifti(path)


@case("nifti-wrong-suffix", InvalidInputError, "slice.png", "NIfTI")
def _(env, tmp):
    from unibrain_hf.utils.readers import read_nifti

    (tmp / "slice.png").write_bytes(b"\x89PNG")
    return lambda: read_nifti(tmp / "slice.png")


@case("safetensors-file-is-a-pickle", UnsafeFileError, "ema.bin", "safetensors")
def _(env, tmp):
    from unibrain_hf.utils.readers import read_safetensors

    path = malicious_pickle(tmp / "ema.bin")
    return lambda: read_safetensors(path)


# ---- datasets loader: load_radgenome / iter_subject_records
def load_radgenome(*args, **kwargs):
    from unibrain_hf.data.radgenome import load_radgenome as load

    return lambda: load(*args, **kwargs)


@case("cohort-missing", InputFileNotFoundError, "no_cohort")
def _(env, tmp):
    return load_radgenome(tmp / "no_cohort", cache_dir=env.cache)


@case("cohort-empty-dir", InputFileNotFoundError, "empty", "*.parquet")
def _(env, tmp):
    (tmp / "empty").mkdir()
    return load_radgenome(tmp / "empty", cache_dir=env.cache)


@case("cohort-empty-file-list", InvalidInputError, "data_files_or_dir")
def _(env, tmp):
    return load_radgenome([], cache_dir=env.cache)


@case("cohort-not-a-path", InvalidInputError, "data_files_or_dir")
def _(env, tmp):
    return load_radgenome(None, cache_dir=env.cache)


@case("cohort-not-parquet-file", InvalidInputError, SPLIT_FILE_NAME, ".parquet")
def _(env, tmp):
    return load_radgenome(copy(env.cohort / SPLIT_FILE_NAME, tmp), cache_dir=env.cache)


@case("cohort-missing-columns", "SchemaError", "chunk_0.parquet", "mask")
def _(env, tmp):
    (tmp / "c").mkdir()
    pq.write_table(pa.table({"subject_id": ["a"]}), tmp / "c" / "chunk_0.parquet")
    return load_radgenome(tmp / "c", cache_dir=env.cache)


@case("cohort-wrong-column-type", "SchemaError", "chunk_0.parquet", "impression")
def _(env, tmp):
    columns = {f.name: pa.array([], type=f.type) for f in RADGENOME_ARROW_SCHEMA}
    columns["impression"] = pa.array([], type=pa.list_(pa.int64()))
    (tmp / "c").mkdir()
    pq.write_table(pa.table(columns), tmp / "c" / "chunk_0.parquet")
    return load_radgenome(tmp / "c", cache_dir=env.cache)


@case("cohort-parquet-damaged", CorruptFileError, "chunk_0.parquet")
def _(env, tmp):
    cohort = copy(env.cohort, tmp)
    (cohort / "chunk_0.parquet").write_bytes(np.random.default_rng(0).bytes(3000))
    return load_radgenome(cohort, cache_dir=env.cache)


@case("cohort-parquet-truncated-streaming", CorruptFileError, "chunk_1.parquet")
def _(env, tmp):
    cohort = copy(env.cohort, tmp)
    truncate(cohort / "chunk_1.parquet")
    return load_radgenome(cohort, streaming=True)


@case("cohort-records-truncated", CorruptFileError, "chunk_1.parquet")
def _(env, tmp):
    from unibrain_hf.data.radgenome import iter_subject_records

    cohort = copy(env.cohort, tmp)
    truncate(cohort / "chunk_1.parquet")
    return lambda: iter_subject_records(cohort)  # the call reports it, before any subject is read


@case("cohort-split-file-missing", InputFileNotFoundError, SPLIT_FILE_NAME)
def _(env, tmp):
    cohort = copy(env.cohort, tmp)
    (cohort / SPLIT_FILE_NAME).unlink()
    return load_radgenome(cohort, split="train", cache_dir=env.cache)


@case("cohort-split-file-not-json", CorruptFileError, SPLIT_FILE_NAME, "line 1")
def _(env, tmp):
    cohort = copy(env.cohort, tmp)
    (cohort / SPLIT_FILE_NAME).write_text("{")
    return load_radgenome(cohort, split="train", cache_dir=env.cache)


@case("cohort-split-file-wrong-structure", "SchemaError", SPLIT_FILE_NAME)
def _(env, tmp):
    cohort = copy(env.cohort, tmp)
    (cohort / SPLIT_FILE_NAME).write_text('{"train": "S-0"}')
    return load_radgenome(cohort, split="train", cache_dir=env.cache)


@case("cohort-unknown-split", InvalidInputError, "'validation'", "['test', 'train', 'val']")
def _(env, tmp):
    return load_radgenome(env.cohort, split="validation", cache_dir=env.cache)


@case("cohort-split-not-a-name", InvalidInputError, "split", "int")
def _(env, tmp):
    return load_radgenome(env.cohort, split=1, cache_dir=env.cache)


@case("cohort-row-bytes-do-not-match-shape", "SchemaError", "S-0", "'t1n'", heavy_ok=True)
def _(env, tmp):
    from unibrain_hf.data.radgenome import load_radgenome as load

    rows = pq.read_table(env.cohort / "chunk_0.parquet").to_pylist()
    rows[0]["image_list"][0] = rows[0]["image_list"][0][:-8]
    (tmp / "c").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=RADGENOME_ARROW_SCHEMA), tmp / "c" / "chunk_0.parquet")
    dataset = load(tmp / "c", cache_dir=env.cache)  # rows are decoded when read
    return lambda: dataset[0]


@case("cohort-write-over-existing", OutputExistsError, "cohort", "overwrite=True")
def _(env, tmp):
    (tmp / "cohort").mkdir()
    (tmp / "cohort" / "keep.txt").write_text("x")
    record = SubjectRecord("S", {"t1n": np.ones((2, 4, 4), np.float32)})
    return lambda: write_cohort([record], tmp / "cohort")


@case("cohort-write-complex-volume", "SchemaError", "'t1n'", "complex")
def _(env, tmp):
    record = SubjectRecord("S", {"t1n": np.ones((2, 4, 4), np.complex64)})
    return lambda: write_cohort([record], tmp / "cohort")


# ---- cohort preparation: prepare_cohort and `unibrain prepare`
def prepare(env, tmp, reports=None, out=None, **kwargs):
    from unibrain_hf.data.prepare import prepare_cohort

    return lambda: prepare_cohort(kwargs.pop("input_dir", env.nifti), reports or env.reports,
                                  out or tmp / "out", **kwargs)


def reports_file(tmp: Path, name: str, text: str | bytes) -> Path:
    path = tmp / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


@case("prepare-input-missing", InputFileNotFoundError, "input_dir", "no_input")
def _(env, tmp):
    return prepare(env, tmp, input_dir=tmp / "no_input")


@case("prepare-reports-missing", InputFileNotFoundError, "reports", "nope.csv")
def _(env, tmp):
    return prepare(env, tmp, reports=tmp / "nope.csv")


@case("prepare-reports-unknown-column", InvalidInputError, "bad.csv", "finding_swi")
def _(env, tmp):
    return prepare(env, tmp, reports=reports_file(tmp, "bad.csv", "subject_id,finding_swi\nA-1,x\n"))


@case("prepare-reports-no-subject-column", InvalidInputError, "noid.csv", "subject_id")
def _(env, tmp):
    return prepare(env, tmp, reports=reports_file(tmp, "noid.csv", "id,impression\nA-1,x\n"))


@case("prepare-reports-duplicate-subject", InvalidInputError, "twice.csv", "line 3", "'A-1'")
def _(env, tmp):
    return prepare(env, tmp, reports=reports_file(tmp, "twice.csv", "subject_id,impression\nA-1,x\nA-1,y\n"))


@case("prepare-reports-not-utf8", CorruptFileError, "latin1.csv", "UTF-8")
def _(env, tmp):
    return prepare(env, tmp, reports=reports_file(tmp, "latin1.csv", b"subject_id,impression\nA-1,\xe9d\xe8me\n"))


@case("prepare-reports-json-invalid", CorruptFileError, "reports.json", "line 1")
def _(env, tmp):
    return prepare(env, tmp, reports=reports_file(tmp, "reports.json", '{"A-1": {"impression": "x",}}'))


@case("prepare-reports-wrong-format", InvalidInputError, "reports.txt", ".csv")
def _(env, tmp):
    return prepare(env, tmp, reports=reports_file(tmp, "reports.txt", "x"))


@case("prepare-output-exists", OutputExistsError, "out_dir", "overwrite=True")
def _(env, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("x")
    return prepare(env, tmp)


@case("prepare-output-inside-input", InvalidInputError, "out_dir", "input_dir")
def _(env, tmp):
    nifti = copy(env.nifti, tmp)
    return prepare(env, tmp, input_dir=nifti, out=nifti / "cohort")


@case("prepare-split-fractions", InvalidInputError, "split_fractions", "summing to 1")
def _(env, tmp):
    return prepare(env, tmp, split_fractions=(0.5, 0.5, 0.5))


@case("prepare-keep-pattern-regex", InvalidInputError, "keep_pattern", "(GLI")
def _(env, tmp):
    return prepare(env, tmp, hash_subject_ids=True, keep_pattern="(GLI")


@case("prepare-subjects-per-file", InvalidInputError, "subjects_per_file")
def _(env, tmp):
    return prepare(env, tmp, subjects_per_file=0)


@case("prepare-every-volume-damaged", "PrepareError", "A-1-t1n.nii.gz", "B-2-t2f.nii.gz", "damaged")
def _(env, tmp):
    nifti = copy(env.nifti, tmp)
    for path in nifti.rglob("*.nii.gz"):
        damaged_gzip(path) if "A-1" in path.name else truncate(path)
    return prepare(env, tmp, input_dir=nifti)


@case("prepare-volume-damaged", CorruptFileError, "t1n.nii.gz", "damaged")
def _(env, tmp):
    from unibrain_hf.data.prepare import load_volume

    path = damaged_gzip(tmp / "t1n.nii.gz")
    return lambda: load_volume(path)


@case("prepare-volume-complex", "VolumeError", "phase.nii.gz", "complex")
def _(env, tmp):
    from unibrain_hf.data.prepare import load_volume

    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.complex64), np.eye(4)), tmp / "phase.nii.gz")
    return lambda: load_volume(tmp / "phase.nii.gz")


@case("prepare-cli-output-exists", CLI, "OUT_DIR", "--overwrite")
def _(env, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("x")
    return unibrain("prepare", env.nifti, tmp / "out", "--reports", env.reports)


@case("prepare-cli-reports-missing", CLI, "--reports", "nope.csv")
def _(env, tmp):
    return unibrain("prepare", env.nifti, tmp / "out", "--reports", tmp / "nope.csv")


@case("prepare-cli-split", CLI, "--split")
def _(env, tmp):
    return unibrain("prepare", env.nifti, tmp / "out", "--reports", env.reports, "--split", "0.5", "0.5", "0.5")


@case("prepare-cli-keep-pattern-without-hash", CLI, "--keep-pattern", "--hash-ids")
def _(env, tmp):
    return unibrain("prepare", env.nifti, tmp / "out", "--reports", env.reports, "--keep-pattern", "(A)")


@case("prepare-cli-nifti-out-exists", CLI, "--nifti-out", "--overwrite")
def _(env, tmp):
    (tmp / "review").mkdir()
    (tmp / "review" / "keep.txt").write_text("x")
    return unibrain("prepare", env.nifti, tmp / "out", "--reports", env.reports, "--nifti-out", tmp / "review")


@case("prepare-cli-subjects-per-file", CLI, "--subjects-per-file")
def _(env, tmp):
    return unibrain("prepare", env.nifti, tmp / "out", "--reports", env.reports, "--subjects-per-file", "0")


# ---- `unibrain phantom`
@case("phantom-cli-subjects", CLI, "--subjects")
def _(env, tmp):
    return unibrain("phantom", tmp / "out", "--subjects", "0")


@case("phantom-cli-size", CLI, "--size", "'big'")
def _(env, tmp):
    return unibrain("phantom", tmp / "out", "--size", "big")


@case("phantom-cli-field", CLI, "--field")
def _(env, tmp):
    return unibrain("phantom", tmp / "out", "--field", "2")


@case("phantom-cli-seed", CLI, "--seed")
def _(env, tmp):
    return unibrain("phantom", tmp / "out", "--seed", "-1")


@case("phantom-cli-output-exists", CLI, "OUT_DIR", "--overwrite")
def _(env, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("x")
    return unibrain("phantom", tmp / "out", "--subjects", "1", "--size", "8")


@case("phantom-cli-output-is-a-file", CLI, "OUT_DIR", "a file")
def _(env, tmp):
    (tmp / "out").write_text("x")
    return unibrain("phantom", tmp / "out", "--subjects", "1", "--size", "8")


# ---- `unibrain eval`: every flag before the cohort is read or the pipeline loaded
def evaluate(env, tmp, *extra, pipeline=None, cohort=None, task="generation",
             modalities=("--modalities-in", "t1n", "--modalities-out", "t2f")):
    return unibrain("eval", "--pipeline", pipeline or env.pipeline_dir, "--cohort", cohort or env.cohort,
                    "--task", task, *modalities, "--out", tmp / "eval", *extra)


@case("eval-pipeline-missing", CLI, "--pipeline", "no_pipeline")
def _(env, tmp):
    return evaluate(env, tmp, pipeline=tmp / "no_pipeline")


@case("eval-pipeline-not-a-pipeline", CLI, "--pipeline", "model_index.json")
def _(env, tmp):
    (tmp / "folder").mkdir()
    return evaluate(env, tmp, pipeline=tmp / "folder")


@case("eval-pipeline-index-not-json", CLI, "--pipeline", "model_index.json", "line 1")
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    (pipeline_dir / "model_index.json").write_text("{")
    return evaluate(env, tmp, pipeline=pipeline_dir)


@case("eval-pipeline-weights-truncated", CLI, "--pipeline", "model.safetensors", "truncated")
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    truncate(pipeline_dir / "model" / "model.safetensors")
    return evaluate(env, tmp, pipeline=pipeline_dir)


@case("eval-pipeline-vae-pickle", CLI, "--pipeline", "diffusion_pytorch_model.bin")
def _(env, tmp):
    pipeline_dir = copy(env.pipeline_dir, tmp)
    (pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    malicious_pickle(pipeline_dir / "vae" / "diffusion_pytorch_model.bin")
    return evaluate(env, tmp, pipeline=pipeline_dir)


@case("eval-cohort-missing", CLI, "--cohort", "no_cohort")
def _(env, tmp):
    return evaluate(env, tmp, cohort=tmp / "no_cohort")


@case("eval-cohort-damaged", CLI, "chunk_0.parquet", "damaged")
def _(env, tmp):
    cohort = copy(env.cohort, tmp)
    (cohort / "chunk_0.parquet").write_bytes(np.random.default_rng(0).bytes(3000))
    return evaluate(env, tmp, cohort=cohort)


@case("eval-unknown-modality", CLI, "--modalities-out", "t9x")
def _(env, tmp):
    return evaluate(env, tmp, modalities=("--modalities-in", "t1n", "--modalities-out", "t9x"))


@case("eval-repeated-modality", CLI, "--modalities-in", "t1n")
def _(env, tmp):
    return evaluate(env, tmp, modalities=("--modalities-in", "t1n", "t1n", "--modalities-out", "t2f"))


@case("eval-unknown-split", CLI, "--split", "holdout")
def _(env, tmp):
    return evaluate(env, tmp, "--split", "holdout")


@case("eval-out-not-empty", CLI, "--out", "--overwrite")
def _(env, tmp):
    (tmp / "eval").mkdir()
    (tmp / "eval" / "keep.txt").write_text("x")
    return evaluate(env, tmp)


@case("eval-rules-missing", CLI, "--rules", "rules.json")
def _(env, tmp):
    return evaluate(env, tmp, "--rules", tmp / "rules.json")


@case("eval-rules-not-json", CLI, "--rules", "rules.json", "line 1")
def _(env, tmp):
    (tmp / "rules.json").write_text("{rules")
    return evaluate(env, tmp, "--rules", tmp / "rules.json")


@case("eval-replaced-by-empty", CLI, "--replaced-by", "generated")
def _(env, tmp):
    (tmp / "generated").mkdir()
    return evaluate(env, tmp, "--replaced-by", tmp / "generated", task="diagnosis",
                    modalities=("--modalities-in", "t1n"))


@case("eval-device-unknown", CLI, "--device", "gpu0")
def _(env, tmp):
    return evaluate(env, tmp, "--device", "gpu0")


@case("eval-steps", CLI, "--steps")
def _(env, tmp):
    return evaluate(env, tmp, "--steps", "1")


@case("eval-flag-for-another-task", CLI, "--replaced-by", "--task diagnosis")
def _(env, tmp):
    return evaluate(env, tmp, "--replaced-by", tmp)


# ---- pipeline inputs (owned by the pipeline contract)
def call_pipe(env, images, **kwargs):
    kwargs.setdefault("target_modalities", ["t2w"])
    pipe = env.pipe  # loaded before the tripwires are armed: only the call is under test
    return lambda: pipe(images=images, **{**FAST, **kwargs})


def mri_slice():
    return np.random.default_rng(0).normal(100, 30, (32, 32)).astype(np.float32)


@case("pipe-string-array", InvalidInputError, "images['t1n']")
def _(env, tmp):
    return call_pipe(env, {"t1n": np.array([["a", "b"], ["c", "d"]])})


@case("pipe-complex-array", InvalidInputError, "images['t1n']", "complex")
def _(env, tmp):
    return call_pipe(env, {"t1n": mri_slice().astype(np.complex64)})


@case("pipe-nifti-damaged", CorruptFileError, "images['t1n']", "bad.nii.gz")
def _(env, tmp):
    return call_pipe(env, {"t1n": str(damaged_gzip(tmp / "bad.nii.gz"))}, slice_index=2)


@case("pipe-nifti-truncated", CorruptFileError, "images['t1n']", "short.nii.gz")
def _(env, tmp):
    return call_pipe(env, {"t1n": str(truncate(copy(env.volume, tmp, "short.nii.gz"), 0.6))}, slice_index=2)


@case("pipe-nifti-missing", InputFileNotFoundError, "images['t1n']", "nope.nii.gz")
def _(env, tmp):
    return call_pipe(env, {"t1n": str(tmp / "nope.nii.gz")}, slice_index=2)


@case("pipe-nan-slice", InvalidInputError, "images['t1n']", "NaN")
def _(env, tmp):
    image = mri_slice()
    image[0, 0] = np.nan
    return call_pipe(env, {"t1n": image})


@case("pipe-unknown-task", InvalidInputError, "task", "segment")
def _(env, tmp):
    return call_pipe(env, {"t1n": mri_slice()}, task="segment")


@case("pipe-slice-index-out-of-range", InvalidInputError, "slice_index", "images['t1n']")
def _(env, tmp):
    return call_pipe(env, {"t1n": str(env.volume)}, slice_index=99)


@case("pipe-impute-volume-damaged", CorruptFileError, "nifti_in['t1n']", "bad.nii.gz")
def _(env, tmp):
    path = damaged_gzip(tmp / "bad.nii.gz")
    pipe = env.pipe
    return lambda: pipe.impute_volume({"t1n": str(path)}, ["t2w"], num_inference_steps=2)


# ---- LoRA adapters
def load_adapter(env, path):
    pipe = env.pipe
    load = getattr(pipe, "load_lora_weights", None) or pipe.load_lora
    return lambda: load(str(path))


@case("lora-dir-missing", InputFileNotFoundError, "no_adapter")
def _(env, tmp):
    return load_adapter(env, tmp / "no_adapter")


@case("lora-pickle-only", UnsafeFileError, "adapter_model.bin")
def _(env, tmp):
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                                      "target_modules": ["q_proj"]}))
    malicious_pickle(tmp / "adapter" / "adapter_model.bin")
    return load_adapter(env, tmp / "adapter")


# ---- `unibrain convert`
def convert(fixture_dir, tmp, *extra, src=None):
    return unibrain("convert", src or fixture_dir, tmp / "converted", *extra)


@case("convert-output-exists", CLI, "--overwrite", code=None)
def _(env, tmp):
    (tmp / "converted").mkdir()
    (tmp / "converted" / "keep.txt").write_text("x")
    return convert(env.fixture_dir, tmp)


@case("convert-weights-missing", CLI, "--weights", "nope.safetensors", code=None)
def _(env, tmp):
    return convert(env.fixture_dir, tmp, "--weights", tmp / "nope.safetensors")


@case("convert-weights-pickle", CLI, "--weights", "ema.bin", "pickle", code=None)
def _(env, tmp):
    return convert(env.fixture_dir, tmp, "--weights", malicious_pickle(tmp / "ema.bin"))


@case("convert-weights-truncated", CLI, "--weights", "ema.safetensors", code=None)
def _(env, tmp):
    weights = truncate(copy(env.fixture_dir / "ema.safetensors", tmp))
    return convert(env.fixture_dir, tmp, "--weights", weights)


@case("convert-no-weights-names-flag", CLI, "--weights", code=None)
def _(env, tmp):
    source = tmp / "bagel"
    source.mkdir()
    for path in env.fixture_dir.iterdir():
        if path.name not in ("ema.safetensors", "model.safetensors"):
            (source / path.name).symlink_to(path)
    return convert(env.fixture_dir, tmp, src=source)


@case("convert-shard-size", CLI, "--max-shard-size-gb", code=None)
def _(env, tmp):
    return convert(env.fixture_dir, tmp, "--max-shard-size-gb", "0")


# ---- training configs (`python -m unibrain_hf.train`)
def train_config(env, tmp, text: str = "", **sections) -> Path:
    import yaml

    config = {"stage": "unified", "model": {"pretrained": str(env.pipeline_dir)},
              "data": {"path": str(env.cohort), "image_size": 32, "vae_max_size": 32, "vae_min_size": 32,
                       "vit_max_size": 28, "vit_min_size": 28},
              "train": {"max_steps": 1, "warmup_steps": 0, "output_dir": str(tmp / "run"), "export_pipeline": False}}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = tmp / "cfg.yaml"
    path.write_text(text or yaml.safe_dump(config))
    return path


@case("train-config-missing", CLI, "nope.yaml")
def _(env, tmp):
    return train_cli("--config", tmp / "nope.yaml")


@case("train-config-unknown-key", CLI, "train.max_stepz")
def _(env, tmp):
    return train_cli("--config", train_config(env, tmp, train={"max_stepz": 3}), "--print-config")


@case("train-config-string-for-int", CLI, "train.max_steps")
def _(env, tmp):
    return train_cli("--config", train_config(env, tmp, train={"max_steps": "ten"}), "--print-config")


@case("train-config-bool-for-int", CLI, "train.max_steps")
def _(env, tmp):
    return train_cli("--config", train_config(env, tmp, train={"max_steps": True}), "--print-config")


@case("train-config-negative-learning-rate", CLI, "train.learning_rate")
def _(env, tmp):
    return train_cli("--config", train_config(env, tmp, train={"learning_rate": -0.001}), "--print-config")


@case("train-config-float-for-int", CLI, "train.warmup_steps")
def _(env, tmp):
    return train_cli("--config", train_config(env, tmp, train={"warmup_steps": 2.5}), "--print-config")


@case("train-config-probability-above-one", CLI, "data.text_dropout")
def _(env, tmp):
    return train_cli("--config", train_config(env, tmp, data={"text_dropout": 1.5}), "--print-config")


@case("train-config-yaml-syntax", CLI, "cfg.yaml", "line")
def _(env, tmp):
    return train_cli("--config", train_config(env, tmp, "train:\n  max_steps: [1,\n"), "--print-config")


@case("train-config-not-a-mapping", CLI, "cfg.yaml")
def _(env, tmp):
    return train_cli("--config", train_config(env, tmp, "- stage\n- unified\n"), "--print-config")


@case("train-weights-pickle", CLI, "model.weights", "w.bin")
def _(env, tmp):
    weights = malicious_pickle(tmp / "w.bin")
    return train_cli("--config", train_config(env, tmp, model={"weights": str(weights)}))


@case("train-weights-missing", CLI, "model.weights", "nope.safetensors")
def _(env, tmp):
    return train_cli("--config", train_config(env, tmp, model={"weights": str(tmp / "nope.safetensors")}))


@case("train-resume-missing-folder", CLI, "step-0000999", "does not exist", code=3)
def _(env, tmp):
    return train_cli("--config", train_config(env, tmp), "--resume", tmp / "run" / "checkpoints" / "step-0000999")


# --------------------------------------------------------------------------- the test
class HeavyWork(AssertionError):
    """Raised by the guards: work started before the bad input was reported."""


@pytest.fixture
def guard(monkeypatch):
    """Arm tripwires on every kind of heavy work; ``arm(heavy_ok=True)`` leaves data loading allowed."""
    import datasets

    from unibrain_hf.pipelines.pipeline_unibrain import UniBrainPipeline

    def tripwire(what):
        def fail(*args, **kwargs):
            raise HeavyWork(f"{what} started before the bad input was reported")
        return fail

    def arm(heavy_ok: bool = False, before_components: bool = False):
        monkeypatch.setattr(UniBrainForConditionalGeneration, "__init__", tripwire("building the model"))
        monkeypatch.setattr(torch, "load", tripwire("torch.load (opening a pickle)"))
        monkeypatch.setattr(pickle, "load", tripwire("pickle.load"))
        monkeypatch.setattr(pickle, "loads", tripwire("pickle.loads"))
        if before_components:
            import diffusers.pipelines.pipeline_utils

            monkeypatch.setattr(diffusers.pipelines.pipeline_utils, "load_sub_model",
                                tripwire("loading a pipeline component"))
        if not heavy_ok:
            monkeypatch.setattr(datasets, "load_dataset", tripwire("datasets.load_dataset"))
            monkeypatch.setattr(UniBrainPipeline, "encode_images", tripwire("image encoding"))
    return arm


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_reported_early_by_name(case: Case, env, tmp_path, guard):
    trigger = case.setup(env, tmp_path)
    before = snapshot(tmp_path)
    guard(heavy_ok=case.heavy_ok, before_components=case.before_components)
    if case.error == CLI:
        code, output = trigger()
        assert "Traceback" not in output
        assert (code != 0) if case.code is None else (code == case.code), output
        errors = [line for line in output.splitlines() if "error" in line]
        assert errors, output
        message = "\n".join(errors)
    else:
        with pytest.raises(Exception) as raised:
            trigger()
        error = raised.value
        if isinstance(error, HeavyWork):
            raise error
        expected = case.error if isinstance(case.error, type) else None
        assert isinstance(error, UniBrainError), f"{type(error).__name__} is not a package error: {error}"
        assert isinstance(error, (ValueError, OSError))
        if expected is not None:
            assert isinstance(error, expected), f"{type(error).__name__}: {error}"
        else:
            assert type(error).__name__ == case.error, f"{type(error).__name__}: {error}"
        message = str(error)
    for name in case.names:
        assert name in message, f"the message does not name {name!r}: {message}"
    assert snapshot(tmp_path) == before, "something was written next to the inputs or at the output"
    assert not (tmp_path / "PWNED").exists()


def test_one_target_modality_as_a_string_is_one_target(env):
    """``target_modalities="t2w"`` is either one target or an error naming the argument, never 't', '2', 'w'."""
    try:
        out = env.pipe(images={"t1n": mri_slice()}, target_modalities="t2w", output_type="np", **FAST)
    except InvalidInputError as error:
        assert "target_modalities" in str(error)
    else:  # one bare target: ``out.images`` is that target's batch, as in diffusers
        assert not isinstance(out.images, dict) and len(out.images) == 1


def test_every_error_type_is_documented_with_an_example():
    import unibrain_hf.errors as errors

    from unibrain_hf.data.prepare import PrepareError, VolumeError
    from unibrain_hf.data.schema import SchemaError

    page = (Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md").read_text()
    for error in [getattr(errors, name) for name in errors.__all__] + [SchemaError, PrepareError, VolumeError]:
        assert f"`{error.__name__}`" in page, f"docs/ERRORS.md does not describe {error.__name__}"
        if error is not errors.UniBrainError:
            assert f"\n{error.__name__}: " in page or f"  {error.__name__}: " in page, \
                f"docs/ERRORS.md has no example message of {error.__name__}"


def test_the_model_loader_works_without_the_package(env, tmp_path, monkeypatch):
    """modeling/ ships as Hub remote code: ``from_pretrained`` must work where ``unibrain_hf`` cannot be imported."""
    import builtins

    real_import = builtins.__import__

    def without_package(name, *args, **kwargs):
        if name.startswith("unibrain_hf"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_package)
    assert isinstance(UniBrainForConditionalGeneration.from_pretrained(env.model_dir),
                      UniBrainForConditionalGeneration)
    with pytest.raises(FileNotFoundError) as raised:
        UniBrainForConditionalGeneration.from_pretrained(tmp_path / "missing")
    assert not isinstance(raised.value, UniBrainError)  # the built-in fallback, named by path
    assert "missing" in str(raised.value)
