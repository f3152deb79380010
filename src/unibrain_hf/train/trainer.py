"""The UniBrain trainer: one training path for one process, DDP, FSDP2 and DeepSpeed ZeRO-3.

    accelerate launch -m unibrain_hf.train --config configs/tiny_unified.yaml
    python -m unibrain_hf.train --config configs/tiny_align.yaml train.max_steps=50   # single CPU process

:class:`Trainer` builds everything once — the launch layout is checked (and a resumed
checkpoint's metadata compared with it) before anything is loaded or written; then model, LoRA,
data stream, the wrapped (possibly sharded) model, and, on the *prepared* parameters, the
optimizer, LR schedule and EMA. :meth:`Trainer.train_step` runs one optimizer step:

* each pack of the step (``train.packs_per_step`` per process) gets its VAE latents (posterior
  parameters read from the latent cache, ``data.latent_cache``, or encoded one image per call;
  then sampled with the pack's generator, no grad) and runs through the stage's forward
  (:mod:`.stages`), under autocast when ``train.mixed_precision`` asks (checked by :mod:`.precision`);
* loss = CE + MSE as *global token means*: the token counts of the whole step are summed over
  ranks first, each pack contributes its token sums divided by them, times the world size
  (DDP and FSDP average gradients over ranks), so one process with N packs per step and N
  processes with one pack each compute the same loss and gradients;
* AdamW (β 0.9/0.95, ε 1e-15, no weight decay), clipping on the global gradient norm, LR schedule
  after linear warm-up (constant, cosine or linear with a floor), EMA.

Every random draw of a pack (VAE posterior, flow noise, self-forcing timesteps, LoRA dropout) is
made under a generator seeded from ``train.seed`` and the pack's sample keys, so the numbers do
not depend on which rank holds the pack or on how often the run was interrupted: checkpoints need
no RNG state and a resumed run repeats the uninterrupted losses exactly. Checkpoints every
``save_every`` steps (and on SIGINT/SIGTERM after the current step) through :mod:`.checkpoint`;
the export (:mod:`.export`) is gathered from the EMA or the trained weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CheckpointError, ConfigError
from .checkpoint import (
    check_compatible,
    checkpoint_name,
    human_bytes,
    inspect_checkpoint,
    load_tensors,
    read_full_tensors,
    read_rank_state,
    remove_orphans,
    resolve_resume,
    save_checkpoint,
)
from .config import TrainConfig
from .ema import ExponentialMovingAverage
from .parallel import (
    REPLICATED,
    ZERO3,
    checkpoint_state,
    clean_name,
    clip_grad_norm,
    deepspeed_grad_norm,
    full_state_dict,
    gradient_sync,
    load_checkpoint_state,
    plan_parallelism,
    prepare,
    torch_optimizer,
    unwrap,
)
from .stages import STAGES, StageModule, unwrap_peft

_PACK_SEED_SALT = 0x7A1E


class StopRequested:
    """Turns SIGINT / SIGTERM into a flag checked between steps, so a step is never cut in half."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[dict]
    export_dir: Path | None
    stopped_early: bool
    last_checkpoint: Path | None = None  # pass it as `model.weights` to start a stage from these trained weights
    world_size: int = 1
    checkpoints: list[dict] = field(default_factory=list)  # {"step", "path", "disk_bytes"} per checkpoint written


# ------------------------------------------------------------------------------------- components
def load_components(config: TrainConfig, vae=None):
    """Model, VAE and tokenizer from ``model.pretrained`` (pipeline or model dir) or a preset.

    ``vae``: an already loaded VAE (the latent-cache check loads it first) instead of loading it again.
    """
    from transformers import AutoTokenizer

    from ..modeling import UniBrainConfig, UniBrainForConditionalGeneration

    section = config.model
    pretrained = Path(section.pretrained) if section.pretrained else None
    if pretrained is not None:
        model = UniBrainForConditionalGeneration.from_pretrained(str(pretrained),
                                                                 attn_implementation=section.attn_implementation,
                                                                 dtype=torch.float32)
    else:
        presets = {"tiny": UniBrainConfig.tiny, "bagel_7b_mot": UniBrainConfig.bagel_7b_mot}
        model_config = presets[section.preset](**section.preset_overrides)
        model_config._attn_implementation = section.attn_implementation
        torch.manual_seed(config.train.seed)
        model = UniBrainForConditionalGeneration(model_config)
    if section.weights:
        load_weights(model, Path(section.weights))
    tokenizer_dir = section.tokenizer or str(pretrained / "tokenizer")
    vae = vae if vae is not None else load_vae(config)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model, vae, tokenizer


def load_vae(config: TrainConfig):
    """The frozen VAE (``model.vae``, else ``<model.pretrained>/vae``), in eval mode."""
    from diffusers import AutoencoderKL

    section = config.model
    vae = AutoencoderKL.from_pretrained(section.vae or str(Path(section.pretrained) / "vae"))
    return vae.requires_grad_(False).eval()


def load_model_config(config: TrainConfig):
    """The model's config alone (no weights): from ``model.pretrained`` (pipeline or model dir) or the preset."""
    from ..modeling import UniBrainConfig

    section = config.model
    if section.pretrained:
        path = Path(section.pretrained)
        folder = path / "model" if (path / "model" / "config.json").exists() else path
        return UniBrainConfig.from_pretrained(str(folder))
    presets = {"tiny": UniBrainConfig.tiny, "bagel_7b_mot": UniBrainConfig.bagel_7b_mot}
    return presets[config.model.preset](**config.model.preset_overrides)


def open_latent_cache(config: TrainConfig, vae, model_config, create: bool = True, what: str = "data.latent_cache"):
    """``data.latent_cache`` for this run's VAE and VAE image transform (stale caches raise before training)."""
    from ..data.latent_cache import LatentCache
    from ..processing.image_transforms import StrideResize

    resize = StrideResize(config.data.vae_max_size, config.data.vae_min_size, model_config.latent_downsample)
    return LatentCache.open(config.data.latent_cache, vae, resize, create=create, what=what)


def load_weights(model, path: Path) -> None:
    """Load ``model.weights`` over the pretrained weights: a safetensors file, or a checkpoint's trained weights."""
    from ..utils.readers import read_safetensors

    if path.is_dir():
        state = inspect_checkpoint(path)
        if state["fingerprint"]["lora"]["enabled"]:
            raise ConfigError(f"model.weights {path} is a LoRA run's checkpoint (adapters only); start from that "
                              "run's exported pipeline (model.pretrained) instead")
        weights = read_full_tensors(path, "model.")
    else:
        weights = read_safetensors(path, what="model.weights")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not _is_fixed_buffer(m)]
    if unexpected or (missing and not path.is_dir()):  # a checkpoint holds only what its stage trained
        raise ConfigError(f"model.weights {path} does not fit the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")


def _is_fixed_buffer(name: str) -> bool:
    return "pos_embed" in name or "rotary_emb" in name


def build_scheduler(optimizer, train):
    """The LR schedule over ``train.max_steps``: linear warm-up, then constant / cosine / linear to the floor."""
    from transformers import get_scheduler

    name, kwargs = {"constant": ("constant_with_warmup", {}),
                    "cosine": ("cosine_with_min_lr", {"min_lr_rate": train.min_lr_ratio}),
                    "linear": ("polynomial", {"lr_end": train.learning_rate * train.min_lr_ratio, "power": 1.0}),
                    }[train.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=train.max_steps,
                         scheduler_specific_kwargs=kwargs)


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from .precision import check_mixed_precision

    # Before accelerate sees it: it would accept fp16 on a CPU and quietly train in fp32.
    check_mixed_precision(config.train.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")

    output_dir = Path(config.train.output_dir)
    log_with = "tensorboard" if _has_tensorboard() else None
    # Without an accelerator device, accelerate must be told to use the CPU: a process launched by
    # torchrun (every multi-process accelerate config except MULTI_CPU+mpirun) otherwise concludes
    # it is not distributed at all and trains alone. find_unused_parameters: a pack may use no ViT
    # image or no text loss, leaving the vision tower or lm_head without a gradient on that rank.
    return Accelerator(cpu=not torch.accelerator.is_available(), mixed_precision=config.train.mixed_precision,
                       log_with=log_with, project_config=ProjectConfiguration(
                           project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def pack_seed(seed: int, batch) -> int:
    """The seed of every random draw made for ``batch``: a function of the run seed and its samples' keys."""
    keys = []
    for key in batch.sample_ids:
        keys.extend(int(part) for part in (key[:2] if isinstance(key, tuple) else (key,)))
    return int(np.random.SeedSequence([seed, _PACK_SEED_SALT, *keys]).generate_state(1, np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------- the trainer
class Trainer:
    """Everything one run needs, built once; see the module docstring for what a step does."""

    def __init__(self, config: TrainConfig, resume: str | Path | None = None, accelerator=None, progress: bool = True):
        from accelerate.utils import set_seed

        from ..modeling.checkpointing import enable_activation_checkpointing
        from ..utils.threads import configure_threads
        from .data import build_dataset, training_processor
        from .lora import resolve_lora
        from .precision import check_mixed_precision

        configure_threads(config.train.threads, what="train.threads")
        self.config = config
        self.progress = progress
        self.output_dir = Path(config.train.output_dir)
        self.accelerator = accelerator or _make_accelerator(config)
        check_mixed_precision(self.accelerator.mixed_precision, self.accelerator.device)
        self.stage = STAGES[config.stage]
        # ---- checks: nothing has been loaded or written yet
        self.plan = plan_parallelism(self.accelerator, self.stage, config)
        if config.train.sample_every and self.plan.sharding != REPLICATED:
            raise ConfigError("train.sample_every needs every rank to hold the whole model; set it to 0 under "
                              f"{self.plan.describe()}")
        self.fingerprint = config.fingerprint()
        self.layout = {"world_size": self.plan.world_size, "sharding": self.plan.sharding,
                       "num_workers": config.data.num_workers, "packs_per_step": config.train.packs_per_step}
        resume_state = None
        if resume:
            path = resolve_resume(self.output_dir, resume)
            resume_state = inspect_checkpoint(path)
            check_compatible(resume_state, self.fingerprint, self.layout)

        # A stale latent cache is refused before the model is loaded (only the VAE and configs are read).
        vae, self.latent_cache = None, None
        if config.data.latent_cache:
            vae = load_vae(config)
            with self.accelerator.main_process_first():  # rank 0 writes the manifest of a new cache
                self.latent_cache = open_latent_cache(config, vae, load_model_config(config))

        # ---- components (the same seed on every rank: identical initial weights and adapters)
        set_seed(config.train.seed)
        model, self.vae, self.tokenizer = load_components(config, vae=vae)
        self.stage.apply(model)
        if config.model.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if config.train.compile:
            from .compile import compile_decoder

            compile_decoder(model, self.accelerator.device)
        model = resolve_lora(model, config.lora)
        if config.lora.enabled:  # adapters follow the stage's predicate too (e.g. align: generation expert only)
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    parameter.requires_grad_(self.stage.is_trainable(name))
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("nothing to train: the stage and LoRA settings froze every parameter")
        base = unwrap_peft(model)
        self.processor = training_processor(base.config, self.tokenizer, config.data)
        if self.latent_cache is not None and self.latent_cache.manifest["transform"]["vae_resize"] != \
                self.processor.vae_resize.to_dict():  # the model's stride disagrees with its config file
            raise ConfigError(f"data.latent_cache {config.data.latent_cache}: the processor's VAE transform "
                              f"{self.processor.vae_resize.to_dict()} differs from the one checked before loading")
        self.dataset = build_dataset(config, self.processor, self.plan.rank, self.plan.world_size,
                                     latent_cache=self.latent_cache)

        # ---- the wrapped model, then optimizer / schedule / EMA on its (possibly sharded) parameters
        train = config.train
        self.module, self.optimizer = prepare(
            self.accelerator, self.plan, StageModule(model, self.stage),
            lambda parameters: torch.optim.AdamW(parameters, lr=train.learning_rate, betas=(train.beta1, train.beta2),
                                                 eps=train.eps, weight_decay=train.weight_decay),
            max_grad_norm=train.max_grad_norm)
        self.model = unwrap(self.accelerator, self.module).model
        self.named_parameters = [(clean_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.parameters = [p for _, p in self.named_parameters]
        self.scheduler = build_scheduler(torch_optimizer(self.optimizer), train)
        self.ema = ExponentialMovingAverage(self.named_parameters, train.ema_decay)
        self.vae.to(self.accelerator.device)
        self.step = 0
        self.checkpoints: list[dict] = []
        self.resumed_from: Path | None = None
        self._token = self._agree_on_token()
        if resume_state is not None:
            self.load_checkpoint(resume_state)
        self._log(f"[rank {self.plan.rank}/{self.plan.world_size}] {self.plan.describe()} on "
                  f"{self.accelerator.device} (backend {self.accelerator.state.backend}); "
                  f"{sum(_local_numel(p) for p in self.parameters)} trainable parameter elements held by this rank",
                  every_rank=True)

    # --------------------------------------------------------------------------------- helpers
    def _log(self, message: str, every_rank: bool = False) -> None:
        if every_rank or self.accelerator.is_main_process:
            print(message, file=sys.stderr, flush=True)

    def _agree_on_token(self) -> str:
        """A random token shared by all ranks: the name of this run's temporary checkpoint folders."""
        token = torch.tensor([secrets.randbits(31)], dtype=torch.long)
        if self.plan.distributed:
            token = token.to(self.accelerator.device)
            dist.broadcast(token, src=0)
        return f"{int(token.item()):08x}"

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.plan.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    # --------------------------------------------------------------------------------- one step
    def train_step(self, packs: list) -> dict:
        """One optimizer step over this rank's ``packs``; returns the step's global metrics."""
        accelerator, train = self.accelerator, self.config.train
        device, world = accelerator.device, self.plan.world_size
        started = time.perf_counter()
        ce_total, mse_total = self._sum_over_ranks([sum(b.num_ce_tokens for b in packs),
                                                    sum(b.num_mse_tokens for b in packs)])
        self.module.train()
        step_parts = torch.zeros(3, dtype=torch.float64)
        devices = [device] if device.type == "cuda" else []
        for index, batch in enumerate(packs):
            with gradient_sync(self.module, enabled=index == len(packs) - 1), \
                    torch.random.fork_rng(devices=devices):
                torch.manual_seed(pack_seed(train.seed, batch))
                latents = self.latents(batch)
                with accelerator.autocast():
                    output = self.module(batch.to(device), latents)
                zero = torch.zeros((), device=device)
                ce = output.ce_per_token.sum() / ce_total if output.ce_per_token is not None and ce_total else zero
                mse = output.mse_per_element.mean(dim=-1).sum() / mse_total \
                    if output.mse_per_element is not None and mse_total else zero
                loss = train.ce_weight * ce + train.mse_weight * mse
                backward = loss * world  # DDP / FSDP average gradients over ranks
                if backward.requires_grad:
                    accelerator.backward(backward)
            step_parts += torch.tensor([float(loss.detach()), float(ce.detach()), float(mse.detach())],
                                       dtype=torch.float64)
        loss, ce, mse = self._sum_over_ranks(step_parts.tolist())
        grad_norm = clip_grad_norm(accelerator, self.plan, self.module, self.parameters, train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.plan.sharding == ZERO3:
            grad_norm = deepspeed_grad_norm(self.module)
        self.ema.update()
        self.step += 1
        elapsed = time.perf_counter() - started
        tokens = self._sum_over_ranks([sum(b.sequence_length for b in packs)])[0]
        record = {"step": self.step, "loss": loss, "ce": ce if ce_total else None, "mse": mse if mse_total else None,
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_second": tokens / max(elapsed, 1e-9)}
        if self.latent_cache is not None:  # this rank's running totals (distinct images per pack)
            record.update(latent_cache_hits=self.latent_cache.hits, latent_cache_misses=self.latent_cache.misses)
        return record

    @torch.no_grad()
    def latents(self, batch) -> torch.Tensor | None:
        """The pack's normalised VAE latents: posterior parameters (cached or encoded), then one ε draw."""
        from ..data.latent_cache import pack_distributions, sample_latents

        if batch.padded_images is None:
            return None
        mean, logvar = pack_distributions(self.vae, batch.padded_images.to(self.accelerator.device),
                                          self.latent_cache, getattr(batch, "cached_latents", None))
        return sample_latents(self.vae, mean, logvar)

    # --------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """This rank's full training state: ``tensors`` (sharded as trained), rank-0 ``trainer`` JSON, ``rank`` JSON."""
        model_state, optimizer_state = checkpoint_state(self.model, self.optimizer)
        return {
            "step": self.step,
            "tensors": {"model": model_state, "optimizer": optimizer_state["state"], "ema": self.ema.state_dict()},
            "trainer": {"scheduler": self.scheduler.state_dict(), "param_groups": optimizer_state["param_groups"],
                        "fingerprint": self.fingerprint, "layout": self.layout},
            "rank": {"rank": self.plan.rank, "world_size": self.plan.world_size, "data": self.dataset.state_dict()},
        }

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        load_checkpoint_state(self.model, self.optimizer, tensors["model"],
                              {"state": tensors["optimizer"], "param_groups": state["trainer"]["param_groups"]})
        self.ema.load_state_dict(tensors["ema"])
        self.scheduler.load_state_dict(state["trainer"]["scheduler"])
        self.dataset.load_state_dict(state["rank"]["data"])
        self.step = int(state["step"])

    def save_checkpoint(self) -> Path:
        state = self.state_dict()
        path, size = save_checkpoint(self.output_dir, self.step, state["tensors"], state["trainer"], state["rank"],
                                     token=self._token, keep_last=self.config.train.keep_checkpoints)
        size = int(self._sum_over_ranks([float(size)])[0])  # only rank 0 measured it
        self.checkpoints.append({"step": self.step, "path": str(path), "disk_bytes": size})
        self._log(f"checkpoint {path.name}: {human_bytes(size)} on disk ({path})")
        if self.accelerator.log_with:
            self.accelerator.log({"checkpoint_mib": size / 2**20}, step=self.step)
        return path

    def load_checkpoint(self, checkpoint: dict | str | Path) -> None:
        """Continue from a checkpoint (``inspect_checkpoint``'s result or a folder) of this run's layout."""
        if not isinstance(checkpoint, dict):
            checkpoint = inspect_checkpoint(checkpoint)
            check_compatible(checkpoint, self.fingerprint, self.layout)
        path = Path(checkpoint["path"])
        state = self.state_dict()
        load_tensors(path, state["tensors"])  # fills this rank's (sharded) tensors in place
        rank_state = read_rank_state(path, self.plan.rank)
        if rank_state.get("rank") != self.plan.rank:
            raise CheckpointError(f"checkpoint {path}: rank file of rank {self.plan.rank} names rank "
                                  f"{rank_state.get('rank')}")
        self.load_state_dict({"step": checkpoint["step"], "tensors": state["tensors"], "trainer": checkpoint,
                              "rank": rank_state})
        self.resumed_from = path
        self._log(f"resumed from {path} at step {self.step}")

    def export(self) -> Path:
        """``<output_dir>/pipeline`` (+ ``lora_adapter``) from the EMA or the trained weights (all ranks call this)."""
        from .export import write_export

        use_ema = self.config.train.export_weights == "ema"
        with self.ema.applied() if use_ema else contextlib.nullcontext():
            state = full_state_dict(self.model, self.plan)
        final = self.output_dir / "pipeline"
        if self.accelerator.is_main_process:
            final = write_export(state, self.model, self.vae, self.tokenizer, self.processor, self.output_dir)
        del state
        self.accelerator.wait_for_everyone()
        return final

    # --------------------------------------------------------------------------------- the loop
    def _next_packs(self, batches) -> list:
        packs = []
        for _ in range(self.config.train.packs_per_step):
            try:
                packs.append(next(batches))
            except StopIteration:
                break
        return packs

    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train until ``train.max_steps`` (or ``max_steps`` in this call), the data runs out, or a stop signal."""
        from tqdm.auto import tqdm

        from ..data.packed_dataset import packed_dataloader

        accelerator, train = self.accelerator, self.config.train
        if accelerator.is_main_process:
            for orphan in remove_orphans(self.output_dir):
                self._log(f"removed {orphan}, an unfinished checkpoint of an interrupted save")
            (self.output_dir / "logs").mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and accelerator.log_with:
            accelerator.init_trackers("unibrain", config={"stage": self.config.stage, "lr": train.learning_rate})
        samples = None
        if train.sample_every and accelerator.is_main_process:
            from .data import first_subjects
            from .samples import SamplePanelWriter

            samples = SamplePanelWriter(first_subjects(self.config), self.output_dir, self.config.data.image_size)
        batches = iter(packed_dataloader(self.dataset, num_workers=self.config.data.num_workers))
        total = min(max_steps or train.max_steps, train.max_steps)
        bar = tqdm(total=total, initial=self.step, desc=self.config.stage,
                   disable=not (self.progress and accelerator.is_local_main_process))
        metrics_file = self.output_dir / "logs" / "metrics.jsonl"
        losses: list[dict] = []
        stopped_early = False
        last_checkpoint = self.resumed_from  # already on disk: not written again if no step follows
        peak_flops = _peak_flops(accelerator.device)
        active_parameters = _active_parameters(self.model)
        with StopRequested() as stop:
            while self.step < total:
                packs = self._next_packs(batches)
                # Every rank must agree before stepping: all have data, and whether anyone was asked to stop.
                have_data, stopping = self._sum_over_ranks([float(len(packs) == train.packs_per_step),
                                                            float(stop.requested)])
                if have_data < self.plan.world_size:
                    self._log("the data ran out; stopping after a final checkpoint")
                    stopped_early = True
                    break
                record = self.train_step(packs)
                if peak_flops:
                    # Each token passes through one expert: ~half of the decoder weights, 6 FLOPs per weight.
                    record["mfu"] = 6 * active_parameters * record["tokens_per_second"] / (
                        peak_flops * self.plan.world_size)
                losses.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if accelerator.is_main_process:
                    with metrics_file.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                if self.step % train.log_every == 0 or self.step == 1:
                    accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=self.step)
                if samples is not None and self.step % train.sample_every == 0:
                    samples.write(self.step, unwrap_peft(self.model), self.vae, self.tokenizer, self.processor)
                if train.save_every and (self.step % train.save_every == 0 or stopping):
                    last_checkpoint = self.save_checkpoint()
                if stopping:
                    self._log(f"stop requested: saved step {self.step} and exiting cleanly")
                    stopped_early = True
                    break
        bar.close()
        if train.save_every and self.step and (last_checkpoint is None or
                                               last_checkpoint.name != checkpoint_name(self.step)):
            last_checkpoint = self.save_checkpoint()
        export_dir = None
        if train.export_pipeline and not stopped_early:
            export_dir = self.export()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainResult(self.output_dir, self.step, losses, export_dir, stopped_early, last_checkpoint,
                           self.plan.world_size, list(self.checkpoints))


def train(config: TrainConfig, resume: str | Path | None = None, accelerator=None, max_steps: int | None = None,
          progress: bool = True) -> TrainResult:
    """Run (or resume) the training run described by ``config``; returns the losses per step."""
    return Trainer(config, resume=resume, accelerator=accelerator, progress=progress).fit(max_steps)


def _local_numel(parameter) -> int:
    local = getattr(parameter, "to_local", None)  # a DTensor shard, under FSDP2
    return local().numel() if local is not None else parameter.numel()


def _peak_flops(device) -> float | None:
    """Peak bf16 dense FLOP/s of the accelerator, for MFU; ``UNIBRAIN_PEAK_TFLOPS`` overrides the table."""
    if os.environ.get("UNIBRAIN_PEAK_TFLOPS"):
        return float(os.environ["UNIBRAIN_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40", 181.0), ("A10", 125.0)):
        if key in name:
            return tflops * 1e12
    return None


def _active_parameters(model) -> int:
    total = sum(p.numel() for p in model.parameters())
    generation_expert = sum(p.numel() for n, p in model.named_parameters() if ".gen." in n)
    return total - generation_expert


__all__ = ["Trainer", "train", "TrainResult", "load_components", "load_vae", "load_model_config", "open_latent_cache",
           "load_weights", "build_scheduler", "pack_seed"]
