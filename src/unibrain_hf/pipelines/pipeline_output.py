"""The result object of ``UniBrainPipeline.__call__``.

Outputs are batched like every diffusers pipeline: with ``R = len(images) × num_images_per_prompt``
rows (a single ``images`` dict counts as one row), each image entry is a batch of R in diffusers'
form for its ``output_type`` and each text entry is a list of R strings, row 0's copies first.

    python -c "from unibrain_hf.pipelines.pipeline_output import UniBrainPipelineOutput as O; print(O())"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers.utils import BaseOutput


@dataclass
class UniBrainPipelineOutput(BaseOutput):
    """Imputed images and generated text of one pipeline call (R output rows).

    Args:
        images: the imputed images. With ``target_modalities`` a list: a dict target → batch, in the
            order of ``target_modalities``; with one bare string (``target_modalities="t2w"``): that
            target's batch itself, like any diffusers pipeline. A batch is, per ``output_type``:
            ``"pil"`` a list of R ``PIL.Image`` (mode ``L`` for single-channel inputs, else RGB);
            ``"np"`` float32 in [0, 1] of shape (R, H, W) for single-channel inputs or (R, H, W, 3);
            ``"pt"`` float (R, 1|3, H, W) in [0, 1]; ``"latent"`` the normalised latent grid
            (R, C, H_m/8, W_m/8) at the padded model size. Images are on the input slice's grid.
            Empty (``{}``) for the text-only tasks.
        thinking: the reasoning text generated before each image (``think=True``): target → list of R
            strings (a list of R strings for a bare-string target); ``{}`` / ``None`` without thinking.
        impression: R impression texts (``unified`` and ``report`` tasks), else ``None``.
        diagnosis: R diagnosis texts (``unified`` and ``diagnosis`` tasks), else ``None``.
        diagnosis_label: per row, the class word parsed from ``diagnosis`` (e.g. ``"Gli"``) or ``None``.
        answer: R answers to ``prompt`` (``answer`` task), else ``None``.
    """

    images: Any = field(default_factory=dict)
    thinking: Any = field(default_factory=dict)
    impression: list[str] | None = None
    diagnosis: list[str] | None = None
    diagnosis_label: list[str | None] | None = None
    answer: list[str] | None = None
