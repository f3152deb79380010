"""Prompt builders: every text UniBrain sees around its images, for training samples and the pipeline.

Training (``data.sequence_builder``) draws phrasings at random from
:mod:`~unibrain_hf.protocol.templates`; evaluation and the pipeline use the fixed prompts. Both
go through these functions, so a prompt the model was trained on and the prompt it is asked
at inference come from one place.

* random phrasings: :func:`translation_question`, :func:`translation_think`,
  :func:`impression_question`, :func:`diagnosis_question`, :func:`think_text`, with
  :func:`modality_display_name`, :func:`join_with_and` and :func:`size_rewrite`;
* answers: :func:`impression_answer`, :func:`diagnosis_answer`;
* fixed evaluation prompts: :func:`build_eval_generation_prompt`, :func:`build_eval_diagnosis_prompt`,
  :func:`build_unified_instructions`, :func:`build_unified_impression_prompt`,
  :func:`build_unified_diagnosis_prompt`.

Every random choice comes from one ``numpy.random.Generator`` (or an int seed).

    python -c "from unibrain_hf.protocol.prompts import build_eval_generation_prompt as p; print(p('t2f'))"
"""

from __future__ import annotations

import re
from numbers import Real

import numpy as np

from . import templates


def as_generator(rng) -> np.random.Generator:
    """Accept a ``numpy.random.Generator`` or an int seed (same seed -> same draws)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng must be a numpy.random.Generator or an int seed; got {type(rng).__name__}")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _check_probability(name: str, value) -> float:
    if not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1]; got {value!r}")
    return float(value)


def join_with_and(items) -> str:
    """English list join: "A"; "A and B"; "A, B, and C" (Oxford comma); "" for none.

    Reference detail kept: with two items, if the first already ends in ", " only "and "
    is added (so ["A, ", "B"] gives "A, and B").
    """
    items = [str(item) for item in items]
    if len(items) <= 1:
        return items[0] if items else ""
    if len(items) == 2:
        return items[0] + ("and " if items[0].endswith(", ") else " and ") + items[1]
    return ", ".join(items[:-1]) + ", and " + items[-1]


def join_diseases(diseases) -> str:
    """The diagnosis answer's disease list, joined like the reference ("A, B, and C")."""
    if isinstance(diseases, str):
        raise ValueError("diseases must be a list of names, not a single string")
    return join_with_and(diseases)


def modality_display_name(code: str, rng) -> str:
    """A uniformly chosen spelling of a sequence code ("t2f" -> e.g. "T2 FLAIR").

    A code without synonyms (e.g. "SWI") is used verbatim, so new sequences still produce
    readable prompts; the reference would fail on it.
    """
    if not isinstance(code, str) or not code:
        raise ValueError(f"modality code must be a non-empty string; got {code!r}")
    synonyms = templates.MODALITY_SYNONYMS.get(code)
    return code if synonyms is None else _pick(as_generator(rng), synonyms)


def _noun_for(count: int, rng: np.random.Generator) -> str:
    return _pick(rng, templates.PLURAL_NOUN_CHOICES if count > 1 else templates.SINGULAR_NOUN_CHOICES)


def translation_question(inputs, targets, rng, drop_input_modality_prob: float = 0.0) -> str:
    """Instruction to translate ``inputs`` into ``targets`` (sequence codes).

    With probability ``drop_input_modality_prob`` the input names are left out, leaving
    only the noun ("Translate the given scan into the corresponding T2W image.").
    """
    rng = as_generator(rng)
    drop_input_modality_prob = _check_probability("drop_input_modality_prob", drop_input_modality_prob)
    input_names = join_with_and([modality_display_name(code, rng) for code in inputs])
    target_names = join_with_and([modality_display_name(code, rng) for code in targets])
    input_prefix = "" if rng.random() < drop_input_modality_prob else input_names + " "
    d_in = input_prefix + _noun_for(len(inputs), rng)
    d_out = target_names + " " + _noun_for(len(targets), rng)
    return _pick(rng, templates.TRANSLATION_QUESTION_TEMPLATES).format(d_in=d_in, d_out=d_out)


def translation_think(inputs, targets, rng) -> str:
    """The first sentence of a thinking text: a restatement of the translation (no drop)."""
    rng = as_generator(rng)
    input_names = join_with_and([modality_display_name(code, rng) for code in inputs])
    target_names = join_with_and([modality_display_name(code, rng) for code in targets])
    d_in = input_names + " " + _noun_for(len(inputs), rng)
    d_out = target_names + " " + _noun_for(len(targets), rng)
    return _pick(rng, templates.TRANSLATION_THINK_TEMPLATES).format(d_in=d_in, d_out=d_out)


def impression_question(rng) -> str:
    rng = as_generator(rng)
    nouns = _pick(rng, templates.PLURAL_NOUN_CHOICES)
    return _pick(rng, templates.IMPRESSION_QUESTION_TEMPLATES).format(nouns=nouns)


def diagnosis_question(rng) -> str:
    rng = as_generator(rng)
    nouns = _pick(rng, templates.PLURAL_NOUN_CHOICES)
    return _pick(rng, templates.DIAGNOSIS_QUESTION_TEMPLATES).format(nouns=nouns)


# A 3-D size "a x b x c mm": separators are *, x, X or "by" (case-insensitive, so also
# "BY"); the unicode multiplication sign and other units (cm) are not recognised, and
# 2-D sizes are left alone — exactly the reference's pattern.
_NUMBER = r"(\d+(?:\.\d+)?)"
_TIMES = r"\s*(?:\*|by|x|X)\s*"
_SIZE_3D_MM = re.compile(_NUMBER + _TIMES + _NUMBER + _TIMES + _NUMBER + r"\s*mm", re.IGNORECASE)


def size_rewrite(text: str, width_mm, height_mm) -> str:
    """Replace every 3-D lesion size in millimetres with the slice's 2-D size.

    "an enhancing mass of 41 x 32 x 20 mm" -> "an enhancing mass of 12.0 * 9.0 mm" for
    width 12, height 9. Like the reference, nothing is rewritten unless the text contains
    a lower-case "mm" somewhere (the size pattern itself ignores case, so "41 x 32 x 20 MM"
    is rewritten only when another "mm" occurs in the same text).
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str; got {type(text).__name__}")
    for name, value in (("width_mm", width_mm), ("height_mm", height_mm)):
        if not isinstance(value, Real) or not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite non-negative number; got {value!r}")
    if "mm" not in text:
        return text
    replacement = f"{width_mm:.1f} * {height_mm:.1f} mm"
    return _SIZE_3D_MM.sub(lambda _match: replacement, text)


def think_text(inputs, target: str, findings: dict, lesion_size_mm, rng) -> str:
    """``<think>`` + restatement + " " + finding of every input (sizes rewritten) + ``</think>``.

    Missing findings contribute an empty string, so the separating space stays (the
    reference text then has a space before ``</think>``).
    """
    sentence = translation_think(inputs, [target], rng)
    width_mm, height_mm = lesion_size_mm
    notes = "".join(" " + size_rewrite(findings.get(code) or "", width_mm, height_mm) for code in inputs)
    return templates.THINK_OPEN + sentence + notes + templates.THINK_CLOSE


def impression_answer(impression: str) -> str:
    """The impression answer a training sample carries: "Impression: <text>"."""
    return templates.IMPRESSION_ANSWER_PREFIX + impression


def diagnosis_answer(diseases) -> str:
    """The diagnosis answer a training sample carries: "Final Diagnosis: A, B, and C"."""
    return templates.DIAGNOSIS_ANSWER_PREFIX + join_diseases(diseases)


def _check_code(code) -> str:
    if not isinstance(code, str) or not code:
        raise ValueError(f"modality code must be a non-empty string; got {code!r}")
    return code


def build_eval_generation_prompt(target_modality: str) -> str:
    """Generation task (and first unified instruction): "Translate the attached MRI into its T2-FLAIR image."

    The code is used raw except that the substring "t2f" becomes "T2-FLAIR".
    """
    target = _check_code(target_modality)
    for old, new in templates.EVAL_GENERATION_TARGET_RENAMES:
        target = target.replace(old, new)
    return templates.EVAL_GENERATION_PROMPT_TEMPLATE.format(target=target)


def build_eval_diagnosis_prompt() -> str:
    """Diagnosis task: the single impression-and-diagnosis question after the input images."""
    return templates.EVAL_DIAGNOSIS_PROMPT


def build_unified_next_target_prompt(target_modality: str) -> str:
    """Unified task, before every target after the first: "Translate the attached MRI images into t1c image."."""
    return templates.UNIFIED_NEXT_TARGET_PROMPT_TEMPLATE.format(target=_check_code(target_modality))


def build_unified_instructions(target_modalities) -> list[str]:
    """Unified task: the instruction preceding each target, in order."""
    targets = [_check_code(code) for code in target_modalities]
    if not targets:
        raise ValueError("the unified task needs at least one target modality")
    return [build_eval_generation_prompt(targets[0])] + [build_unified_next_target_prompt(c) for c in targets[1:]]


def build_unified_impression_prompt() -> str:
    return templates.UNIFIED_IMPRESSION_PROMPT


def build_unified_diagnosis_prompt() -> str:
    return templates.UNIFIED_DIAGNOSIS_PROMPT


__all__ = ["as_generator", "join_with_and", "join_diseases", "modality_display_name", "translation_question", "translation_think", "impression_question", "diagnosis_question", "size_rewrite", "think_text", "impression_answer", "diagnosis_answer", "build_eval_generation_prompt", "build_eval_diagnosis_prompt", "build_unified_next_target_prompt", "build_unified_instructions", "build_unified_impression_prompt", "build_unified_diagnosis_prompt"]
