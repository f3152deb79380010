"""Diagnosis classes: the ground-truth class word of a subject and the label parser of a generated text.

One table for everything that needs the classes — training samples, the pipeline's parsed
``diagnosis_label`` and the evaluation's scoring. The reference (UniBrain's
``evaluate_metrics.py``) derives the true class from the subject id and counts a generated
diagnosis as correct when the class word, lower-cased, occurs anywhere in the lower-cased
text (:func:`is_correct`). The class words are stems ("Gli", "Mening", "Meta") so that
"glioma", "glioblastoma", "meningioma" and "metastatic" all match. The default rules, in
order (first match wins, matching is case-sensitive as in the reference):

====================  ================  ===============================================
subject id contains   class word        cohort
====================  ================  ===============================================
``-GLI-``             Gli               BraTS glioma
``-MEN-``             Mening            BraTS meningioma
``-MET-``             Meta              BraTS metastases
``strokecase``        Infarct           ISLES'22 stroke
``-NOR-``             Normal            phantom normal subjects (our addition)
anything else         Degeneration      WMH challenge (white-matter hyperintensities)
====================  ================  ===============================================

The reference lists "Normal" as an option but no rule ever produces it; the ``-NOR-`` rule
exists for the phantom cohort's normal subjects and changes nothing for RadGenome ids.

Because the reference's rule is a plain substring test it inherits its quirks: "negligible"
contains "gli", and a text naming several classes is correct for each of them.
:func:`parse_diagnosis_label` gives a stricter, single-label reading.

    python -c "from unibrain_hf.protocol.diagnosis import ground_truth_class as g; print(g('BraTS-GLI-00001-000'))"
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

#: A rule's test: a substring of the subject id, or a function of the subject id.
SubjectMatcher = Union[str, Callable[[str], bool]]

DEFAULT_CLASS_RULES: tuple[tuple[SubjectMatcher, str], ...] = (
    ("-GLI-", "Gli"),
    ("-MEN-", "Mening"),
    ("-MET-", "Meta"),
    ("strokecase", "Infarct"),
    ("-NOR-", "Normal"),
)

#: Class of every subject no rule matches (the WMH cohort in RadGenome).
DEFAULT_FALLBACK_CLASS = "Degeneration"


def _check_class_word(word, where: str) -> str:
    if not isinstance(word, str) or not word.strip():
        # An empty word would be a substring of every prediction and score 100 %.
        raise ValueError(f"{where}: class words must be non-empty strings, got {word!r}")
    return word


@dataclass(frozen=True)
class DiagnosisRules:
    """An ordered list of (matcher, class word) rules plus a fallback class.

    A matcher is a substring of the subject id or a callable ``subject_id -> bool``; the
    first matching rule decides. Build one from a plain mapping (e.g. read from JSON) with
    :meth:`from_mapping` / :meth:`from_json`.
    """

    rules: tuple[tuple[SubjectMatcher, str], ...] = DEFAULT_CLASS_RULES
    fallback: str | None = DEFAULT_FALLBACK_CLASS

    def __post_init__(self):
        normalised = []
        for index, rule in enumerate(self.rules):
            if not isinstance(rule, (tuple, list)) or len(rule) != 2:
                raise ValueError(f"rule {index} must be a (matcher, class word) pair, got {rule!r}")
            matcher, word = rule
            if isinstance(matcher, str):
                if not matcher:
                    raise ValueError(f"rule {index}: an empty substring would match every subject")
            elif not callable(matcher):
                raise ValueError(f"rule {index}: matcher must be a substring or a callable, got {matcher!r}")
            normalised.append((matcher, _check_class_word(word, f"rule {index}")))
        if not normalised and self.fallback is None:
            raise ValueError("DiagnosisRules needs at least one rule or a fallback class")
        if self.fallback is not None:
            _check_class_word(self.fallback, "fallback")
        object.__setattr__(self, "rules", tuple(normalised))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str], fallback: str | None = DEFAULT_FALLBACK_CLASS) -> "DiagnosisRules":
        """Rules from ``{subject-id substring: class word}``, tried in the mapping's order."""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"expected a mapping of substring -> class word, got {type(mapping).__name__}")
        return cls(tuple(mapping.items()), fallback)

    @classmethod
    def from_json(cls, path: str | Path) -> "DiagnosisRules":
        """Rules from a JSON file: ``{"rules": {"-GLI-": "Gli", ...}, "fallback": "Degeneration"}``.

        ``fallback`` may be omitted (→ "Degeneration") or ``null`` (unmatched ids are an error).
        """
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "rules" not in data:
            raise ValueError(f"{path}: expected an object with a 'rules' mapping")
        return cls.from_mapping(data["rules"], data.get("fallback", DEFAULT_FALLBACK_CLASS))

    @property
    def class_words(self) -> tuple[str, ...]:
        """Every class word the rules can produce, in rule order, fallback last."""
        words = [word for _, word in self.rules]
        if self.fallback is not None:
            words.append(self.fallback)
        return tuple(dict.fromkeys(words))

    def classify(self, subject_id: str) -> str:
        """The class word of ``subject_id``."""
        if not isinstance(subject_id, str) or not subject_id:
            raise ValueError(f"subject_id must be a non-empty string, got {subject_id!r}")
        for matcher, word in self.rules:
            matched = matcher in subject_id if isinstance(matcher, str) else bool(matcher(subject_id))
            if matched:
                return word
        if self.fallback is None:
            raise ValueError(f"no diagnosis rule matches subject {subject_id!r} and there is no fallback class")
        return self.fallback


DEFAULT_RULES = DiagnosisRules()

RulesLike = Union[DiagnosisRules, Mapping[str, str], Sequence[tuple[SubjectMatcher, str]], None]


def as_rules(rules: RulesLike = None) -> DiagnosisRules:
    """Accept a :class:`DiagnosisRules`, a substring→word mapping, a list of pairs, or ``None`` (defaults)."""
    if rules is None:
        return DEFAULT_RULES
    if isinstance(rules, DiagnosisRules):
        return rules
    if isinstance(rules, Mapping):
        return DiagnosisRules.from_mapping(rules)
    if isinstance(rules, (list, tuple)):
        return DiagnosisRules(tuple(rules))
    raise ValueError(f"rules must be DiagnosisRules, a mapping or a list of pairs, got {type(rules).__name__}")


def ground_truth_class(subject_id: str, rules: RulesLike = None) -> str:
    """The reference's class word for a subject id, e.g. ``"BraTS-MEN-00004-000"`` → ``"Mening"``."""
    return as_rules(rules).classify(subject_id)


def is_correct(gt_word: str, prediction_text: str) -> bool:
    """The reference's scoring rule: ``gt_word.lower() in prediction_text.lower()``."""
    _check_class_word(gt_word, "gt_word")
    if not isinstance(prediction_text, str):
        raise ValueError(f"prediction_text must be a str, got {type(prediction_text).__name__}")
    return gt_word.lower() in prediction_text.lower()


_FINAL_DIAGNOSIS = re.compile(r"final\s+diagnosis\s*:", re.IGNORECASE)


def final_diagnosis_line(text: str) -> str:
    """The answer's diagnosis: what follows the last "Final Diagnosis:" up to the end of its line.

    Without that marker, the last non-empty line. An impression such as "Fazekas 2 white-matter
    lesions, no mass" followed by "Final Diagnosis: White matter degeneration" therefore reads as
    the diagnosis, not as whatever class word the impression happens to contain.
    """
    markers = list(_FINAL_DIAGNOSIS.finditer(text))
    if markers:
        return text[markers[-1].end():].split("\n", 1)[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def find_class_word(text: str, word: str, word_start_only: bool = True):
    """The first occurrence of class word ``word`` in ``text`` (a ``re.Match``), or ``None``.

    Case-insensitive. With ``word_start_only`` the word must begin a word, so "negligible" does not
    read as "Gli" nor "abnormal" as "Normal", while stems still match ("glioblastoma" → "Gli").
    """
    return re.search((r"\b" if word_start_only else "") + re.escape(word), text, flags=re.IGNORECASE)


def parse_diagnosis_label(
    text: str, class_words: Iterable[str] | None = None, *, word_start_only: bool = True
) -> str | None:
    """The class word that occurs earliest in the final diagnosis line of ``text``, or ``None``.

    Only :func:`final_diagnosis_line` is read, never the impression before it. With
    ``word_start_only`` a class word must begin a word, so "negligible" does not read as "Gli"
    nor "abnormal" as "Normal"; the stems still match word beginnings ("glioblastoma" → "Gli").
    When two words start at the same place the longer wins. Negation is not understood:
    "no infarct" parses as "Infarct".
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    text = final_diagnosis_line(text)
    words = DEFAULT_RULES.class_words if class_words is None else tuple(class_words)
    if isinstance(class_words, str) or not words:
        raise ValueError("class_words must be a non-empty list of class words")
    best: tuple[int, int, str] | None = None
    for word in words:
        _check_class_word(word, "class_words")
        found = find_class_word(text, word, word_start_only)
        if found is None:
            continue
        candidate = (found.start(), -len(word), word)
        if best is None or candidate < best:
            best = candidate
    return None if best is None else best[2]


#: The reference defines this class word as an answer option but never assigns it.
REFERENCE_UNUSED_CLASS = "Normal"

__all__ = ["SubjectMatcher", "DEFAULT_CLASS_RULES", "DEFAULT_FALLBACK_CLASS", "DiagnosisRules", "DEFAULT_RULES",
           "RulesLike", "as_rules", "ground_truth_class", "is_correct", "final_diagnosis_line", "find_class_word",
           "parse_diagnosis_label", "REFERENCE_UNUSED_CLASS"]
