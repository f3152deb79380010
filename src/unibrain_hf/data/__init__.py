"""Data: the RadGenome parquet schema and loader, the interleaved sequence builder, cohort
preparation from NIfTI, and the synthetic phantom cohort.

    python -c "from unibrain_hf.data import load_radgenome; help(load_radgenome)"
"""

import importlib

# Imported on first use: the pipeline imports `data.intensity` alone and must not pull in pyarrow
# (`schema`) or `datasets` (`radgenome`), which Hub users of the shipped pipeline code need not have.
_LAZY = {"SubjectRecord": ".schema", "write_cohort": ".schema", "load_radgenome": ".radgenome",
         "iter_subject_records": ".radgenome"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'unibrain_hf.data' has no attribute {name!r}")


__all__ = ["SubjectRecord", "write_cohort", "load_radgenome", "iter_subject_records"]
