"""Resumable training checkpoints, written atomically and without pickles.

A checkpoint directory ``<output_dir>/checkpoints/step-0000100/`` holds::

    model.safetensors        all model weights (LoRA runs: the adapter-wrapped model's weights)
    ema.safetensors          the EMA shadow of the trainable weights
    optimizer.safetensors    AdamW moments (+ optimizer.json: param groups, hyper-parameters)
    rng.safetensors          torch CPU (and CUDA) generator states
    trainer_state.json       step, LR-scheduler state, python/numpy RNG states, data position,
                             and the config fingerprint a resume must match

It is written into a temporary sibling directory and renamed into place, then ``latest`` is
updated, so an interrupted save never leaves a half-written checkpoint behind. Everything is
safetensors or JSON: loading a checkpoint never unpickles anything.

    python -c "from unibrain_hf.train.checkpoint import latest_checkpoint; print(latest_checkpoint('runs/x'))"
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..utils.atomic import atomic_directory


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or was written by a different configuration."""


def _optimizer_to_flat(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py_state = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(output_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], ema_state: dict | None,
                    optimizer, scheduler, data_state: dict | None, fingerprint: dict, keep_last: int = 3) -> Path:
    checkpoints = Path(output_dir) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step-{step:07d}"
    with atomic_directory(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        if ema_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_meta, "data": data_state,
                 "fingerprint": fingerprint}
        (tmp / "trainer_state.json").write_text(json.dumps(state, default=_json_default))
    latest_tmp = checkpoints / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, checkpoints / "latest")
    for old in sorted(checkpoints.glob("step-*"))[:-keep_last] if keep_last else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = Path(output_dir) / "checkpoints"
    pointer = checkpoints / "latest"
    if pointer.exists():
        candidate = checkpoints / pointer.read_text().strip()
        if candidate.exists():
            return candidate
    found = sorted(checkpoints.glob("step-*")) if checkpoints.exists() else []
    return found[-1] if found else None


def load_checkpoint(path: str | Path, fingerprint: dict) -> dict:
    """Read a checkpoint (no side effects yet); raises :class:`CheckpointError` with the reason."""
    path = Path(path)
    required = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
                "trainer_state.json"]
    missing = [name for name in required if not (path / name).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        result = {
            "step": int(state["step"]), "scheduler": state["scheduler"], "rng_meta": state["rng"],
            "data": state.get("data"), "model": load_file(str(path / "model.safetensors")),
            "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").exists() else None,
            "optimizer": _optimizer_from_flat(load_file(str(path / "optimizer.safetensors")),
                                              json.loads((path / "optimizer.json").read_text())),
            "rng": load_file(str(path / "rng.safetensors")),
        }
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
    except Exception as exc:  # safetensors raises its own error type on damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
    if state.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        raise CheckpointError(f"checkpoint {path} was written by a different configuration "
                              f"(stage/model/lora differ): {state.get('fingerprint')} vs {fingerprint}")
    return result


def restore_rng(checkpoint: dict) -> None:
    _restore_rng(checkpoint["rng"], checkpoint["rng_meta"])
