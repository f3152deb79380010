"""The pipeline reproduces the reference fixture's inference run (context, sampler, CFG, decode, text).

    HF_HUB_OFFLINE=1 python -m pytest tests/test_pipeline_parity.py -q
"""

from unibrain_hf.testing.inference_parity import check_inference, failures, tolerance_for


def test_inference_matches_fixture(fixture_dir, converted_fixture):
    diffs = check_inference(fixture_dir, converted_fixture)
    assert any(k.startswith("flow.") and k.endswith(".v_cfg_img") for k in diffs)  # CFG branches were compared
    assert diffs["text_ids.output_ids"] == 0 and diffs["context.gen.kv_lens"] == 0
    bad = failures(diffs)
    assert not bad, {k: (v, tolerance_for(k)) for k, v in bad.items()}
