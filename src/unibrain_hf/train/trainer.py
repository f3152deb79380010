"""The UniBrain training loop on ``accelerate`` (one file for all three stages).

    accelerate launch -m unibrain_hf.train --config configs/tiny_unified.yaml
    python -m unibrain_hf.train --config configs/tiny_align.yaml train.max_steps=50   # single CPU process

Per step: VAE-encode the pack's images (posterior sampled, no grad) → the stage's forward
(:meth:`UniBrainForConditionalGeneration.forward`, or :func:`self_forcing_forward` for ``dhs``) →
loss = CE + MSE as *global token means* (per-rank token sums, normalised by the token counts
summed over ranks, times the world size, because DDP/FSDP average gradients over ranks) →
AdamW (β 0.9/0.95, ε 1e-15, no weight decay), gradient clipping, constant LR after linear
warm-up, EMA. Checkpoints every ``save_every`` steps (and on SIGINT/SIGTERM after the current
step); ``--resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig
from .ema import ExponentialMovingAverage
from .stages import configure_stage


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


# ------------------------------------------------------------------------------------- components
def load_components(config: TrainConfig):
    """Model, VAE and tokenizer from ``model.pretrained`` (pipeline or model dir) or a preset."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer

    from ..modeling import UniBrainConfig, UniBrainForConditionalGeneration

    section = config.model
    pretrained = Path(section.pretrained) if section.pretrained else None
    if pretrained is not None:
        model = UniBrainForConditionalGeneration.from_pretrained(str(pretrained),
                                                                 attn_implementation=section.attn_implementation,
                                                                 dtype=torch.float32)
        if section.weights:
            _load_weights(model, Path(section.weights))
    else:
        presets = {"tiny": UniBrainConfig.tiny, "bagel_7b_mot": UniBrainConfig.bagel_7b_mot}
        if section.preset not in presets:
            raise ValueError(f"model.preset must be one of {sorted(presets)}, got {section.preset!r}")
        model_config = presets[section.preset](**section.preset_overrides)
        model_config._attn_implementation = section.attn_implementation
        torch.manual_seed(config.train.seed)
        model = UniBrainForConditionalGeneration(model_config)
    vae_dir = section.vae or (str(pretrained / "vae") if pretrained else None)
    tokenizer_dir = section.tokenizer or (str(pretrained / "tokenizer") if pretrained else None)
    if vae_dir is None or tokenizer_dir is None:
        raise ValueError("model.vae and model.tokenizer must be set when model.pretrained is not a pipeline directory")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vae.requires_grad_(False).eval()
    return model, vae, tokenizer


def _load_weights(model, path: Path) -> None:
    """Load a full model state (e.g. a checkpoint's raw ``model.safetensors``) over the pretrained weights."""
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"model.weights {path} does not exist")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    missing = [m for m in missing if not _is_fixed_buffer(m)]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def build_dataset(config: TrainConfig, processor, rank: int, world_size: int):
    from ..data.packed_dataset import PackedDataset, TokenBudget
    from ..processing.packing import DropoutProbabilities

    import functools

    from ..data.sequence_builder import build_recon_sample, build_unified_sample

    data = config.data
    task = build_recon_sample if config.stage == "align" else functools.partial(build_unified_sample,
                                                                                image_size=data.image_size)
    budget = TokenBudget(expected_num_tokens=data.expected_num_tokens, max_num_tokens=data.max_num_tokens,
                         max_num_tokens_per_sample=data.max_num_tokens_per_sample,
                         prefer_buffer_before=data.prefer_buffer_before)
    dropout = DropoutProbabilities(text=data.text_dropout, vit=data.vit_dropout, vae=data.vae_dropout)
    from ..data.radgenome import iter_subject_records

    records = list(iter_subject_records(data.path, split=data.split))
    if not records:
        raise ValueError(f"no usable subjects in {data.path} (split {data.split!r})")
    dataset = PackedDataset(records, task=task, processor=processor, dropout=dropout, budget=budget,
                            seed=config.train.data_seed, num_epochs=data.num_epochs, rank=rank, world_size=world_size)
    return dataset, records


# ------------------------------------------------------------------------------------- the loop
def train(config: TrainConfig, resume: str | None = None, accelerator=None, max_steps: int | None = None,
          progress: bool = True) -> TrainResult:
    """Run (or resume) a training run described by ``config``; returns the losses per step."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from ..data.packed_dataset import packed_dataloader
    from ..modeling.checkpointing import enable_activation_checkpointing
    from ..modeling.vae import encode_latents
    from ..processing.processor import UniBrainProcessor
    from .lora import apply_lora
    from .self_forcing import self_forcing_forward

    output_dir = Path(config.train.output_dir)
    if accelerator is None:
        log_with = "tensorboard" if _has_tensorboard() else None
        accelerator = Accelerator(mixed_precision=config.train.mixed_precision, log_with=log_with,
                                  project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                      logging_dir=str(output_dir / "logs")))
    set_seed(config.train.seed + accelerator.process_index)
    model, vae, tokenizer = load_components(config)
    configure_stage(model, config.stage)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if config.lora.enabled:
        model.requires_grad_(False)
        model = apply_lora(model, config.lora.preset, config.lora.rank, config.lora.alpha, config.lora.dropout,
                           config.lora.projections)
    base_model = model.get_base_model() if config.lora.enabled else model
    processor = UniBrainProcessor.for_model(base_model.config, tokenizer, vae_max_size=config.data.vae_max_size,
                                            vae_min_size=config.data.vae_min_size,
                                            vit_max_size=config.data.vit_max_size,
                                            vit_min_size=config.data.vit_min_size)
    dataset, records = build_dataset(config, processor, accelerator.process_index, accelerator.num_processes)
    samples = None
    if config.train.sample_every and accelerator.is_main_process:
        from .samples import SamplePanelWriter

        samples = SamplePanelWriter(records, output_dir, config.data.image_size)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: the stage and LoRA settings froze every parameter")
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=config.train.learning_rate,
                                  betas=(config.train.beta1, config.train.beta2), eps=config.train.eps,
                                  weight_decay=config.train.weight_decay)
    scheduler = _lr_scheduler(optimizer, config.train)
    ema = ExponentialMovingAverage(trainable, config.train.ema_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    vae.to(accelerator.device)

    step = 0
    fingerprint = config.fingerprint()
    if resume:
        path = latest_checkpoint(output_dir) if resume == "auto" else Path(resume)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint found under {output_dir / 'checkpoints'}")
        state = load_checkpoint(path, fingerprint)
        unwrapped = accelerator.unwrap_model(model)
        missing, unexpected = unwrapped.load_state_dict(state["model"], strict=False)
        if unexpected or [m for m in missing if not _is_fixed_buffer(m)]:
            raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        if state["data"] is not None:
            dataset.load_state_dict(state["data"])
        step = state["step"]
        accelerator.print(f"resumed from {path} at step {step}")

    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers("unibrain", config={"stage": config.stage, "lr": config.train.learning_rate})
    loader = packed_dataloader(dataset, num_workers=config.data.num_workers)
    batches = iter(loader)
    # Starting the loader's iteration draws from the global RNG (DataLoader's shared seed), so the
    # saved RNG state is restored only after the first batch has been fetched: step N+1 then sees
    # exactly the random numbers of the uninterrupted run.
    pending_rng = state if resume else None
    total_steps = max_steps or config.train.max_steps
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and accelerator.is_local_main_process),
               desc=f"{config.stage}")
    losses: list[dict] = []
    stopped_early = False
    peak_flops = _peak_flops(accelerator.device)
    active_parameters = _active_parameters(accelerator.unwrap_model(model))
    with StopRequested() as stop:
        while step < total_steps:
            try:
                batch = next(batches)
            except StopIteration:
                accelerator.print("the data ran out; stopping after a final checkpoint")
                stopped_early = True
                break
            if pending_rng is not None:
                restore_rng(pending_rng)
                pending_rng = None
            started = time.perf_counter()
            model.train()
            with torch.no_grad():
                latents = encode_latents(vae, batch.padded_images.to(accelerator.device)) \
                    if batch.padded_images is not None else None
            with accelerator.autocast():
                if config.stage == "dhs":
                    output = self_forcing_forward(accelerator.unwrap_model(model) if not config.lora.enabled
                                                  else model, batch, latents)
                else:
                    output = model(**batch.model_inputs(latents))
            loss, parts = _global_token_mean_loss(output, accelerator, config)
            if not loss.requires_grad:  # no loss token on this rank: still join the (distributed) backward
                loss = loss + sum(p.sum() * 0.0 for _, p in trainable)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_([p for _, p in trainable], config.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(trainable)
            step += 1
            elapsed = time.perf_counter() - started
            tokens_per_second = batch.sequence_length * accelerator.num_processes / max(elapsed, 1e-9)
            record = {"step": step, "loss": float(loss.detach()), **parts,
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "tokens_per_second": tokens_per_second}
            if peak_flops:
                # Each token passes through one expert: ~half of the decoder weights, 6 FLOPs per weight.
                record["mfu"] = 6 * active_parameters * tokens_per_second / (peak_flops * accelerator.num_processes)
            losses.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if step % config.train.log_every == 0 or step == 1:
                accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
            if samples is not None and step % config.train.sample_every == 0:
                base = accelerator.unwrap_model(model)
                samples.write(step, base.get_base_model() if config.lora.enabled else base, vae, tokenizer, processor)
            if step % config.train.save_every == 0 or stop.requested:
                _save(accelerator, output_dir, step, model, ema, optimizer, scheduler, dataset, fingerprint)
            if stop.requested:
                accelerator.print(f"stop requested: saved step {step} and exiting cleanly")
                stopped_early = True
                break
    bar.close()
    if step % config.train.save_every and not stop.requested:
        _save(accelerator, output_dir, step, model, ema, optimizer, scheduler, dataset, fingerprint)
    export_dir = None
    if config.train.export_pipeline and not stopped_early and accelerator.is_main_process:
        export_dir = export_run(accelerator.unwrap_model(model), ema, vae, tokenizer, processor, output_dir,
                                lora=config.lora.enabled)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir, step, losses, export_dir, stopped_early)


def _lr_scheduler(optimizer, section):
    """Linear warm-up, then constant or a cosine / linear decay to ``min_lr_ratio`` at ``max_steps``."""
    import math

    warmup, total, floor = section.warmup_steps, section.max_steps, section.min_lr_ratio
    if section.lr_scheduler == "constant":
        from transformers import get_constant_schedule_with_warmup

        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if section.lr_scheduler == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def _is_fixed_buffer(name: str) -> bool:
    return "pos_embed" in name or "rotary_emb" in name


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _global_token_mean_loss(output, accelerator, config: TrainConfig):
    """CE and MSE as means over all tokens of all ranks (the reference's reduction)."""
    device = accelerator.device
    world = accelerator.num_processes
    ce_sum = output.ce_per_token.sum() if output.ce_per_token is not None else torch.zeros((), device=device)
    ce_count = torch.tensor(0 if output.ce_per_token is None else output.ce_per_token.numel(), device=device)
    mse_rows = output.mse_per_element
    mse_sum = mse_rows.mean(dim=-1).sum() if mse_rows is not None else torch.zeros((), device=device)
    mse_count = torch.tensor(0 if mse_rows is None else mse_rows.shape[0], device=device)
    counts = accelerator.reduce(torch.stack([ce_count, mse_count]).float(), reduction="sum")
    loss = torch.zeros((), device=device)
    parts = {"ce": None, "mse": None}
    if counts[0] > 0:
        ce = ce_sum * world / counts[0]
        loss = loss + config.train.ce_weight * ce
        parts["ce"] = float(ce_sum.detach() / max(int(ce_count), 1)) if int(ce_count) else None
    if counts[1] > 0:
        mse = mse_sum * world / counts[1]
        loss = loss + config.train.mse_weight * mse
        parts["mse"] = float(mse_sum.detach() / max(int(mse_count), 1)) if int(mse_count) else None
    return loss, parts


def _save(accelerator, output_dir, step, model, ema, optimizer, scheduler, dataset, fingerprint):
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_checkpoint(output_dir, step, state, ema.state_dict(), optimizer, scheduler,
                        dataset.state_dict(), fingerprint)
    accelerator.wait_for_everyone()


def export_run(model, ema, vae, tokenizer, processor, output_dir: Path, lora: bool = False) -> Path:
    """Write ``<output_dir>/pipeline`` (EMA weights) and, for LoRA runs, ``<output_dir>/lora_adapter``."""
    import copy

    from ..pipelines.components import save_pipeline_components
    from ..utils.atomic import atomic_directory

    final = output_dir / "pipeline"
    with atomic_directory(final) as tmp:
        if lora:
            model.save_pretrained(str(output_dir / "lora_adapter"))  # peft format
            averaged = copy.deepcopy(model)
            ema.copy_to(averaged)
            base = averaged.merge_and_unload()
        else:
            base = copy.deepcopy(model)
            ema.copy_to(base)
        save_pipeline_components(tmp, base, vae, tokenizer, processor)
    return final


__all__ = ["train", "export_run", "load_components", "TrainResult"]
