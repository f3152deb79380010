"""A small default phantom cohort, generated on first use and reused afterwards.

Demos, tests and benchmarks need *a* cohort without anyone running ``unibrain phantom``
first, and the cohort is never committed as data. :func:`ensure_default_cohort` writes
it under the package cache - ``$UNIBRAIN_CACHE`` if set, else ``~/.cache/unibrain_hf`` -
in ``phantom/<parameters>-<hash>/``, where the hash covers every generation parameter and
the generator version, so a changed generator never serves a stale cohort.

    python -m unibrain_hf.data.phantom.cache
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from ..schema import SPLIT_FILE_NAME
from .anatomy import check_voxel_size
from .generator import INFO_FILE_NAME, PHANTOM_VERSION, check_subject_count, generate_cohort
from .tissue import check_field_strength

CACHE_ENV_VAR = "UNIBRAIN_CACHE"
DEFAULT_COHORT_SUBJECTS = 24  # four subjects of each of the six classes


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The package cache: ``cache_dir``, else ``$UNIBRAIN_CACHE``, else ``~/.cache/unibrain_hf``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "unibrain_hf"


def default_cohort_dir(cache_dir: str | os.PathLike | None = None, num_subjects: int = DEFAULT_COHORT_SUBJECTS,
                       seed: int = 0, voxel_size: float = 4.0, field_strength: float = 3.0) -> Path:
    """Where :func:`ensure_default_cohort` keeps the cohort with these parameters."""
    params = {"version": PHANTOM_VERSION, "num_subjects": check_subject_count(num_subjects), "seed": int(seed),
              "voxel_size": check_voxel_size(voxel_size), "field_strength": check_field_strength(field_strength)}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    name = f"n{params['num_subjects']}-seed{params['seed']}-{params['voxel_size']:g}mm-{params['field_strength']:g}T-{digest}"
    return cache_root(cache_dir) / "phantom" / name


def is_complete_cohort(path: Path) -> bool:
    """True when ``path`` holds a finished phantom cohort (parquet, split and info files)."""
    return (path / SPLIT_FILE_NAME).is_file() and (path / INFO_FILE_NAME).is_file() and any(path.glob("chunk_*.parquet"))


@contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (POSIX); elsewhere, proceed unlocked."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX platforms
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_default_cohort(cache_dir: str | os.PathLike | None = None, num_subjects: int = DEFAULT_COHORT_SUBJECTS,
                          seed: int = 0, voxel_size: float = 4.0, field_strength: float = 3.0,
                          preview: bool = False) -> Path:
    """Return the cached cohort directory, generating it first if it is missing or incomplete.

    Concurrent callers (e.g. parallel test workers) wait for one another instead of
    generating the same cohort twice.
    """
    path = default_cohort_dir(cache_dir, num_subjects, seed, voxel_size, field_strength)
    if is_complete_cohort(path):
        return path
    with _exclusive(path.with_name(path.name + ".lock")):
        if not is_complete_cohort(path):
            generate_cohort(path, num_subjects, seed, voxel_size, field_strength, preview=preview, overwrite=True)
    return path


if __name__ == "__main__":
    print(ensure_default_cohort())
