"""What training, inference and scoring must agree on, in one ground-floor package.

* :mod:`~unibrain_hf.protocol.tokens` — the special tokens of every sequence;
* :mod:`~unibrain_hf.protocol.templates` — every prompt string the model was trained and evaluated with;
* :mod:`~unibrain_hf.protocol.prompts` — the builders that turn those strings into prompts and answers;
* :mod:`~unibrain_hf.protocol.diagnosis` — the diagnosis class rules and the label parser;
* :mod:`~unibrain_hf.protocol.orientation` — the voxel frame slices are taken in, and NIfTI volumes' way to it.

It imports nothing from the rest of the package (nibabel only inside the orientation functions),
so data preparation, training, the pipeline and the evaluation can all build on it.

    python -c "from unibrain_hf.protocol import prompts; print(prompts.build_eval_diagnosis_prompt())"
"""

from . import diagnosis, orientation, prompts, templates, tokens

__all__ = ["diagnosis", "orientation", "prompts", "templates", "tokens"]
