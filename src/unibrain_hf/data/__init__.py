"""Data: the RadGenome parquet schema and loader, the interleaved sequence builder, cohort
preparation from NIfTI, and the synthetic phantom cohort.

    python -c "from unibrain_hf.data import load_radgenome; help(load_radgenome)"
"""

from .schema import SubjectRecord, write_cohort


def __getattr__(name):
    # `datasets` is imported only when the loader is used.
    if name in ("load_radgenome", "iter_subject_records"):
        from . import radgenome

        return getattr(radgenome, name)
    raise AttributeError(f"module 'unibrain_hf.data' has no attribute {name!r}")


__all__ = ["SubjectRecord", "write_cohort", "load_radgenome", "iter_subject_records"]
