"""Tests for the evaluation metrics, the diagnosis rule and their offline ``evaluate`` modules.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_metrics.py -q
"""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local modules must never need the Hub

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from unibrain_hf.evaluation.diagnosis import (
    DEFAULT_RULES,
    DiagnosisRules,
    diagnosis_accuracy,
    ground_truth_class,
    is_correct,
    majority_class,
    majority_class_baseline,
    parse_diagnosis_label,
    score_diagnoses,
)
from unibrain_hf.evaluation.metrics import psnr, rouge_per_item, rouge_scores, ssim

RNG = np.random.default_rng(0)


def _random_uint8(shape):
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


# --------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_ssim_equal_direct_scikit_image_calls_on_slices():
    gt, pred = _random_uint8((40, 48)), _random_uint8((40, 48))
    # The reference's exact expressions.
    assert psnr(gt, pred) == peak_signal_noise_ratio(gt / 255.0, pred / 255.0, data_range=1)
    assert ssim(gt, pred) == structural_similarity(gt / 255.0, pred / 255.0, data_range=1)


def test_psnr_of_uniform_error_matches_hand_computation():
    gt = np.zeros((16, 16), np.uint8)
    pred = np.full((16, 16), 51, np.uint8)  # 51/255 = 0.2 everywhere -> mse 0.04
    assert psnr(gt, pred) == pytest.approx(10 * math.log10(1 / 0.04))  # 13.9794 dB
    half_wrong = gt.copy()
    half_wrong[:8] = 255  # half the pixels off by 1.0 -> mse 0.5
    assert psnr(gt, half_wrong) == pytest.approx(10 * math.log10(2))


def test_ssim_of_constant_images_matches_luminance_formula():
    gt = np.full((12, 12), 51, np.uint8)  # 0.2
    pred = np.full((12, 12), 102, np.uint8)  # 0.4
    c1 = (0.01 * 1) ** 2  # K1 * data_range, squared
    expected = (2 * 0.2 * 0.4 + c1) / (0.2**2 + 0.4**2 + c1)  # zero variance: structure term is 1
    assert ssim(gt, pred) == pytest.approx(expected, rel=1e-9)


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    image = _random_uint8((32, 32))
    assert psnr(image, image.copy()) == math.inf
    assert ssim(image, image.copy()) == pytest.approx(1.0)


def test_float_unit_range_inputs_equal_uint8_inputs():
    gt, pred = _random_uint8((20, 20)), _random_uint8((20, 20))
    assert psnr(gt / 255.0, pred / 255.0) == psnr(gt, pred)
    assert ssim(gt / 255.0, pred / 255.0) == ssim(gt, pred)
    assert psnr(gt.astype(np.float64), pred.astype(np.float64), max_value=255) == psnr(gt, pred)


def test_volumes_are_scored_as_one_3d_array_with_a_7_cube_window():
    gt, pred = _random_uint8((9, 16, 16)), _random_uint8((9, 16, 16))
    direct = structural_similarity(gt / 255.0, pred / 255.0, data_range=1, win_size=7)
    assert ssim(gt, pred) == direct
    per_slice_mean = np.mean([ssim(g, p) for g, p in zip(gt, pred)])
    assert ssim(gt, pred) != pytest.approx(per_slice_mean)  # really a 3-D window
    assert psnr(gt, pred) == peak_signal_noise_ratio(gt / 255.0, pred / 255.0, data_range=1)


@pytest.mark.parametrize(
    "gt, pred, message",
    [
        (np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8), "shapes differ"),
        (np.zeros((8, 8)), np.full((8, 8), np.nan), "NaN"),
        (np.zeros((8, 8)), np.full((8, 8), 200.0), "outside"),  # 0-255 floats are a mistake
        (np.zeros((8,), np.uint8), np.zeros((8,), np.uint8), "2-D slice"),
        (np.zeros((2, 8, 8, 8), np.uint8), np.zeros((2, 8, 8, 8), np.uint8), "2-D slice"),
        (np.zeros((0, 8), np.uint8), np.zeros((0, 8), np.uint8), "empty"),
        (np.zeros((8, 8), bool), np.zeros((8, 8), bool), "dtype"),
    ],
)
def test_bad_images_raise_value_error(gt, pred, message):
    with pytest.raises(ValueError, match=message):
        psnr(gt, pred)


def test_ssim_rejects_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 7"):
        ssim(np.zeros((5, 5, 20), np.uint8), np.zeros((5, 5, 20), np.uint8))


# --------------------------------------------------------------------------- ROUGE


def test_rouge_identical_disjoint_and_partial_overlap():
    identical = rouge_scores(["ring enhancing mass in the left frontal lobe"], ["ring enhancing mass in the left frontal lobe"])
    assert identical["rouge1"] == identical["rouge2"] == identical["rougeL"] == 1.0
    disjoint = rouge_scores(["acute infarct"], ["normal study"])
    assert disjoint["rouge1"] == disjoint["rouge2"] == disjoint["rougeL"] == 0.0
    # 2 of 3 unigrams shared, 1 of 2 bigrams, longest common subsequence 2 of 3.
    partial = rouge_scores(["the cat sat"], ["the cat ran"])
    assert partial["rouge1"] == pytest.approx(2 / 3)
    assert partial["rouge2"] == pytest.approx(1 / 2)
    assert partial["rougeL"] == pytest.approx(2 / 3)


def test_rouge_means_per_item_and_stemming():
    result = rouge_scores(["the cat sat", "acute infarct"], ["the cat ran", "acute infarct"])
    assert [item["rouge1"] for item in result["per_item"]] == pytest.approx([2 / 3, 1.0])
    assert result["rouge1"] == pytest.approx((2 / 3 + 1.0) / 2)
    # Porter stemming makes plural and singular match; without it they do not.
    assert rouge_per_item(["enhancing tumors"], ["enhancing tumor"])[0]["rouge2"] == 1.0
    assert rouge_per_item(["enhancing tumors"], ["enhancing tumor"], use_stemmer=False)[0]["rouge2"] == 0.0


@pytest.mark.parametrize(
    "predictions, references, message",
    [([], [], "empty"), (["a"], ["a", "b"], "1 predictions but 2"), ("abc", "abc", "lists"), ([1], ["a"], "must be str")],
)
def test_rouge_bad_input_raises(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        rouge_scores(predictions, references)


def test_rouge_unknown_type_raises():
    with pytest.raises(ValueError, match="ROUGE type"):
        rouge_scores(["a b"], ["a b"], rouge_types=["rouge9x"])


# --------------------------------------------------------------------------- diagnosis


@pytest.mark.parametrize(
    "subject_id, word",
    [
        ("BraTS-GLI-00001-000", "Gli"),
        ("BraTS-MEN-00004-000", "Mening"),
        ("BraTS-MET-00086-000", "Meta"),
        ("strokecase0001", "Infarct"),
        ("PHANTOM-NOR-00006", "Normal"),
        ("PHANTOM-GLI-00001", "Gli"),
        ("Utrecht-0", "Degeneration"),  # WMH challenge subject: no rule matches
        ("brats-gli-00001-000", "Degeneration"),  # matching is case-sensitive, as in the reference
    ],
)
def test_default_class_rules(subject_id, word):
    assert ground_truth_class(subject_id) == word


def test_custom_rules_from_mapping_json_and_predicates(tmp_path):
    mapping = {"-GLI-": "Glioma", "-MEN-": "Meningioma"}
    assert ground_truth_class("BraTS-GLI-1", mapping) == "Glioma"
    assert ground_truth_class("Utrecht-0", mapping) == "Degeneration"
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json.dumps({"rules": mapping, "fallback": None}))
    strict = DiagnosisRules.from_json(rules_file)
    assert strict.class_words == ("Glioma", "Meningioma")
    with pytest.raises(ValueError, match="no diagnosis rule"):
        strict.classify("Utrecht-0")
    by_predicate = DiagnosisRules(((lambda sid: sid.startswith("sub-"), "Normal"),), fallback="Other")
    assert ground_truth_class("sub-01", by_predicate) == "Normal"
    assert ground_truth_class("x", by_predicate) == "Other"
    # First matching rule wins.
    assert ground_truth_class("A-GLI-MEN-", [("-MEN-", "Mening"), ("-GLI-", "Gli")]) == "Mening"
    assert DEFAULT_RULES.class_words == ("Gli", "Mening", "Meta", "Infarct", "Normal", "Degeneration")


@pytest.mark.parametrize(
    "rules, message",
    [
        ([("", "Gli")], "empty substring"),
        ([("-GLI-", "")], "non-empty"),
        ([("-GLI-",)], "pair"),
        ([(3, "Gli")], "matcher"),
        ("not rules", "list of pairs"),
    ],
)
def test_bad_rules_raise(rules, message):
    with pytest.raises(ValueError, match=message):
        ground_truth_class("BraTS-GLI-1", rules)


def test_is_correct_is_the_case_insensitive_substring_rule():
    assert is_correct("Gli", "Most likely GLIOBLASTOMA.")
    assert is_correct("Meta", "metastatic disease")
    assert not is_correct("Mening", "glioma")
    assert is_correct("Gli", "negligible mass effect")  # the reference's quirk, kept on purpose
    with pytest.raises(ValueError, match="non-empty"):
        is_correct("", "anything")  # an empty word would match every prediction


def test_diagnosis_accuracy_and_records():
    subject_ids = ["BraTS-GLI-00001-000", "BraTS-MEN-00004-000", "strokecase0001", "Utrecht-0"]
    predictions = ["Glioblastoma, WHO grade 4.", "Metastasis.", "Acute infarct in the MCA territory.", "Normal study."]
    assert diagnosis_accuracy(subject_ids, predictions) == 0.5
    records = score_diagnoses(subject_ids, predictions)
    assert [record["correct"] for record in records] == [True, False, True, False]
    assert [record["parsed_label"] for record in records] == ["Gli", "Meta", "Infarct", "Normal"]
    with pytest.raises(ValueError, match="empty"):
        diagnosis_accuracy([], [])
    with pytest.raises(ValueError, match="2 subject ids but 1"):
        diagnosis_accuracy(["a", "b"], ["x"])


def test_parse_diagnosis_label():
    assert parse_diagnosis_label("Findings favour glioblastoma; metastasis less likely.") == "Gli"
    assert parse_diagnosis_label("Metastatic disease rather than glioma.") == "Meta"
    # Word starts only: "negligible" is not "Gli", "abnormal" is not "Normal".
    assert parse_diagnosis_label("Negligible mass effect; abnormal dural tail: meningioma.") == "Mening"
    assert parse_diagnosis_label("negligible", word_start_only=False) == "Gli"
    assert parse_diagnosis_label("Unremarkable examination.") is None
    assert parse_diagnosis_label("Glioma", class_words=["Glioma", "Gli"]) == "Glioma"  # longer wins a tie
    with pytest.raises(ValueError, match="class_words"):
        parse_diagnosis_label("text", class_words="Gli")


def test_parse_reads_the_final_diagnosis_line_not_the_impression():
    # A normal subject's answer that describes white-matter lesions: the substring rule finds "normal" inside
    # "abnormal" and scores it correct; the final diagnosis line says what the model diagnosed.
    text = ("Impression: Abnormal periventricular FLAIR hyperintensities, Fazekas grade 2.\n"
            "Final Diagnosis: White matter degeneration")
    assert is_correct("Normal", text)  # the reference's rule: wrongly "correct"
    assert parse_diagnosis_label(text) == "Degeneration"
    assert score_diagnoses(["PHANTOM-NOR-00001"], [text])[0]["parsed_label"] == "Degeneration"
    # The last marker wins; text after it on later lines is ignored; without a marker the last line counts.
    assert parse_diagnosis_label("Final Diagnosis: Glioblastoma\nFinal diagnosis: Meningioma\nNo glioma.") == "Mening"
    assert parse_diagnosis_label("Impression: a ring-enhancing mass.\nMetastatic tumor") == "Meta"
    assert parse_diagnosis_label("Impression: glioblastoma-like mass.\nFinal Diagnosis:") is None


def test_majority_class_baseline():
    train = ["BraTS-GLI-1", "BraTS-GLI-2", "BraTS-GLI-3", "BraTS-MEN-1"]
    test = ["BraTS-GLI-9", "BraTS-GLI-8", "BraTS-MET-1", "BraTS-MEN-2"]
    assert majority_class(train) == "Gli"
    assert majority_class_baseline(train, test) == 0.5
    assert majority_class(["BraTS-MEN-1", "BraTS-GLI-1"]) == "Gli"  # tie: earlier rule wins
    with pytest.raises(ValueError, match="non-empty"):
        majority_class_baseline([], test)
    with pytest.raises(ValueError, match="non-empty"):
        majority_class_baseline(train, [])


# --------------------------------------------------------------------------- evaluate modules


@pytest.fixture(scope="module")
def evaluate_module():
    return pytest.importorskip("evaluate")


def _load_kwargs(tmp_path):
    return {"keep_in_memory": True, "cache_dir": str(tmp_path)}


def test_metric_modules_load_by_path_offline(evaluate_module, tmp_path):
    from unibrain_hf.evaluation.metric_modules import load_metric, metric_module_path

    gt = [_random_uint8((12, 12)), _random_uint8((12, 12))]
    pred = [_random_uint8((12, 12)), gt[1].copy()]
    psnr_metric = evaluate_module.load(str(metric_module_path("unibrain_psnr")), **_load_kwargs(tmp_path))
    result = psnr_metric.compute(predictions=pred, references=gt)
    assert result["per_item"] == [psnr(gt[0], pred[0]), math.inf]
    assert result["psnr"] == math.inf

    ssim_result = load_metric("unibrain_ssim", **_load_kwargs(tmp_path)).compute(predictions=pred, references=gt)
    assert ssim_result["per_item"] == pytest.approx([ssim(gt[0], pred[0]), 1.0])

    volume_gt, volume_pred = _random_uint8((7, 8, 9)), _random_uint8((7, 8, 9))
    volume = load_metric("unibrain_ssim", **_load_kwargs(tmp_path)).compute(predictions=[volume_pred], references=[volume_gt])
    assert volume["ssim"] == pytest.approx(ssim(volume_gt, volume_pred))

    rouge = load_metric("unibrain_rouge", **_load_kwargs(tmp_path)).compute(predictions=["the cat sat"], references=["the cat ran"])
    assert rouge["rouge2"] == pytest.approx(0.5)

    accuracy = load_metric("unibrain_diagnosis_accuracy", **_load_kwargs(tmp_path)).compute(
        predictions=["Glioblastoma.", "Meningioma."], references=["BraTS-GLI-00001-000", "strokecase0001"]
    )
    assert (accuracy["accuracy"], accuracy["correct"], accuracy["total"]) == (0.5, 1, 2)


def test_metric_modules_work_by_import(evaluate_module):
    from unibrain_hf.evaluation.metric_modules.unibrain_diagnosis_accuracy.unibrain_diagnosis_accuracy import (
        UnibrainDiagnosisAccuracy,
    )
    from unibrain_hf.evaluation.metric_modules.unibrain_psnr.unibrain_psnr import UnibrainPsnr
    from unibrain_hf.evaluation.metric_modules.unibrain_rouge.unibrain_rouge import UnibrainRouge

    gt, pred = _random_uint8((10, 10)), _random_uint8((10, 10))
    assert UnibrainPsnr(keep_in_memory=True).compute(predictions=[pred], references=[gt])["psnr"] == psnr(gt, pred)
    # Float images in [0, 1] need max_value=1 (the module sees every image as float64).
    unit = UnibrainPsnr(keep_in_memory=True).compute(predictions=[pred / 255.0], references=[gt / 255.0], max_value=1.0)
    assert unit["psnr"] == pytest.approx(psnr(gt, pred))
    assert UnibrainRouge(keep_in_memory=True).compute(predictions=["a b c"], references=["x y z"])["rouge1"] == 0.0
    custom = UnibrainDiagnosisAccuracy(keep_in_memory=True).compute(
        predictions=["glioma", "nothing"], references=["site-A-7", "site-B-1"], class_rules={"-A-": "Glioma"}, fallback_class="Other"
    )
    assert custom["accuracy"] == 0.5
    assert [item["ground_truth"] for item in custom["per_item"]] == ["Glioma", "Other"]


def test_load_metric_rejects_unknown_names():
    from unibrain_hf.evaluation.metric_modules import load_metric

    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("rouge")


# --------------------------------------------------------------------------- intervals and confusion


def test_paired_bootstrap_interval_is_the_mean_difference_and_can_exclude_zero():
    from unibrain_hf.evaluation.statistics import bootstrap_mean, paired_difference

    rng = np.random.default_rng(1)
    baseline = rng.normal(15.0, 2.0, size=40)
    ours = baseline + 1.0 + rng.normal(0.0, 0.5, size=40)  # a consistent +1 dB gain
    interval = paired_difference(ours, baseline)
    assert interval.mean == pytest.approx(float(np.mean(ours - baseline)))
    assert interval.low < interval.mean < interval.high and interval.excludes_zero and interval.n == 40
    assert 0.6 < interval.low and interval.high < 1.4
    # An unpaired reading of the same numbers would be much wider; pure noise straddles zero.
    noise = paired_difference(baseline + rng.normal(0.0, 1.0, size=40), baseline)
    assert noise.low < 0 < noise.high and not noise.excludes_zero
    assert paired_difference(ours, baseline) == interval  # fixed seed: the report repeats exactly
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([1.0, math.inf])


def test_confusion_matrix_and_best_constant_answer():
    from unibrain_hf.evaluation.statistics import best_constant_answer, confusion_matrix

    truths = ["Gli", "Gli", "Mening", "Normal"]
    predictions = ["Gli", "Mening", None, "Gli"]
    confusion = confusion_matrix(truths, predictions, ["Gli", "Mening", "Normal"])
    assert confusion["columns"] == ["Gli", "Mening", "Normal", "(none)"]
    assert confusion["counts"] == [[1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    assert best_constant_answer(truths) == ("Gli", 0.5)


def test_lesion_psnr_scores_only_the_masked_pixels():
    from unibrain_hf.evaluation.metrics import lesion_psnr

    truth = np.full((8, 8), 100, np.uint8)
    prediction = truth.copy()
    prediction[:4] = 0  # wrong everywhere outside the lesion
    lesion = np.zeros((8, 8), bool)
    lesion[6:, 6:] = True
    assert lesion_psnr(truth, prediction, lesion) == float("inf")
    prediction[7, 7] = 110  # one lesion pixel off by 10 of 4
    assert lesion_psnr(truth, prediction, lesion) == pytest.approx(10 * np.log10(4 / (10 / 255) ** 2))
    assert lesion_psnr(truth, prediction, np.zeros((8, 8), bool)) is None
    with pytest.raises(ValueError, match="lesion mask is"):
        lesion_psnr(truth, prediction, lesion[:4])


def test_windowed_ssim_is_scikit_images_ssim_term_for_term():
    from unibrain_hf.evaluation.metrics import _windowed_ssim

    rng = np.random.default_rng(0)
    for shape in ((16, 20), (9, 11, 12)):
        truth, prediction = rng.random(shape), rng.random(shape)
        prediction[: shape[0] // 2] = truth[: shape[0] // 2]  # partly equal: both SSIM terms matter
        assert _windowed_ssim(truth, prediction) == pytest.approx(
            structural_similarity(truth, prediction, data_range=1), abs=1e-12)


def _posterior_world(noise_std: float, correlation_px: float, seed: int):
    """A known posterior: truth = mean + smooth-or-white noise inside a disc, so a perfect sampler can be drawn."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    mean = 0.5 + 0.25 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    mean[(xx - 32) ** 2 + (yy - 32) ** 2 > 28 ** 2] = 0.0

    def draw():
        noise = rng.standard_normal(mean.shape)
        if correlation_px:
            noise = gaussian_filter(noise, correlation_px)
            noise /= noise.std()
        return np.clip(mean + noise_std * (mean > 0) * noise, 0, 1)

    return mean, draw


@pytest.mark.parametrize("noise_std, correlation_px, tolerance_below, tolerance_above",
                         [(0.05, 0.0, 0.01, 0.01), (0.1, 1.0, 0.0, 0.04)])
def test_sampler_ssim_matches_a_perfect_samplers_monte_carlo_ssim(noise_std, correlation_px, tolerance_below,
                                                                   tolerance_above):
    from unibrain_hf.evaluation.metrics import sampler_ssim, ssim

    mean, draw = _posterior_world(noise_std, correlation_px, seed=1)
    pairs = [(draw(), draw()) for _ in range(60)]
    monte_carlo = np.mean([structural_similarity(truth, sample, data_range=1) for truth, sample in pairs])
    estimate = np.mean([sampler_ssim(truth, mean) for truth, _ in pairs])
    assert monte_carlo - tolerance_below <= estimate <= monte_carlo + tolerance_above
    # one sample scores below the mean it was drawn around (SSIM's analogue of the 3.01 dB)
    assert estimate < np.mean([ssim(truth, mean) for truth, _ in pairs]) - 0.05


def test_sampler_ssim_of_an_exact_estimate_is_one_and_inputs_are_checked():
    from unibrain_hf.evaluation.metrics import sampler_ssim

    truth = np.random.default_rng(2).integers(0, 256, (12, 12)).astype(np.uint8)
    assert sampler_ssim(truth, truth) == pytest.approx(1.0)
    assert sampler_ssim(truth, truth.astype(np.float64) / 255) == pytest.approx(1.0)  # a float mean in [0, 1]
    with pytest.raises(ValueError, match="at least 7"):
        sampler_ssim(truth[:5], truth[:5])
    with pytest.raises(ValueError, match="shapes differ"):
        sampler_ssim(truth, truth[:10])
