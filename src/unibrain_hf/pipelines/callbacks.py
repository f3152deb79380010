"""Step-end callbacks for ``UniBrainPipeline`` in diffusers' ``PipelineCallback`` form.

:class:`UniBrainCFGCutoffCallback` switches classifier-free guidance off after a given step,
like diffusers' ``SDXLCFGCutoffCallback`` does for SDXL: it sets the pipeline's
``_guidance_scale`` to 0, so the remaining steps of that image evaluate the conditional branch
only (one model call per step instead of three). UniBrain's unconditional branches are separate
KV-cache contexts rather than a doubled batch, so no tensor needs to be cut — its
``tensor_inputs`` is empty. Combine it with other callbacks through diffusers'
``MultiPipelineCallbacks``.

    python -c "from unibrain_hf.pipelines.callbacks import UniBrainCFGCutoffCallback as C; print(C(cutoff_step_ratio=0.5).config)"
"""

from __future__ import annotations

from typing import Any

from diffusers.callbacks import PipelineCallback


class UniBrainCFGCutoffCallback(PipelineCallback):
    """Disable guidance (text and image) after ``cutoff_step_index`` or ``cutoff_step_ratio · num_timesteps`` steps.

    The pipeline restores the call's guidance scales at the start of every image it denoises,
    so with several targets each image gets guidance up to the cutoff.
    """

    tensor_inputs: list[str] = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs) -> dict[str, Any]:
        ratio, index = self.config.cutoff_step_ratio, self.config.cutoff_step_index
        cutoff_step = index if index is not None else int(pipeline.num_timesteps * ratio)
        if step_index == cutoff_step:
            pipeline._guidance_scale = 0.0
        return callback_kwargs


__all__ = ["UniBrainCFGCutoffCallback"]
