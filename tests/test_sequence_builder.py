"""The interleaved sample builders (stage-1 recon, stage-2/3 unified) and the prompt helpers.

Structure is checked on every sample of many seeds; the random choices are checked against
the reference's frequencies.

    python -m pytest tests/test_sequence_builder.py -q
"""

import re
from collections import Counter

import numpy as np
import pytest

from unibrain_hf.data import templates
from unibrain_hf.data.intensity import minmax_uint8, rescale_intensity, slice_to_rgb
from unibrain_hf.data.schema import SubjectRecord
from unibrain_hf.data.sequence_builder import (
    RECON_AXIS_PERMUTATIONS,
    as_generator,
    build_eval_diagnosis_prompt,
    build_eval_generation_prompt,
    build_recon_sample,
    build_unified_diagnosis_prompt,
    build_unified_impression_prompt,
    build_unified_instructions,
    build_unified_sample,
    diagnosis_is_correct,
    join_diseases,
    join_with_and,
    modality_display_name,
    reference_diagnosis_label,
    size_rewrite,
    translation_question,
)

CODES = ("t1n", "t1c", "t2w", "t2f")
SEEDS = range(300)
IMAGE_SIZE = 32  # = the synthetic slice size, so no padding work in the many-seed loops
# Lesion: slices 2 and 3; on slice 2 a 9 x 5 (w x h) box, on slice 3 a 4 x 3 box.
LESION_SIZES = {2: (9, 5), 3: (4, 3)}


def make_record(codes=CODES, with_mask=True, subject_id="BraTS-GLI-00001-000", seed=0):
    rng = np.random.default_rng(seed)
    volumes = {}
    for i, code in enumerate(codes):
        volume = (rng.random((6, 32, 32)) * 100 + 1 + 10 * i).astype(np.float32)
        volume[:, :2, :] = 0  # some background
        volumes[code] = volume
    mask = None
    if with_mask:
        mask = np.zeros((6, 32, 32), np.float32)
        mask[2, 10:15, 8:17] = 1
        mask[3, 11:14, 9:13] = 2
    findings = {code: f"On {code} a mass of 41 x 32 x 20 mm [{code}-finding]." for code in codes}
    return SubjectRecord(subject_id=subject_id, volumes=volumes, findings=findings,
                         impression="Large left frontal glioma.", disease=["Glioma", "Edema", "Necrosis"],
                         mask=mask)


RECORD = make_record()


def _template_regex(template, **groups):
    pattern = re.escape(template)
    for name in groups:
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>.+?)")
    return re.compile("^" + pattern + "$")


QUESTION_RES = [_template_regex(t, d_in=1, d_out=1) for t in templates.TRANSLATION_QUESTION_TEMPLATES]
THINK_RES = [_template_regex(t, d_in=1, d_out=1) for t in templates.TRANSLATION_THINK_TEMPLATES]
IMPRESSION_QS = {t.format(nouns=n) for t in templates.IMPRESSION_QUESTION_TEMPLATES for n in templates.PLURAL_NOUN_CHOICES}
DIAGNOSIS_QS = {t.format(nouns=n) for t in templates.DIAGNOSIS_QUESTION_TEMPLATES for n in templates.PLURAL_NOUN_CHOICES}


def _parse(regexes, text):
    for regex in regexes:
        match = regex.match(text)
        if match:
            return match.group("d_in"), match.group("d_out")
    raise AssertionError(f"{text!r} matches no template")


def _split_noun(description, count):
    nouns = templates.PLURAL_NOUN_CHOICES if count > 1 else templates.SINGULAR_NOUN_CHOICES
    for noun in sorted(nouns, key=len, reverse=True):
        if description == noun:
            return "", noun
        if description.endswith(" " + noun):
            return description[: -len(noun) - 1], noun
    raise AssertionError(f"{description!r} does not end with a valid noun for {count} modalities")


def _is_joined_names(names, codes):
    """Whether ``names`` is the and-join of one synonym per code (in order)."""
    def options(code):
        return templates.MODALITY_SYNONYMS.get(code, (code,))
    candidates = [""]
    for code in codes:
        candidates = [c + ("\0" if c else "") + s for c in candidates for s in options(code)]
    return any(join_with_and(c.split("\0")) == names for c in candidates)


def check_unified_structure(sample, record):
    """Walk the plan and assert it is exactly what the reference builds for these choices."""
    items = list(sample.items)
    pos = 0

    def take(kind, loss, cfg, role, modality=None):
        nonlocal pos
        item = items[pos]
        assert (item.kind, item.loss, item.enable_cfg, item.meta.get("role")) == (kind, loss, cfg, role), (pos, item)
        if modality is not None:
            assert item.meta.get("modality") == modality
        pos += 1
        return item

    gen, think = sample.gen, sample.include_think
    if gen and think:
        assert take("text", False, True, "system").text == templates.GEN_THINK_SYSTEM_PROMPT
    if gen:
        clean = take("vae_image", False, True, "input_image", sample.input_modality)
    vit = take("vit_image", False, True, "input_image", sample.input_modality)
    if gen:
        assert clean.image is vit.image
    expected_input = slice_to_rgb(rescale_intensity(record.volumes[sample.input_modality]), sample.slice_index,
                                  IMAGE_SIZE)
    assert np.array_equal(vit.image, expected_input)

    inputs = [sample.input_modality]
    for target in sample.target_modalities:
        if gen:
            instruction = take("text", False, True, "instruction", target).text
            d_in, d_out = _parse(QUESTION_RES, instruction)
            names_in, _ = _split_noun(d_in, len(inputs))
            assert names_in == "" or _is_joined_names(names_in, inputs), instruction
            names_out, _ = _split_noun(d_out, 1)
            assert _is_joined_names(names_out, [target]), instruction
        if think:
            thought = take("text", True, True, "think", target).text
            assert thought.startswith("<think>") and thought.endswith("</think>")
            width, height = sample.lesion_size_mm
            notes = "".join(f" On {c} a mass of {width:.1f} * {height:.1f} mm [{c}-finding]." for c in inputs)
            body = thought[len("<think>"): -len("</think>")]
            assert body.endswith(notes), thought
            d_in, d_out = _parse(THINK_RES, body[: -len(notes)])
            names_in, _ = _split_noun(d_in, len(inputs))
            assert _is_joined_names(names_in, inputs), thought  # the thought never drops the names
            assert _is_joined_names(_split_noun(d_out, 1)[0], [target])
        if gen:
            noisy = take("vae_image", True, False, "target_image", target)
            clean = take("vae_image", False, True, "target_image", target)
        vit = take("vit_image", False, True, "target_image", target)
        if gen:
            assert noisy.image is clean.image is vit.image
        expected = slice_to_rgb(rescale_intensity(record.volumes[target]), sample.slice_index, IMAGE_SIZE)
        assert np.array_equal(vit.image, expected)
        inputs.append(target)

    diseases = "Glioma, Edema, and Necrosis"
    idx = sample.instruction_idx
    if idx == 1:
        assert take("text", False, True, "question").text in IMPRESSION_QS
        assert take("text", True, True, "answer").text == "Impression: " + record.impression
    elif idx == 2:
        assert take("text", False, True, "question").text in DIAGNOSIS_QS
        assert take("text", True, True, "answer").text == "Final Diagnosis: " + diseases
    elif idx == 3:
        question = take("text", False, True, "question").text
        assert any(question == a + " " + b for a in IMPRESSION_QS for b in DIAGNOSIS_QS if question.startswith(a))
        assert take("text", True, True, "answer").text == (
            "Impression: " + record.impression + "\nFinal Diagnosis: " + diseases)
    assert pos == len(items), "unexpected trailing items"


@pytest.fixture(scope="module")
def unified_samples():
    return [build_unified_sample(RECORD, seed, image_size=IMAGE_SIZE) for seed in SEEDS]


def test_unified_structure_over_many_seeds(unified_samples):
    for sample in unified_samples:
        assert sample.task == "medical_edit" and sample.subject_id == RECORD.subject_id
        check_unified_structure(sample, RECORD)


def test_unified_targets_are_distinct_others(unified_samples):
    for sample in unified_samples:
        targets = sample.target_modalities
        assert len(set(targets)) == len(targets)
        assert sample.input_modality not in targets
        assert set(targets) <= set(CODES)


def test_unified_no_generation_means_no_vae_items(unified_samples):
    seen_no_gen = False
    for sample in unified_samples:
        kinds = [item.kind for item in sample.items]
        if not sample.gen:
            seen_no_gen = True
            assert "vae_image" not in kinds
            assert sample.instruction_idx > 0  # generation-only samples always generate
            assert not any(item.meta.get("role") in ("system", "instruction") for item in sample.items)
        losses = [item for item in sample.items if item.loss]
        assert all(item.kind in ("text", "vae_image") for item in losses)
        assert all(not item.enable_cfg for item in sample.items if item.kind == "vae_image" and item.loss)
    assert seen_no_gen


def test_unified_slice_is_a_lesion_slice_with_its_own_size(unified_samples):
    counts = Counter(sample.slice_index for sample in unified_samples)
    assert set(counts) == {2, 3}
    assert abs(counts[2] / len(unified_samples) - 0.5) < 0.1
    for sample in unified_samples:
        assert sample.lesion_size_mm == LESION_SIZES[sample.slice_index]


def test_unified_without_mask_uses_any_slice_and_zero_size():
    record = make_record(with_mask=False)
    samples = [build_unified_sample(record, seed, image_size=IMAGE_SIZE) for seed in range(200)]
    assert set(s.slice_index for s in samples) == set(range(6))
    for sample in samples:
        assert sample.lesion_size_mm == (0, 0)
        check_unified_structure(sample, record)


def test_unified_random_choice_frequencies():
    n = 2000
    samples = [build_unified_sample(RECORD, seed, image_size=IMAGE_SIZE) for seed in range(1000, 1000 + n)]
    tolerance = 4 * np.sqrt(0.25 / n)  # 4 standard deviations of a frequency

    gen = np.array([s.gen for s in samples])
    idx = np.array([s.instruction_idx for s in samples])
    assert abs(gen.mean() - 0.85) < tolerance
    assert gen[idx == 0].all()
    assert abs(gen[idx > 0].mean() - 0.8) < 4 * np.sqrt(0.16 / (idx > 0).sum())
    assert abs(np.mean([s.include_think for s in samples]) - 0.5) < tolerance
    for value in range(4):
        assert abs(np.mean(idx == value) - 0.25) < tolerance
    inputs = Counter(s.input_modality for s in samples)
    for code in CODES:
        assert abs(inputs[code] / n - 0.25) < tolerance
    # number of targets uniform on 0..3 (= randint(0, len(others)))
    num_targets = Counter(len(s.target_modalities) for s in samples)
    for k in range(4):
        assert abs(num_targets[k] / n - 0.25) < tolerance
    # every other modality is equally likely to be the first target
    first = Counter(s.target_modalities[0] for s in samples if s.target_modalities)
    total = sum(first.values())
    for code in CODES:
        assert abs(first[code] / total - 0.25) < 4 * np.sqrt(0.25 / total)


def test_unified_input_name_drop_frequency():
    dropped = kept = 0
    for seed in range(600):
        sample = build_unified_sample(RECORD, seed, image_size=IMAGE_SIZE)
        inputs = [sample.input_modality]
        instructions = [item for item in sample.items if item.meta.get("role") == "instruction"]
        for item, target in zip(instructions, sample.target_modalities):
            names, _ = _split_noun(_parse(QUESTION_RES, item.text)[0], len(inputs))
            dropped, kept = dropped + (names == ""), kept + (names != "")
            inputs.append(target)
    assert abs(dropped / (dropped + kept) - 0.5) < 0.08


def test_unified_probability_knobs():
    for seed in range(100):
        always = build_unified_sample(RECORD, seed, gen_prob=1.0, think_prob=1.0, image_size=IMAGE_SIZE)
        assert always.gen and always.include_think
        never = build_unified_sample(RECORD, seed, gen_prob=0.25, think_prob=0.0, image_size=IMAGE_SIZE)
        assert never.gen == (never.instruction_idx == 0) and not never.include_think
        named = build_unified_sample(RECORD, seed, drop_input_modality_prob=0.0, gen_prob=1.0, image_size=IMAGE_SIZE)
        first = next((i for i in named.items if i.meta.get("role") == "instruction"), None)
        if first is not None:
            assert _split_noun(_parse(QUESTION_RES, first.text)[0], 1)[0] != ""


def test_unified_is_deterministic_per_seed():
    for seed in range(30):
        a = build_unified_sample(RECORD, seed, image_size=IMAGE_SIZE)
        b = build_unified_sample(RECORD, np.random.default_rng(seed), image_size=IMAGE_SIZE)
        assert [(i.kind, i.text, i.loss, i.enable_cfg, i.meta) for i in a.items] == \
               [(i.kind, i.text, i.loss, i.enable_cfg, i.meta) for i in b.items]
        assert all(np.array_equal(x.image, y.image) for x, y in zip(a.items, b.items) if x.kind != "text")
        assert (a.slice_index, a.target_modalities, a.gen) == (b.slice_index, b.target_modalities, b.gen)
    texts = {tuple(i.text for i in build_unified_sample(RECORD, s, image_size=IMAGE_SIZE).items if i.text)
             for s in range(30)}
    assert len(texts) > 20  # different seeds give different plans


def test_unified_default_image_size_pads_to_256():
    sample = build_unified_sample(RECORD, 0)
    for item in sample.items:
        if item.kind != "text":
            assert item.image.shape == (256, 256, 3) and item.image.dtype == np.uint8
            assert not item.image[:112].any() and not item.image[144:].any()  # 32 rows centred


def test_unified_single_modality_record_has_no_targets():
    record = make_record(codes=("t1n",))
    for seed in range(50):
        sample = build_unified_sample(record, seed, image_size=IMAGE_SIZE)
        assert sample.target_modalities == [] and sample.input_modality == "t1n"
        check_unified_structure(sample, record)


def test_unified_other_source_codes_and_free_text_codes():
    record = make_record(codes=("T1", "FLAIR", "swi"))
    for seed in range(100):
        check_unified_structure(build_unified_sample(record, seed, image_size=IMAGE_SIZE), record)


def test_unified_rejects_bad_input():
    with pytest.raises(ValueError, match="no volumes"):
        build_unified_sample(SubjectRecord("s", {}), 0)
    empty = make_record()
    empty.volumes["t2w"] = np.zeros((6, 32, 32), np.float32)
    with pytest.raises(ValueError, match="'t2w'.*no foreground"):
        for seed in range(50):
            build_unified_sample(empty, seed, image_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match="rng"):
        build_unified_sample(RECORD, "seed")
    with pytest.raises(ValueError, match="gen_prob"):
        build_unified_sample(RECORD, 0, gen_prob=0.1)
    with pytest.raises(ValueError, match="think_prob"):
        build_unified_sample(RECORD, 0, think_prob=1.5)
    with pytest.raises(ValueError, match="SubjectRecord"):
        build_unified_sample({"volumes": {}}, 0)
    bad_mask = make_record()
    bad_mask.mask = np.zeros((5, 32, 32), np.float32)
    with pytest.raises(ValueError, match="mask shape"):
        build_unified_sample(bad_mask, 0)
    with pytest.raises(ValueError, match="wider"):
        wide = make_record()
        wide.volumes = {c: np.ones((6, 8, 40), np.float32) + np.arange(40) for c in CODES}
        wide.mask = None
        build_unified_sample(wide, 0, image_size=32)


# ---------------------------------------------------------------- stage-1 recon

def _expected_plane(volume, axis, index):
    return np.take(volume, index, axis=axis)  # axis 0 -> (y, x), 1 -> (z, x), 2 -> (z, y)


def test_recon_structure_and_axis_permutation_over_many_seeds():
    for seed in SEEDS:
        sample = build_recon_sample(RECORD, seed)
        assert sample.task == "medical_recon" and sample.target_modalities == []
        vit, prompt, noisy = sample.items
        assert (vit.kind, vit.loss, vit.enable_cfg) == ("vit_image", False, True)
        assert (prompt.kind, prompt.loss, prompt.enable_cfg) == ("text", False, True)
        assert (noisy.kind, noisy.loss, noisy.enable_cfg) == ("vae_image", True, False)
        assert prompt.text == templates.RECON_PROMPTS[sample.prompt_index]
        assert vit.image is noisy.image
        volume = RECORD.volumes[sample.input_modality]
        permuted = np.transpose(volume, RECON_AXIS_PERMUTATIONS[sample.axis])
        plane = _expected_plane(volume, sample.axis, sample.slice_index)
        assert np.array_equal(permuted[:, :, sample.slice_index], plane)
        expected = np.rot90(np.repeat(minmax_uint8(plane)[..., None], 3, axis=-1), k=sample.rotation_k)
        assert vit.image.dtype == np.uint8 and np.array_equal(vit.image, expected)
        assert vit.image.flags["C_CONTIGUOUS"]
        lesion = RECORD.mask if sample.axis == 0 else np.moveaxis(RECORD.mask, sample.axis, 0)
        assert lesion[sample.slice_index].any()  # the lesion is visible on every axis, so always preferred


def test_recon_permutations_are_the_reference_ones():
    assert RECON_AXIS_PERMUTATIONS == {0: (1, 2, 0), 1: (0, 2, 1), 2: (0, 1, 2)}
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for axis, permutation in RECON_AXIS_PERMUTATIONS.items():
        assert np.transpose(volume, permutation).shape[2] == volume.shape[axis]


def test_recon_frequencies_and_no_mask():
    n = 1200
    samples = [build_recon_sample(RECORD, seed) for seed in range(n)]
    tol = 4 * np.sqrt(0.25 / n)
    for key, values in (("axis", range(3)), ("rotation_k", range(4))):
        counts = Counter(getattr(s, key) for s in samples)
        for v in values:
            assert abs(counts[v] / n - 1 / len(values)) < tol
    modalities = Counter(s.input_modality for s in samples)
    assert all(abs(modalities[c] / n - 0.25) < tol for c in CODES)
    assert len({s.prompt_index for s in samples}) > 250

    record = make_record(with_mask=False)
    slices = {(s.axis, s.slice_index) for s in (build_recon_sample(record, seed) for seed in range(400))}
    assert {i for a, i in slices if a == 0} == set(range(6))
    assert max(i for a, i in slices if a == 2) > 20


def test_recon_is_deterministic_and_validates():
    for seed in range(20):
        a, b = build_recon_sample(RECORD, seed), build_recon_sample(RECORD, np.random.default_rng(seed))
        assert (a.axis, a.slice_index, a.rotation_k, a.prompt_index) == (b.axis, b.slice_index, b.rotation_k,
                                                                         b.prompt_index)
    with pytest.raises(ValueError, match="no volumes"):
        build_recon_sample(SubjectRecord("s", {}), 0)


# ---------------------------------------------------------------- text helpers

@pytest.mark.parametrize("text, expected", [
    ("A mass of 41 x 32 x 20 mm.", "A mass of 9.0 * 5.0 mm."),
    ("sizes 41x32x20mm and 1.5 * 2 * 3.25  mm", "sizes 9.0 * 5.0 mm and 9.0 * 5.0 mm"),
    ("4 by 3 BY 2 mm", "9.0 * 5.0 mm"),
    ("4 X 3 x 2 MM near a 5 mm cyst", "9.0 * 5.0 mm near a 5 mm cyst"),
    ("4 X 3 x 2 MM", "4 X 3 x 2 MM"),                    # guard: needs a lower-case "mm" somewhere
    ("4.1 x 3.2 x 2.0 cm", "4.1 x 3.2 x 2.0 cm"),        # centimetres are not rewritten
    ("a 4 x 3 mm focus", "a 4 x 3 mm focus"),            # 2-D sizes are not rewritten
    ("4 \u00d7 3 \u00d7 2 mm", "4 \u00d7 3 \u00d7 2 mm"),  # the multiplication sign is not recognised
    ("", ""),
])
def test_size_rewrite(text, expected):
    assert size_rewrite(text, 9, 5) == expected


def test_size_rewrite_formats_one_decimal_width_then_height():
    assert size_rewrite("1 x 2 x 3 mm", np.int64(12), 7.25) == "12.0 * 7.2 mm"
    with pytest.raises(ValueError, match="width_mm"):
        size_rewrite("1 x 2 x 3 mm", -1, 2)
    with pytest.raises(ValueError, match="text"):
        size_rewrite(None, 1, 2)


def test_join_rules():
    assert join_diseases(["Glioma"]) == "Glioma"
    assert join_diseases(["Glioma", "Edema"]) == "Glioma and Edema"
    assert join_diseases(["Glioma", "Edema", "Necrosis"]) == "Glioma, Edema, and Necrosis"
    assert join_diseases(["a", "b", "c", "d"]) == "a, b, c, and d"
    assert join_diseases([]) == ""
    assert join_with_and(["A, ", "B"]) == "A, and B"  # reference detail
    with pytest.raises(ValueError, match="list"):
        join_diseases("Glioma")


def test_modality_display_names():
    rng = as_generator(0)
    for code, synonyms in templates.MODALITY_SYNONYMS.items():
        seen = {modality_display_name(code, rng) for _ in range(400)}
        assert seen == set(synonyms)
    assert modality_display_name("SWI", rng) == "SWI"
    with pytest.raises(ValueError, match="modality code"):
        modality_display_name("", rng)


def test_translation_question_plural_noun_for_several_inputs():
    for seed in range(100):
        question = translation_question(["t1n", "t2w"], ["t2f"], seed, drop_input_modality_prob=0.5)
        d_in, d_out = _parse(QUESTION_RES, question)
        _split_noun(d_in, 2)
        _split_noun(d_out, 1)


def test_templates_data():
    assert len(templates.RECON_PROMPTS) == 364
    assert len(set(templates.RECON_PROMPTS)) < 364  # the reference list's duplicates are kept
    assert templates.RECON_PROMPTS[0].startswith("Analyze the visual fidelity, artistic approach")
    assert len(templates.TRANSLATION_QUESTION_TEMPLATES) == 10 and len(templates.TRANSLATION_THINK_TEMPLATES) == 12
    assert len(templates.IMPRESSION_QUESTION_TEMPLATES) == 10 and len(templates.DIAGNOSIS_QUESTION_TEMPLATES) == 10
    assert templates.GEN_THINK_SYSTEM_PROMPT.count("image. \nThe planning") == 1
    assert set(templates.CANONICAL_MODALITIES) <= set(templates.MODALITY_SYNONYMS)


# ---------------------------------------------------------------- evaluation prompts

def test_eval_prompts():
    assert build_eval_generation_prompt("t2f") == "Translate the attached MRI into its T2-FLAIR image."
    assert build_eval_generation_prompt("t1c") == "Translate the attached MRI into its t1c image."
    assert build_eval_diagnosis_prompt() == (
        "Based on the provided information, provide a detailed impression of the observed structures and any "
        "potential issues, and tell me what is the most likely clinical diagnosis?")
    assert build_unified_instructions(["t2f", "t1c", "t2f"]) == [
        "Translate the attached MRI into its T2-FLAIR image.",
        "Translate the attached MRI images into t1c image.",
        "Translate the attached MRI images into t2f image.",
    ]
    assert build_unified_impression_prompt() == (
        "Assess the given data and present a comprehensive impression of the observed anatomical structures.")
    assert build_unified_diagnosis_prompt() == (
        "Based on the provided information, what is the most likely clinical diagnosis? Answer with "
        "Glioblastoma, Meningioma, or Metastatic tumor.")
    with pytest.raises(ValueError, match="at least one"):
        build_unified_instructions([])


def test_diagnosis_labels_and_scoring():
    assert reference_diagnosis_label("BraTS-GLI-00001-000") == "Gli"
    assert reference_diagnosis_label("BraTS-MEN-00004-000") == "Mening"
    assert reference_diagnosis_label("BraTS-MET-00010-000") == "Meta"
    assert reference_diagnosis_label("sub-strokecase0001") == "Infarct"
    assert reference_diagnosis_label("WMH-100") == "Degeneration"
    assert diagnosis_is_correct("Gli", "Final Diagnosis: glioblastoma")
    assert diagnosis_is_correct("Meta", "Metastatic tumor")
    assert not diagnosis_is_correct("Mening", "Glioblastoma")
