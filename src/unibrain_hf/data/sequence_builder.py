"""Turn one subject into one interleaved training sample (a sequence plan), as UniBrain does.

Two training tasks:

* :func:`build_unified_sample` — stage 2/3 ("medical_edit"): from one random input sequence
  of one axial slice, translate into a random ordered subset of the subject's other
  sequences, optionally thinking aloud (per-sequence findings with the lesion size
  rewritten to the slice), then optionally answer an impression and/or diagnosis question.
* :func:`build_recon_sample` — stage 1 (self-alignment, "medical_recon"): a ViT copy of a
  random slice (random axis and rotation), a generic describe-the-image prompt, and a noisy
  VAE copy of the same slice to reconstruct.
The texts themselves (questions, thinking, answers, the evaluation prompts) come from
:mod:`unibrain_hf.protocol.prompts`; their names are re-exported here for older imports.

Every random choice comes from one ``numpy.random.Generator`` (or an int seed), so the
same seed gives the same plan. Condition dropout is *not* applied here: it happens when
plans are packed, driven by each item's ``enable_cfg``, which is set as the reference sets
it (every text and clean image True — loss-carrying texts included — noisy VAE targets False).

    python -c "import numpy as np; from unibrain_hf.data.schema import SubjectRecord; from unibrain_hf.data.sequence_builder import build_unified_sample; r = SubjectRecord('demo', {c: np.random.default_rng(0).random((4, 16, 16), dtype=np.float32) for c in ('t1n', 't2w', 't2f')}, impression='No acute abnormality.', disease=['Normal']); print(*build_unified_sample(r, 13, image_size=16).summary(), sep='\\n')"
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unibrain_hf.protocol import templates
from unibrain_hf.protocol.diagnosis import ground_truth_class as reference_diagnosis_label  # noqa: F401
from unibrain_hf.protocol.diagnosis import is_correct as diagnosis_is_correct  # noqa: F401
from unibrain_hf.protocol.prompts import (  # noqa: F401  (re-exported for older imports)
    _check_probability,
    _pick,
    as_generator,
    build_eval_diagnosis_prompt,
    build_eval_generation_prompt,
    build_unified_diagnosis_prompt,
    build_unified_impression_prompt,
    build_unified_instructions,
    build_unified_next_target_prompt,
    diagnosis_answer,
    diagnosis_question,
    impression_answer,
    impression_question,
    join_diseases,
    join_with_and,
    modality_display_name,
    size_rewrite,
    think_text,
    translation_question,
    translation_think,
)
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
# Plan items
# --------------------------------------------------------------------------------------

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
    impression = impression_answer(record.impression)
    diagnosis = diagnosis_answer(record.disease)
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
