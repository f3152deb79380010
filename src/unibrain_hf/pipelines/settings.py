"""The validated settings of one pipeline call, built once by ``__call__`` and by ``impute_volume``.

Every scalar argument of a call is checked here — type, range, and how it combines with the
task and the inputs — and its defaults are resolved (the task's time shift and text budget,
``think``, the number of denoising steps), before any model work. The result is a frozen
:class:`CallSettings`; the pipeline's task methods read it instead of a long parameter list.
Errors are :class:`~unibrain_hf.errors.InvalidInputError` (a ``ValueError``) naming the argument.

    python -c "from unibrain_hf.pipelines.settings import CallSettings; help(CallSettings.from_arguments)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from ..errors import InvalidInputError
from ..protocol.orientation import PLANES
from .sampler import RENORM_TYPES

TASKS = ("generation", "unified", "diagnosis", "report", "answer")
IMAGE_TASKS = ("generation", "unified")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: UniBrain's evaluation runs 10 grid points of the time grid, i.e. 9 denoising steps.
DEFAULT_NUM_INFERENCE_STEPS = 9
#: UniBrain's evaluation shifts: ``generation`` keeps interleave_inference's 3.0, ``unified`` uses 1.
DEFAULT_TIMESTEP_SHIFT = {"generation": 3.0, "unified": 1.0}
FALLBACK_TIMESTEP_SHIFT = 3.0
#: The reference's text budgets count the start token: 800 in the unified task, 512 otherwise.
DEFAULT_MAX_NEW_TOKENS = {"unified": 799}
FALLBACK_MAX_NEW_TOKENS = 511


def _fail(message: str):
    raise InvalidInputError(message)


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _int(name: str, value, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        _fail(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _real(name: str, value, minimum: float | None = None, exclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        _fail(f"{name} must be a finite number; got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        _fail(f"{name} must be {'>' if exclusive else '>='} {minimum}; got {value!r}")
    return value


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        _fail(f"{name} must be True or False; got {value!r}")
    return value


def _per_row(name: str, value, batch_size: int, check) -> tuple:
    """A value given once for every input row, or a list with one entry per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch_size:
            _fail(f"{name} has {len(value)} entries but images has {batch_size} rows; give one per row or a single value")
        return tuple(check(f"{name}[{index}]", item) for index, item in enumerate(value))
    return (check(name, value),) * batch_size


def _target_list(value) -> tuple[tuple[str, ...], bool]:
    """``target_modalities`` as a tuple, and whether it was one bare string (one target, diffusers style)."""
    if value is None:
        return (), False
    if isinstance(value, str):
        value, single = [value], True
    elif isinstance(value, (list, tuple)):
        single = False
    else:
        _fail(f"target_modalities must be a modality string or a list of them; got {type(value).__name__}")
    for code in value:
        if not isinstance(code, str) or not code.strip():
            _fail(f"target_modalities must hold non-empty modality strings; got {code!r}")
    if len(set(value)) != len(value):
        _fail(f"target_modalities has duplicates: {list(value)}")
    return tuple(value), single


@dataclass(frozen=True)
class CallSettings:
    """Everything a call decided, validated and with defaults resolved.

    ``batch_size`` counts the input rows (image dicts); every row is generated
    ``num_images_per_prompt`` times, giving ``num_rows`` outputs in diffusers' order
    (row 0's copies first). ``prompts`` and ``slice_indices`` hold one entry per input row.
    """

    task: str
    target_modalities: tuple[str, ...]
    single_target: bool
    batch_size: int
    num_images_per_prompt: int
    prompts: tuple[str | None, ...]
    slice_indices: tuple[int | None, ...]
    axis: str
    num_inference_steps: int
    timestep_shift: float
    guidance_scale: float
    image_guidance_scale: float
    cfg_interval: tuple[float, float]
    cfg_renorm_type: str
    cfg_renorm_min: float
    think: bool
    max_new_tokens: int
    do_sample: bool
    temperature: float
    output_type: str
    return_dict: bool
    callback_on_step_end_tensor_inputs: tuple[str, ...]

    @property
    def num_rows(self) -> int:
        return self.batch_size * self.num_images_per_prompt

    def input_row(self, row: int) -> int:
        """The input row (image dict) an output row was generated from."""
        return row // self.num_images_per_prompt

    def prompt_for(self, row: int) -> str | None:
        return self.prompts[self.input_row(row)]

    @classmethod
    def from_arguments(
        cls, *, batch_size: int, input_modalities, allowed_callback_inputs, task="generation",
        target_modalities=None, prompt=None, slice_index=None, axis="axial", num_inference_steps=None,
        num_grid_points=None, timestep_shift=None, guidance_scale=3.0, image_guidance_scale=1.2,
        cfg_interval=(0.4, 1.0), cfg_renorm_type="text_channel", cfg_renorm_min=0.0, think=None,
        max_new_tokens=None, do_sample=False, temperature=1.0, num_images_per_prompt=1, output_type="pil",
        return_dict=True, callback_on_step_end_tensor_inputs=("latents",),
    ) -> "CallSettings":
        """Validate a call's arguments (see ``UniBrainPipeline.__call__`` for their meaning)."""
        if task not in TASKS:
            _fail(f"task must be one of {TASKS}; got {task!r}")
        targets, single_target = _target_list(target_modalities)
        overlap = [code for code in targets if code in input_modalities]
        if overlap:
            _fail(f"target_modalities {overlap} are also inputs in images; a target must be a missing modality")
        if task in IMAGE_TASKS and not targets:
            _fail(f"task {task!r} needs at least one entry in target_modalities")
        if task not in IMAGE_TASKS and targets:
            _fail(f"task {task!r} generates text only; target_modalities must be empty (use task='unified')")

        def check_prompt(name, value):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                _fail(f"{name} must be a non-empty string or None; got {value!r}")
            return value

        prompts = _per_row("prompt", prompt, batch_size, check_prompt)
        if task == "answer" and any(p is None for p in prompts):
            _fail("task 'answer' needs a prompt (the question) for every row")
        if task not in ("answer", "generation") and any(p is not None for p in prompts):
            _fail(f"prompt is only used by the 'answer' and 'generation' tasks, not {task!r}")
        if task == "generation" and len(targets) != 1 and any(p is not None for p in prompts):
            _fail("a custom generation prompt needs exactly one target modality")

        def check_index(name, value):
            return None if value is None else _int(name, value, 0)

        slice_indices = _per_row("slice_index", slice_index, batch_size, check_index)
        if axis not in PLANES:
            _fail(f"axis must be one of {tuple(PLANES)} (a plane of the training frame, see docs/PIPELINE.md); "
                  f"got {axis!r}")

        if num_grid_points is not None:
            points = _int("num_grid_points", num_grid_points, 2)
            if num_inference_steps is not None and _int("num_inference_steps", num_inference_steps, 1) != points - 1:
                _fail(f"num_inference_steps={num_inference_steps} and num_grid_points={num_grid_points} disagree "
                      f"(N grid points give N - 1 steps); pass only one of them")
            steps = points - 1
        elif num_inference_steps is None:
            steps = DEFAULT_NUM_INFERENCE_STEPS
        else:
            steps = _int("num_inference_steps", num_inference_steps, 1)

        shift = (DEFAULT_TIMESTEP_SHIFT.get(task, FALLBACK_TIMESTEP_SHIFT) if timestep_shift is None
                 else _real("timestep_shift", timestep_shift, 0.0, exclusive=True))
        if not isinstance(cfg_interval, (list, tuple)) or len(cfg_interval) != 2:
            _fail(f"cfg_interval must be a pair (low, high); got {cfg_interval!r}")
        interval = (_real("cfg_interval[0]", cfg_interval[0]), _real("cfg_interval[1]", cfg_interval[1]))
        if interval[0] > interval[1]:
            _fail(f"cfg_interval must be (low, high) with low <= high; got {cfg_interval!r}")
        if cfg_renorm_type not in RENORM_TYPES:
            _fail(f"cfg_renorm_type must be one of {RENORM_TYPES}; got {cfg_renorm_type!r}")
        think = (task == "unified") if think is None else _bool("think", think)
        if think and task not in IMAGE_TASKS:
            _fail(f"think=True plans an image; task {task!r} generates none")
        if max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS.get(task, FALLBACK_MAX_NEW_TOKENS)
        do_sample = _bool("do_sample", do_sample)
        temperature = _real("temperature", temperature)
        if do_sample and not temperature > 0:
            _fail(f"temperature must be > 0 when do_sample=True; got {temperature!r}")
        if output_type not in OUTPUT_TYPES:
            _fail(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        tensor_inputs = tuple(callback_on_step_end_tensor_inputs or ())
        unknown = [name for name in tensor_inputs if name not in allowed_callback_inputs]
        if unknown:
            _fail(f"callback_on_step_end_tensor_inputs {unknown} are not in {list(allowed_callback_inputs)}")
        return cls(
            task=task, target_modalities=targets, single_target=single_target, batch_size=_int("batch", batch_size, 1),
            num_images_per_prompt=_int("num_images_per_prompt", num_images_per_prompt, 1), prompts=prompts,
            slice_indices=slice_indices, axis=axis, num_inference_steps=steps, timestep_shift=shift,
            guidance_scale=_real("guidance_scale", guidance_scale),
            image_guidance_scale=_real("image_guidance_scale", image_guidance_scale), cfg_interval=interval,
            cfg_renorm_type=cfg_renorm_type, cfg_renorm_min=_real("cfg_renorm_min", cfg_renorm_min, 0.0),
            think=think, max_new_tokens=_int("max_new_tokens", max_new_tokens, 1), do_sample=do_sample,
            temperature=temperature, output_type=output_type, return_dict=_bool("return_dict", return_dict),
            callback_on_step_end_tensor_inputs=tensor_inputs)


__all__ = ["CallSettings", "TASKS", "IMAGE_TASKS", "OUTPUT_TYPES", "DEFAULT_NUM_INFERENCE_STEPS",
           "DEFAULT_TIMESTEP_SHIFT", "DEFAULT_MAX_NEW_TOKENS"]
