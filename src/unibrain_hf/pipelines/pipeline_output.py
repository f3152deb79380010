"""The result object of ``UniBrainPipeline.__call__``.

    python -c "from unibrain_hf.pipelines.pipeline_output import UniBrainPipelineOutput as O; print(O())"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers.utils import BaseOutput


@dataclass
class UniBrainPipelineOutput(BaseOutput):
    """Imputed images and generated text of one pipeline call.

    Args:
        images: target modality → image (``PIL.Image`` / ``np.ndarray`` / ``torch.Tensor`` / latents,
            per ``output_type``), in the order of ``target_modalities``.
        thinking: target modality → the reasoning text generated before that image (``think=True``).
        impression: the impression text (``unified`` and ``report`` tasks).
        diagnosis: the diagnosis text (``unified`` and ``diagnosis`` tasks).
        diagnosis_label: the class word parsed from ``diagnosis`` (e.g. ``"Gli"``), or ``None``.
        answer: the answer to a free-form ``prompt`` (``answer`` task).
    """

    images: dict[str, Any] = field(default_factory=dict)
    thinking: dict[str, str] = field(default_factory=dict)
    impression: str | None = None
    diagnosis: str | None = None
    diagnosis_label: str | None = None
    answer: str | None = None
