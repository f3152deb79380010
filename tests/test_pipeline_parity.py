"""The pipeline reproduces both reference fixtures' inference runs, and the guidance window's float32 bound.

``bagel_tiny_b`` has a grid point on the guidance interval's lower bound (6 grid points, shift 1:
t = 0.4 with interval (0.4, 1]), text_channel renorm, GQA 3:1, 8 latent channels and other
image sizes.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_pipeline_parity.py -q
"""

import numpy as np
import pytest
import torch

from tiny_pipeline import mri_slice, tiny_pipeline
from unibrain_hf.pipelines.sampler import GuidanceSettings, flow_sigmas
from unibrain_hf.testing.inference_parity import check_inference, failures, tolerance_for

FIXTURES = ("bagel_tiny", "bagel_tiny_b")


def shipped_fixture(fixture_dir, name: str):
    """The shipped reference fixtures live side by side; ``fixture_dir`` is the first one."""
    directory = fixture_dir.parent / name
    if not (directory / "README.json").exists():
        pytest.fail(f"reference fixture {name} not found next to {fixture_dir}")
    return directory


@pytest.fixture(scope="module", params=FIXTURES)
def fixture_and_converted(request, fixture_dir, converted_fixture, tmp_path_factory):
    if request.param == "bagel_tiny":
        return fixture_dir, converted_fixture
    from unibrain_hf.convert import convert_bagel_checkpoint

    directory = shipped_fixture(fixture_dir, request.param)
    converted = tmp_path_factory.mktemp("converted_b") / request.param
    convert_bagel_checkpoint(directory, converted)
    return directory, converted


def test_inference_matches_fixture(fixture_and_converted):
    fixture, converted = fixture_and_converted
    diffs = check_inference(fixture, converted)
    assert any(k.startswith("flow.") and k.endswith(".v_cfg_img") for k in diffs)  # CFG branches were compared
    assert diffs["text_ids.output_ids"] == 0 and diffs["context.gen.kv_lens"] == 0
    bad = failures(diffs)
    assert not bad, {k: (v, tolerance_for(k)) for k, v in bad.items()}


# --------------------------------------------------------------------------- the bound, without fixtures
def test_guidance_window_compares_in_float32():
    guidance = GuidanceSettings(interval=(0.4, 1.0))
    bound = np.float32(0.4)
    assert float(bound) > 0.4  # float32(0.4) lies above the double 0.4: a float64 test would say "inside"
    assert not guidance.in_interval(bound)
    assert not guidance.in_interval(torch.tensor(0.4))
    assert not guidance.in_interval(float(bound))
    assert guidance.in_interval(np.nextafter(bound, np.float32(1)))
    assert guidance.in_interval(np.float32(1.0)) and not guidance.in_interval(np.nextafter(np.float32(1), 2))
    assert guidance.scales_at(bound) == (1.0, 1.0)
    assert guidance.scales_at(np.float32(0.5)) == (3.0, 1.2)


@pytest.mark.parametrize("steps, shift, low", [(5, 1.0, 0.4), (9, 1.0, 1 / 3), (10, 1.0, 0.4)])
def test_grid_point_on_the_bound_gets_no_guidance(steps, shift, low):
    grid = flow_sigmas(steps, shift)
    on_bound = [i for i, t in enumerate(grid[:-1]) if np.float32(t) == np.float32(low)]
    assert on_bound, "the case must put a grid point on the bound"
    assert all(float(grid[i]) > low for i in on_bound)  # where a float64 comparison would apply guidance
    guidance = GuidanceSettings(interval=(low, 1.0))
    assert [guidance.in_interval(t) for t in grid[:-1]] == [bool(t > np.float32(low)) for t in grid[:-1].numpy()]
    assert not any(guidance.in_interval(grid[i]) for i in on_bound)


def test_pipeline_skips_guidance_branches_on_the_bound(converted_fixture):
    pipe = tiny_pipeline(converted_fixture / "tokenizer")
    evaluated = []

    def record(pipeline, step, timestep, kwargs):
        evaluated.append((float(pipeline.scheduler.sigmas[step]), kwargs["v_uncond_text"] is not None,
                          kwargs["v_uncond_image"] is not None))
        return {}

    pipe(images={"t1n": mri_slice()}, target_modalities="t2w", num_inference_steps=5, timestep_shift=1.0,
         cfg_interval=(0.4, 1.0), output_type="latent", callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=["v_uncond_text", "v_uncond_image"])
    assert [round(t, 6) for t, _, _ in evaluated] == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert [text for _, text, _ in evaluated] == [True, True, True, False, False]
    assert [image for _, _, image in evaluated] == [True, True, True, False, False]
