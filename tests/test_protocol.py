"""The ground-floor protocol: one diagnosis table, one token list, one training frame, shared by every layer.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_protocol.py -q
"""

import ast
from pathlib import Path

import numpy as np
import pytest

from unibrain_hf.protocol import diagnosis, orientation, prompts, tokens

PROTOCOL_DIR = Path(diagnosis.__file__).parent


def test_one_diagnosis_table_for_training_scoring_and_the_old_paths():
    from unibrain_hf.data import sequence_builder, templates
    from unibrain_hf.evaluation import diagnosis as scoring

    # The phantom cohort's normal subjects: the two former tables disagreed here.
    for subject, expected in [("PHANTOM-NOR-0003", "Normal"), ("BraTS-GLI-00001-000", "Gli"),
                              ("BraTS-MEN-00004-000", "Mening"), ("sub-strokecase0001", "Infarct"),
                              ("WMH-100", "Degeneration")]:
        assert diagnosis.ground_truth_class(subject) == expected
        assert scoring.ground_truth_class(subject) == expected
        assert sequence_builder.reference_diagnosis_label(subject) == expected
        first_match = next((word for marker, word in templates.DIAGNOSIS_LABEL_RULES if marker in subject),
                           templates.DIAGNOSIS_FALLBACK_LABEL)
        assert first_match == expected
    assert scoring.DiagnosisRules is diagnosis.DiagnosisRules
    assert scoring.parse_diagnosis_label is diagnosis.parse_diagnosis_label
    assert sequence_builder.diagnosis_is_correct is diagnosis.is_correct


def test_label_parser_reads_word_starts_only():
    assert diagnosis.parse_diagnosis_label("Final Diagnosis: Glioblastoma") == "Gli"
    assert diagnosis.parse_diagnosis_label("negligible mass effect, meningioma") == "Mening"
    assert diagnosis.parse_diagnosis_label("abnormal signal") is None
    assert diagnosis.parse_diagnosis_label("Normal study") == "Normal"


def test_prompt_builders_are_shared_by_training_and_old_imports():
    from unibrain_hf.data import sequence_builder

    assert sequence_builder.build_eval_generation_prompt is prompts.build_eval_generation_prompt
    assert prompts.build_eval_generation_prompt("t2f") == "Translate the attached MRI into its T2-FLAIR image."
    assert prompts.diagnosis_answer(["Glioma", "Edema"]) == "Final Diagnosis: Glioma and Edema"
    assert prompts.impression_answer("No lesion.") == "Impression: No lesion."


def test_special_tokens_have_one_home():
    from unibrain_hf.modeling import configuration_unibrain
    from unibrain_hf.processing import processor

    assert processor.SPECIAL_TOKENS is tokens.SPECIAL_TOKENS
    # modeling/ ships as standalone Hub code and keeps its own copy; it must stay equal.
    assert dict(configuration_unibrain.SPECIAL_TOKENS) == dict(tokens.CONFIG_TOKEN_FIELDS)


def test_protocol_imports_nothing_from_the_rest_of_the_package():
    for path in PROTOCOL_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), f"{path.name} imports from outside protocol/"
                assert node.level == 1 or not (node.module or "").startswith("unibrain_hf"), path.name
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("unibrain_hf") for alias in node.names), path.name


def _module_level_imports(module: str) -> set[str]:
    """Every ``unibrain_hf`` module imported at module level, transitively, starting from ``module``."""
    import importlib.util

    def find(name):
        try:
            return importlib.util.find_spec(name)
        except (ImportError, AttributeError, ValueError):  # "package.attribute" is not a module
            return None

    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or not name.startswith("unibrain_hf"):
            continue
        seen.add(name)
        spec = find(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        package = name if spec.origin.endswith("__init__.py") else name.rpartition(".")[0]
        for node in ast.parse(Path(spec.origin).read_text()).body:  # module level only: lazy imports are fine
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                todo.append(target)
                todo += [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
    return {name for name in seen if name.startswith("unibrain_hf") and find(name) is not None}


def test_pipeline_does_not_import_the_sample_builder_or_the_evaluation():
    imported = _module_level_imports("unibrain_hf.pipelines.pipeline_unibrain")
    assert "unibrain_hf.protocol.prompts" in imported  # the walk does follow the pipeline's imports
    bad = sorted(m for m in imported if m.startswith(("unibrain_hf.evaluation", "unibrain_hf.train"))
                 or m == "unibrain_hf.data.sequence_builder")
    assert not bad, bad


# --------------------------------------------------------------------------- orientation
def test_training_frame_is_what_prepare_and_the_phantom_write():
    from unibrain_hf.data import prepare
    from unibrain_hf.data.phantom.anatomy import LPI_DIRECTION

    assert tuple(prepare.TARGET_AXCODES) == orientation.TRAINING_AXCODES
    # The phantom's ITK (LPS) direction cosines: x towards L, y towards P, z towards I.
    assert np.allclose(np.reshape(LPI_DIRECTION, (3, 3)), np.diag([1.0, 1.0, -1.0]))
    volume = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)  # (z, y, x)
    written = prepare.deidentified_nifti(volume, orientation.training_frame_affine((1.0, 1.0, 2.0)))
    assert np.array_equal(orientation.to_training_frame(np.asarray(written.dataobj), written.affine), volume)


def _stored_versions(volume_zyx):
    """The same voxels stored as RAS, LPS, (z, y, x) with its own affine, and LPS under an oblique affine."""
    from nibabel.affines import from_matvec

    xyz = volume_zyx.transpose(2, 1, 0)
    angle = np.deg2rad(17.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    return {
        "RAS": (np.ascontiguousarray(xyz[::-1, ::-1, ::-1]), np.diag([1.0, 1.0, 2.0, 1.0])),
        "LPS": (np.ascontiguousarray(xyz[:, :, ::-1]), np.diag([-1.0, -1.0, 2.0, 1.0])),
        "IPL": (volume_zyx.copy(), from_matvec(np.array([[0, 0, -1.0], [0, -1.0, 0], [-2.0, 0, 0]]), [0, 0, 0])),
        "oblique": (np.ascontiguousarray(xyz[:, :, ::-1]), from_matvec(rotation @ np.diag([-1.0, -1.0, 2.0]), [9, -4, 2])),
    }


@pytest.mark.parametrize("name", ["RAS", "LPS", "IPL", "oblique"])
def test_every_storage_order_maps_to_the_same_training_frame_and_back(name):
    volume = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    data, affine = _stored_versions(volume)[name]
    canonical = orientation.to_training_frame(data, affine)
    assert np.array_equal(canonical, volume)
    assert np.array_equal(orientation.from_training_frame(canonical, affine), data)


def test_plane_names():
    assert orientation.plane_axis("axial") == 0 and orientation.plane_axis("sagittal") == 2
    with pytest.raises(ValueError, match="axial"):
        orientation.plane_axis(2)
