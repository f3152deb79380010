"""Write a directory atomically: build it under a temporary name, rename it into place at the end.

Every writer of a directory in this package (cohorts, converted checkpoints, training checkpoints,
exported pipelines) goes through :func:`atomic_directory`, so an interrupted or failed run never
leaves a half-written result where a complete one is expected; :func:`check_output_dir` refuses an
occupied output location before any work starts.

    python -c "from unibrain_hf.utils.atomic import atomic_directory; help(atomic_directory)"
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import InvalidInputError, OutputExistsError


def check_output_dir(path: str | os.PathLike, what: str = "output directory", overwrite: bool = False,
                     option: str = "overwrite=True") -> Path:
    """``path`` if it can be written as a directory: absent, empty, or non-empty with ``overwrite``.

    Called before any work, so a run never stops at the end on its output location. ``what``
    and ``option`` are how the message names the location and the way to replace it (a
    command line passes its own words, e.g. ``"OUT_DIR"`` and ``"--overwrite"``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{what} {path} is a file; a directory is expected")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(path, what, option)
    return path


@contextmanager
def atomic_directory(final: str | os.PathLike):
    """Yield a temporary sibling of ``final``; on success it replaces ``final``, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes the folder owner-only; results are meant to be shared
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path next to ``final``; on success it replaces ``final``, on error it is removed.

    ``suffix`` keeps the real extension on the temporary name, for writers that pick the format
    from it (PIL, nibabel).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix or ".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o644)  # mkstemp creates owner-only files
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
