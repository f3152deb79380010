"""Checkpoint conversion: BAGEL / UniBrain → this package's pipeline directory.

Names are imported on first access, so that ``unibrain convert --help`` does not import torch.
"""

import importlib

_LAZY = {"ConversionError": ".convert_bagel", "ConversionReport": ".convert_bagel",
         "convert_bagel_checkpoint": ".convert_bagel"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConversionError", "ConversionReport", "convert_bagel_checkpoint"]
