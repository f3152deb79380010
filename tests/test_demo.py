"""The main job's recipe plumbing and report logic.

CI runs ``unibrain demo --quick``; one test here re-scores a copy of it.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_demo.py -q
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from unibrain_hf.demo import (FULL, LOSSES_FILE, QUICK, read_stage_record, stage_config, vae_recipe,
                              write_stage_record)
from unibrain_hf.demo_report import comparisons, loss_trend, plot_loss_curves
from unibrain_hf.evaluation.results import UnifiedResult, DiagnosisResult, accuracy_summary, image_comparisons

SUBJECTS = [f"PHANTOM-{kind}-{i:05d}" for i in range(10) for kind in ("GLI", "NOR")]


def test_plan_assignments_are_typed_and_checked():
    plan = FULL.replace(["unified_steps=2500", "unified_lr=1e-3", "lr_scheduler=linear", "targets=t2f"])
    assert (plan.unified_steps, plan.unified_lr, plan.lr_scheduler, plan.target_list) == (2500, 1e-3, "linear",
                                                                                          ["t2f"])
    assert FULL.unified_steps != 2500  # a copy, the preset is unchanged
    with pytest.raises(SystemExit, match="FIELD one of"):
        FULL.replace(["no_such_field=1"])
    recipe = vae_recipe(FULL.replace(["vae_latent_channels=8", "vae_downsample=8"]))
    assert (recipe.latent_channels, recipe.downsample, recipe.steps) == (8, 8, FULL.vae_steps)
    with pytest.raises(SystemExit, match="not a int"):
        FULL.replace(["layers=four"])


def test_stage_config_carries_the_plan(tmp_path):
    (tmp_path / "cohort").mkdir()
    (tmp_path / "init").mkdir()
    config = stage_config("unified", tmp_path / "runs", tmp_path / "init", tmp_path / "cohort", 40, 5e-4,
                          QUICK.replace(["lr_scheduler=cosine", "min_lr_ratio=0.2", "tokens_per_step=512",
                                         "ema_decay=0.99"]))
    assert config.train.max_steps == 40 and config.train.learning_rate == 5e-4
    assert config.train.ema_decay == 0.99
    assert (config.train.lr_scheduler, config.train.min_lr_ratio) == ("cosine", 0.2)
    assert config.data.expected_num_tokens == 512 and config.data.image_size == QUICK.image_size
    # the ViT's copy: by default the largest multiple of its 14-pixel patch within the slice, else as set
    assert (config.data.vit_max_size, config.data.vit_min_size) == (QUICK.image_size - QUICK.image_size % 14, 28)
    bigger = stage_config("align", tmp_path / "runs", tmp_path / "init", tmp_path / "cohort", 4, 1e-3,
                          QUICK.replace(["vit_image_size=84"]))
    assert (bigger.data.vit_max_size, bigger.data.vit_min_size) == (84, 84)


def test_stage_two_can_average_its_weights_over_longer_than_the_other_stages(tmp_path):
    (tmp_path / "cohort").mkdir()
    (tmp_path / "init").mkdir()
    plan = QUICK.replace(["ema_decay=0.9", "unified_ema_decay=0.999"])
    decays = {stage: stage_config(stage, tmp_path / "runs", tmp_path / "init", tmp_path / "cohort", 4, 1e-3,
                                  plan).train.ema_decay for stage in ("align", "unified", "dhs")}
    assert decays == {"align": 0.9, "unified": 0.999, "dhs": 0.9}
    unset = stage_config("unified", tmp_path / "runs", tmp_path / "init", tmp_path / "cohort", 4, 1e-3,
                         QUICK.replace(["ema_decay=0.9"]))
    assert unset.train.ema_decay == 0.9  # 0: stage 2 follows ema_decay


def _image_record(subject, ours, copy, target="t2f"):
    return {target: {"psnr": ours, "ssim": ours / 40}}, {target: {"psnr": copy, "ssim": copy / 40}}


def _unified(per_subject, name="unified"):
    metrics, baselines, compared = accuracy_summary(per_subject, ["PHANTOM-GLI-00099"], None)
    compared["imputed_vs_copy_input"] = image_comparisons(per_subject, ["t2f"])
    metrics["images"] = {"per_target": {"t2f": {"psnr": 0.0, "ssim": 0.0}}}
    return UnifiedResult(name, {}, metrics=metrics, baselines=baselines, per_subject=per_subject,
                         comparisons=compared)


def _diagnosis(per_subject):
    metrics, baselines, compared = accuracy_summary(per_subject, ["PHANTOM-GLI-00099"], None)
    return DiagnosisResult("diagnosis", {}, metrics=metrics, baselines=baselines, per_subject=per_subject,
                           comparisons=compared)


def _records(correct_every, psnr_gain, seed):
    rng = np.random.default_rng(seed)
    records = []
    for position, subject in enumerate(SUBJECTS):
        truth = "Gli" if "-GLI-" in subject else "Normal"
        right = position % correct_every == 0
        parsed = truth if right else ("Normal" if truth == "Gli" else "Gli")
        copy = float(rng.normal(15, 1))
        imputed, baseline = _image_record(subject, copy + psnr_gain + float(rng.normal(0, 0.3)), copy)
        records.append({"subject_id": subject, "ground_truth": truth, "parsed_label": parsed, "correct": right,
                        "reference_correct": right, "diagnosis": f"Final Diagnosis: {parsed}",
                        "imputed": imputed, "copy_input": baseline})
    return records


def test_reused_stage_finds_its_checkpoint_after_the_run_folder_moved(tmp_path, monkeypatch):
    """--reuse-stages on a copied run folder, from another working directory, chains from the copy's checkpoint."""
    import shutil

    monkeypatch.chdir(tmp_path)
    stage = tmp_path / "runs" / "demo" / "runs" / "align"
    (stage / "checkpoints" / "step-0000300").mkdir(parents=True)
    losses = [{"step": 1, "loss": 1.0}]
    # The trainer reports the checkpoint relative to the working directory the demo ran in.
    write_stage_record(stage, 1, losses, "runs/demo/runs/align/checkpoints/step-0000300")
    assert json.loads((stage / LOSSES_FILE).read_text())["last_checkpoint"] == "checkpoints/step-0000300"

    copy = tmp_path / "elsewhere" / "align"
    shutil.copytree(stage, copy)
    shutil.rmtree(tmp_path / "runs")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert read_stage_record(copy) == (copy / "checkpoints" / "step-0000300", losses)

    # A record written by an older version holds the working-directory path; its last part names the checkpoint.
    (copy / LOSSES_FILE).write_text(json.dumps({"steps": 1, "losses": losses,
                                                "last_checkpoint": "runs/demo/runs/align/checkpoints/step-0000300"}))
    assert read_stage_record(copy)[0] == copy / "checkpoints" / "step-0000300"
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(SystemExit, match="step-0000300.*train the stage again"):
        read_stage_record(copy)


def test_comparisons_pair_the_same_subjects_and_decide_the_claims():
    results = {"targets": ["t2f"], "all_sequences": ["t1n", "t2f"],
               "unified": _unified(_records(1, 2.0, 0)),  # every diagnosis right, +2 dB over copying
               "unified_stage2": _unified(_records(1, 1.0, 0), "unified_stage2"),
               "diagnosis_t1n": _diagnosis(_records(2, 0.0, 0)),  # half right = the best constant answer
               "diagnosis_all": _diagnosis(_records(1, 0.0, 0))}
    compared = comparisons(results)
    assert compared["imputation"]["t2f"]["psnr"]["low"] > 1.5
    assert compared["dhs_vs_stage2"]["t2f"]["psnr"]["mean"] == pytest.approx(1.0, abs=0.2)
    after = compared["diagnosis"]["after unified imputation (stage 3)"]
    assert after["accuracy"] == 1.0 and after["vs_t1n_alone"]["mean"] == pytest.approx(0.5)
    assert compared["diagnosis"]["T1n alone (diagnosis task)"]["vs_best_constant"]["mean"] == pytest.approx(0.0)
    verdicts = list(compared["verdicts"].values())
    assert verdicts == [True, True, True, False, True]  # T1n alone does not beat the best constant answer
    assert set(compared["data_allow"]) == set(compared["verdicts"]) and not any(compared["data_allow"].values())
    # With the supervised estimates measured, the claims they bound say what the data allow.
    from unibrain_hf.demo_report import expected_sampler_delta

    results["predictability"] = {"t2f": {"summary": {"psnr": 17.0}}}
    results["diagnosability"] = {"t1n": {"summary": {"vs_best_constant": {"mean": 0.0, "low": -0.2, "high": 0.2,
                                                                          "n": 4, "excludes_zero": False}}}}
    copy = results["unified"].baselines.setdefault("copy_input", {"per_target": {}})
    copy["per_target"]["t2f"] = {"psnr": 15.0}
    assert expected_sampler_delta(results, "t2f") == pytest.approx(17.0 - 3.0103 - 15.0, abs=1e-4)
    assert expected_sampler_delta({**results, "predictability": None}, "t2f") is None
    allowed = list(comparisons(results)["data_allow"].values())
    assert allowed[0] == "a perfect one-sample imputation is expected at Δ PSNR t2f -1.01 dB"
    # with the SSIM estimate measured too (a results file from before it has none: the PSNR text alone, above)
    assert expected_sampler_delta(results, "t2f", "ssim") is None
    results["predictability"]["t2f"]["summary"]["sampler_ssim_estimate"] = 0.68
    copy["per_target"]["t2f"]["ssim"] = 0.65
    assert expected_sampler_delta(results, "t2f", "ssim") == pytest.approx(0.03)  # no penalty: the estimate is one
    allowed = list(comparisons(results)["data_allow"].values())
    assert allowed[0] == "a perfect one-sample imputation is expected at Δ PSNR t2f -1.01 dB; Δ SSIM t2f +0.030"
    results["latent_predictability"] = {"t2f": {"summary": {"delta_ssim_vs_copy_interval": {"mean": -0.01}}}}
    assert list(comparisons(results)["data_allow"].values())[0].endswith(
        "; the conditional mean regressed in the VAE's latent space (the model's own): Δ SSIM t2f -0.010")
    with pytest.raises(ValueError, match="metric must be"):
        expected_sampler_delta(results, "t2f", "lpips")
    assert allowed[2] == allowed[3] == "a classifier fitted on T1n: Δ vs best constant +0.000 [-0.200, +0.200]"
    assert allowed[1] == allowed[4] == ""
    # Findings on normal subjects: T1n alone is right on every glioma and calls every normal subject "Gli".
    assert results["diagnosis_t1n"].metrics["findings_on_normal"]["mean"] == 1.0
    assert results["unified"].metrics["findings_on_normal"]["mean"] == 0.0
    results["diagnosis_all"] = _diagnosis(_records(1, 0.0, 0)[::-1])
    with pytest.raises(RuntimeError, match="different subjects"):
        comparisons(results)


def test_loss_curves_have_a_trend_and_a_figure(tmp_path):
    steps = [{"step": s, "loss": 2.0 / (1 + s / 50), "mse": 1.0 / (1 + s / 50), "ce": 1.0 / (1 + s / 50)}
             for s in range(1, 201)]
    flat = [{"step": s, "loss": 1.0 + 0.1 * np.sin(s), "mse": None, "ce": None} for s in range(1, 101)]
    trend = loss_trend(steps)
    assert trend["last_10pct"] < 0.5 * trend["first_10pct"] and trend["steps"] == 200
    assert abs(loss_trend(flat)["relative_change"]) < 0.05
    assert loss_trend(steps[:5]) is None
    path = plot_loss_curves(tmp_path / "curves.png", {"stage 2": steps, "stage 3": flat})
    with Image.open(path) as image:
        assert image.width > 600 and image.height > 300


def test_fitted_vae_has_a_narrow_posterior_and_unit_variance_latents():
    """The flow model predicts posterior *samples*: their noise must be small next to the signal."""
    import torch

    from unibrain_hf.train.bootstrap import VaeRecipe, _to_model_range, fit_vae

    rng = np.random.default_rng(0)
    images = (rng.random((24, 16, 16)) * 255).astype(np.uint8)
    vae = fit_vae(images, recipe=VaeRecipe(steps=3, downsample=4, base_channels=8, latent_noise=0.1),
                  log=lambda *_: None)
    with torch.no_grad():
        posterior = vae.encode(_to_model_range(images)).latent_dist
    scale = vae.config.scaling_factor
    normalised_means = (posterior.mean - vae.config.shift_factor) * scale
    assert normalised_means.std().item() == pytest.approx(1.0, rel=0.05)
    assert (posterior.std * scale).max().item() == pytest.approx(0.1, rel=0.05)
    assert posterior.mean.shape[-1] == 4  # 16 px / a 4x VAE


def test_intensity_lookup_baseline_remaps_contrast_and_keeps_anatomy(tmp_path):
    """The lookup is identity when source and target are the same sequence, and beats a blank image otherwise."""
    from unibrain_hf.data.phantom.generator import generate_cohort
    from unibrain_hf.data.radgenome import iter_subject_records
    from unibrain_hf.demo_report import lookup_table_baseline
    from unibrain_hf.evaluation.cohort import evaluation_slice_index, scaled_volumes
    from unibrain_hf.evaluation.metrics import psnr

    cohort = generate_cohort(tmp_path / "cohort", 12, seed=0, voxel_size=6.0)
    records = [r for r in iter_subject_records(cohort, split="test") if {"t1n", "t2w"} <= set(r.volumes)]
    subjects = [r.subject_id for r in records]
    assert subjects
    same = lookup_table_baseline(cohort, "test", subjects, "t1n", ["t1n"])
    assert same["per_target"]["t1n"]["psnr"] > 40  # every training intensity maps to itself
    found = lookup_table_baseline(cohort, "test", subjects, "t1n", ["t2w"])
    blank = []
    for record in records:
        truth = scaled_volumes(record, ["t2w"])["t2w"][evaluation_slice_index(record)]
        blank.append(psnr(truth, np.zeros_like(truth)))
    assert found["per_target"]["t2w"]["psnr"] > np.mean(blank) + 3


def test_quick_demo_rescored_from_a_copied_folder_reuses_every_stage(tmp_path, monkeypatch):
    """The ablation path of docs/DEMO_RUN.md: copy a run, re-score it from elsewhere with --reuse-stages."""
    import shutil

    from unibrain_hf.demo import main

    monkeypatch.chdir(tmp_path)
    assert main(["--quick", "--out", "runs/demo"]) == 0
    shutil.copytree(tmp_path / "runs" / "demo", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "report")
    shutil.rmtree(tmp_path / "runs")  # nothing of the first run is left to read
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    assert main(["--quick", "--out", "../copy", "--reuse-stages", "--set", "inference_steps=3"]) == 0
    summary = json.loads((tmp_path / "copy" / "report" / "demo.json").read_text())
    assert {name for name in summary["phases"] if name.endswith("(reused)")} == {
        "stage 1 (align) (reused)", "stage 2 (unified) (reused)", "stage 3 (dhs) (reused)"}
    assert summary["plan"]["inference_steps"] == 3
    # the report says where each model's imputation looks, for every target
    assert set(summary["copy_attention"]) == {"stage 3", "stage 2"}
    for per_target in summary["copy_attention"].values():
        assert set(per_target) == set(summary["plan"]["targets"].split(","))
        assert all(0 <= best["same_position"] <= best["on_input"] <= 1 for best in per_target.values())
    text = (tmp_path / "copy" / "report" / "summary.md").read_text()
    assert "Where the imputed image looks" in text and "How predictable is each target from T1n" in text
    # the information bound of every target: a conditional-mean estimate fitted for the plan's steps
    assert set(summary["predictability"]) == set(summary["plan"]["targets"].split(","))
    assert all(found["settings"]["steps"] == summary["plan"]["predictability_steps"] > 0
               for found in summary["predictability"].values())
    # and the same regression in the VAE's latent space, as a column of that table
    assert set(summary["latent_predictability"]) == set(summary["predictability"])
    assert all(found["settings"]["steps"] == summary["plan"]["latent_predictability_steps"] > 0
               for found in summary["latent_predictability"].values())
    assert "regression in the VAE's latent space" in text
    # how diagnosable the subjects are: a classifier per set of images, and the imputations read in place of
    # the real targets for every scored subject
    assert "How diagnosable are these subjects" in text
    found = summary["diagnosability"]
    assert set(found) == {"t1n", "t1n+targets", "all"}
    assert all(f["settings"]["steps"] == summary["plan"]["diagnosability_steps"] > 0 for f in found.values())
    targets = sorted(summary["plan"]["targets"].split(","))
    replaced = [row["replaced"] for row in found["t1n+targets"]["per_subject"]]
    assert replaced == [targets] * summary["headline"]["subjects"]
    assert 0 <= found["t1n+targets"]["summary"]["replaced_accuracy"] <= 1
    claims = text.split("## Claims", 1)[1].split("##", 1)[0]
    assert "a perfect one-sample imputation is expected" in claims and "a classifier fitted on T1n" in claims

    # Both supervised estimates can be switched off: their tables and the claims' bounds go, the report stays.
    assert main(["--quick", "--out", "../copy", "--reuse-stages", "--set", "diagnosability_steps=0",
                 "--set", "predictability_steps=0"]) == 0
    summary = json.loads((tmp_path / "copy" / "report" / "demo.json").read_text())
    assert summary["diagnosability"] == {} and summary["predictability"] == {} and summary["latent_predictability"] == {}
    assert not any(summary["comparisons"]["data_allow"].values())
    text = (tmp_path / "copy" / "report" / "summary.md").read_text()
    assert "How diagnosable" not in text and "How predictable" not in text and "## Claims" in text


def test_bootstrap_builds_the_vae_latent_the_plan_asks_for(tmp_path):
    """--set vae_latent_channels reaches the fitted VAE and the model's latent geometry."""
    from unibrain_hf.data.phantom.generator import generate_cohort
    from unibrain_hf.train.bootstrap import bootstrap_pipeline

    cohort = generate_cohort(tmp_path / "cohort", 6, seed=0, voxel_size=6.0)
    plan = QUICK.replace(["vae_latent_channels=4", "vae_steps=0"])
    out = bootstrap_pipeline(cohort, tmp_path / "init", image_size=plan.image_size, hidden_size=plan.hidden_size,
                             layers=plan.layers, vae=vae_recipe(plan), log=lambda *_: None)
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    model_config = json.loads((out / "model" / "config.json").read_text())
    assert vae_config["latent_channels"] == 4 and model_config["latent_channels"] == 4


def test_bootstrap_shrinks_slices_larger_than_the_canvas_and_refuses_a_canvas_off_the_latent_grid(tmp_path):
    """A canvas smaller than the cohort's slices fits the VAE on shrunk slices (it used to crash inside torch's
    loss); a side the VAE and the latent patches do not tile is refused by name before anything is written."""
    from unibrain_hf.data.phantom.generator import generate_cohort
    from unibrain_hf.demo import main
    from unibrain_hf.train.bootstrap import bootstrap_pipeline

    cohort = generate_cohort(tmp_path / "cohort", 6, seed=0, voxel_size=6.0)  # axial slices 36 × 32
    plan = QUICK.replace(["vae_steps=2"])
    stride = plan.vae_downsample * plan.latent_patch_size
    out = bootstrap_pipeline(cohort, tmp_path / "init", image_size=2 * stride, hidden_size=plan.hidden_size,
                             layers=plan.layers, vae=vae_recipe(plan), log=lambda *_: None)
    assert json.loads((out / "vae_fit.json").read_text())["image_size"] == 2 * stride
    with pytest.raises(ValueError, match="image_size must be a positive multiple"):
        bootstrap_pipeline(cohort, tmp_path / "bad", image_size=stride + 4, vae=vae_recipe(plan), log=lambda *_: None)
    assert not (tmp_path / "bad").exists()
    # the model's sizes too, before the tokenizer and the VAE fit
    with pytest.raises(ValueError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        bootstrap_pipeline(cohort, tmp_path / "bad", image_size=2 * stride, heads=4, kv_heads=3, vae=vae_recipe(plan),
                           log=lambda *_: pytest.fail("work started before the sizes were checked"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit, match="image_size=.*multiple of vae_downsample"):
        main(["--quick", "--out", str(tmp_path / "demo"), "--set", f"image_size={stride + 4}"])
    assert not (tmp_path / "demo").exists()


def test_bootstrap_sizes_the_vit_copy_as_the_plan_asks_and_refuses_sizes_off_the_patch_grid(tmp_path):
    """--set vit_image_size reaches the processor that inference uses; a bad size fails before any fitting."""
    from unibrain_hf.data.phantom.generator import generate_cohort
    from unibrain_hf.demo import main
    from unibrain_hf.processing.processor import UniBrainProcessor
    from unibrain_hf.train.bootstrap import bootstrap_pipeline

    cohort = generate_cohort(tmp_path / "cohort", 6, seed=0, voxel_size=6.0)
    plan = QUICK.replace(["vit_image_size=84", "vae_steps=0"])
    out = bootstrap_pipeline(cohort, tmp_path / "init", image_size=plan.image_size, hidden_size=plan.hidden_size,
                             layers=plan.layers, vae=vae_recipe(plan), log=lambda *_: None,
                             vit_image_size=plan.vit_image_size)
    processor = UniBrainProcessor.from_pretrained(out / "processor")
    image = np.zeros((plan.image_size, plan.image_size, 3), dtype=np.uint8)
    assert processor.vit_resize.target_size(plan.image_size, plan.image_size) == (84, 84)
    assert processor.vit_resize(Image.fromarray(image)).size == (84, 84)
    for bad in (50, 2 * plan.image_size + 14):
        with pytest.raises(ValueError, match="vit_image_size"):
            bootstrap_pipeline(cohort, tmp_path / f"bad{bad}", image_size=plan.image_size, vit_image_size=bad,
                               vae=vae_recipe(plan), log=lambda *_: None)
        assert not (tmp_path / f"bad{bad}").exists()
        with pytest.raises(SystemExit, match="vit_image_size"):
            main(["--quick", "--out", str(tmp_path / "demo"), "--set", f"vit_image_size={bad}"])
        assert not (tmp_path / "demo").exists()


def test_the_plan_copy_head_reaches_the_bootstrapped_model_and_sizes_without_room_are_refused(tmp_path, monkeypatch):
    import unibrain_hf.train.trainer as trainer
    from safetensors.torch import load_file

    from unibrain_hf.demo import main
    from unibrain_hf.train.copy_head import copy_head_channels

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="copy_head_gain=2.0: a copy head needs .* heads of at least 32 channels"):
        main(["--quick", "--out", "small", "--set", "copy_head_gain=2"])  # the quick model's heads are 8 wide
    assert not (tmp_path / "small").exists()  # refused before anything was written
    with pytest.raises(SystemExit, match="copy_head_gain=-1.0: the copy head's gain must be > 0"):
        main(["--quick", "--out", "negative", "--set", "hidden_size=64", "--set", "heads=2", "--set", "kv_heads=1",
              "--set", "copy_head_gain=-1"])
    assert not (tmp_path / "negative").exists()

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(trainer, "train", stop)  # only the bootstrap is needed
    with pytest.raises(Stop):
        main(["--quick", "--out", "run", "--set", "hidden_size=64", "--set", "heads=2", "--set", "kv_heads=1",
              "--set", "copy_head_gain=3"])
    weights = load_file(tmp_path / "run" / "init" / "model" / "model.safetensors")
    head_channels, hidden_channels = copy_head_channels(64, 2)
    q_norm = weights["language_model.layers.0.gen.q_norm.weight"]
    assert q_norm[head_channels].eq(3.0).all()
    q_proj = weights["language_model.layers.0.gen.q_proj.weight"][:32]  # query head 0
    assert q_proj[head_channels, hidden_channels].eq(1.0).all() and q_proj.abs().sum() == len(head_channels)


def test_predictability_table_takes_the_better_mean_estimate_less_the_sampling_penalty():
    from types import SimpleNamespace

    from unibrain_hf.demo_report import predictability_table

    interval = {"mean": 1.0, "low": 0.5, "high": 1.5, "n": 4, "excludes_zero": True}
    results = {"targets": ["t2f"],
               "unified": SimpleNamespace(baselines={"copy_input": {"per_target": {"t2f": {"psnr": 15.0}}}}),
               "lookup_table": {"per_target": {"t2f": {"psnr": 18.0}}},  # better than the CNN: it sets the bound
               "predictability": {"t2f": {"summary": {"psnr": 16.0, "ssim": 0.7,
                                                      "delta_psnr_vs_copy_interval": interval}}}}
    compared = {"imputation": {"t2f": {"psnr": {**interval, "mean": -0.5, "low": -1.0, "high": 0.0,
                                                "excludes_zero": False}}}}
    row = predictability_table(results, compared).splitlines()[-1]
    assert "| +3.00 |" in row  # lookup − copy
    assert "| -0.01 |" in row  # 18.0 − 10·log10(2) − 15.0
    results["lookup_table"]["per_target"]["t2f"]["psnr"] = 15.5  # now the CNN is the better estimate
    assert "| -2.01 |" in predictability_table(results, compared).splitlines()[-1]  # 16.0 − 3.01 − 15.0
    assert "SSIM vs copy" not in predictability_table(results, compared)  # no SSIM estimate measured
    results["unified"].baselines["copy_input"]["per_target"]["t2f"]["ssim"] = 0.65
    results["predictability"]["t2f"]["summary"]["sampler_ssim_estimate"] = 0.60
    results["lookup_table"]["per_target"]["t2f"]["sampler_ssim"] = 0.70  # the better one sets the bound
    compared["imputation"]["t2f"]["ssim"] = {**interval, "mean": -0.12, "low": -0.15, "high": -0.09,
                                             "excludes_zero": True}
    table = predictability_table(results, compared)
    assert "a perfect sampler, expected Δ SSIM vs copy" in table.splitlines()[0]
    assert "| +0.050 |" in table.splitlines()[-1] and "-0.120 [-0.150, -0.090] ✗" in table.splitlines()[-1]


def test_lesion_and_diagnosability_rows_pair_the_estimates_with_the_models_own_rows():
    from types import SimpleNamespace

    from unibrain_hf.demo_report import _lesion_comparisons, diagnosability_table

    # Lesion region: the lookup's per-subject lesion PSNR is paired with the copy's on the subjects with a lesion.
    per_subject = [{"subject_id": "a", "copy_input": {"t2f": {"lesion_psnr": 10.0}}},
                   {"subject_id": "b", "copy_input": {"t2f": {"psnr": 12.0}}}]  # no lesion on b's slice
    results = {"targets": ["t2f"],
               "unified": SimpleNamespace(per_subject=per_subject,
                                          comparisons={"lesion_psnr_vs_copy_input": {"t2f": {"mean": -4.0}}}),
               "lookup_table": {"per_subject": {"a": {"t2f": {"lesion_psnr": 7.0}}, "b": {"t2f": {"psnr": 1.0}}}},
               "predictability": {"t2f": {"summary": {"lesion_delta_psnr_vs_copy_interval": {"mean": -2.0}}}}}
    found = _lesion_comparisons(results)["t2f"]
    assert found["ours"]["mean"] == -4.0 and found["conditional-mean CNN"]["mean"] == -2.0
    assert found["intensity lookup"]["mean"] == -3.0 and found["intensity lookup"]["n"] == 1

    # Diagnosability: each classifier row sits beside the model's row that reads the same images.
    def summary(accuracy, **extra):
        interval = {"mean": accuracy - 0.25, "low": accuracy - 0.4, "high": accuracy - 0.1, "n": 4,
                    "excludes_zero": accuracy > 0.4}
        return {"accuracy": accuracy, "accuracy_interval": {"low": 0.0, "high": 1.0},
                "vs_best_constant": interval, **extra}

    results = {"targets": ["t2w", "t2f"], "diagnosability": {
        "t1n": {"summary": summary(0.25)},
        "t1n+targets": {"summary": summary(0.75, replaced_accuracy=0.5, replaced_accuracy_interval={"low": 0.1,
                                                                                                      "high": 0.9},
                                           replaced_vs_best_constant={"mean": 0.25, "low": -0.1, "high": 0.6,
                                                                      "n": 4, "excludes_zero": False})},
        "all": {"summary": summary(1.0), "settings": {"sources": ["t1n", "t1c", "t2w", "t2f"]}}}}
    compared = {"diagnosis": {"T1n alone (diagnosis task)": {"accuracy": 0.125},
                              "after unified imputation (stage 3)": {"accuracy": 0.375},
                              "all real sequences (t1n, t1c, t2w, t2f), upper bound": {"accuracy": 0.625}}}
    rows = diagnosability_table(results, compared).splitlines()[2:]
    assert [row.split(" | ")[1].split(" ")[0] for row in rows] == ["0.250", "0.500", "0.750", "1.000"]
    assert [row.split("|")[-2].strip() for row in rows] == ["0.125", "0.375", "", "0.625"]


@pytest.mark.parametrize("assignment, named", [
    ("targets=t1n", "targets=t1n: targets are sequences imputed from T1n"),
    ("targets=xyz", "(xyz unknown)"),
    ("targets=t2w,t2w", "more than once"),
    ("targets=", "targets=: name at least one sequence to impute from T1n"),
    ("kv_heads=3", "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("inference_steps=1", "inference_steps=1: the evaluation's sampler grid needs at least 2 points"),
    ("eval_subjects=-1", "eval_subjects=-1: must be 0 or more"),
    ("dhs_steps=0", "dhs_steps=0: must be at least 1"),
    ("unified_ema_decay=1.0", "unified_ema_decay=1.0: an EMA decay must be in [0, 1)"),
    ("ema_decay=-0.5", "ema_decay=-0.5: an EMA decay must be in [0, 1)"),
])
def test_the_demo_refuses_a_plan_that_could_only_fail_later_before_writing_anything(tmp_path, assignment, named):
    """Each of these used to fail after the cohort, the VAE fit or the training (or at evaluation, after all of it)."""
    from unibrain_hf.demo import main

    with pytest.raises(SystemExit, match=re.escape(named)):
        main(["--quick", "--out", str(tmp_path / "demo"), "--set", assignment])
    assert not (tmp_path / "demo").exists()


def test_the_demo_refuses_targets_its_evaluation_split_cannot_score_before_training(tmp_path):
    from unibrain_hf.demo import main

    with pytest.raises(SystemExit, match=r"targets=dwi: no subject of split 'test' has all of \['t1n', 'dwi'\]"):
        main(["--quick", "--out", str(tmp_path / "demo"), "--set", "targets=dwi"])
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["cohort"]  # nothing trained; the cohort stays
