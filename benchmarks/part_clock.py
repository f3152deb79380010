"""Wall and CPU seconds spent in named parts of a call, by wrapping methods in place.

Standard library only: ``bench_pipeline.py`` (our pipeline) and ``reference_unified.py`` (run in the
reference's own virtualenv) both import it from this folder, so both sides are timed the same way.

    python -c "import sys; sys.path.insert(0, 'benchmarks'); from part_clock import PartClock; print(PartClock().parts)"
"""

from __future__ import annotations

import time


class PartClock:
    """Wall and CPU seconds per named part (text decoding, denoising, VAE decoding, prefills)."""

    def __init__(self):
        self.parts = {}

    def wrap(self, owner, name: str, part: str) -> None:
        """Replace ``owner.name`` by a wrapper that adds each call's time to ``parts[part]``."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                entry = self.parts.setdefault(part, {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})
                entry["wall_s"] += time.perf_counter() - wall
                entry["cpu_s"] += time.process_time() - cpu
                entry["calls"] += 1

        setattr(owner, name, timed)
