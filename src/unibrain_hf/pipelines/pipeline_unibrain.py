"""``UniBrainPipeline``: brain-MRI sequence imputation and reasoning in one interleaved KV-cache context.

Given the MRI sequences a patient has (2-D slices or NIfTI volumes), the pipeline imputes the
missing ones and/or writes text, exactly as UniBrain's evaluation does it (see
``docs/REFERENCE.md`` §3.5, §3.6, §8):

* ``generation`` — each target imputed from the inputs with "Translate the attached MRI into its
  {T} image." (targets are independent; shift 3).
* ``unified`` — system prompt, inputs, then per target: thinking text, image (shift 1), the
  generated image appended to the context; then impression and diagnosis.
* ``diagnosis`` / ``report`` / ``answer`` — text only: the diagnosis question, the impression
  question, or a free-form ``prompt``.

Reads top to bottom like diffusers' FLUX pipeline: ``check_inputs → prepare images → encode
context → prepare latents → denoise (CFG) → decode``.

    python -c "from unibrain_hf import UniBrainPipeline; help(UniBrainPipeline.__call__)"
    # a tiny random pipeline end to end:
    python -m pytest tests/test_pipeline.py -q
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from PIL import Image

from ..data import templates
from ..data.sequence_builder import (build_eval_diagnosis_prompt, build_eval_generation_prompt,
                                     build_unified_diagnosis_prompt, build_unified_impression_prompt,
                                     build_unified_instructions)
from ..evaluation.diagnosis import parse_diagnosis_label
from ..modeling.modeling_unibrain import UniBrainForConditionalGeneration
from ..modeling.vae import decode_latents, encode_latents
from ..processing.image_transforms import patchify, to_model_tensor
from ..processing.processor import UniBrainProcessor
from . import mri_io
from .context import EncodedImage, InterleavedContext
from .offload import ExpertOffloadMixin
from .pipeline_output import UniBrainPipelineOutput
from .sampler import RENORM_TYPES, GuidanceSettings, combine_guidance, flow_timesteps

TASKS = ("generation", "diagnosis", "unified", "report", "answer")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: UniBrain's evaluation shifts: ``generation`` keeps interleave_inference's 3.0, ``unified`` uses 1.
DEFAULT_TIMESTEP_SHIFT = {"generation": 3.0, "unified": 1.0}
#: The reference's text budgets count the start token: 800 in the unified task, 512 otherwise.
DEFAULT_MAX_NEW_TOKENS = {"unified": 799}
FALLBACK_MAX_NEW_TOKENS = 511


def _register_processor_with_diffusers() -> None:
    """Let diffusers save/load ``UniBrainProcessor`` as a pipeline component.

    diffusers only loads components whose class derives from a base it knows (``LOADABLE_CLASSES``);
    the processor is a plain class with ``save_pretrained``/``from_pretrained``, so it is added there.
    """
    from diffusers.pipelines import pipeline_loading_utils as loading

    module = UniBrainProcessor.__module__
    methods = ["save_pretrained", "from_pretrained"]
    loading.LOADABLE_CLASSES.setdefault(module, {})[UniBrainProcessor.__name__] = methods
    loading.ALL_IMPORTABLE_CLASSES[UniBrainProcessor.__name__] = methods


_register_processor_with_diffusers()


def _grid_position_ids(rows: int, cols: int, grid: int, what: str) -> torch.Tensor:
    """Raster ids ``row * grid + col`` into a model's 2-D position table."""
    if rows > grid or cols > grid:
        raise ValueError(f"{what}: a {rows}×{cols} token grid exceeds the model's {grid}×{grid} position table")
    return (torch.arange(rows)[:, None] * grid + torch.arange(cols)[None, :]).flatten()


class UniBrainPipeline(ExpertOffloadMixin, DiffusionPipeline):
    r"""Interleaved brain-MRI imputation and understanding with UniBrain (BAGEL-7B-MoT).

    Args:
        model ([`UniBrainForConditionalGeneration`]): the MoT decoder, SigLIP ViT and flow head.
        vae ([`AutoencoderKL`]): the FLUX-shaped VAE (latents sampled from the posterior, like UniBrain).
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): Euler flow-matching steps; the pipeline hands it
            UniBrain's time grid (``linspace(1, 0, N)`` warped by the shift) explicitly.
        tokenizer: a transformers tokenizer with ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
            ``<|vision_end|>``.
        processor ([`UniBrainProcessor`]): image resize rules and position grids.

    Precision: ``from_pretrained(..., dtype=torch.bfloat16)`` runs the decoder in bf16 (as UniBrain
    does on GPU). The VAE may be kept in fp32 (``pipe.vae.to(torch.float32)``); latents and the Euler
    update are always kept in fp32.
    """

    model_cpu_offload_seq = "model->vae"
    _callback_tensor_inputs = ["latents", "x_t", "velocity", "v_cond", "v_uncond_text", "v_uncond_image", "context",
                               "target_modality"]

    def __init__(self, model: UniBrainForConditionalGeneration, vae: AutoencoderKL,
                 scheduler: FlowMatchEulerDiscreteScheduler, tokenizer, processor: UniBrainProcessor):
        super().__init__()
        if processor is not None and getattr(processor, "tokenizer", None) is None:
            processor.tokenizer = tokenizer
        self.register_modules(model=model, vae=vae, scheduler=scheduler, tokenizer=tokenizer, processor=processor)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader; afterwards the processor shares the pipeline's tokenizer."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if pipe.processor is not None:
            pipe.processor.tokenizer = pipe.tokenizer
        return pipe

    # ------------------------------------------------------------------ geometry
    @property
    def latent_stride(self) -> int:
        return self.model.config.latent_downsample

    def _special_ids(self) -> dict[str, int]:
        ids = self.processor.special_token_ids()
        config = self.model.config
        if (ids["start_of_image"], ids["end_of_image"]) != (config.start_of_image_token_id,
                                                             config.end_of_image_token_id):
            raise ValueError("the tokenizer's <|vision_start|>/<|vision_end|> ids do not match the model config")
        return ids

    # ------------------------------------------------------------------ input checks (no model work)
    def check_inputs(self, images, target_modalities, task, prompt, num_inference_steps, cfg_renorm_type,
                     cfg_interval, output_type, max_new_tokens, temperature, do_sample,
                     callback_on_step_end_tensor_inputs):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}; got {task!r}")
        if not isinstance(images, dict) or not images:
            raise ValueError("images must be a non-empty dict {modality code: slice or volume}")
        for code in images:
            if not isinstance(code, str) or not code:
                raise ValueError(f"images keys must be non-empty modality strings; got {code!r}")
        targets = list(target_modalities or [])
        for code in targets:
            if not isinstance(code, str) or not code:
                raise ValueError(f"target_modalities must be non-empty strings; got {code!r}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"target_modalities has duplicates: {targets}")
        overlap = [code for code in targets if code in images]
        if overlap:
            raise ValueError(f"target_modalities {overlap} are also inputs in images; a target must be missing")
        if task in ("generation", "unified") and not targets:
            raise ValueError(f"task {task!r} needs at least one entry in target_modalities")
        if task in ("diagnosis", "report", "answer") and targets:
            raise ValueError(f"task {task!r} generates text only; target_modalities must be empty (use task='unified')")
        if task == "answer" and (not isinstance(prompt, str) or not prompt.strip()):
            raise ValueError("task 'answer' needs a non-empty prompt")
        if prompt is not None and task not in ("answer", "generation"):
            raise ValueError(f"prompt is only used by the 'answer' and 'generation' tasks, not {task!r}")
        if prompt is not None and task == "generation" and len(targets) != 1:
            raise ValueError("a custom generation prompt needs exactly one target modality")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 2:
            raise ValueError(f"num_inference_steps must be an int >= 2 (N grid points = N-1 steps); "
                             f"got {num_inference_steps!r}")
        if cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}; got {cfg_renorm_type!r}")
        if len(tuple(cfg_interval)) != 2 or cfg_interval[0] > cfg_interval[1]:
            raise ValueError(f"cfg_interval must be (low, high) with low <= high; got {cfg_interval!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True; got {temperature!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")
        return targets

    def prepare_slices(self, images: dict, slice_index=None, axis: int = 2) -> dict[str, mri_io.PreparedSlice]:
        """Each input → a padded uint8 RGB slice at a model size; all inputs must share one shape."""
        prepared, shape_of = {}, {}
        for code, value in images.items():
            name = f"images[{code!r}]"
            if mri_io.is_volume_source(value):
                volume = mri_io.volume_array(mri_io.load_nifti(value, name), name)
                mri_io.check_finite_and_varying(volume, name)
                plane = mri_io.take_slice(volume, slice_index, axis, name)
                # Scale with whole-volume statistics, as UniBrain does, but only materialise the slice.
                scaled = mri_io.scale_volume(volume, name)
                array = mri_io.take_slice(scaled, slice_index, axis, name)
                mri_io.check_finite_and_varying(plane, f"{name} slice {slice_index}")
            else:
                array = mri_io.scale_to_uint8(mri_io.slice_array(value, name), name)
            shape_of[code] = array.shape[:2]
            prepared[code] = mri_io.prepare_slice(array, self.processor.vae_resize)
        if len(set(shape_of.values())) > 1:
            raise ValueError(f"images have different slice shapes {shape_of}; all modalities must be co-registered "
                             f"slices of one size")
        return prepared

    def _check_latents(self, latents, batch: int, num_tokens: int, rows: int, cols: int):
        if latents is None:
            return None
        if isinstance(latents, dict):
            return {k: self._check_latents(v, batch, num_tokens, rows, cols) for k, v in latents.items()}
        config = self.model.config
        channels = config.patch_latent_dim
        latents = torch.as_tensor(latents)
        if latents.dim() == 4:  # (B, C, h·p, w·p) latent grid → tokens
            expected = (batch, config.latent_channels, rows * config.latent_patch_size, cols * config.latent_patch_size)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents grid must have shape {expected}; got {tuple(latents.shape)}")
            latents = torch.stack([UniBrainForConditionalGeneration.patchify_latents(
                row[None], [(rows, cols)], config.latent_patch_size) for row in latents])
        if latents.dim() == 2:
            latents = latents[None]
        if tuple(latents.shape) != (batch, num_tokens, channels):
            raise ValueError(f"latents must have shape ({batch}, {num_tokens}, {channels}) (tokens) or a latent grid; "
                             f"got {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or Inf")
        return latents.float()

    # ------------------------------------------------------------------ building blocks
    def load_lora(self, adapter_dir, merge: bool = False, adapter_name: str = "default") -> None:
        """Attach a peft LoRA adapter (from ``accelerate launch -m unibrain_hf.train`` with ``lora:``).

        With ``merge=True`` the adapter is folded into the weights (no inference overhead, not
        removable); otherwise :meth:`unload_lora` restores the base model.
        """
        from ..train.lora import load_lora

        if hasattr(self.model, "peft_config"):
            raise ValueError("a LoRA adapter is already attached; call unload_lora() first")
        self.register_modules(model=load_lora(self.model, adapter_dir, merge=merge, adapter_name=adapter_name))

    def unload_lora(self) -> None:
        """Remove an attached (unmerged) LoRA adapter."""
        if not hasattr(self.model, "peft_config"):
            raise ValueError("no LoRA adapter is attached")
        self.register_modules(model=self.model.unload())

    def tokenize(self, text: str) -> list[int]:
        return self.processor.tokenize(text)

    def new_context(self, batch_size: int = 1) -> InterleavedContext:
        ids = self._special_ids()
        return InterleavedContext(self.model, ids["bos_token_id"], ids["eos_token_id"], batch_size,
                                  device=self._execution_device)

    @torch.no_grad()
    def encode_images(self, rgb_images: list[np.ndarray], posterior_eps: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> EncodedImage:
        """B uint8 RGB images of one VAE-valid size → latent tokens (VAE block) + ViT patches."""
        config = self.model.config
        pil_images = [Image.fromarray(np.asarray(a, dtype=np.uint8), mode="RGB") for a in rgb_images]
        pixels = torch.stack([to_model_tensor(image) for image in pil_images]).to(self._execution_device)
        height, width = pixels.shape[-2:]
        stride, patch = self.latent_stride, config.latent_patch_size
        rows, cols = height // stride, width // stride
        if posterior_eps is not None:
            posterior_eps = torch.as_tensor(posterior_eps).reshape(len(rgb_images), config.latent_channels,
                                                                   rows * patch, cols * patch)
        latents = encode_latents(self.vae, pixels, posterior_eps=posterior_eps, generator=generator).float()
        tokens = torch.stack([UniBrainForConditionalGeneration.patchify_latents(latent[None], [(rows, cols)], patch)
                              for latent in latents])
        latent_ids = _grid_position_ids(rows, cols, config.max_latent_size, "latent")
        vit_patches, vit_ids = [], []
        vit_patch = config.vit_patch_size
        for image in pil_images:
            vit_tensor = to_model_tensor(self.processor.vit_resize(image))
            vit_patches.append(patchify(vit_tensor, vit_patch))
            vit_ids.append(_grid_position_ids(vit_tensor.shape[1] // vit_patch, vit_tensor.shape[2] // vit_patch,
                                              config.vit_max_num_patch_per_side, "ViT"))
        return EncodedImage(tokens, latent_ids, torch.cat(vit_patches), torch.cat(vit_ids))

    def generate_text(self, context: InterleavedContext, max_new_tokens: int, do_sample: bool = False,
                      temperature: float = 1.0, generator: torch.Generator | None = None) -> list[str]:
        """Decode from the full context (unchanged) and return one string per batch row.

        Like the reference, the text kept is what lies between ``<|im_start|>`` and ``<|im_end|>``.
        """
        ids = context.generate_text(max_new_tokens + 1, do_sample, temperature, generator)
        texts = []
        for row in ids.tolist():
            decoded = self.processor.decode(row)
            after_start = decoded.split("<|im_start|>", 2)
            body = after_start[1] if len(after_start) > 1 else decoded
            texts.append(body.split("<|im_end|>")[0])
        return texts

    @torch.no_grad()
    def generate_latents(self, context: InterleavedContext, height: int, width: int, batch_size: int,
                         num_inference_steps: int, timestep_shift: float, guidance: GuidanceSettings,
                         generator=None, latents: torch.Tensor | None = None, target_modality: str | None = None,
                         callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs=()):
        """Denoise one image per batch row against ``context`` (read-only) → latent tokens (B, N, p·p·C)."""
        config = self.model.config
        rows, cols = height // self.latent_stride, width // self.latent_stride
        position_ids = _grid_position_ids(rows, cols, config.max_latent_size, "latent")
        if latents is None:
            # diffusers' randn_tensor draws on the generator's device (a CPU generator also seeds GPU runs).
            latents = randn_tensor((batch_size, rows * cols, config.patch_latent_dim), generator=generator,
                                   device=self._execution_device, dtype=torch.float32)
        x = latents.float().to(self._execution_device, copy=True)
        grid = flow_timesteps(num_inference_steps, timestep_shift)
        # The scheduler runs the Euler update on UniBrain's grid (its own shift stays 1).
        self.scheduler.set_timesteps(sigmas=grid[:-1].numpy(), device="cpu")
        self.scheduler.sigmas = grid.clone()
        self.scheduler.timesteps = grid[:-1] * self.scheduler.config.num_train_timesteps
        with self.progress_bar(total=num_inference_steps - 1) as progress:
            for i in range(num_inference_steps - 1):
                t = float(grid[i])
                text_scale, image_scale = guidance.scales_at(t)
                v_cond, v_text, v_image = context.velocities(x, t, position_ids, text_scale, image_scale)
                velocity = combine_guidance(v_cond.float(), None if v_text is None else v_text.float(),
                                            None if v_image is None else v_image.float(), text_scale, image_scale,
                                            guidance.renorm_type, guidance.renorm_min)
                x_t = x
                x = self.scheduler.step(velocity, self.scheduler.timesteps[i], x, return_dict=False)[0]
                if callback_on_step_end is not None:
                    available = {"latents": x, "x_t": x_t, "velocity": velocity, "v_cond": v_cond,
                                 "v_uncond_text": v_text, "v_uncond_image": v_image, "context": context,
                                 "target_modality": target_modality}
                    kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    returned = callback_on_step_end(self, i, t, kwargs) or {}
                    x = returned.get("latents", x)
                progress.update()
        return x

    @torch.no_grad()
    def latents_to_uint8(self, tokens: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Latent tokens (B, N, p·p·C) → (B, H, W, 3) uint8, truncating like the reference."""
        images = self.decode_latent_tokens(tokens, height, width)
        images = ((images.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        config = self.model.config
        return UniBrainForConditionalGeneration.unpatchify_latents(
            tokens, height // self.latent_stride, width // self.latent_stride, config.latent_patch_size,
            config.latent_channels)

    @torch.no_grad()
    def decode_latent_tokens(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latent tokens → VAE output (B, 3, H, W) in [-1, 1]-ish, unclamped."""
        return decode_latents(self.vae, self.unpatchify(tokens, height, width))

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(
        self,
        images: dict[str, Any],
        target_modalities: list[str] | None = None,
        task: str = "generation",
        prompt: str | None = None,
        slice_index: int | None = None,
        axis: int = 2,
        num_inference_steps: int = 10,
        timestep_shift: float | None = None,
        guidance_scale: float = 3.0,
        image_guidance_scale: float = 1.2,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "text_channel",
        cfg_renorm_min: float = 0.0,
        think: bool | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | dict | None = None,
        posterior_eps: dict[str, torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""Impute missing MRI sequences and/or generate text from the given ones.

        Args:
            images (`dict[str, ...]`): modality code → one input. A 2-D slice as ``PIL.Image``, numpy array
                or torch tensor ((H, W), (H, W, 1|3); tensors also (1|3, H, W)), or a volume as a NIfTI path /
                nibabel image together with ``slice_index``. uint8 data is used as is; other dtypes get
                UniBrain's percentile foreground scaling (whole volume for volumes). All inputs must have
                one slice shape. The dict order is the order the images enter the context.
            target_modalities (`list[str]`): modalities to impute, in order. Known codes (``t1n``, ``t1c``,
                ``t2w``, ``t2f``, …) and any other free text (e.g. ``"SWI"``) are accepted.
            task (`str`): ``"generation"`` (each target from the inputs, independently), ``"unified"``
                (thinking + image per target, each generated image joins the context, then impression and
                diagnosis), ``"diagnosis"`` (impression + diagnosis text), ``"report"`` (impression text) or
                ``"answer"`` (answer to ``prompt``).
            prompt (`str`, *optional*): the question for ``"answer"``; for ``"generation"`` with one target it
                replaces the default instruction.
            slice_index (`int`, *optional*): slice to take from volume inputs. axis (`int`): axis of that slice
                in the stored array (default 2, the last voxel axis).
            num_inference_steps (`int`, defaults to 10): grid points of the flow sampler; N points give N − 1
                Euler steps, like the reference. Must be >= 2.
            timestep_shift (`float`, *optional*): warp ``s·t / (1 + (s − 1)·t)`` of the grid; defaults to 3.0 for
                ``generation`` and 1.0 for ``unified`` (UniBrain's evaluation).
            guidance_scale (`float`, defaults to 3.0): text classifier-free guidance (context without the last
                instruction as the unconditional branch). <= 1 disables guidance.
            image_guidance_scale (`float`, defaults to 1.2): image guidance (text-only context as unconditional).
            cfg_interval (`tuple`, defaults to (0.4, 1.0)): guidance is applied where ``low < t <= high``.
            cfg_renorm_type (`str`, defaults to ``"text_channel"``): ``"global"``, ``"channel"`` or
                ``"text_channel"`` renormalisation of the guided velocity. cfg_renorm_min (`float`): lower clamp
                of the renormalisation factor (0).
            think (`bool`, *optional*): generate reasoning text before each image (with UniBrain's planning
                system prompt). Defaults to True for ``unified``, False otherwise.
            max_new_tokens (`int`, *optional*): text budget per generation, not counting the start token;
                defaults to the reference's 799 (``unified``) or 511.
            do_sample (`bool`, defaults to False): sample text instead of greedy decoding. temperature
                (`float`): sampling temperature.
            generator (`torch.Generator`, *optional*): drives the VAE posterior samples, initial noise and text
                sampling, in that order per image.
            latents (`torch.Tensor` or `dict`, *optional*): initial noise at t = 1 as tokens (N, p·p·C) /
                (B, N, p·p·C) or a latent grid (B, C, H/8, W/8); a dict gives one per target.
            posterior_eps (`dict[str, torch.Tensor]`, *optional*): the VAE posterior noise of each input image
                (shape of the latent mean), to replay a recorded run.
            output_type (`str`, defaults to ``"pil"``): ``"pil"``, ``"np"`` (float32 in [0, 1]), ``"pt"``
                (float (C, H, W) in [0, 1]) or ``"latent"`` (the normalised latent grid at the model size).
                Images of single-channel inputs are single-channel, cropped back to the input slice size.
            return_dict (`bool`, defaults to True): return a [`UniBrainPipelineOutput`] instead of a tuple
                ``(images, thinking, impression, diagnosis, diagnosis_label, answer)``.
            callback_on_step_end (`Callable`, *optional*): ``fn(pipe, step, t, callback_kwargs) -> dict`` after
                each Euler step; returning ``{"latents": ...}`` replaces the latents.
            callback_on_step_end_tensor_inputs (`list[str]`): keys passed in ``callback_kwargs``, from
                ``pipe._callback_tensor_inputs``.

        Returns:
            [`UniBrainPipelineOutput`] or `tuple`.
        """
        targets = self.check_inputs(images, target_modalities, task, prompt, num_inference_steps, cfg_renorm_type,
                                    cfg_interval, output_type, max_new_tokens, temperature, do_sample,
                                    callback_on_step_end_tensor_inputs)
        prepared = self.prepare_slices(images, slice_index, axis)
        slices = {code: [item] for code, item in prepared.items()}
        result = self._run(slices, targets, task, prompt, num_inference_steps, timestep_shift, guidance_scale,
                           image_guidance_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, think,
                           max_new_tokens, do_sample, temperature, generator, latents, posterior_eps, output_type,
                           callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.maybe_free_model_hooks()
        output = UniBrainPipelineOutput(images={k: v[0] for k, v in result["images"].items()},
                                        thinking={k: v for k, v in result["thinking"].items()},
                                        impression=result["impression"], diagnosis=result["diagnosis"],
                                        diagnosis_label=result["diagnosis_label"], answer=result["answer"])
        if not return_dict:
            return (output.images, output.thinking, output.impression, output.diagnosis, output.diagnosis_label,
                    output.answer)
        return output

    def _run(self, slices: dict[str, list], targets, task, prompt, num_inference_steps, timestep_shift,
             guidance_scale, image_guidance_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, think,
             max_new_tokens, do_sample, temperature, generator, latents, posterior_eps, output_type,
             callback_on_step_end=None, callback_on_step_end_tensor_inputs=()):
        """The interleaved run over B rows (B slices of one size); text tasks need B = 1."""
        first = next(iter(slices.values()))
        batch = len(first)
        height, width = first[0].model_size
        rows, cols = height // self.latent_stride, width // self.latent_stride
        latents = self._check_latents(latents, batch, rows * cols, rows, cols)
        for code in posterior_eps or {}:
            if code not in slices:
                raise ValueError(f"posterior_eps has {code!r}, which is not an input modality")
        think = (task == "unified") if think is None else bool(think)
        shift = DEFAULT_TIMESTEP_SHIFT.get(task, 3.0) if timestep_shift is None else float(timestep_shift)
        if max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS.get(task, FALLBACK_MAX_NEW_TOKENS)
        guidance = GuidanceSettings(guidance_scale, image_guidance_scale, tuple(cfg_interval), cfg_renorm_type,
                                    cfg_renorm_min)
        text_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                           generator=generator)

        def latents_for(code):
            return latents.get(code) if isinstance(latents, dict) else latents

        def denoise(context, code):
            return self.generate_latents(context, height, width, batch, num_inference_steps, shift, guidance,
                                         generator, latents_for(code), code, callback_on_step_end,
                                         callback_on_step_end_tensor_inputs)

        result = {"images": {}, "thinking": {}, "impression": None, "diagnosis": None, "diagnosis_label": None,
                  "answer": None}
        context = self.new_context(batch)
        if think:
            context.add_system_prompt(self.tokenize(templates.GEN_THINK_SYSTEM_PROMPT))
        for code, items in slices.items():
            eps = (posterior_eps or {}).get(code)
            context.add_image(self.encode_images([item.rgb for item in items], eps, generator))

        def think_then(context, code):
            if think:
                text = self.generate_text(context, **text_kwargs)
                result["thinking"][code] = text[0] if batch == 1 else text
                context.add_generated_text(torch.tensor([self.tokenize(t) for t in text]))

        def emit(code, tokens, rgb):
            result["images"][code] = self._format(tokens, rgb, first, height, width, output_type, slices)

        if task == "generation":
            for code in targets:
                branch = context.fork()  # every target sees the inputs only
                branch.add_instruction(self.tokenize(prompt if prompt is not None else build_eval_generation_prompt(code)))
                think_then(branch, code)
                tokens = denoise(branch, code)
                rgb = None if output_type == "latent" else self.latents_to_uint8(tokens, height, width)
                emit(code, tokens, rgb)
        elif task == "unified":
            instructions = build_unified_instructions(targets)
            context.add_instruction(self.tokenize(instructions[0]))
            for index, code in enumerate(targets):
                think_then(context, code)
                tokens = denoise(context, code)
                rgb = self.latents_to_uint8(tokens, height, width)
                emit(code, tokens, rgb)
                # UniBrain re-encodes the decoded uint8 image (not the latent) and, before that, points
                # the image-free guidance branch at the current context.
                context.image_branch_from_gen()
                context.add_image(self.encode_images(list(rgb), None, generator))
                if index + 1 < len(targets):
                    context.add_instruction(self.tokenize(instructions[index + 1]))
            context.add_generated_text(self.tokenize(build_unified_impression_prompt()))
            result["impression"] = self.generate_text(context, **text_kwargs)[0]
            # As in the reference, the diagnosis question follows the impression question directly.
            context.add_generated_text(self.tokenize(build_unified_diagnosis_prompt()))
            result["diagnosis"] = self.generate_text(context, **text_kwargs)[0]
        elif task == "diagnosis":
            context.add_instruction(self.tokenize(build_eval_diagnosis_prompt()))
            result["diagnosis"] = self.generate_text(context, **text_kwargs)[0]
        elif task == "report":
            context.add_instruction(self.tokenize(build_unified_impression_prompt()))
            result["impression"] = self.generate_text(context, **text_kwargs)[0]
        else:  # answer
            context.add_instruction(self.tokenize(prompt))
            result["answer"] = self.generate_text(context, **text_kwargs)[0]
        if result["diagnosis"] is not None:
            result["diagnosis_label"] = parse_diagnosis_label(result["diagnosis"])
        return result

    def _format(self, tokens, rgb, reference_slices, height, width, output_type, slices):
        """Per batch row: the output in ``output_type``, on the caller's grid (except latents)."""
        if output_type == "latent":
            return list(self.unpatchify(tokens, height, width))
        outputs = []
        for row, prepared in zip(rgb, reference_slices):
            image = prepared.restore(row)
            if output_type == "pil":
                outputs.append(Image.fromarray(image))
            elif output_type == "np":
                outputs.append(image.astype(np.float32) / 255.0)
            else:
                tensor = torch.from_numpy(image.astype(np.float32) / 255.0)
                outputs.append(tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1))
        return outputs

    # ------------------------------------------------------------------ volumes
    @torch.no_grad()
    def impute_volume(self, nifti_in: dict[str, Any], target_modalities: list[str], axis: int = 2,
                      batch_size: int = 8, output_dir: str | os.PathLike | None = None, **call_kwargs):
        """Impute whole volumes slice by slice; returns {target: nibabel image} (uint8, input affine/header).

        Args:
            nifti_in: modality → NIfTI path or nibabel image; all of one shape.
            target_modalities: modalities to impute (task ``generation`` by default).
            axis: slicing axis of the stored arrays.
            batch_size: slices denoised together (``generation`` without ``think``: one batched context
                per slice group); other settings run slice by slice.
            output_dir: if given, each target is written to ``<output_dir>/<target>.nii.gz`` (atomically).
            **call_kwargs: ``__call__`` settings (``task``, ``num_inference_steps``, ``generator``, …).

        Slices where every input is constant (e.g. empty background) are not generated; they stay 0.
        """
        import nibabel as nib

        task = call_kwargs.pop("task", "generation")
        for forbidden in ("images", "slice_index", "output_type", "return_dict", "latents", "posterior_eps"):
            if forbidden in call_kwargs:
                raise ValueError(f"impute_volume does not take {forbidden!r}")
        if task not in ("generation", "unified"):
            raise ValueError(f"impute_volume runs task 'generation' or 'unified'; got {task!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2; got {axis!r}")
        defaults = dict(num_inference_steps=10, timestep_shift=None, guidance_scale=3.0, image_guidance_scale=1.2,
                        cfg_interval=(0.4, 1.0), cfg_renorm_type="text_channel", cfg_renorm_min=0.0, think=None,
                        max_new_tokens=None, do_sample=False, temperature=1.0, generator=None, prompt=None)
        unknown = set(call_kwargs) - set(defaults)
        if unknown:
            raise ValueError(f"impute_volume got unknown settings {sorted(unknown)}")
        settings = {**defaults, **call_kwargs}
        targets = self.check_inputs(nifti_in, target_modalities, task, settings["prompt"],
                                    settings["num_inference_steps"], settings["cfg_renorm_type"],
                                    settings["cfg_interval"], "np", settings["max_new_tokens"],
                                    settings["temperature"], settings["do_sample"], ())
        sources = {code: mri_io.load_nifti(value, f"nifti_in[{code!r}]") for code, value in nifti_in.items()}
        volumes = {}
        for code, image in sources.items():
            name = f"nifti_in[{code!r}]"
            volumes[code] = mri_io.scale_volume(mri_io.volume_array(image, name), name)
        shapes = {code: v.shape for code, v in volumes.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"nifti_in volumes have different shapes {shapes}")
        shape = next(iter(shapes.values()))
        depth = shape[axis]
        wanted = [i for i in range(depth)
                  if any(np.take(v, i, axis=axis).min() != np.take(v, i, axis=axis).max() for v in volumes.values())]
        think = (task == "unified") if settings["think"] is None else bool(settings["think"])
        group = batch_size if (task == "generation" and not think) else 1
        outputs = {code: np.zeros(shape, dtype=np.uint8) for code in targets}
        run_settings = {k: v for k, v in settings.items() if k != "prompt"}
        with self.progress_bar(total=len(wanted)) as progress:
            for start in range(0, len(wanted), group):
                indices = wanted[start:start + group]
                slices = {code: [mri_io.prepare_slice(np.take(volumes[code], i, axis=axis), self.processor.vae_resize)
                                 for i in indices] for code in volumes}
                result = self._run(slices, targets, task, settings["prompt"], output_type="np", latents=None,
                                   posterior_eps=None, **run_settings)
                for code in targets:
                    for i, image in zip(indices, result["images"][code]):
                        index = [slice(None)] * 3
                        index[axis] = i
                        outputs[code][tuple(index)] = np.round(image * 255).astype(np.uint8)
                progress.update(len(indices))
        reference = next(iter(sources.values()))
        images = {}
        for code, data in outputs.items():
            header = reference.header.copy()
            header.set_data_dtype(np.uint8)
            images[code] = nib.Nifti1Image(data, reference.affine, header)
        if output_dir is not None:
            directory = Path(output_dir)
            directory.mkdir(parents=True, exist_ok=True)
            for code, image in images.items():
                _atomic_nifti_save(image, directory / f"{code}.nii.gz")
        self.maybe_free_model_hooks()
        return images


def _atomic_nifti_save(image, path: Path) -> None:
    """Write next to the destination, then rename, so no half-written file is ever visible."""
    import nibabel as nib

    from ..utils.atomic import atomic_file

    with atomic_file(path, ".nii.gz") as temporary:
        nib.save(image, str(temporary))
