"""Checkpoint conversion: BAGEL / UniBrain → this package's pipeline directory."""

from .convert_bagel import ConversionError, ConversionReport, convert_bagel_checkpoint

__all__ = ["ConversionError", "ConversionReport", "convert_bagel_checkpoint"]
