"""Periodic sample generations during training, saved as PNG panels.

Every ``train.sample_every`` steps the main process imputes one fixed slice of the first
subject that has two sequences (input | imputed | ground truth | |difference|) with the current
weights, so a run can be watched without an evaluation job.

    python -c "from unibrain_hf.train.samples import SamplePanelWriter; help(SamplePanelWriter)"
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class SamplePanelWriter:
    def __init__(self, records, output_dir: Path, image_size: int, num_inference_steps: int = 10):
        from ..data.intensity import middle_lesion_slice, pad_to_size, rescale_intensity

        self.directory = Path(output_dir) / "samples"
        self.example = None
        self.num_inference_steps = num_inference_steps
        for record in records:
            codes = list(record.volumes)
            if len(codes) >= 2:
                depth = record.shape_zyx[0]
                index = middle_lesion_slice(record.mask, depth) if record.mask is not None else depth // 2
                slices = {c: pad_to_size(rescale_intensity(record.volumes[c])[index], image_size) for c in codes[:2]}
                self.example = (codes[0], codes[1], slices)
                break

    @torch.no_grad()
    def write(self, step: int, model, vae, tokenizer, processor) -> Path | None:
        if self.example is None:
            return None
        from ..evaluation.report import difference_map, save_panel
        from ..pipelines.components import flow_match_scheduler
        from ..pipelines.pipeline_unibrain import UniBrainPipeline

        source, target, slices = self.example
        was_training = model.training
        model.eval()
        try:
            pipe = UniBrainPipeline(model=model, vae=vae, scheduler=flow_match_scheduler(), tokenizer=tokenizer,
                                    processor=processor)
            pipe.set_progress_bar_config(disable=True)
            output = pipe(images={source: slices[source]}, target_modalities=[target], task="generation",
                          num_inference_steps=self.num_inference_steps, output_type="np",
                          generator=torch.Generator().manual_seed(0))
        finally:
            model.train(was_training)
        imputed = np.asarray(output.images[target][0])
        imputed = (imputed * 255).round().astype(np.uint8) if imputed.dtype != np.uint8 else imputed
        imputed = imputed.mean(axis=-1).astype(np.uint8) if imputed.ndim == 3 else imputed
        self.directory.mkdir(parents=True, exist_ok=True)
        return save_panel(self.directory / f"step-{step:07d}.png",
                          [(source, slices[source]), (f"{target} imputed", imputed), (f"{target} true", slices[target]),
                           ("|difference|", difference_map(slices[target], imputed))], scale=2)
