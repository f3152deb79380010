"""``UniBrainPipeline``: brain-MRI sequence imputation and reasoning in one interleaved KV-cache context.

Given the MRI sequences a patient has (2-D slices or NIfTI volumes), the pipeline imputes the
missing ones and/or writes text, exactly as UniBrain's evaluation does it (see
UniBrain's ``inferencer.py`` and ``evaluate_metrics.py``):

* ``generation`` — each target imputed from the inputs with "Translate the attached MRI into its
  {T} image." (targets are independent; shift 3).
* ``unified`` — system prompt, inputs, then per target: thinking text, image (shift 1), the
  generated image appended to the context; then impression and diagnosis.
* ``diagnosis`` / ``report`` / ``answer`` — text only: the diagnosis question, the impression
  question, or a free-form ``prompt``.

A call reads top to bottom like diffusers' FLUX pipeline: ``check_inputs`` (every argument, into
one :class:`~unibrain_hf.pipelines.settings.CallSettings`) → ``prepare_inputs`` (one
:func:`~unibrain_hf.pipelines.mri_io.load_slice` per modality and row, in the training frame) →
the task's method (encode the context → prepare latents → denoise with CFG → decode) → the
output object. The call contract is diffusers': a list of image dicts is a batch,
``num_images_per_prompt`` repeats each row, ``num_inference_steps`` counts denoising steps,
``callback_on_step_end`` takes a function or a ``PipelineCallback``, and the scheduler is driven
through its own ``set_timesteps(sigmas=...)`` / ``step``. Usage: ``docs/PIPELINE.md``.

    python -c "from unibrain_hf import UniBrainPipeline; help(UniBrainPipeline.__call__)"
    # a tiny random pipeline end to end:
    python -m pytest tests/test_pipeline.py -q
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..errors import InvalidInputError
from ..modeling.modeling_unibrain import UniBrainForConditionalGeneration
from ..modeling.vae import decode_latents, encode_latents
from ..processing.image_transforms import patchify, to_model_tensor
from ..processing.processor import UniBrainProcessor
from ..protocol import templates
from ..protocol.diagnosis import parse_diagnosis_label
from ..protocol.orientation import plane_axis
from ..protocol.prompts import (build_eval_diagnosis_prompt, build_eval_generation_prompt,
                                build_unified_diagnosis_prompt, build_unified_impression_prompt,
                                build_unified_instructions)
from ..utils.readers import check_pipeline_directory
from . import mri_io
from .context import EncodedImage, InterleavedContext
from .fast_inference import FastInferenceMixin
from .lora import UniBrainLoraLoaderMixin
from .hub import UniBrainHubMixin
from .offload import ExpertOffloadMixin
from .pipeline_output import UniBrainPipelineOutput
from .sampler import GuidanceSettings, check_scheduler, combine_guidance, flow_sigmas, set_flow_timesteps
from .settings import IMAGE_TASKS, CallSettings


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


def _grid_position_ids(rows: int, cols: int, grid: int, what: str, device) -> torch.Tensor:
    """Raster ids ``row * grid + col`` into a model's 2-D position table."""
    if rows > grid or cols > grid:
        raise InvalidInputError(f"{what}: a {rows}×{cols} token grid exceeds the model's {grid}×{grid} position table")
    ids = torch.arange(rows, device=device)[:, None] * grid + torch.arange(cols, device=device)[None, :]
    return ids.flatten()


@dataclass
class _Rows:
    """Output rows that share one context: their slices per modality, generator(s), and given noise."""

    slices: dict[str, list[mri_io.PreparedSlice]]
    generator: Any
    latents: dict[str, torch.Tensor]  # target -> (B, N, p·p·C) tokens
    posterior_eps: dict[str, torch.Tensor]  # input modality -> (B, C, h, w)
    prompt: str | None

    def __len__(self) -> int:
        return len(next(iter(self.slices.values())))

    @property
    def reference(self) -> list[mri_io.PreparedSlice]:
        """Each row's geometry (every modality of a row has the same)."""
        return next(iter(self.slices.values()))

    @property
    def model_size(self) -> tuple[int, int]:
        return self.reference[0].model_size


@dataclass
class _RowsResult:
    """What a task produced for some rows: per row, an image (uint8 on the input grid, or latents) and texts."""

    images: dict[str, list] = field(default_factory=dict)
    thinking: dict[str, list[str]] = field(default_factory=dict)
    impression: list[str] | None = None
    diagnosis: list[str] | None = None
    answer: list[str] | None = None

    TEXTS = ("impression", "diagnosis", "answer")

    def extend(self, other: "_RowsResult") -> None:
        """Append another group's rows."""
        for name in ("images", "thinking"):
            for code, values in getattr(other, name).items():
                getattr(self, name).setdefault(code, []).extend(values)
        for name in self.TEXTS:
            if getattr(other, name) is not None:
                setattr(self, name, (getattr(self, name) or []) + list(getattr(other, name)))

    def in_row_order(self, rows: list[int]) -> "_RowsResult":
        """Entry i belongs to row ``rows[i]``; return the entries sorted by row."""
        order = sorted(range(len(rows)), key=rows.__getitem__)

        def pick(values):
            return None if values is None else [values[i] for i in order]

        return _RowsResult({code: pick(v) for code, v in self.images.items()},
                           {code: pick(v) for code, v in self.thinking.items()},
                           *(pick(getattr(self, name)) for name in self.TEXTS))


def _is_local_path(name_or_path) -> bool:
    """A path on this machine (existing, or not a valid Hub repo id), as opposed to a Hub repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if isinstance(name_or_path, os.PathLike) or os.path.exists(str(name_or_path)):
        return True
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        return True
    return str(name_or_path).startswith((".", "~")) or os.path.isabs(str(name_or_path))


class UniBrainPipeline(UniBrainLoraLoaderMixin, UniBrainHubMixin, ExpertOffloadMixin, FastInferenceMixin,
                       DiffusionPipeline):
    r"""Interleaved brain-MRI imputation and understanding with UniBrain (BAGEL-7B-MoT).

    Args:
        model ([`UniBrainForConditionalGeneration`]): the MoT decoder, SigLIP ViT and flow head.
        vae ([`AutoencoderKL`]): the FLUX-shaped VAE (latents sampled from the posterior, like UniBrain).
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): the flow-matching scheduler; the pipeline hands it
            UniBrain's time grid as custom ``sigmas``, so its own ``shift`` should stay 1. Any diffusers
            flow-matching scheduler whose ``set_timesteps`` accepts ``sigmas`` can replace it.
        tokenizer: a transformers tokenizer with ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
            ``<|vision_end|>``.
        processor ([`UniBrainProcessor`]): image resize rules and position grids.

    Precision: ``from_pretrained(..., dtype=torch.bfloat16)`` runs the decoder in bf16 (as UniBrain
    does on GPU). The VAE may be kept in fp32 (``pipe.vae.to(torch.float32)``); latents and the Euler
    update are always kept in fp32. ``enable_fast_inference(dtype=torch.bfloat16, compile=...)``
    switches an fp32 pipeline to bf16 where this machine has native bf16 (else it stays fp32 and
    says why) and optionally compiles the decoder experts.
    """

    model_cpu_offload_seq = "model->vae"
    _optional_components: list[str] = []
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
        """diffusers' loader, safetensors only; afterwards the processor shares the pipeline's tokenizer.

        A local pipeline directory whose components hold weights only as pickles (``*.bin``, ``*.pt``)
        is refused before anything is opened: loading a pickle can run code.
        """
        use_safetensors = kwargs.pop("use_safetensors", True)
        if use_safetensors is not True:
            raise InvalidInputError(f"use_safetensors={use_safetensors!r}: UniBrainPipeline loads safetensors weights "
                                    f"only, because opening a pickle can run code; convert the weights to "
                                    f".safetensors once, in an environment you trust")
        if _is_local_path(pretrained_model_name_or_path):
            # Every component is checked before diffusers loads any (it loads them in no fixed order).
            check_pipeline_directory(pretrained_model_name_or_path, "pipeline directory")
        pipe = super().from_pretrained(pretrained_model_name_or_path, use_safetensors=True, **kwargs)
        if pipe.processor is not None:
            pipe.processor.tokenizer = pipe.tokenizer
        return pipe

    # ------------------------------------------------------------------ what callbacks read and set
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def image_guidance_scale(self) -> float:
        return self._image_guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ geometry
    @property
    def latent_stride(self) -> int:
        return self.model.config.latent_downsample

    def _special_ids(self) -> dict[str, int]:
        ids = self.processor.special_token_ids()
        config = self.model.config
        if (ids["start_of_image"], ids["end_of_image"]) != (config.start_of_image_token_id,
                                                             config.end_of_image_token_id):
            raise InvalidInputError("the tokenizer's <|vision_start|>/<|vision_end|> ids do not match the model config")
        return ids

    # ------------------------------------------------------------------ 1. inputs (no model work)
    def check_inputs(self, images, callback_on_step_end=None, **arguments) -> tuple[CallSettings, list[dict]]:
        """Validate every argument of a call; returns its settings and ``images`` as a list of rows."""
        rows = mri_io.image_rows(images)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise InvalidInputError(f"callback_on_step_end must be callable; got {type(callback_on_step_end).__name__}")
        settings = CallSettings.from_arguments(batch_size=len(rows), input_modalities=tuple(rows[0]),
                                               allowed_callback_inputs=self._callback_tensor_inputs, **arguments)
        if settings.task in IMAGE_TASKS:
            check_scheduler(self.scheduler)
        return settings, rows

    def prepare_inputs(self, rows: list[dict], settings: CallSettings) -> list[dict[str, mri_io.PreparedSlice]]:
        """One prepared slice per modality and output row (rows repeated ``num_images_per_prompt`` times)."""
        batched = len(rows) > 1
        prepared, shapes = [], {}
        for index, row in enumerate(rows):
            slice_index = settings.slice_indices[index]
            if slice_index is not None and not any(mri_io.is_volume_source(v) for v in row.values()):
                raise InvalidInputError(f"slice_index is set but no input of images{f'[{index}]' if batched else ''} "
                                        f"is a volume (NIfTI path or nibabel image)")
            loaded = {}
            for code, value in row.items():
                name = f"images[{index}][{code!r}]" if batched else f"images[{code!r}]"
                loaded[code] = mri_io.load_slice(value, name, self.processor.vae_resize, slice_index, settings.axis)
                shapes[name] = loaded[code].original_size
            prepared += [loaded] * settings.num_images_per_prompt
        if len(set(shapes.values())) > 1:
            raise InvalidInputError(f"images have different slice shapes {shapes}; all modalities (and all rows of a "
                                    f"batch) must be co-registered slices of one size")
        return prepared

    def _check_generator(self, generator, num_rows: int):
        if isinstance(generator, list):
            if len(generator) != num_rows:
                raise InvalidInputError(f"generator is a list of {len(generator)} generators but the call has "
                                        f"{num_rows} output rows (len(images) × num_images_per_prompt)")
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise InvalidInputError("generator must be a torch.Generator or a list of them")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise InvalidInputError(f"generator must be a torch.Generator or a list of them; got "
                                    f"{type(generator).__name__}")
        return generator

    def _check_latents(self, latents, settings: CallSettings, model_size) -> dict[str, torch.Tensor]:
        """Given initial noise → target → (R, N, p·p·C) float32 tokens; one tensor serves every target."""
        if latents is None:
            return {}
        if isinstance(latents, dict):
            unknown = [code for code in latents if code not in settings.target_modalities]
            if unknown:
                raise InvalidInputError(f"latents has {unknown}, which are not in target_modalities")
            return {code: self._latent_tokens(value, settings.num_rows, model_size, f"latents[{code!r}]")
                    for code, value in latents.items()}
        tokens = self._latent_tokens(latents, settings.num_rows, model_size, "latents")
        return {code: tokens for code in settings.target_modalities}

    def _latent_tokens(self, value, num_rows: int, model_size, name: str) -> torch.Tensor:
        config = self.model.config
        rows, cols = model_size[0] // self.latent_stride, model_size[1] // self.latent_stride
        patch, channels = config.latent_patch_size, config.patch_latent_dim
        latents = torch.as_tensor(value)
        if latents.dim() == 4:  # (R, C, h·p, w·p) latent grid → tokens
            expected = (num_rows, config.latent_channels, rows * patch, cols * patch)
            if tuple(latents.shape) != expected:
                raise InvalidInputError(f"{name} as a latent grid must have shape {expected}; got {tuple(latents.shape)}")
            latents = torch.cat([UniBrainForConditionalGeneration.patchify_latents(row[None], [(rows, cols)], patch)[None]
                                 for row in latents])
        if latents.dim() == 2:
            latents = latents[None]
        if tuple(latents.shape) != (num_rows, rows * cols, channels):
            raise InvalidInputError(f"{name} must have shape ({num_rows}, {rows * cols}, {channels}) (tokens) or be a "
                                    f"latent grid; got {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise InvalidInputError(f"{name} contains NaN or Inf")
        return latents.float()

    def _check_posterior_eps(self, posterior_eps, settings: CallSettings, input_modalities, model_size):
        if posterior_eps is None:
            return {}
        if not isinstance(posterior_eps, dict):
            raise InvalidInputError("posterior_eps must be a dict {input modality: noise}")
        config = self.model.config
        shape = (settings.num_rows, config.latent_channels, model_size[0] // self.latent_stride * config.latent_patch_size,
                 model_size[1] // self.latent_stride * config.latent_patch_size)
        checked = {}
        for code, value in posterior_eps.items():
            if code not in input_modalities:
                raise InvalidInputError(f"posterior_eps has {code!r}, which is not an input modality")
            eps = torch.as_tensor(value)
            if eps.numel() != int(np.prod(shape)):
                raise InvalidInputError(f"posterior_eps[{code!r}] must have the latent mean's shape {shape}; "
                                        f"got {tuple(eps.shape)}")
            checked[code] = eps.reshape(shape).float()
        return checked

    # ------------------------------------------------------------------ 2. building blocks
    # LoRA (load_lora_weights, set_adapters, fuse_lora, ...) comes from UniBrainLoraLoaderMixin (pipelines/lora.py).
    def tokenize(self, text: str) -> list[int]:
        return self.processor.tokenize(text)

    def new_context(self, batch_size: int = 1) -> InterleavedContext:
        ids = self._special_ids()
        return InterleavedContext(self.model, ids["bos_token_id"], ids["eos_token_id"], batch_size,
                                  device=self._execution_device)

    @torch.no_grad()
    def encode_images(self, rgb_images: list[np.ndarray], posterior_eps: torch.Tensor | None = None,
                      generator=None) -> EncodedImage:
        """B uint8 RGB images of one VAE-valid size → latent tokens (VAE block) + ViT patches."""
        config = self.model.config
        device = self._execution_device
        pil_images = [Image.fromarray(np.asarray(a, dtype=np.uint8), mode="RGB") for a in rgb_images]
        pixels = torch.stack([to_model_tensor(image) for image in pil_images]).to(device)
        height, width = pixels.shape[-2:]
        stride, patch = self.latent_stride, config.latent_patch_size
        rows, cols = height // stride, width // stride
        if posterior_eps is not None:
            posterior_eps = torch.as_tensor(posterior_eps).reshape(len(rgb_images), config.latent_channels,
                                                                   rows * patch, cols * patch).to(device)
        latents = encode_latents(self.vae, pixels, posterior_eps=posterior_eps, generator=generator).float()
        tokens = torch.stack([UniBrainForConditionalGeneration.patchify_latents(latent[None], [(rows, cols)], patch)
                              for latent in latents])
        latent_ids = _grid_position_ids(rows, cols, config.max_latent_size, "latent", device)
        vit_patches, vit_ids = [], []
        vit_patch = config.vit_patch_size
        for image in pil_images:
            vit_tensor = to_model_tensor(self.processor.vit_resize(image))
            vit_patches.append(patchify(vit_tensor, vit_patch))
            vit_ids.append(_grid_position_ids(vit_tensor.shape[1] // vit_patch, vit_tensor.shape[2] // vit_patch,
                                              config.vit_max_num_patch_per_side, "ViT", device))
        return EncodedImage(tokens, latent_ids, torch.cat(vit_patches).to(device), torch.cat(vit_ids))

    def generate_text(self, context: InterleavedContext, settings: CallSettings, generator=None) -> list[str]:
        """Decode from the full context (unchanged) and return one string per batch row.

        Like the reference, the text kept is what lies between ``<|im_start|>`` and ``<|im_end|>``.
        """
        ids = context.generate_text(settings.max_new_tokens + 1, settings.do_sample, settings.temperature, generator)
        texts = []
        for row in ids.tolist():
            decoded = self.processor.decode(row)
            after_start = decoded.split("<|im_start|>", 2)
            body = after_start[1] if len(after_start) > 1 else decoded
            texts.append(body.split("<|im_end|>")[0])
        return texts

    def prepare_latents(self, batch_size: int, height: int, width: int, generator, latents=None) -> torch.Tensor:
        """Initial noise at t = 1 as tokens (B, N, p·p·C), float32 on the execution device."""
        device = self._execution_device
        if latents is not None:
            return latents.to(device=device, dtype=torch.float32)
        config = self.model.config
        rows, cols = height // self.latent_stride, width // self.latent_stride
        # diffusers' randn_tensor draws on the generator's device (a CPU generator also seeds GPU runs).
        return randn_tensor((batch_size, rows * cols, config.patch_latent_dim), generator=generator, device=device,
                            dtype=torch.float32)

    @torch.no_grad()
    def denoise(self, context: InterleavedContext, rows: _Rows, settings: CallSettings, target: str,
                callback_on_step_end: Callable | None = None) -> torch.Tensor:
        """Denoise one image per row against ``context`` (read-only) → latent tokens (B, N, p·p·C)."""
        device = self._execution_device
        height, width = rows.model_size
        config = self.model.config
        position_ids = _grid_position_ids(height // self.latent_stride, width // self.latent_stride,
                                          config.max_latent_size, "latent", device)
        latents = self.prepare_latents(len(rows), height, width, rows.generator, rows.latents.get(target))
        timesteps = set_flow_timesteps(self.scheduler, flow_sigmas(settings.num_inference_steps,
                                                                   settings.timestep_shift), device)
        self._num_timesteps = len(timesteps)
        # Each image starts from the call's scales; a callback may change them for the rest of this image.
        self._guidance_scale, self._image_guidance_scale = settings.guidance_scale, settings.image_guidance_scale
        guidance = GuidanceSettings(settings.guidance_scale, settings.image_guidance_scale, settings.cfg_interval,
                                    settings.cfg_renorm_type, settings.cfg_renorm_min)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                sigma = self.scheduler.sigmas[i]  # this step's time t in [0, 1], the model's time input
                text_scale, image_scale = guidance.scales_at(sigma, self._guidance_scale, self._image_guidance_scale)
                v_cond, v_text, v_image = context.velocities(latents, sigma, position_ids, text_scale, image_scale)
                velocity = combine_guidance(v_cond.float(), None if v_text is None else v_text.float(),
                                            None if v_image is None else v_image.float(), text_scale, image_scale,
                                            guidance.renorm_type, guidance.renorm_min)
                x_t = latents
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    available = {"latents": latents, "x_t": x_t, "velocity": velocity, "v_cond": v_cond,
                                 "v_uncond_text": v_text, "v_uncond_image": v_image, "context": context,
                                 "target_modality": target}
                    callback_kwargs = {k: available[k] for k in settings.callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()
        return latents

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

    # ------------------------------------------------------------------ 3. one method per task
    def _input_context(self, rows: _Rows, settings: CallSettings) -> InterleavedContext:
        """The system prompt (when thinking) and every input image, in ``images`` order."""
        context = self.new_context(len(rows))
        if settings.think:
            context.add_system_prompt(self.tokenize(templates.GEN_THINK_SYSTEM_PROMPT))
        for code, slices in rows.slices.items():
            context.add_image(self.encode_images([s.rgb for s in slices], rows.posterior_eps.get(code), rows.generator))
        return context

    def _think(self, context: InterleavedContext, rows: _Rows, settings: CallSettings, target: str,
               result: _RowsResult) -> None:
        if settings.think:
            texts = self.generate_text(context, settings, rows.generator)
            result.thinking[target] = texts
            context.add_generated_text(torch.tensor([self.tokenize(text) for text in texts]))

    def _image_outputs(self, tokens: torch.Tensor, rgb: np.ndarray | None, rows: _Rows, settings: CallSettings):
        """Per row: the latent grid (``output_type="latent"``) or the uint8 image on the caller's grid."""
        height, width = rows.model_size
        if settings.output_type == "latent":
            return list(self.unpatchify(tokens, height, width))
        if rgb is None:
            rgb = self.latents_to_uint8(tokens, height, width)
        return [prepared.restore(image) for image, prepared in zip(rgb, rows.reference)]

    def _generate(self, rows: _Rows, settings: CallSettings, callback=None) -> _RowsResult:
        """Each target from the inputs alone (the context is forked per target)."""
        result, context = _RowsResult(), self._input_context(rows, settings)
        for code in settings.target_modalities:
            branch = context.fork()
            branch.add_instruction(self.tokenize(rows.prompt or build_eval_generation_prompt(code)))
            self._think(branch, rows, settings, code, result)
            tokens = self.denoise(branch, rows, settings, code, callback)
            result.images[code] = self._image_outputs(tokens, None, rows, settings)
        return result

    def _unified(self, rows: _Rows, settings: CallSettings, callback=None) -> _RowsResult:
        """Think + image per target, each image joining the context, then impression and diagnosis."""
        result, context = _RowsResult(), self._input_context(rows, settings)
        height, width = rows.model_size
        instructions = build_unified_instructions(settings.target_modalities)
        context.add_instruction(self.tokenize(instructions[0]))
        for index, code in enumerate(settings.target_modalities):
            self._think(context, rows, settings, code, result)
            tokens = self.denoise(context, rows, settings, code, callback)
            rgb = self.latents_to_uint8(tokens, height, width)
            result.images[code] = self._image_outputs(tokens, rgb, rows, settings)
            # UniBrain re-encodes the decoded uint8 image (not the latent) and, before that, points
            # the image-free guidance branch at the current context.
            context.image_branch_from_gen()
            context.add_image(self.encode_images(list(rgb), None, rows.generator))
            if index + 1 < len(instructions):
                context.add_instruction(self.tokenize(instructions[index + 1]))
        context.add_generated_text(self.tokenize(build_unified_impression_prompt()))
        result.impression = self.generate_text(context, settings, rows.generator)
        # As in the reference, the diagnosis question follows the impression question directly.
        context.add_generated_text(self.tokenize(build_unified_diagnosis_prompt()))
        result.diagnosis = self.generate_text(context, settings, rows.generator)
        return result

    def _diagnosis(self, rows: _Rows, settings: CallSettings, callback=None) -> _RowsResult:
        context = self._input_context(rows, settings)
        context.add_instruction(self.tokenize(build_eval_diagnosis_prompt()))
        return _RowsResult(diagnosis=self.generate_text(context, settings, rows.generator))

    def _report(self, rows: _Rows, settings: CallSettings, callback=None) -> _RowsResult:
        context = self._input_context(rows, settings)
        context.add_instruction(self.tokenize(build_unified_impression_prompt()))
        return _RowsResult(impression=self.generate_text(context, settings, rows.generator))

    def _answer(self, rows: _Rows, settings: CallSettings, callback=None) -> _RowsResult:
        context = self._input_context(rows, settings)
        context.add_instruction(self.tokenize(rows.prompt))
        return _RowsResult(answer=self.generate_text(context, settings, rows.generator))

    # ------------------------------------------------------------------ 4. the call
    @torch.no_grad()
    def __call__(
        self,
        images: dict[str, Any] | list[dict[str, Any]],
        target_modalities: str | list[str] | None = None,
        task: str = "generation",
        prompt: str | list[str] | None = None,
        slice_index: int | list[int] | None = None,
        axis: str = "axial",
        num_inference_steps: int | None = None,
        num_grid_points: int | None = None,
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
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | dict | None = None,
        posterior_eps: dict[str, torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""Impute missing MRI sequences and/or generate text from the given ones.

        Args:
            images (`dict[str, ...]` or `list[dict[str, ...]]`): modality code → one input; a list of such
                dicts is a batch (every dict with the same modalities, all slices of one size). An input is a
                2-D slice (``PIL.Image``, numpy array or torch tensor of shape (H, W), (H, W, 1|3), tensors also
                (1|3, H, W)) taken as a training-frame plane as is, or a volume (NIfTI path / nibabel image)
                with ``slice_index``, reoriented from its affine to the training frame first. uint8 data is used
                as is, bool as 0/255; other real dtypes get UniBrain's percentile foreground scaling (whole
                volume for volumes). The dict order is the order the images enter the context.
            target_modalities (`str` or `list[str]`): modalities to impute, in order. Known codes (``t1n``,
                ``t1c``, ``t2w``, ``t2f``, …) or any other text (e.g. ``"SWI"``). A bare string is one target
                and makes ``output.images`` that target's batch itself (diffusers' form); a list makes it a dict.
            task (`str`): ``"generation"`` (each target from the inputs, independently), ``"unified"``
                (thinking + image per target, each generated image joins the context, then impression and
                diagnosis), ``"diagnosis"`` (impression + diagnosis text), ``"report"`` (impression text) or
                ``"answer"`` (answer to ``prompt``).
            prompt (`str` or `list[str]`, *optional*): the question for ``"answer"``; for ``"generation"`` with
                one target it replaces the default instruction. A list gives one per input row.
            slice_index (`int` or `list[int]`, *optional*): the slice of volume inputs, counted along ``axis``
                in the training frame (axial: 0 = the most superior slice, as in a prepared cohort's volumes).
                A list gives one per input row.
            axis (`str`, defaults to ``"axial"``): the plane of ``slice_index``: ``"axial"``, ``"coronal"`` or
                ``"sagittal"`` (see ``docs/PIPELINE.md``; UniBrain's stage 2/3 saw axial slices only).
            num_inference_steps (`int`, *optional*): denoising steps, diffusers' meaning; defaults to 9, the
                reference's evaluation setting (its 10 grid points).
            num_grid_points (`int`, *optional*): the reference's ``num_timesteps`` — N grid points give N − 1
                steps. Pass this or ``num_inference_steps``.
            timestep_shift (`float`, *optional*): warp ``s·t / (1 + (s − 1)·t)`` of the grid; defaults to 3.0 for
                ``generation`` and 1.0 for ``unified`` (UniBrain's evaluation).
            guidance_scale (`float`, defaults to 3.0): text classifier-free guidance (context without the last
                instruction as the unconditional branch). <= 1 disables guidance.
            image_guidance_scale (`float`, defaults to 1.2): image guidance (text-only context as unconditional).
            cfg_interval (`tuple`, defaults to (0.4, 1.0)): guidance is applied where ``low < t <= high``,
                compared in float32 like the reference.
            cfg_renorm_type (`str`, defaults to ``"text_channel"``): ``"global"``, ``"channel"`` or
                ``"text_channel"`` renormalisation of the guided velocity. cfg_renorm_min (`float`): lower clamp
                of the renormalisation factor (0).
            think (`bool`, *optional*): generate reasoning text before each image (with UniBrain's planning
                system prompt). Defaults to True for ``unified``, False otherwise.
            max_new_tokens (`int`, *optional*): text budget per generation, not counting the start token;
                defaults to the reference's 799 (``unified``) or 511.
            do_sample (`bool`, defaults to False): sample text instead of greedy decoding. temperature
                (`float`): sampling temperature.
            num_images_per_prompt (`int`, defaults to 1): outputs per input row, each with its own noise (VAE
                posterior samples included) — UniBrain's ``sample_time`` ensembles.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): drives the VAE posterior
                samples, initial noise and text sampling, in that order per image. A list gives each output
                row its own generator, and row r then equals a single call with ``generator[r]``.
            latents (`torch.Tensor` or `dict`, *optional*): initial noise at t = 1 as tokens (N, p·p·C) /
                (R, N, p·p·C) or a latent grid (R, C, H/8, W/8); a dict gives one per target.
            posterior_eps (`dict[str, torch.Tensor]`, *optional*): the VAE posterior noise of each input image
                (shape of the latent mean, with or without the row dimension), to replay a recorded run.
            output_type (`str`, defaults to ``"pil"``): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``; shapes in
                [`UniBrainPipelineOutput`].
            return_dict (`bool`, defaults to True): return a [`UniBrainPipelineOutput`] instead of a tuple
                ``(images, thinking, impression, diagnosis, diagnosis_label, answer)``.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each denoising step; returning
                ``{"latents": ...}`` replaces the latents. It may set ``pipe._guidance_scale`` (e.g.
                [`~pipelines.callbacks.UniBrainCFGCutoffCallback`]) or ``pipe._interrupt``.
            callback_on_step_end_tensor_inputs (`list[str]`): keys passed in ``callback_kwargs``, from
                ``pipe._callback_tensor_inputs``; a ``PipelineCallback`` brings its own ``tensor_inputs``.

        Returns:
            [`UniBrainPipelineOutput`] or `tuple`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        # 1. Check every argument, then load every input (file errors included) — no model work yet.
        settings, rows = self.check_inputs(
            images, callback_on_step_end, target_modalities=target_modalities, task=task, prompt=prompt,
            slice_index=slice_index, axis=axis, num_inference_steps=num_inference_steps,
            num_grid_points=num_grid_points, timestep_shift=timestep_shift, guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale, cfg_interval=cfg_interval, cfg_renorm_type=cfg_renorm_type,
            cfg_renorm_min=cfg_renorm_min, think=think, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, num_images_per_prompt=num_images_per_prompt, output_type=output_type,
            return_dict=return_dict, callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        prepared = self.prepare_inputs(rows, settings)
        model_size = prepared[0][next(iter(prepared[0]))].model_size
        generator = self._check_generator(generator, settings.num_rows)
        latents = self._check_latents(latents, settings, model_size)
        posterior_eps = self._check_posterior_eps(posterior_eps, settings, tuple(rows[0]), model_size)
        self._guidance_scale, self._image_guidance_scale = settings.guidance_scale, settings.image_guidance_scale
        self._num_timesteps = settings.num_inference_steps
        self._interrupt = False

        # 2. Run the task over the rows, then shape the output like diffusers does.
        output = self._run(prepared, settings, generator, latents, posterior_eps, callback_on_step_end)
        self.maybe_free_model_hooks()
        if not settings.return_dict:
            return (output.images, output.thinking, output.impression, output.diagnosis, output.diagnosis_label,
                    output.answer)
        return output

    def _run(self, prepared: list[dict], settings: CallSettings, generator=None, latents=None, posterior_eps=None,
             callback_on_step_end=None) -> UniBrainPipelineOutput:
        """Run the task's method on groups of rows that can share one context; returns the call's output.

        Without thinking, ``generation`` rows under one prompt are denoised together in one batched
        context; every other task runs row by row (texts differ in length), with the same outputs.
        """
        task_method = {"generation": self._generate, "unified": self._unified, "diagnosis": self._diagnosis,
                       "report": self._report, "answer": self._answer}[settings.task]
        if settings.task == "generation" and not settings.think:
            groups: dict[Any, list[int]] = {}
            for row in range(len(prepared)):
                groups.setdefault(settings.prompt_for(row), []).append(row)
            row_groups = list(groups.values())
        else:
            row_groups = [[row] for row in range(len(prepared))]
        collected, order = _RowsResult(), []
        for indices in row_groups:
            group_generator = [generator[row] for row in indices] if isinstance(generator, list) else generator
            if isinstance(group_generator, list) and len(group_generator) == 1:
                group_generator = group_generator[0]  # one row with its own generator: exactly a single call
            rows = _Rows(slices={code: [prepared[row][code] for row in indices] for code in prepared[0]},
                         generator=group_generator,
                         latents={code: value[indices] for code, value in (latents or {}).items()},
                         posterior_eps={code: value[indices] for code, value in (posterior_eps or {}).items()},
                         prompt=settings.prompt_for(indices[0]))
            collected.extend(task_method(rows, settings, callback_on_step_end))
            order += indices
        return self._output(collected.in_row_order(order), settings)

    def _output(self, result: _RowsResult, settings: CallSettings) -> UniBrainPipelineOutput:
        """Per-row results → batches in ``output_type`` form (see [`UniBrainPipelineOutput`])."""
        images = {code: _batch(result.images[code], settings.output_type) for code in settings.target_modalities}
        thinking = dict(result.thinking)
        labels = None if result.diagnosis is None else [parse_diagnosis_label(text) for text in result.diagnosis]
        if settings.single_target:
            (target,) = settings.target_modalities
            images, thinking = images[target], thinking.get(target)
        return UniBrainPipelineOutput(images=images, thinking=thinking, impression=result.impression,
                                      diagnosis=result.diagnosis, diagnosis_label=labels, answer=result.answer)

    # ------------------------------------------------------------------ 5. volumes
    @torch.no_grad()
    def impute_volume(self, nifti_in: dict[str, Any], target_modalities: str | list[str], axis: str = "axial",
                      batch_size: int = 8, output_dir: str | os.PathLike | None = None, **call_kwargs):
        """Impute whole volumes slice by slice; returns {target: nibabel image} on the input's grid.

        Args:
            nifti_in: modality → NIfTI path or nibabel image; all co-registered (one shape in the training frame).
            target_modalities: modality or modalities to impute (task ``generation`` by default).
            axis: the training-frame plane the volume is cut into (``"axial"`` as UniBrain was trained).
            batch_size: slices denoised together (``generation`` without ``think``: one batched context
                per slice group); other settings run slice by slice.
            output_dir: if given, each target is written to ``<output_dir>/<target>.nii.gz`` (atomically).
            **call_kwargs: ``__call__`` settings (``task``, ``num_inference_steps``, ``generator``, …).

        Every volume is brought to the training frame from its affine, cut into planes there, and each
        imputed volume is mapped back onto the first input's voxel grid: same shape, voxel order, affine
        and header (uint8 data). Slices where every input is constant (e.g. empty background) are not
        generated; they stay 0.
        """
        for forbidden in ("images", "slice_index", "output_type", "return_dict", "latents", "posterior_eps",
                          "num_images_per_prompt"):
            if forbidden in call_kwargs:
                raise InvalidInputError(f"impute_volume does not take {forbidden!r}")
        task = call_kwargs.get("task", "generation")
        if task not in ("generation", "unified"):
            raise InvalidInputError(f"impute_volume runs task 'generation' or 'unified'; got {task!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive int; got {batch_size!r}")
        generator = call_kwargs.pop("generator", None)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InvalidInputError("impute_volume takes one torch.Generator (slices draw from it in order)")
        callback = call_kwargs.pop("callback_on_step_end", None)
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            call_kwargs["callback_on_step_end_tensor_inputs"] = callback.tensor_inputs
        allowed = set(inspect.signature(CallSettings.from_arguments).parameters) - {
            "batch_size", "input_modalities", "allowed_callback_inputs", "target_modalities", "axis"}
        unknown = sorted(set(call_kwargs) - allowed)
        if unknown:
            raise InvalidInputError(f"impute_volume got unknown settings {unknown}")
        if not isinstance(nifti_in, dict):
            raise InvalidInputError(f"nifti_in must be a dict {{modality: NIfTI path or nibabel image}}; got "
                                    f"{type(nifti_in).__name__}")
        (row,) = mri_io.image_rows(nifti_in, "nifti_in")
        settings = CallSettings.from_arguments(batch_size=1, input_modalities=tuple(row),
                                               allowed_callback_inputs=self._callback_tensor_inputs,
                                               target_modalities=target_modalities, axis=axis, output_type="np",
                                               **call_kwargs)
        check_scheduler(self.scheduler)
        volumes = {code: mri_io.load_volume(value, f"nifti_in[{code!r}]") for code, value in row.items()}
        shapes = {code: volume.data.shape for code, volume in volumes.items()}
        if len(set(shapes.values())) > 1:
            raise InvalidInputError(f"nifti_in volumes have different shapes in the training frame {shapes}; they must "
                                    f"be co-registered")
        shape = next(iter(shapes.values()))
        depth = shape[plane_axis(settings.axis)]
        wanted = [i for i in range(depth) if any(np.ptp(v.plane(i, axis)) > 0 for v in volumes.values())]
        group = batch_size if (settings.task == "generation" and not settings.think) else 1
        outputs = {code: np.zeros(shape, dtype=np.uint8) for code in settings.target_modalities}
        self._interrupt = False
        with self.progress_bar(total=len(wanted)) as progress:
            for start in range(0, len(wanted), group):
                indices = wanted[start:start + group]
                prepared = [{code: mri_io.prepare_slice(volume.plane(i, axis), self.processor.vae_resize)
                             for code, volume in volumes.items()} for i in indices]
                group_settings = dataclasses.replace(settings, batch_size=len(indices), single_target=False,
                                                     prompts=settings.prompts * len(indices),
                                                     slice_indices=(None,) * len(indices))
                output = self._run(prepared, group_settings, generator, callback_on_step_end=callback)
                for code in settings.target_modalities:
                    # "np" images are uint8 / 255 exactly, so rounding recovers the uint8 values.
                    planes = np.round(output.images[code] * 255).astype(np.uint8)
                    np.moveaxis(outputs[code], plane_axis(settings.axis), 0)[indices] = planes
                progress.update(len(indices))
        reference = next(iter(volumes.values()))
        images = {code: reference.to_input_frame(data) for code, data in outputs.items()}
        if output_dir is not None:
            directory = Path(output_dir)
            directory.mkdir(parents=True, exist_ok=True)
            for code, image in images.items():
                _atomic_nifti_save(image, directory / f"{code}.nii.gz")
        self.maybe_free_model_hooks()
        return images


def _batch(items: list, output_type: str):
    """Per-row outputs → one batch in diffusers' form for ``output_type``."""
    if output_type == "latent":
        return torch.stack(items)
    if output_type == "pil":
        return [Image.fromarray(item) for item in items]
    if output_type == "np":
        return np.stack(items).astype(np.float32) / 255.0
    tensors = torch.from_numpy(np.stack(items).astype(np.float32) / 255.0)
    return tensors[:, None] if tensors.dim() == 3 else tensors.permute(0, 3, 1, 2)


def _atomic_nifti_save(image, path: Path) -> None:
    """Write next to the destination, then rename, so no half-written file is ever visible."""
    import nibabel as nib

    from ..utils.atomic import atomic_file

    with atomic_file(path, ".nii.gz") as temporary:
        nib.save(image, str(temporary))
