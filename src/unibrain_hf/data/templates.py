"""Older import path of the prompt strings: they live in :mod:`unibrain_hf.protocol.templates`.

The diagnosis class table that used to sit here is :mod:`unibrain_hf.protocol.diagnosis`
(one table: the ``-NOR-`` rule of the phantom cohort's normal subjects is part of it).

    python -c "from unibrain_hf.data import templates as t; print(t.EVAL_GENERATION_PROMPT_TEMPLATE)"
"""

from __future__ import annotations

from ..protocol.diagnosis import DEFAULT_CLASS_RULES, DEFAULT_FALLBACK_CLASS, REFERENCE_UNUSED_CLASS
from ..protocol.templates import *  # noqa: F401,F403

#: (subject-id substring, class word) pairs, first match wins — the shared table.
DIAGNOSIS_LABEL_RULES = DEFAULT_CLASS_RULES
DIAGNOSIS_FALLBACK_LABEL = DEFAULT_FALLBACK_CLASS
DIAGNOSIS_UNUSED_LABEL = REFERENCE_UNUSED_CLASS
