"""Every Python snippet of docs/PIPELINE.md runs as written, in order, against a tiny saved pipeline.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_pipeline_docs.py -q
"""

import re
from pathlib import Path

import numpy as np
import pytest

from tiny_pipeline import mri_volume, tiny_pipeline

DOC = Path(__file__).resolve().parents[1] / "docs" / "PIPELINE.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_pipeline_doc_snippets_run(converted_fixture, tmp_path, monkeypatch):
    import nibabel as nib

    from unibrain_hf.pipelines import settings

    tiny_pipeline(converted_fixture / "tokenizer").save_pretrained(tmp_path / "checkpoints" / "unibrain-bagel")
    # Scans as they come: LPS on disk for sub-01, RAS for sub-02 (16 axial slices, 30 × 40 in plane).
    for subject, flips, seed in (("sub-01", (1, 1, -1), 0), ("sub-02", (-1, -1, -1), 5)):
        for code, offset in (("t1n", 0), ("t2w", 1)):
            xyz = mri_volume(seed + offset, shape=(16, 30, 40)).transpose(2, 1, 0)[::flips[0], ::flips[1], ::flips[2]]
            affine = np.diag([-flips[0] * 1.0, -flips[1] * 1.0, -flips[2] * 2.0, 1.0])
            nib.save(nib.Nifti1Image(np.ascontiguousarray(xyz), affine), str(tmp_path / f"{subject}_{code}.nii.gz"))
    # The reference's text budgets (799/511 tokens) are long for a random tiny model.
    monkeypatch.setattr(settings, "DEFAULT_MAX_NEW_TOKENS", {})
    monkeypatch.setattr(settings, "FALLBACK_MAX_NEW_TOKENS", 8)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 7
    namespace: dict = {}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block {index}", "exec"), namespace)
        except Exception as error:  # name the snippet that broke
            pytest.fail(f"docs/PIPELINE.md python block {index} failed: {type(error).__name__}: {error}\n{block}")
    assert (tmp_path / "imputed" / "t2f.nii.gz").exists() and (tmp_path / "t2w_slice12.png").exists()
    assert namespace["ensembles"].shape == (2, 30, 40)
