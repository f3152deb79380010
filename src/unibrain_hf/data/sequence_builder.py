"""Turn one subject into one interleaved training sample (a sequence plan), as UniBrain does.

Two training tasks and the evaluation prompts:

* :func:`build_unified_sample` — stage 2/3 ("medical_edit"): from one random input sequence
  of one axial slice, translate into a random ordered subset of the subject's other
  sequences, optionally thinking aloud (per-sequence findings with the lesion size
  rewritten to the slice), then optionally answer an impression and/or diagnosis question.
* :func:`build_recon_sample` — stage 1 (self-alignment, "medical_recon"): a ViT copy of a
  random slice (random axis and rotation), a generic describe-the-image prompt, and a noisy
  VAE copy of the same slice to reconstruct.
* ``build_eval_*`` / ``build_unified_*`` — the fixed prompts of the evaluation tasks.

Every random choice comes from one ``numpy.random.Generator`` (or an int seed), so the
same seed gives the same plan. Condition dropout is *not* applied here: it happens when
plans are packed, driven by each item's ``enable_cfg``, which is set as the reference sets
it (every text and clean image True — loss-carrying texts included — noisy VAE targets False).

    python -c "import numpy as np; from unibrain_hf.data.schema import SubjectRecord; from unibrain_hf.data.sequence_builder import build_unified_sample; r = SubjectRecord('demo', {c: np.random.default_rng(0).random((4, 16, 16), dtype=np.float32) for c in ('t1n', 't2w', 't2f')}, impression='No acute abnormality.', disease=['Normal']); print(*build_unified_sample(r, 13, image_size=16).summary(), sep='\\n')"
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from numbers import Real

import numpy as np

from unibrain_hf.data import templates
from unibrain_hf.data.intensity import (
    lesion_bbox_size,
    lesion_slice_indices,
    minmax_uint8,
    rescale_intensity,
    slice_to_rgb,
)
from unibrain_hf.data.schema import SubjectRecord
from unibrain_hf.processing.sequence_plan import PlanItem, image_items, text_item

UNIFIED_TASK = "medical_edit"
RECON_TASK = "medical_recon"

#: In the reference, a sample that asks an understanding question (instruction_idx > 0)
#: skips image generation with probability 0.2, so P(gen) = 1/4 + 3/4 * 0.8 = 0.85.
REFERENCE_GEN_PROB = 0.85
#: instruction_idx 0 (generation only) always generates, so P(gen) can't go below 1/4.
_MIN_GEN_PROB = 0.25

#: Stage-1 slicing axis -> transpose that moves that axis last (the reference's exact
#: permutations; for axis 0 the slice plane keeps its axial (y, x) orientation).
RECON_AXIS_PERMUTATIONS = {0: (1, 2, 0), 1: (0, 2, 1), 2: (0, 1, 2)}


@dataclass
class BuiltSample:
    """One training sample: the plan plus what was chosen to make it.

    Attributes:
        items: the sequence plan, in order.
        task: ``"medical_edit"`` (unified) or ``"medical_recon"`` (self-alignment).
        subject_id: the record's subject.
        slice_index: index of the slice along ``axis`` (always axis 0 for the unified task).
        input_modality: the code of the sequence the sample starts from.
        target_modalities: codes generated/described after it, in plan order (empty for recon).
        instruction_idx: 0 generation only, 1 + impression, 2 + diagnosis, 3 + both (unified only).
        gen: whether images are generated (False: targets appear as ViT copies only).
        include_think: whether ``<think>`` texts precede the targets.
        lesion_size_mm: (width, height) of the lesion's bbox on the slice; (0, 0) if none.
        axis: slicing axis of the volume (recon picks it at random; unified uses 0).
        rotation_k: number of 90-degree rotations applied (recon only).
        prompt_index: index into ``templates.RECON_PROMPTS`` (recon only).
    """

    items: list[PlanItem] = field(repr=False)
    task: str
    subject_id: str
    slice_index: int
    input_modality: str
    target_modalities: list[str] = field(default_factory=list)
    instruction_idx: int | None = None
    gen: bool = True
    include_think: bool = False
    lesion_size_mm: tuple[int, int] = (0, 0)
    axis: int = 0
    rotation_k: int = 0
    prompt_index: int | None = None

    def summary(self) -> list[str]:
        """One short line per plan item (kind, loss/cfg flags, role, text head) for logs and debugging."""
        lines = []
        for item in self.items:
            flags = f"loss={int(item.loss)} cfg={int(item.enable_cfg)}"
            if item.kind == "text":
                what = repr(item.text[:60])
            else:
                what = f"{item.meta.get('modality')} {np.shape(item.image)}"
            lines.append(f"{item.kind:<9} {flags} {item.meta.get('role', ''):<12} {what}")
        return lines


# --------------------------------------------------------------------------------------
# Randomness helpers
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# Text pieces
# --------------------------------------------------------------------------------------

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


def _text(text: str, loss: bool, role: str, **meta) -> PlanItem:
    item = text_item(text, loss=loss, enable_cfg=True)  # the reference's default for every text
    item.meta.update(role=role, **meta)
    return item


def _images(image, role: str, modality: str, **flags) -> list[PlanItem]:
    items = image_items(image, **flags)
    for item in items:
        item.meta.update(role=role, modality=modality)
    return items


# --------------------------------------------------------------------------------------
# Stage 2/3: unified generation + reasoning
# --------------------------------------------------------------------------------------

def _check_record(record) -> list[str]:
    if not isinstance(record, SubjectRecord):
        raise ValueError(f"expected a SubjectRecord; got {type(record).__name__}")
    record.validate()  # SchemaError (a ValueError) naming the subject and the problem
    return list(record.volumes)


def _scaled_volume(record: SubjectRecord, code: str, cache: dict) -> np.ndarray:
    if code not in cache:
        try:
            cache[code] = rescale_intensity(record.volumes[code])
        except ValueError as err:
            raise ValueError(f"subject {record.subject_id!r}, modality {code!r}: {err}") from None
    return cache[code]


def build_unified_sample(record: SubjectRecord, rng, *, gen_prob: float = REFERENCE_GEN_PROB,
                         think_prob: float = 0.5, drop_input_modality_prob: float = 0.5,
                         image_size: int = 256) -> BuiltSample:
    """The stage-2/3 interleaved sample (reference ``MRIDataset.parse_row``).

    Plan, in order:

    1. if generating and thinking: the system "think" prompt (no loss);
    2. the input image: clean VAE copy (only if generating) + ViT copy;
    3. per target (random ordered subset of the other sequences, possibly empty): the
       translation instruction (no loss, only if generating), the ``<think>`` text (loss,
       when thinking — even without generation), the target image as noisy VAE (loss) +
       clean VAE + ViT when generating, else ViT only. Every target joins the inputs of
       the next instruction/thought;
    4. by ``instruction_idx``: impression and/or diagnosis question (no loss) and answer (loss).

    The slice is a uniformly chosen lesion slice when the mask has one, else any slice; all
    sequences use the same slice. Images are uint8 (H, W, 3): whole-volume percentile
    scaling, then the reference's padding to ``image_size``.

    ``gen_prob`` is the overall probability of generating; following the reference rule,
    samples with ``instruction_idx == 0`` always generate and the others skip generation
    with probability ``(1 - gen_prob) * 4 / 3`` (0.2 at the default 0.85).

    A record with a single sequence is accepted (the reference does not forbid it): it
    yields no targets, only the input image and the understanding tail — the same as a
    draw of an empty target subset for a multi-sequence subject.
    """
    rng = as_generator(rng)
    codes = _check_record(record)
    gen_prob = _check_probability("gen_prob", gen_prob)
    if gen_prob < _MIN_GEN_PROB:
        raise ValueError(f"gen_prob must be >= {_MIN_GEN_PROB} (generation-only samples always generate); "
                         f"got {gen_prob}")
    think_prob = _check_probability("think_prob", think_prob)
    drop_input_modality_prob = _check_probability("drop_input_modality_prob", drop_input_modality_prob)
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int; got {image_size!r}")
    skip_gen_prob = round((1.0 - gen_prob) / (1.0 - _MIN_GEN_PROB), 12)

    depth = record.shape_zyx[0]
    lesion_slices = lesion_slice_indices(record.mask)
    slice_index = int(_pick(rng, lesion_slices)) if len(lesion_slices) else int(rng.integers(depth))

    input_code = codes[int(rng.integers(len(codes)))]
    other_codes = [code for code in codes if code != input_code]
    scaled: dict[str, np.ndarray] = {}
    input_image = slice_to_rgb(_scaled_volume(record, input_code, scaled), slice_index, image_size)
    lesion_size = lesion_bbox_size(record.mask[slice_index]) if record.mask is not None else (0, 0)

    instruction_idx = int(rng.integers(len(templates.INSTRUCTION_KINDS)))
    gen = not (instruction_idx > 0 and rng.random() < skip_gen_prob)
    include_think = bool(rng.random() < think_prob)

    items: list[PlanItem] = []
    if gen and include_think:
        items.append(_text(templates.GEN_THINK_SYSTEM_PROMPT, loss=False, role="system"))
    items += _images(input_image, "input_image", input_code, need_loss=False, need_vae=gen, need_vit=True)

    num_targets = int(rng.integers(len(other_codes) + 1))
    targets = [other_codes[j] for j in rng.permutation(len(other_codes))[:num_targets]]
    inputs_so_far = [input_code]
    for target in targets:
        if gen:
            instruction = translation_question(inputs_so_far, [target], rng, drop_input_modality_prob)
            items.append(_text(instruction.rstrip(), loss=False, role="instruction", modality=target))
        target_image = slice_to_rgb(_scaled_volume(record, target, scaled), slice_index, image_size)
        if include_think:
            thought = think_text(inputs_so_far, target, record.findings, lesion_size, rng)
            items.append(_text(thought, loss=True, role="think", modality=target))
        items += _images(target_image, "target_image", target, need_loss=gen, need_vae=gen, need_vit=True)
        inputs_so_far.append(target)

    items += _understanding_tail(instruction_idx, record, rng)
    return BuiltSample(
        items=items, task=UNIFIED_TASK, subject_id=record.subject_id, slice_index=slice_index,
        input_modality=input_code, target_modalities=targets, instruction_idx=instruction_idx, gen=gen,
        include_think=include_think, lesion_size_mm=lesion_size, axis=0)


def _understanding_tail(instruction_idx: int, record: SubjectRecord, rng) -> list[PlanItem]:
    impression = templates.IMPRESSION_ANSWER_PREFIX + record.impression
    diagnosis = templates.DIAGNOSIS_ANSWER_PREFIX + join_diseases(record.disease)
    if instruction_idx == 1:
        return [_text(impression_question(rng), False, "question"), _text(impression, True, "answer")]
    if instruction_idx == 2:
        return [_text(diagnosis_question(rng), False, "question"), _text(diagnosis, True, "answer")]
    if instruction_idx == 3:
        question = impression_question(rng) + " " + diagnosis_question(rng)
        return [_text(question, False, "question"), _text(impression + "\n" + diagnosis, True, "answer")]
    return []


# --------------------------------------------------------------------------------------
# Stage 1: self-alignment (reconstruct a slice from its ViT tokens)
# --------------------------------------------------------------------------------------

def build_recon_sample(record: SubjectRecord, rng) -> BuiltSample:
    """The stage-1 sample (reference ``ReconDataset.parse_row``).

    A random sequence and a random axis; the volume is transposed so that axis comes last
    (``RECON_AXIS_PERMUTATIONS``); a uniformly chosen slice containing lesion if the mask
    has any, else any slice; per-slice min-max scaling to uint8, 3 channels, ``rot90`` by a
    random k in 0..3. Plan: [ViT copy (no loss)] [random recon prompt (no loss)] [noisy VAE
    copy of the same image (loss)] — no clean VAE copy and no text loss. No padding.
    """
    rng = as_generator(rng)
    codes = _check_record(record)
    modality = codes[int(rng.integers(len(codes)))]
    axis = int(rng.integers(3))
    permutation = RECON_AXIS_PERMUTATIONS[axis]
    volume = np.transpose(record.volumes[modality], permutation)
    lesion_slices = lesion_slice_indices(record.mask, axis=axis)
    slice_index = int(_pick(rng, lesion_slices)) if len(lesion_slices) else int(rng.integers(volume.shape[2]))

    plane = minmax_uint8(volume[:, :, slice_index])
    rotation_k = int(rng.integers(4))
    image = np.ascontiguousarray(np.rot90(np.repeat(plane[..., None], 3, axis=-1), k=rotation_k))
    prompt_index = int(rng.integers(len(templates.RECON_PROMPTS)))

    items = _images(image, "input_image", modality, need_vit=True)
    items.append(_text(templates.RECON_PROMPTS[prompt_index], loss=False, role="instruction"))
    items += _images(image, "target_image", modality, need_loss=True)
    return BuiltSample(
        items=items, task=RECON_TASK, subject_id=record.subject_id, slice_index=slice_index,
        input_modality=modality, target_modalities=[], gen=True, include_think=False, axis=axis,
        rotation_k=rotation_k, prompt_index=prompt_index)


# --------------------------------------------------------------------------------------
# Evaluation prompts (deterministic)
# --------------------------------------------------------------------------------------

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


def reference_diagnosis_label(subject_name: str) -> str:
    """Ground-truth diagnosis class the evaluation derives from the subject name."""
    if not isinstance(subject_name, str) or not subject_name:
        raise ValueError(f"subject name must be a non-empty string; got {subject_name!r}")
    for marker, label in templates.DIAGNOSIS_LABEL_RULES:
        if marker in subject_name:
            return label
    return templates.DIAGNOSIS_FALLBACK_LABEL


def diagnosis_is_correct(label: str, prediction: str) -> bool:
    """The evaluation's scoring rule: the label occurs in the prediction, ignoring case."""
    return label.lower() in prediction.lower()
