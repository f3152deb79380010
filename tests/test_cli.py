"""The ``unibrain`` command answers ``--help`` and argument errors without importing the ML stack.

    python -m pytest tests/test_cli.py -q
"""

import json
import subprocess
import sys
import textwrap

import pytest

from unibrain_hf.cli import COMMANDS

HEAVY = ("torch", "transformers", "diffusers")


def imported_after(argv: list[str], code: str = "") -> dict:
    """Run ``unibrain ARGV`` in a fresh interpreter; report its exit status and which heavy modules it imported."""
    script = textwrap.dedent(f"""
        import json, sys
        {code}
        from unibrain_hf.cli import main
        try:
            status = main({argv!r})
        except SystemExit as exit:
            status = exit.code
        print(json.dumps({{"status": status, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_help_does_not_import_torch():
    report = imported_after(["--help"])
    assert report == {"status": 0, "heavy": []}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_and_argument_errors_stay_light(command):
    assert imported_after([command, "--help"]) == {"status": 0, "heavy": []}
    assert imported_after([command, "--no-such-flag"]) == {"status": 2, "heavy": []}


def test_package_import_is_light_and_registers_with_transformers_when_it_arrives():
    code = textwrap.dedent("""
        import sys
        import unibrain_hf
        assert not any(m in sys.modules for m in ("torch", "transformers", "diffusers")), "eager import"
        from transformers import AutoConfig, AutoModel
        config = AutoConfig.for_model("unibrain", text_config=dict(hidden_size=64, num_attention_heads=4,
            num_key_value_heads=2, num_hidden_layers=1, intermediate_size=64, vocab_size=64),
            vision_config=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32,
            image_size=14 * 4, patch_size=14), vit_max_num_patch_per_side=4, max_latent_size=4)
        model = AutoModel.from_config(config)
        print(type(config).__module__, type(model).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["unibrain_hf.modeling.configuration_unibrain", "UniBrainForConditionalGeneration"]
