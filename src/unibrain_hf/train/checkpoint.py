"""Resumable training checkpoints through torch distributed checkpoint, as safetensors and JSON.

A checkpoint ``<output_dir>/checkpoints/step-0000100/`` holds::

    shard-0000R-model-00001-of-00001.safetensors   every rank's shards of the trainable weights,
                                                 their AdamW moments and their EMA, written by
                                                 torch.distributed.checkpoint (DCP) in its
                                                 Hugging Face safetensors storage; the offset of
                                                 each shard is in the file's header
    rank-0000R.json                              that rank's data-stream position
    trainer_state.json                           step, LR-scheduler state, optimizer hyper-parameters,
                                                 the config fingerprint and the process layout a
                                                 resume must match, and the checkpoint's size

Frozen weights are not saved (they come from ``model.pretrained``, which the fingerprint pins).
Every rank writes only its own shards, so a sharded (FSDP2) model is never gathered to save it.
DCP's default ``FileSystemReader`` unpickles a ``.metadata`` file; the Hugging Face storage reader
used here rebuilds the metadata from the safetensors headers instead, so loading a checkpoint
never unpickles anything. No randomness state is saved: every random draw of a step is seeded
from the run seed and the keys of the samples in its pack (see :mod:`.trainer`).

All ranks write into one temporary sibling ``.step-0000100.tmp-<token>`` that rank 0 renames into
place once everyone has finished, then ``latest`` is updated; a run killed mid-save leaves only
that temporary folder, which the next start removes (:func:`remove_orphans`).

    python -c "from unibrain_hf.train.checkpoint import latest_checkpoint; print(latest_checkpoint('runs/x'))"
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import CheckpointError

FORMAT = "unibrain-dcp-1"
STATE_FILE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns on every single-process save/load that it is one; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def human_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


# ------------------------------------------------------------------------------------- finding
def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = Path(output_dir) / "checkpoints"
    pointer = checkpoints / "latest"
    if pointer.exists():
        candidate = checkpoints / pointer.read_text().strip()
        if candidate.exists():
            return candidate
    found = sorted(checkpoints.glob("step-*")) if checkpoints.exists() else []
    return found[-1] if found else None


def resolve_resume(output_dir: str | Path, resume: str | Path) -> Path:
    """The checkpoint ``--resume`` names: ``"auto"`` → the latest one of ``output_dir``, else that folder."""
    if resume == "auto":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint found under {Path(output_dir) / 'checkpoints'}")
        return path
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume: checkpoint folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"--resume: {path} is a file; a checkpoint is a folder (checkpoints/step-NNNNNNN)")
    return path


def remove_orphans(output_dir: str | Path) -> list[Path]:
    """Delete temporary checkpoint folders left by a run killed while saving; return what was removed."""
    checkpoints = Path(output_dir) / "checkpoints"
    orphans = sorted(checkpoints.glob(".step-*.tmp-*")) if checkpoints.exists() else []
    for orphan in orphans:
        shutil.rmtree(orphan, ignore_errors=True)
    return orphans


# ------------------------------------------------------------------------------------- reading
def inspect_checkpoint(path: str | Path) -> dict:
    """Read and check a checkpoint's small files (no tensors): raises :class:`CheckpointError` with the reason."""
    from ..utils.readers import check_safetensors

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {STATE_FILE} (not written by this trainer, "
                              "or damaged)")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {state.get('format')!r}; this trainer reads "
                                  f"{FORMAT!r}")
        world_size = int(state["layout"]["world_size"])
        missing = [_rank_file(r) for r in range(world_size) if not (path / _rank_file(r)).exists()]
        shards = sorted(path.glob("*.safetensors"))
        if missing or not shards:
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing or 'its safetensors shards'}")
        for shard in shards:
            check_safetensors(shard, what="checkpoint shard")
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
    state["path"] = str(path)
    return state


def check_compatible(state: dict, fingerprint: dict, layout: dict) -> None:
    """Refuse a checkpoint written by another configuration or another process layout."""
    path = state["path"]
    if state.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        raise CheckpointError(f"checkpoint {path} was written by a different configuration "
                              f"(stage/model/lora differ): {state.get('fingerprint')} vs {fingerprint}")
    saved = state["layout"]
    different = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if different:
        details = ", ".join(f"{k} {a!r} (checkpoint) vs {b!r} (this run)" for k, (a, b) in different.items())
        raise CheckpointError(f"checkpoint {path} was written with another process layout: {details}. Each rank's "
                              "shards and data position belong to that layout; resume with the same launch "
                              "configuration (number of processes, sharding, DataLoader workers, packs per step)")


def read_rank_state(path: str | Path, rank: int) -> dict:
    try:
        return json.loads((Path(path) / _rank_file(rank)).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {_rank_file(rank)} cannot be read ({exc})") from exc


def load_tensors(path: str | Path, template: dict) -> None:
    """Fill ``template`` (nested dict of tensors / DTensors, this rank's layout) in place from the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        with _single_process_quietly():
            dcp.load(template, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not _distributed())
    except Exception as exc:  # DCP wraps per-rank failures in its own exception types
        raise CheckpointError(f"checkpoint {path} does not fit this run or is corrupt: {exc}") from exc


def read_full_tensors(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` (e.g. ``"model."``, ``"ema."``), gathered to full size, in this process only.

    For reading a checkpoint outside a run (``model.weights``, tests); no process group is used.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    inspect_checkpoint(path)
    reader = HuggingFaceStorageReader(str(path))
    metadata = reader.read_metadata()
    template = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                for key, meta in metadata.state_dict_metadata.items() if key.startswith(prefix)}
    if not template:
        raise CheckpointError(f"checkpoint {path} holds no tensor under {prefix!r}")
    try:
        with _single_process_quietly():
            dcp.load(template, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
    return {key[len(prefix):]: value for key, value in template.items()}


# ------------------------------------------------------------------------------------- writing
def save_checkpoint(output_dir: str | Path, step: int, tensors: dict, trainer_state: dict, rank_state: dict,
                    token: str, keep_last: int = 3) -> tuple[Path, int]:
    """Write a checkpoint collectively (every rank calls this); return its path and size in bytes.

    ``tensors`` is this rank's nested dict of (D)Tensors, ``trainer_state`` the JSON state rank 0
    writes, ``rank_state`` this rank's JSON state; ``token`` names the shared temporary folder and
    must be the same on every rank. utils.atomic's directory helper is per-process, so the same
    build-then-rename is done here with a folder all ranks write into.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    checkpoints = Path(output_dir) / "checkpoints"
    final = checkpoints / checkpoint_name(step)
    tmp = checkpoints / f".{final.name}.tmp-{token}"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        with _single_process_quietly():
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True),
                     no_dist=not _distributed())
        (tmp / _rank_file(rank)).write_text(json.dumps(rank_state, default=_json_default))
        _barrier()
        size = 0
        if rank == 0:
            size = disk_bytes(tmp)
            state = {"format": FORMAT, **trainer_state, "step": step, "disk_bytes": size}
            (tmp / STATE_FILE).write_text(json.dumps(state, default=_json_default))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            latest_tmp = checkpoints / ".latest.tmp"
            latest_tmp.write_text(final.name)
            os.replace(latest_tmp, checkpoints / "latest")
            for old in sorted(checkpoints.glob("step-*"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return final, size


def _json_default(value):
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


__all__ = ["CheckpointError", "checkpoint_name", "latest_checkpoint", "resolve_resume", "remove_orphans",
           "inspect_checkpoint", "check_compatible", "read_rank_state", "load_tensors", "read_full_tensors",
           "save_checkpoint", "disk_bytes", "human_bytes"]
