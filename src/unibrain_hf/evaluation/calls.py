"""Every call the evaluation makes into a :class:`~unibrain_hf.UniBrainPipeline`, in one place.

The tasks never call the pipeline directly: they call these functions, so a change of the
pipeline's call API touches this file only. What is relied on:

* ``pipe(images={code: (H, W, 3) uint8}, target_modalities=[...], task="generation" | "unified",
  num_grid_points=N, generator=g, output_type="pil", **settings)`` returns one output row:
  ``.images[target][0]`` (PIL, RGB because the inputs are RGB), and for ``unified`` also
  ``.thinking[target][0]``, ``.impression[0]`` and ``.diagnosis[0]``. The evaluation counts sampler
  *grid points* as the reference does (N points give N − 1 Euler steps), so it passes
  ``num_grid_points``; the pipeline's ``num_inference_steps`` counts steps.
* ``pipe(images={code: (H, W) uint8}, task="diagnosis", max_new_tokens=M, generator=g,
  output_type="np")`` returns ``.diagnosis[0]``.
* ``pipe.impute_volume({code: nibabel image}, targets, axis="axial", batch_size=B, task="generation",
  num_grid_points=N, generator=g)`` returns ``{target: nibabel image}`` in the input's frame.
* ``pipe.vae`` and ``pipe.processor.vae_resize`` (the slice preparation of
  :func:`unibrain_hf.pipelines.mri_io.load_slice`) for the VAE reconstruction ceiling (encode the true slice → decode, exactly as an imputed latent is decoded).

    python -c "from unibrain_hf.evaluation import calls; help(calls)"
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch


def as_rgb(gray: np.ndarray) -> np.ndarray:
    # Three-channel inputs make the pipeline return RGB, so an ensemble can average RGB first.
    return np.repeat(np.asarray(gray)[..., None], 3, axis=-1)


def reference_ensemble(samples: list[np.ndarray], rgb: bool = True) -> np.ndarray:
    """K generated uint8 images → one uint8 image, in the reference's order of operations.

    The reference averages the K RGB images and truncates to uint8, then averages the three
    channels and truncates again (§8.1); with K = 1 this is exactly the pipeline's own grayscale
    output. ``rgb=False`` takes already-gray samples (slices or (z, y, x) volumes) and only
    averages them.
    """
    if not samples:
        raise ValueError("reference_ensemble needs at least one sample")
    stacked = np.stack([np.asarray(sample) for sample in samples])
    if rgb and stacked.shape[-1] != 3:
        raise ValueError(f"rgb=True needs (..., 3) samples, got shape {stacked.shape[1:]}")
    mean = np.mean(stacked, axis=0).astype(np.uint8)
    if rgb:
        mean = np.mean(mean, axis=-1).astype(np.uint8)
    return mean


def impute_slice(pipe, inputs: dict[str, np.ndarray], targets: list[str], generator: torch.Generator,
                 num_inference_steps: int, task: str = "generation", target_names: dict | None = None,
                 **settings):
    """One call of the pipeline on 2-D uint8 slices → (``{target: (H, W, 3) uint8}``, the raw output).

    The inputs are given as RGB so that the outputs are RGB too: an ensemble of several calls then
    averages RGB first, as the reference does (:func:`reference_ensemble`). ``target_names`` maps a
    target code to the name the prompts use for it (default: the code itself, as the reference).
    """
    names = {target: (target_names or {}).get(target, target) for target in targets}
    output = pipe(images={code: as_rgb(image) for code, image in inputs.items()},
                  target_modalities=[names[t] for t in targets], task=task, num_grid_points=num_inference_steps,
                  generator=generator, output_type="pil", **settings)
    # One input row: unwrap the batch, and report the reasoning under the target codes, like the images.
    row = SimpleNamespace(thinking={code: output.thinking[name][0] for code, name in names.items()
                                    if name in (output.thinking or {})},
                          impression=None if output.impression is None else output.impression[0],
                          diagnosis=None if output.diagnosis is None else output.diagnosis[0])
    return {target: np.asarray(output.images[names[target]][0], dtype=np.uint8) for target in targets}, row


def impute_volume(pipe, volumes: dict[str, np.ndarray], targets: list[str], generator: torch.Generator,
                  num_inference_steps: int, batch_size: int, **settings) -> dict[str, np.ndarray]:
    """Slice-wise imputation of (z, y, x) uint8 volumes along axis 0 → ``{target: (z, y, x) uint8}``."""
    from ..protocol.orientation import to_training_frame, training_frame_nifti

    # The (z, y, x) arrays are the training frame: axial slice k is the (y, x) image the 2-D mode feeds.
    carriers = {code: training_frame_nifti(volume) for code, volume in volumes.items()}
    images = pipe.impute_volume(carriers, targets, axis="axial", batch_size=batch_size, task="generation",
                                num_grid_points=num_inference_steps, generator=generator, **settings)
    return {target: to_training_frame(np.asarray(images[target].dataobj, dtype=np.uint8), images[target].affine)
            for target in targets}


def diagnose(pipe, inputs: dict[str, np.ndarray], generator: torch.Generator, max_new_tokens: int | None,
             **settings) -> str:
    """The diagnosis task's answer text for 2-D uint8 slices."""
    output = pipe(images=inputs, task="diagnosis", max_new_tokens=max_new_tokens, generator=generator,
                  output_type="np", **settings)
    return output.diagnosis[0]


def has_vae(pipe) -> bool:
    """Whether ``pipe`` exposes what :func:`vae_reconstruction` needs (stand-in pipelines in tests may not)."""
    return hasattr(pipe, "vae") and hasattr(getattr(pipe, "processor", None), "vae_resize")


@torch.no_grad()
def vae_encode_slices(pipe, images: list[np.ndarray]) -> tuple[torch.Tensor, list]:
    """uint8 slices → (the posterior-mean latents the model reads, (N, C, h, w); each slice's preparation).

    Each slice is prepared exactly as a pipeline input (padded to the model canvas); the slices must
    share one canvas (the demo's padded cohort does). The preparations crop decoded images back.
    """
    from ..modeling.vae import encode_latents
    from ..pipelines.mri_io import load_slice

    prepared = [load_slice(np.asarray(image, dtype=np.uint8), "image", pipe.processor.vae_resize) for image in images]
    pixels = torch.from_numpy(np.stack([p.rgb for p in prepared])).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    latents = encode_latents(pipe.vae, pixels.to(pipe.vae.device, pipe.vae.dtype), sample=False)
    return latents, prepared


@torch.no_grad()
def vae_decode_slices(pipe, latents: torch.Tensor, prepared: list) -> list[np.ndarray]:
    """Latents → uint8 slices on each input's grid, truncated and cropped back as an imputed image is."""
    from ..modeling.vae import decode_latents

    decoded = ((decode_latents(pipe.vae, latents).float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return [p.restore(image.permute(1, 2, 0).cpu().numpy()) for image, p in zip(decoded, prepared)]


@torch.no_grad()
def vae_reconstruction(pipe, image: np.ndarray) -> np.ndarray:
    """The pipeline's VAE round trip of a uint8 slice (posterior mean), on the slice's grid: the ceiling.

    The slice is prepared exactly as a pipeline input (padded to the model canvas) and the decoded
    image is truncated to uint8 and cropped back as an imputed one is, so an imputation scored
    against the truth can at best reach this image's scores.
    """
    latents, prepared = vae_encode_slices(pipe, [image])
    return vae_decode_slices(pipe, latents, prepared)[0]


__all__ = ["as_rgb", "diagnose", "has_vae", "impute_slice", "impute_volume", "reference_ensemble", "vae_decode_slices",
           "vae_encode_slices", "vae_reconstruction"]
