"""How many CPU threads torch may use: the cores this process is allowed to run on, not the machine's.

torch sizes its intra-op pool from the machine's core count. On a shared or pinned machine (a
container limited to 2 cores, ``taskset``, several training processes per host) that oversubscribes
the cores, and OpenMP threads that spin while waiting for a descheduled partner turn a 1.5 s call
into a 30 s one. :func:`configure_threads` sets the intra-op thread count from
``os.sched_getaffinity`` (divided among the processes of a local multi-process launch), unless the
caller or ``OMP_NUM_THREADS`` says otherwise. The ``unibrain`` CLI, the training entry point and
the trainer call it (``--threads`` / ``train.threads`` override); without an explicit count it only
ever lowers torch's setting, so a caller's ``torch.set_num_threads(1)`` stays in force.

    python -c "from unibrain_hf.utils.threads import configure_threads; print(configure_threads())"
"""

from __future__ import annotations

import os

from ..errors import InvalidInputError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Intra-op threads for this process: its usable cores shared among the local processes of a launch."""
    local_processes = 1
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        pass
    return max(1, usable_cores() // local_processes)


def configure_threads(threads: int | None = None, what: str = "--threads") -> int:
    """Set torch's intra-op thread count and return it.

    ``threads`` wins when given (``what`` names where it came from in errors). Otherwise an explicit
    ``OMP_NUM_THREADS`` is respected, and without one the count is :func:`default_threads`, never
    more than torch would use by itself.
    """
    import torch

    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidInputError(f"{what} must be a positive integer, got {threads!r}")
        count = threads
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        count = int(os.environ["OMP_NUM_THREADS"])
    else:
        count = min(default_threads(), torch.get_num_threads())
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


__all__ = ["usable_cores", "default_threads", "configure_threads"]
