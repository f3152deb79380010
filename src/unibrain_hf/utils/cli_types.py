"""argparse ``type=`` converters shared by the ``unibrain`` sub-commands.

    python -c "from unibrain_hf.utils.cli_types import positive_int; print(positive_int('3'))"
"""

from __future__ import annotations

import argparse


def _integer(text: str, minimum: int, description: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {description}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {description}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1, "positive integer")


def non_negative_int(text: str) -> int:
    return _integer(text, 0, "non-negative integer")


def positive_float(text: str) -> float:
    """A finite number > 0 (e.g. a size in GB)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value
