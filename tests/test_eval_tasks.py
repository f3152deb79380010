"""The evaluation tasks and ``unibrain eval`` on a tiny phantom cohort with a tiny random pipeline.

The pipeline's weights are random, so the numbers themselves mean nothing here; the tests check
what gets written, which keys exist, that baselines are there, determinism, the ensemble
arithmetic, the 3-D NIfTI geometry and the error messages for unusable input.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_eval_tasks.py -q
"""

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from unibrain_hf.data.prepare import sitk_geometry
from unibrain_hf.data.radgenome import iter_subject_records
from unibrain_hf.data.schema import SPLIT_FILE_NAME
from unibrain_hf.evaluation import cli as eval_cli
from unibrain_hf.evaluation.tasks import (EvaluationInputError, evaluate_diagnosis, evaluate_generation,
                                          evaluate_unified, record_affine, reference_ensemble, subject_seed)
from unibrain_hf.pipelines.pipeline_output import UniBrainPipelineOutput

STEPS = 2
TOKENS = 8


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory) -> Path:
    from unibrain_hf.data.phantom.generator import generate_cohort

    # 12 subjects give a test split of two tumour subjects with t1n, t1c, t2w and t2f.
    return generate_cohort(tmp_path_factory.mktemp("eval") / "cohort", 12, seed=0, voxel_size=6.0)


@pytest.fixture(scope="module")
def pipeline_dir(cohort_dir, tmp_path_factory) -> Path:
    from unibrain_hf.train.bootstrap import bootstrap_pipeline

    out = tmp_path_factory.mktemp("eval") / "pipeline"
    bootstrap_pipeline(cohort_dir, out, image_size=48, hidden_size=32, layers=2, vae_steps=0, vocab_size=400,
                       log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    from unibrain_hf import UniBrainPipeline

    pipeline = UniBrainPipeline.from_pretrained(str(pipeline_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def generation_run(pipe, cohort_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "generation"
    result = evaluate_generation(pipe, cohort_dir, ["t1n"], ["t2f", "t2w"], num_inference_steps=STEPS, out_dir=out,
                                 progress=False)
    return result, out


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _image_block_ok(block: dict, targets) -> None:
    assert _finite(block["psnr"]) and _finite(block["ssim"])
    assert set(block["per_target"]) == set(targets)
    for target in targets:
        assert _finite(block["per_target"][target]["psnr"]) and -1 <= block["per_target"][target]["ssim"] <= 1


# --------------------------------------------------------------------------- generation


def test_generation_2d_writes_metrics_panels_and_images(generation_run):
    result, out = generation_run
    assert len(result.per_subject) == 2 and not result.skipped
    _image_block_ok(result.metrics, ["t2f", "t2w"])
    _image_block_ok(result.baselines["copy_input"], ["t2f", "t2w"])
    assert result.baselines["copy_input"]["modality"] == "t1n"
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"task", "settings", "metrics", "baselines", "per_subject", "skipped", "notes"}
    summary = (out / "summary.md").read_text()
    assert "UniBrain PSNR" in summary and "copy input (t1n)" in summary and "VAE ceiling" in summary
    _image_block_ok(result.baselines["vae_ceiling"], ["t2f", "t2w"])
    for target in ("t2f", "t2w"):
        for metric in ("psnr", "ssim"):
            interval = result.comparisons["imputed_vs_copy_input"][target][metric]
            assert interval["n"] == 2 and interval["low"] <= interval["mean"] <= interval["high"]
            ours = np.mean([r["imputed"][target][metric] for r in result.per_subject])
            copy = np.mean([r["copy_input"][target][metric] for r in result.per_subject])
            assert interval["mean"] == pytest.approx(ours - copy)
    for record in result.per_subject:
        for target in ("t2f", "t2w"):
            assert (out / "panels" / f"{record['subject_id']}_{target}.png").is_file()
            image = np.asarray(Image.open(out / "images" / f"{record['subject_id']}-{target}.png"))
            assert image.dtype == np.uint8 and image.shape == (36, 30)  # the input slice's own size
    assert not list(out.rglob(".*"))  # no temporary files left behind


def test_generation_is_deterministic_for_a_seed(pipe, cohort_dir, generation_run):
    first, _ = generation_run
    again = evaluate_generation(pipe, cohort_dir, ["t1n"], ["t2f", "t2w"], num_inference_steps=STEPS, progress=False)
    assert again.per_subject == first.per_subject
    other = evaluate_generation(pipe, cohort_dir, ["t1n"], ["t2f", "t2w"], num_inference_steps=STEPS, seed=1,
                                max_subjects=1, progress=False)
    assert other.per_subject[0]["imputed"] != first.per_subject[0]["imputed"]
    # Seeds depend on the subject, not on how many subjects run before it.
    assert subject_seed(0, "A") == subject_seed(0, "A") != subject_seed(0, "B") != subject_seed(1, "B")


def test_reference_ensemble_averages_rgb_then_channels():
    samples = [np.full((2, 2, 3), (10, 11, 12), np.uint8), np.full((2, 2, 3), (11, 12, 14), np.uint8)]
    # RGB mean (10.5, 11.5, 13) truncates to (10, 11, 13); its channel mean 11.33 truncates to 11.
    assert reference_ensemble(samples).tolist() == [[11, 11], [11, 11]]
    assert reference_ensemble([np.uint8([[3, 4]]), np.uint8([[4, 4]])], rgb=False).tolist() == [[3, 4]]


class _ScriptedPipe:
    """Stands in for the pipeline: returns constant RGB images of the scripted values, records seeds."""

    def __init__(self, values):
        self.values = list(values)
        self.seeds = []

    def __call__(self, images, target_modalities, generator, **kwargs):
        self.seeds.append(generator.initial_seed())
        value = self.values[(len(self.seeds) - 1) % len(self.values)]
        shape = next(iter(images.values())).shape
        return UniBrainPipelineOutput(images={t: [Image.fromarray(np.full(shape, value, np.uint8))]
                                              for t in target_modalities})


def test_sample_time_averages_the_generations(cohort_dir):
    scripted = _ScriptedPipe([100, 201])
    result = evaluate_generation(scripted, cohort_dir, ["t1n"], ["t2f"], sample_time=2, max_subjects=1,
                                 progress=False)
    assert len(scripted.seeds) == 2 and scripted.seeds[0] != scripted.seeds[1]
    single = evaluate_generation(_ScriptedPipe([150]), cohort_dir, ["t1n"], ["t2f"], max_subjects=1,
                                 progress=False)
    # floor((100 + 201) / 2) = 150: the 2-sample ensemble scores exactly like a constant 150 image.
    assert result.per_subject[0]["imputed"] == single.per_subject[0]["imputed"]


def test_generation_3d_writes_nifti_with_the_input_geometry(pipe, cohort_dir, tmp_path):
    result = evaluate_generation(pipe, cohort_dir, ["t1n", "t2w"], ["t2f"], mode="3d", slice_stride=2,
                                 num_inference_steps=STEPS, out_dir=tmp_path, max_subjects=1, progress=False)
    _image_block_ok(result.metrics, ["t2f"])
    _image_block_ok(result.baselines["copy_input"], ["t2f"])
    record = next(iter_subject_records(cohort_dir, split="test"))
    assert result.per_subject[0]["subject_id"] == record.subject_id
    depth, height, width = record.shape_zyx
    for kind in ("gen", "gt"):
        image = nib.load(str(tmp_path / "nifti" / f"{record.subject_id}_t2f_{kind}.nii.gz"))
        assert image.shape == (width, height, len(range(0, depth, 2)))
        assert image.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, record_affine(record.spacing, record.direction, 2))
        np.testing.assert_allclose(image.header.get_zooms(), (6.0, 6.0, 12.0))
        # Read back in the parquet header's own terms: the record's spacing (z times the stride) and direction.
        spacing, direction = sitk_geometry(image.affine)
        assert spacing == (record.spacing[0], record.spacing[1], 2 * record.spacing[2])
        assert direction == tuple(record.direction)
    truth = np.asarray(nib.load(str(tmp_path / "nifti" / f"{record.subject_id}_t2f_gt.nii.gz")).dataobj)
    assert truth.transpose(2, 1, 0).max() == 255  # the rescaled target, stored (x, y, z)
    assert (tmp_path / "panels" / f"{record.subject_id}_t2f.png").is_file()


# --------------------------------------------------------------------------- diagnosis and unified


def test_diagnosis_accuracy_baseline_and_predictions(pipe, cohort_dir, tmp_path):
    result = evaluate_diagnosis(pipe, cohort_dir, ["t1n", "t2f"], max_new_tokens=TOKENS, out_dir=tmp_path,
                                progress=False)
    assert set(result.metrics) >= {"accuracy", "correct", "num_subjects", "reference_rule_accuracy", "confusion"}
    assert all(r["correct"] == (r["parsed_label"] == r["ground_truth"]) for r in result.per_subject)
    assert sum(map(sum, result.metrics["confusion"]["counts"])) == 2
    assert result.baselines["best_constant"]["accuracy"] == 0.5  # one Gli, one Mening
    assert 0 <= result.metrics["accuracy"] <= 1 and result.metrics["num_subjects"] == 2
    baseline = result.baselines["majority_class"]
    assert baseline["class"] and baseline["train_subjects"] > 0 and 0 <= baseline["accuracy"] <= 1
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert [p["subject_id"] for p in predictions] == [r["subject_id"] for r in result.per_subject]
    assert {p["ground_truth"] for p in predictions} == {"Gli", "Mening"}
    assert all(isinstance(p["diagnosis"], str) and "correct" in p for p in predictions)
    assert "majority class of train" in (tmp_path / "summary.md").read_text()
    again = evaluate_diagnosis(pipe, cohort_dir, ["t1n", "t2f"], max_new_tokens=TOKENS, progress=False)
    assert again.per_subject == result.per_subject


def test_diagnosis_replaced_by_a_generation_run(pipe, cohort_dir, generation_run, tmp_path):
    _, generation_out = generation_run
    result = evaluate_diagnosis(pipe, cohort_dir, ["t1n", "t2f"], replaced_by=generation_out,
                                max_new_tokens=TOKENS, progress=False)
    assert all(record["replaced"] == ["t2f"] for record in result.per_subject)
    assert result.settings["replaced_by"].endswith("images")
    with pytest.raises(EvaluationInputError, match="no <subject>-<modality>.png"):
        evaluate_diagnosis(pipe, cohort_dir, ["t1n"], replaced_by=tmp_path, progress=False)


def test_unified_scores_text_images_and_baselines(pipe, cohort_dir, tmp_path):
    result = evaluate_unified(pipe, cohort_dir, ["t1n"], ["t2f", "t2w"], num_inference_steps=STEPS,
                              max_new_tokens=TOKENS, out_dir=tmp_path, progress=False)
    for key in ("accuracy", "rouge1", "rouge2", "rougeL"):
        assert _finite(result.metrics[key]) and 0 <= result.metrics[key] <= 1
    _image_block_ok(result.metrics["images"], ["t2f", "t2w"])
    assert set(result.baselines) == {"majority_class", "best_constant", "constant_impression", "copy_input",
                                     "vae_ceiling"}
    assert "rougeL_vs_constant_impression" in result.comparisons
    constant = result.baselines["constant_impression"]
    assert constant["text"] and all(_finite(constant[k]) for k in ("rouge1", "rouge2", "rougeL"))
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2
    assert set(predictions[0]) >= {"impression", "reference_impression", "diagnosis", "thinking", "rouge"}
    assert set(predictions[0]["thinking"]) == {"t2f", "t2w"}
    summary = (tmp_path / "summary.md").read_text()
    assert "constant training impression" in summary and "copy input (t1n)" in summary
    assert len(list((tmp_path / "panels").glob("*.png"))) == 4


# --------------------------------------------------------------------------- bad input


def test_cohort_without_the_modality_lists_what_is_available(pipe, cohort_dir):
    with pytest.raises(EvaluationInputError, match=r"no subject of split 'test' has all of \['dwi', 't2f'\].*"
                                                   r"t1n, t1c, t2w, t2f"):
        evaluate_generation(pipe, cohort_dir, ["dwi"], ["t2f"], progress=False)


def test_unknown_modality_and_split_are_named(pipe, cohort_dir):
    with pytest.raises(EvaluationInputError, match="unknown modality 't9x'; known codes are t1n"):
        evaluate_generation(pipe, cohort_dir, ["t9x"], ["t2f"], progress=False)
    with pytest.raises(EvaluationInputError, match=r"unknown split 'holdout'.*train \(8 subjects\)"):
        evaluate_diagnosis(pipe, cohort_dir, ["t1n"], split="holdout", progress=False)


def test_empty_split_is_an_error(pipe, cohort_dir, tmp_path):
    for parquet in cohort_dir.glob("*.parquet"):
        shutil.copy(parquet, tmp_path / parquet.name)
    split = json.loads((cohort_dir / SPLIT_FILE_NAME).read_text())
    (tmp_path / SPLIT_FILE_NAME).write_text(json.dumps({**split, "test": []}))
    with pytest.raises(EvaluationInputError, match="split 'test' .* has no subjects.*train: 8"):
        evaluate_unified(pipe, tmp_path, ["t1n"], ["t2f"], progress=False)


# --------------------------------------------------------------------------- command line


def test_cli_end_to_end_and_bad_input(pipeline_dir, cohort_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--pipeline", str(pipeline_dir), "--cohort", str(cohort_dir), "--steps", str(STEPS), "--quiet"]
    code = eval_cli.main([*base, "--task", "generation", "--modalities-in", "t1n", "--modalities-out", "t2f",
                          "--mode", "3d", "--slice-stride", "3", "--sample-time", "2", "--out", str(out)])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out / "summary.md")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["sample_time"] == 2 and metrics["settings"]["mode"] == "3d"
    assert "psnr" in metrics["metrics"] and "copy_input" in metrics["baselines"]
    assert len(list((out / "nifti").glob("*.nii.gz"))) == 4 and len(list((out / "panels").glob("*.png"))) == 2

    assert eval_cli.main([*base, "--task", "generation", "--modalities-in", "dwi", "--modalities-out", "t2f",
                          "--out", str(tmp_path / "bad")]) == 2
    assert "t1n, t1c, t2w, t2f" in capsys.readouterr().err
    assert eval_cli.main([*base, "--task", "diagnosis", "--modalities-in", "t1n", "--split", "nope",
                          "--out", str(tmp_path / "bad")]) == 2
    assert "train (8 subjects)" in capsys.readouterr().err
    assert eval_cli.main([*base, "--task", "generation", "--modalities-in", "t1n", "--modalities-out", "t2f",
                          "--out", str(out)]) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- does the imputation follow its input


class _EchoPipe:
    """Stands in for a pipeline that returns its input unchanged: it follows the input's anatomy exactly."""

    def __call__(self, images, target_modalities, generator, **kwargs):
        source = next(iter(images.values()))
        return UniBrainPipelineOutput(images={t: [Image.fromarray(np.asarray(source, np.uint8))]
                                              for t in target_modalities})


def _subjects_with(cohort_dir, codes, split="train"):
    return [r.subject_id for r in iter_subject_records(cohort_dir, split=split)
            if all(c in r.volumes for c in codes)][:4]


def test_input_specificity_separates_an_input_following_model_from_a_noise_prior(cohort_dir):
    from unibrain_hf.evaluation.specificity import input_specificity

    subjects = _subjects_with(cohort_dir, ["t1n", "t1c"])
    # T1c is T1n with enhancement: an echo of T1n matches its own subject's T1c far better than others'.
    echo = input_specificity(_EchoPipe(), cohort_dir, "train", subjects, "t1n", ["t1c"], STEPS)["t1c"]
    assert echo["own_vs_other_truths"]["low"] > 0
    assert echo["own_truth_psnr"] > echo["other_truths_psnr"] + 3
    # A model whose output ignores the input: every subject gets the same image, no better on its own truth.
    constant = input_specificity(_ScriptedPipe([90]), cohort_dir, "train", subjects, "t1n", ["t1c"], STEPS)["t1c"]
    assert not constant["own_vs_other_truths"]["low"] > 0
    assert constant["imputations_similarity"] > 2 * constant["truths_similarity"]


def test_impression_findings_on_normal_subjects_read_the_whole_impression():
    from unibrain_hf.evaluation.diagnosis import as_rules
    from unibrain_hf.evaluation.results import impression_findings_on_normal, names_a_lesion

    rules = as_rules()
    assert names_a_lesion("Ring-enhancing mass, most consistent with glioblastoma.", rules)
    assert not names_a_lesion("Normal MRI of the brain.", rules)
    assert not names_a_lesion("Negligible volume loss.", rules)  # word start only: not "Gli"
    records = [{"ground_truth": "Normal", "impression": "Metastatic disease."},
               {"ground_truth": "Normal", "impression": "No acute abnormality."},
               {"ground_truth": "Gli", "impression": "Glioblastoma."}]
    assert impression_findings_on_normal(records, rules)["mean"] == 0.5
    assert impression_findings_on_normal(records[2:], rules) is None


# --------------------------------------------------------------------------------------
# Copy attention: where the imputed image's tokens look
# --------------------------------------------------------------------------------------

def test_recorded_attention_probabilities_are_what_the_layer_applied():
    from types import SimpleNamespace

    from unibrain_hf.modeling.attention import PackedAttentionLayout, packed_attention, recording_attention

    torch.manual_seed(0)
    layout = PackedAttentionLayout([5, 4], [2, 3, 4], ["causal", "noise", "full"])
    query, key, value = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    module = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"), scaling=8 ** -0.5,
                             num_key_value_groups=2, training=False)
    plain = packed_attention(module, query, key, value, layout)
    with recording_attention() as record:
        recorded = packed_attention(module, query, key, value, layout)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)  # recording does not change the layer
    assert len(record) == 1 and [p.shape for p in record[0]] == [(4, 5, 5), (4, 4, 4)]
    # probabilities @ values (query head h reads KV head h // 2) give the layer's output, sample by sample
    values = value.repeat_interleave(2, dim=1)
    rebuilt = torch.cat([torch.einsum("hqk,khd->qhd", p, values[s:e]).reshape(e - s, -1)
                         for p, (s, e) in zip(record[0], [(0, 5), (5, 9)])])
    torch.testing.assert_close(rebuilt, plain, rtol=1e-5, atol=1e-5)
    allowed = layout.dense_masks()[0] == 0
    assert torch.all(record[0][0][:, ~allowed] == 0) and torch.allclose(record[0][0].sum(-1), torch.ones(4, 5))
    with recording_attention() as outer, recording_attention() as inner:
        packed_attention(module, query, key, value, layout)
    assert len(outer) == len(inner) == 1
    packed_attention(module, query, key, value, layout)
    assert len(outer) == 1  # nothing is recorded after the block


def test_grid_masses_tell_an_exact_copy_from_a_blur_and_a_uniform_read():
    from unibrain_hf.evaluation.copy_attention import grid_masses

    rows, cols = 3, 4
    n = rows * cols
    queries, keys = torch.arange(2, 2 + n), torch.arange(20, 20 + n)  # two images inside a longer sequence
    length = 20 + n

    def probabilities(block):
        full = torch.zeros(1, length, length)
        full[0, 2:2 + n, 20:20 + n] = block
        return full

    exact = grid_masses(probabilities(torch.eye(n)), queries, keys, (rows, cols))[0]
    assert exact.tolist() == [1.0, 1.0, 0.0]
    uniform = grid_masses(probabilities(torch.full((n, n), 0.5 / n)), queries, keys, (rows, cols))[0]
    torch.testing.assert_close(uniform[:2], torch.tensor([0.5, 0.5 / n]))
    # a 3x3 box blur: the exact cell gets 1/9 of the mass read, the 8 neighbours what falls inside the image
    cell = torch.arange(n)
    distance = torch.maximum((cell[:, None] // cols - cell[None] // cols).abs(),
                             (cell[:, None] % cols - cell[None] % cols).abs())
    blur = grid_masses(probabilities((distance <= 1).float() / 9), queries, keys, (rows, cols))[0]
    assert float(blur[1]) == pytest.approx(1 / 9) and float(blur[2]) > 2 * float(blur[1])
    with pytest.raises(ValueError, match="3x4 tokens"):
        grid_masses(probabilities(torch.eye(n)), queries[:-1], keys, (rows, cols))


def test_copy_attention_reads_every_layer_and_head_of_a_pipeline(pipe, cohort_dir):
    from unibrain_hf.evaluation.copy_attention import copy_attention

    subjects = _subjects_with(cohort_dir, ["t1n", "t2f"], split="test")
    result = copy_attention(pipe, cohort_dir, "test", subjects, "t1n", "t2f", noise_levels=(0.5, 0.9))
    config = pipe.model.config.text_config
    assert result["subjects"] == len(subjects) and len(result["layers"]) == config.num_hidden_layers
    assert all(len(layer) == config.num_attention_heads for layer in result["layers"])
    rows, cols = result["grid"]
    assert result["tokens"] == rows * cols > 1
    for layer in result["layers"]:
        for head in layer:
            assert 0 <= head["same_position"] + head["neighbours"] <= head["on_input"] + 1e-6 <= 1 + 1e-6
    best = result["sharpest"]
    assert best["same_position"] == max(h["same_position"] for layer in result["layers"] for h in layer)
    assert best["uniform_share"] == pytest.approx(1 / result["tokens"])
    with pytest.raises(ValueError, match="noise_levels"):
        copy_attention(pipe, cohort_dir, "test", subjects, "t1n", "t2f", noise_levels=(1.0,))
    with pytest.raises(ValueError, match="no subject"):
        copy_attention(pipe, cohort_dir, "test", ["NOT-A-SUBJECT"], "t1n", "t2f")


# --------------------------------------------------------------------------------------
# Predictability: a supervised estimate of the conditional mean
# --------------------------------------------------------------------------------------

def test_conditional_mean_baseline_learns_an_inverted_contrast_that_copying_cannot(cohort_dir):
    from unibrain_hf.evaluation.predictability import SAMPLING_PENALTY_DB, conditional_mean_baseline

    result = conditional_mean_baseline(cohort_dir, "t1n", "t2w", eval_split="test", steps=150, width=8,
                                       slices_per_subject=4)
    summary = result["summary"]
    assert len(result["per_subject"]) >= 1 and result["settings"]["training_slices"] > 10
    # T2w inverts T1n's tissue contrast: copying scores far below a fitted map
    assert summary["delta_psnr_vs_copy"] > 3 and summary["ssim"] > summary["copy_ssim"]
    assert summary["sampler_psnr_estimate"] == pytest.approx(summary["psnr"] - SAMPLING_PENALTY_DB)
    assert SAMPLING_PENALTY_DB == pytest.approx(3.0103, abs=1e-4)
    # a sample around the fitted mean scores below the mean's SSIM, per subject, and is paired against the copy
    assert all(row["sampler_ssim"] < row["ssim"] for row in result["per_subject"] if row["ssim"] < 1)
    assert summary["sampler_ssim_delta_vs_copy"] == pytest.approx(summary["sampler_ssim_estimate"] - summary["copy_ssim"])
    assert summary["sampler_ssim_vs_copy_interval"]["mean"] == pytest.approx(summary["sampler_ssim_delta_vs_copy"])
    again = conditional_mean_baseline(cohort_dir, "t1n", "t2w", eval_split="test", steps=150, width=8,
                                      slices_per_subject=4)
    assert again["summary"] == summary  # seeded
    # the lesion region alone, paired against the copy, on the subjects with a lesion on the scored slice
    with_lesion = [row for row in result["per_subject"] if "lesion_psnr" in row]
    assert with_lesion and all("copy_lesion_psnr" in row for row in with_lesion)
    assert summary["lesion_delta_psnr_vs_copy_interval"]["n"] == len(with_lesion)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        conditional_mean_baseline(cohort_dir, "t1n", "t2w", steps=0)
    with pytest.raises(ValueError, match="has both t1n and dwi"):
        conditional_mean_baseline(cohort_dir, "t1n", "dwi", steps=1)


def test_a_seeded_copy_head_reads_the_same_position_before_any_training(cohort_dir, tmp_path):
    from unibrain_hf import UniBrainPipeline
    from unibrain_hf.evaluation.copy_attention import copy_attention
    from unibrain_hf.train.bootstrap import bootstrap_pipeline, build_model
    from unibrain_hf.train.copy_head import seed_copy_head

    subjects = _subjects_with(cohort_dir, ["t1n", "t2f"], split="test")
    sharpest = {}
    for gain in (None, 3.0):
        out = tmp_path / f"gain{gain}"
        bootstrap_pipeline(cohort_dir, out, image_size=48, hidden_size=64, layers=2, heads=2, kv_heads=1, vae_steps=0,
                           vocab_size=400, log=lambda *_: None, copy_head_gain=gain)
        pipe = UniBrainPipeline.from_pretrained(str(out))
        sharpest[gain] = copy_attention(pipe, cohort_dir, "test", subjects, "t1n", "t2f")["sharpest"]
    assert sharpest[None]["exact_share"] < 3 * sharpest[None]["uniform_share"]  # a random model reads no position
    seeded = sharpest[3.0]
    assert (seeded["layer"], seeded["head"]) == (0, 0) and seeded["exact_share"] > 0.8
    assert seeded["same_position"] > 10 * sharpest[None]["same_position"]

    model = build_model(UniBrainPipeline.from_pretrained(str(tmp_path / "gainNone")).tokenizer, hidden_size=64,
                        layers=2, heads=2, kv_heads=1)
    for bad, match in (({"gain": 0.0}, "gain"), ({"layer": 2}, "layer"), ({"head": 2}, "head")):
        with pytest.raises(ValueError, match=match):
            seed_copy_head(model, **bad)
    narrow = build_model(UniBrainPipeline.from_pretrained(str(tmp_path / "gainNone")).tokenizer, hidden_size=64,
                         layers=1, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="heads of at least 32 channels"):
        seed_copy_head(narrow)
    with pytest.raises(ValueError, match="heads of at least 32 channels"):  # refused before the VAE fit
        bootstrap_pipeline(cohort_dir, tmp_path / "narrow", hidden_size=64, heads=4, kv_heads=2, vae_steps=5,
                           log=lambda *_: None, copy_head_gain=2.0)
    assert not (tmp_path / "narrow").exists()


def test_latent_mean_baseline_regresses_in_the_pipelines_own_vae_space(cohort_dir, tmp_path):
    from unibrain_hf import UniBrainPipeline
    from unibrain_hf.evaluation.calls import vae_decode_slices, vae_encode_slices, vae_reconstruction
    from unibrain_hf.evaluation.predictability import latent_mean_baseline
    from unibrain_hf.train.bootstrap import bootstrap_pipeline

    pipe = UniBrainPipeline.from_pretrained(str(bootstrap_pipeline(cohort_dir, tmp_path / "init", image_size=32,
                                                                   hidden_size=32, layers=2, heads=2, kv_heads=1,
                                                                   vae_steps=20, seed=0)))
    # the encode/decode pair is the VAE ceiling's own path
    image = (np.arange(32 * 28).reshape(32, 28) % 251).astype(np.uint8)
    latents, prepared = vae_encode_slices(pipe, [image, image])
    decoded = vae_decode_slices(pipe, latents, prepared)
    assert all(np.array_equal(d, vae_reconstruction(pipe, image)) for d in decoded)

    result = latent_mean_baseline(pipe, cohort_dir, "t1n", "t2w", eval_split="test", steps=60, width=8,
                                  slices_per_subject=3)
    summary, settings = result["summary"], result["settings"]
    assert len(result["per_subject"]) >= 1 and settings["training_slices"] > 5
    assert settings["latent_shape"][0] == pipe.vae.config.latent_channels
    for metric in ("psnr", "ssim"):
        interval = summary[f"delta_{metric}_vs_copy_interval"]
        assert interval["mean"] == pytest.approx(summary[metric] - summary[f"copy_{metric}"])
    # the fit learnt: better than the same network after one step
    one_step = latent_mean_baseline(pipe, cohort_dir, "t1n", "t2w", eval_split="test", steps=1, width=8,
                                    slices_per_subject=3)
    assert settings["final_training_loss"] < one_step["settings"]["final_training_loss"]
    again = latent_mean_baseline(pipe, cohort_dir, "t1n", "t2w", eval_split="test", steps=60, width=8,
                                 slices_per_subject=3)
    assert again["summary"] == summary  # seeded
    with pytest.raises(ValueError, match="width must be a positive int"):
        latent_mean_baseline(pipe, cohort_dir, "t1n", "t2w", width=0)
    with pytest.raises(ValueError, match="has both t1n and dwi"):
        latent_mean_baseline(pipe, cohort_dir, "t1n", "dwi", steps=1)

    # the two diagnostics: one token's reach, and the model's flow objective sampled once
    token = latent_mean_baseline(pipe, cohort_dir, "t1n", "t2w", eval_split="test", steps=20, width=8,
                                 slices_per_subject=3, reach="token")
    flow = latent_mean_baseline(pipe, cohort_dir, "t1n", "t2w", eval_split="test", steps=20, width=8,
                                slices_per_subject=3, reach="token", objective="flow", sample_points=3)
    assert (token["settings"]["reach"], token["settings"]["objective"], token["settings"]["sample_points"]) == \
        ("token", "regression", None)
    assert (flow["settings"]["objective"], flow["settings"]["sample_points"]) == ("flow", 3)
    assert [row["subject_id"] for row in flow["per_subject"]] == [row["subject_id"] for row in token["per_subject"]]
    assert flow["summary"] != token["summary"]
    neighbours = latent_mean_baseline(pipe, cohort_dir, "t1n", "t2w", eval_split="test", steps=20, width=8,
                                      slices_per_subject=3)
    assert token["summary"] != neighbours["summary"]  # the reach reaches the network
    assert latent_mean_baseline(pipe, cohort_dir, "t1n", "t2w", eval_split="test", steps=20, width=8,
                                slices_per_subject=3, reach="token", objective="flow",
                                sample_points=3)["summary"] == flow["summary"]  # seeded, sampling too
    for bad, message in ((dict(reach="global"), "reach must be one of neighbours, token"),
                         (dict(objective="score"), "objective must be one of regression, flow"),
                         (dict(objective="flow", sample_points=1), "sample_points must be at least 2"),
                         (dict(sample_points=0), "sample_points must be a positive int")):
        with pytest.raises(ValueError, match=message):
            latent_mean_baseline(pipe, cohort_dir, "t1n", "t2w", steps=1, **bad)


def test_latent_networks_read_what_their_reach_says():
    from unibrain_hf.evaluation.predictability import _latent_network

    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    moved = latents.clone()
    moved[0, :, 2:4, 4:6] += 1.0  # one 2x2 generation token
    for reach, changed_rows, changed_cols in (("token", (2, 4), (4, 6)), ("neighbours", (0, 6), (2, 8))):
        network = _latent_network(4, 4, 8, reach, patch=2)
        with torch.no_grad():
            changed = (network(moved) - network(latents)).abs().amax(dim=(0, 1)) > 0
        expected = torch.zeros(8, 8, dtype=torch.bool)
        expected[slice(*changed_rows), slice(*changed_cols)] = True
        assert torch.equal(changed, expected), reach
