"""How predictable is one sequence from another at all? A supervised estimate of the conditional mean.

An imputation can only be as good as the information the input carries about the target. This
module fits a small convolutional network with squared error on a cohort's training slices
(source slice → target slice, pixel space): its prediction estimates the conditional mean
E[target | source], the image of smallest expected squared error given the input. On held-out
slices it reports PSNR/SSIM of that estimate and of copying the input.

Why it matters for a generative imputation: a sample drawn from the exact posterior
p(target | source) has, per pixel, the posterior variance *plus* the conditional mean's error, so its
expected squared error is twice the mean's — 10·log10(2) = 3.01 dB lower PSNR. The network is an
estimate, not the exact mean (its error is at least the posterior variance), so
``sampler_psnr_estimate`` = its PSNR − 3.01 dB is where a perfect sampler is expected when the
network is close to the best predictor, and a lower estimate otherwise. Where that number is
below copying the input, a single sampled imputation beating the copy in PSNR would need a model
better than the data allows; averaging several samples moves it back toward the mean. SSIM has no such
exact penalty; ``sampler_ssim_estimate`` is the plug-in estimate of :func:`~.metrics.sampler_ssim` (one
sample = the network's mean plus an independent residual of the observed residual's local size).

    python -c "from unibrain_hf.evaluation.predictability import conditional_mean_baseline as f; \\
print(f('runs/demo/cohort', 't1n', 't2f', eval_split='val')['summary'])"
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.intensity import center_crop, lesion_slice_indices, pad_to_size
from ..data.radgenome import iter_subject_records
from .cohort import evaluation_lesion_masks, evaluation_slices, index_cohort, scaled_volumes, select_subjects
from .metrics import lesion_psnr, psnr, sampler_ssim, ssim
from .results import cap_psnr
from .statistics import paired_difference

#: PSNR a perfect posterior sampler loses against the conditional mean: 10·log10(2).
SAMPLING_PENALTY_DB = 10 * math.log10(2)


def _network(width: int) -> torch.nn.Sequential:
    # Dilated 3x3 convolutions: a 31-pixel receptive field (enough for the tissue around a pixel) at a
    # few thousand parameters per layer, so a CPU fits it in a minute or two.
    layers, channels = [], 1
    for dilation in (1, 2, 4, 8, 1):
        layers += [torch.nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation), torch.nn.GELU()]
        channels = width
    layers.append(torch.nn.Conv2d(width, 1, 1))
    return torch.nn.Sequential(*layers)


def canvas_side(images: list[np.ndarray]) -> int:
    """The side of one square canvas that holds every (H, W) or (C, H, W) image, a multiple of 8."""
    side = max(max(image.shape[-2:]) for image in images)
    return int(math.ceil(side / 8) * 8)


def _training_pairs(cohort, source: str, target: str, split: str, slices_per_subject: int, rng) -> tuple:
    inputs, targets = [], []
    for record in iter_subject_records(cohort, split=split):
        if source not in record.volumes or target not in record.volumes:
            continue
        volumes = scaled_volumes(record, [source, target])
        depth = volumes[source].shape[0]
        chosen = list(rng.choice(depth, min(slices_per_subject, depth), replace=False))
        lesion = lesion_slice_indices(record.mask)
        if len(lesion):  # lesions are rare among slices: make sure the network sees them
            chosen += list(rng.choice(lesion, min(2, len(lesion)), replace=False))
        for index in chosen:
            inputs.append(volumes[source][int(index)])
            targets.append(volumes[target][int(index)])
    if not inputs:
        raise ValueError(f"no {split} subject of {cohort} has both {source} and {target}")
    return inputs, targets


def network_batch(images: list[np.ndarray], side: int) -> torch.Tensor:
    """(N, C, side, side) in [-1, 1] from uint8 (H, W) (one channel) or (C, H, W) images, for the fitted baselines.

    Centred zero padding to the common square (the background is 0 after intensity scaling).
    """
    stacks = [image[None] if image.ndim == 2 else image for image in images]
    padded = np.stack([np.stack([pad_to_size(channel, side) for channel in stack]) for stack in stacks])
    return torch.from_numpy(padded.astype(np.float32)) / 127.5 - 1.0


def check_fit_settings(**settings) -> None:
    """Each of the fitted baselines' integer settings (steps, batch size, width, ...) is a positive int, named."""
    for name, value in settings.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")


def _pairs_and_held_out(cohort, source: str, target: str, train_split: str, eval_split: str,
                        subjects: list[str] | None, slices_per_subject: int, seed: int) -> tuple:
    """(training source slices, their target slices, ``{subject: {code: slice}}`` of the scored slices)."""
    inputs, targets = _training_pairs(cohort, source, target, train_split, slices_per_subject,
                                      np.random.default_rng(seed))
    if subjects is None:
        subjects = select_subjects(index_cohort(cohort, eval_split), [source], [target])
    held_out = evaluation_slices(cohort, eval_split, subjects, [source, target])
    if not held_out:
        raise ValueError(f"no subject of {eval_split!r} in {cohort} has both {source} and {target}")
    return inputs, targets, held_out


def _fit(make_network, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int, learning_rate: float,
         seed: int, cosine: bool = False, flow: bool = False) -> tuple[torch.nn.Module, float]:
    """``make_network()`` (seeded) fitted from ``x`` to ``y``; returns it and its last loss.

    Squared error to ``y`` (the conditional mean), or with ``flow`` the model's rectified-flow objective:
    the network is wrapped as the velocity v(x_t, x, t) (:class:`_FlowVelocity`) and fitted to ε − y at
    x_t = (1 − t)·y + t·ε, t = sigmoid(N(0, 1)) (the training time law at shift 1).
    """
    torch_rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = make_network()
    if flow:
        network = _FlowVelocity(network)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    for _ in range(steps):
        batch = torch.randint(len(x), (batch_size,), generator=torch_rng)
        if flow:
            t = torch.sigmoid(torch.randn(batch_size, generator=torch_rng))
            noise = torch.randn(y[batch].shape, generator=torch_rng)
            noisy = (1 - t[:, None, None, None]) * y[batch] + t[:, None, None, None] * noise
            loss = torch.nn.functional.mse_loss(network(noisy, x[batch], t), noise - y[batch])
        else:
            loss = torch.nn.functional.mse_loss(network(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
    return network, float(loss.detach())


def conditional_mean_baseline(cohort, source: str, target: str, *, eval_split: str = "test",
                              subjects: list[str] | None = None, train_split: str = "train", steps: int = 1000,
                              batch_size: int = 16, width: int = 32, slices_per_subject: int = 6,
                              learning_rate: float = 2e-3, seed: int = 0) -> dict:
    """Fit the network on ``train_split`` and score it on the evaluation slices of ``eval_split`` (module docstring).

    ``subjects`` defaults to every subject of ``eval_split`` with both sequences. Returns
    ``{"per_subject": [{subject_id, psnr, ssim, copy_psnr, copy_ssim[, lesion_psnr, copy_lesion_psnr]}],
    "summary": {psnr, ssim, copy_psnr, copy_ssim, delta_psnr_vs_copy (+ its paired bootstrap interval),
    lesion_delta_psnr_vs_copy_interval (subjects with a lesion on the scored slice; None without any),
    sampler_psnr_estimate, sampler_delta_vs_copy, sampler_ssim_estimate, sampler_ssim_delta_vs_copy (+ interval)},
    "settings": {...}}``; images are compared on their own (unpadded) grid, as the evaluation tasks do.
    """
    check_fit_settings(steps=steps, batch_size=batch_size, width=width, slices_per_subject=slices_per_subject)
    inputs, targets, held_out = _pairs_and_held_out(cohort, source, target, train_split, eval_split, subjects,
                                                    slices_per_subject, seed)
    side = canvas_side(inputs + targets + [s[source] for s in held_out.values()])
    x, y = network_batch(inputs, side), network_batch(targets, side)
    network, final_loss = _fit(lambda: _network(width), x, y, steps, batch_size, learning_rate, seed)

    rows = []
    masks = evaluation_lesion_masks(cohort, eval_split, list(held_out))
    with torch.no_grad():
        for subject, images in held_out.items():
            source_image, truth = images[source], images[target]
            predicted = network(network_batch([source_image], side))[0, 0]
            predicted = ((predicted.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            predicted = center_crop(predicted, truth.shape)
            rows.append({"subject_id": subject, "psnr": cap_psnr(psnr(truth, predicted)),
                         "ssim": ssim(truth, predicted), "sampler_ssim": sampler_ssim(truth, predicted),
                         "copy_psnr": cap_psnr(psnr(truth, source_image)), "copy_ssim": ssim(truth, source_image)})
            if masks[subject] is not None and masks[subject].any():
                # Is the lesion itself predictable from the source? (The whole image hides a few hundred pixels.)
                rows[-1].update(lesion_psnr=cap_psnr(lesion_psnr(truth, predicted, masks[subject])),
                                copy_lesion_psnr=cap_psnr(lesion_psnr(truth, source_image, masks[subject])))
    summary = {key: float(np.mean([row[key] for row in rows])) for key in ("psnr", "ssim", "copy_psnr", "copy_ssim")}
    summary["delta_psnr_vs_copy"] = summary["psnr"] - summary["copy_psnr"]
    summary["delta_psnr_vs_copy_interval"] = paired_difference([row["psnr"] for row in rows],
                                                               [row["copy_psnr"] for row in rows]).to_dict()
    with_lesion = [row for row in rows if "lesion_psnr" in row]
    summary["lesion_delta_psnr_vs_copy_interval"] = paired_difference(
        [row["lesion_psnr"] for row in with_lesion],
        [row["copy_lesion_psnr"] for row in with_lesion]).to_dict() if with_lesion else None
    summary["sampler_psnr_estimate"] = summary["psnr"] - SAMPLING_PENALTY_DB
    summary["sampler_delta_vs_copy"] = summary["sampler_psnr_estimate"] - summary["copy_psnr"]
    summary["sampler_ssim_estimate"] = float(np.mean([row["sampler_ssim"] for row in rows]))
    summary["sampler_ssim_delta_vs_copy"] = summary["sampler_ssim_estimate"] - summary["copy_ssim"]
    summary["sampler_ssim_vs_copy_interval"] = paired_difference([row["sampler_ssim"] for row in rows],
                                                                 [row["copy_ssim"] for row in rows]).to_dict()
    settings = dict(source=source, target=target, train_split=train_split, eval_split=eval_split, steps=steps,
                    batch_size=batch_size, width=width, slices_per_subject=slices_per_subject,
                    learning_rate=learning_rate, seed=seed, training_slices=len(inputs), canvas=side,
                    final_training_loss=final_loss)
    return {"per_subject": rows, "summary": summary, "settings": settings}


#: What one prediction of :func:`latent_mean_baseline` may read: a latent pixel's neighbours (two 3×3
#: convolutions) or only its own generation token (``patch × patch`` latent pixels, what the model's copy
#: head hands a target token).
LATENT_REACHES = ("neighbours", "token")
#: How :func:`latent_mean_baseline` is fitted: squared error to the target's latents (the conditional mean)
#: or the model's own rectified-flow objective, then sampled once (what a generator of that reach does).
LATENT_OBJECTIVES = ("regression", "flow")
_TIME_FREQUENCIES = 8  # sin/cos pairs of the flow time, broadcast as constant input channels


def _latent_network(in_channels: int, out_channels: int, width: int, reach: str = "neighbours",
                    patch: int = 2) -> torch.nn.Sequential:
    if reach == "token":
        # One generation token in, the same token out: a per-token MLP written as convolutions of stride
        # `patch`, so no output reads another token.
        return torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, patch, stride=patch), torch.nn.GELU(),
            torch.nn.Conv2d(width, width, 1), torch.nn.GELU(),
            torch.nn.Conv2d(width, width, 1), torch.nn.GELU(),
            torch.nn.ConvTranspose2d(width, out_channels, patch, stride=patch))
    # Two 3x3 convolutions over the latent grid: a few latent pixels of context (a token and its neighbours,
    # the reach of the model's copy head), then per-position mixing.
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, width, 3, padding=1), torch.nn.GELU(),
        torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.GELU(),
        torch.nn.Conv2d(width, width, 1), torch.nn.GELU(),
        torch.nn.Conv2d(width, out_channels, 1))


class _FlowVelocity(torch.nn.Module):
    """v(x_t, source, t) for the flow fit: the network reads [x_t, source latents, sin/cos(t) maps]."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.register_buffer("frequencies", 1000.0 * torch.exp(
            -math.log(1000.0) * torch.arange(_TIME_FREQUENCIES) / _TIME_FREQUENCIES), persistent=False)

    def forward(self, noisy: torch.Tensor, source: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.frequencies[None]
        time = torch.cat([angles.sin(), angles.cos()], dim=1)[:, :, None, None].expand(-1, -1, *noisy.shape[-2:])
        return self.network(torch.cat([noisy, source, time], dim=1))


@torch.no_grad()
def _sample_flow(velocity: torch.nn.Module, source: torch.Tensor, points: int, seed: int) -> torch.Tensor:
    """One sample per source: Euler from t = 1 (seeded noise) to 0 over ``points`` evenly spaced grid points."""
    latents = torch.randn(source.shape, generator=torch.Generator().manual_seed(seed))
    grid = torch.linspace(1.0, 0.0, points)
    for now, following in zip(grid[:-1], grid[1:]):
        latents = latents + (following - now) * velocity(latents, source, now.expand(len(source)))
    return latents


def latent_mean_baseline(pipe, cohort, source: str, target: str, *, eval_split: str = "test",
                         subjects: list[str] | None = None, train_split: str = "train", steps: int = 1500,
                         batch_size: int = 32, width: int = 64, slices_per_subject: int = 6,
                         learning_rate: float = 2e-3, seed: int = 0, reach: str = "neighbours",
                         objective: str = "regression", sample_points: int = 10) -> dict:
    """The conditional-mean regression in the generator's own space: ``pipe``'s VAE latents, decoded by its VAE.

    The model imputes by denoising VAE latents with a squared-error (flow) objective, so its own estimate of
    the mean is E[target latent | source] decoded. A small CNN fitted with squared error from the source
    slice's posterior-mean latents to the target's (training split) estimates that mean; decoded and cropped
    exactly as an imputation, it shows what the model's mean could reach through this VAE, beside the
    pixel-space estimate of :func:`conditional_mean_baseline`. Returns ``{"per_subject": [{subject_id, psnr,
    ssim, copy_psnr, copy_ssim}], "summary": {psnr, ssim, copy_psnr, copy_ssim, delta_psnr_vs_copy_interval,
    delta_ssim_vs_copy_interval}, "settings": {...}}``.

    Two diagnostics of where a generator of this space falls short (docs/DEMO_RUN.md, "The model's own
    space"): ``reach="token"`` lets each prediction read only its own generation token of the source (the
    ``latent_patch_size``² latent pixels the model's copy head hands a target token) instead of its 3×3
    neighbours; ``objective="flow"`` fits the model's rectified-flow objective instead of the mean and
    scores one sample (Euler over ``sample_points`` grid points from seeded noise), what a generator with
    that reach, trained on this one pair alone, achieves.
    """
    from .calls import vae_decode_slices, vae_encode_slices

    check_fit_settings(steps=steps, batch_size=batch_size, width=width, slices_per_subject=slices_per_subject,
                       sample_points=sample_points)
    if reach not in LATENT_REACHES:
        raise ValueError(f"reach must be one of {', '.join(LATENT_REACHES)}; got {reach!r}")
    if objective not in LATENT_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(LATENT_OBJECTIVES)}; got {objective!r}")
    if objective == "flow" and sample_points < 2:
        raise ValueError(f"sample_points must be at least 2 (one Euler step) for the flow objective; "
                         f"got {sample_points}")
    patch = pipe.model.config.latent_patch_size
    inputs, targets, held_out = _pairs_and_held_out(cohort, source, target, train_split, eval_split, subjects,
                                                    slices_per_subject, seed)
    # the pipeline refuses a blank slice as an input; such pairs carry nothing to learn either
    kept = [i for i, (a, b) in enumerate(zip(inputs, targets)) if a.min() < a.max() and b.min() < b.max()]
    inputs, targets = [inputs[i] for i in kept], [targets[i] for i in kept]
    # one canvas for every slice, so the latents stack (the pipeline pads each slice to its own canvas)
    side = canvas_side(inputs + targets + [s[source] for s in held_out.values()])

    def encode(images):
        latents = [vae_encode_slices(pipe, [pad_to_size(i, side) for i in images[start:start + 64]])
                   for start in range(0, len(images), 64)]
        return torch.cat([found for found, _ in latents]).float(), [p for _, ps in latents for p in ps]

    with torch.no_grad():
        x, _ = encode(inputs)
        y, _ = encode(targets)
        held_latents, prepared = encode([s[source] for s in held_out.values()])
    channels = x.shape[1]
    if reach == "token" and x.shape[-1] % patch:
        raise ValueError(f"reach='token': the latent grid ({x.shape[-1]}) is not a multiple of the model's "
                         f"latent_patch_size ({patch})")
    in_channels = 2 * channels + 2 * _TIME_FREQUENCIES if objective == "flow" else channels
    network, final_loss = _fit(lambda: _latent_network(in_channels, channels, width, reach, patch), x, y, steps,
                               batch_size, learning_rate, seed, cosine=True, flow=objective == "flow")
    if objective == "flow":
        predicted = _sample_flow(network.eval(), held_latents, sample_points, seed + 1)
    else:
        with torch.no_grad():
            predicted = network(held_latents)

    with torch.no_grad():
        predicted_latents = predicted.to(pipe.vae.device, pipe.vae.dtype)
        decoded = vae_decode_slices(pipe, predicted_latents, prepared)
    rows = []
    for (subject, images), image in zip(held_out.items(), decoded):
        source_image, truth = images[source], images[target]
        predicted = center_crop(image, truth.shape)
        rows.append({"subject_id": subject, "psnr": cap_psnr(psnr(truth, predicted)), "ssim": ssim(truth, predicted),
                     "copy_psnr": cap_psnr(psnr(truth, source_image)), "copy_ssim": ssim(truth, source_image)})
    summary = {key: float(np.mean([row[key] for row in rows])) for key in ("psnr", "ssim", "copy_psnr", "copy_ssim")}
    for metric in ("psnr", "ssim"):
        summary[f"delta_{metric}_vs_copy_interval"] = paired_difference(
            [row[metric] for row in rows], [row[f"copy_{metric}"] for row in rows]).to_dict()
    settings = dict(source=source, target=target, train_split=train_split, eval_split=eval_split, steps=steps,
                    batch_size=batch_size, width=width, slices_per_subject=slices_per_subject,
                    learning_rate=learning_rate, seed=seed, reach=reach, objective=objective,
                    sample_points=sample_points if objective == "flow" else None, training_slices=len(inputs),
                    canvas=side, latent_shape=list(x.shape[1:]), final_training_loss=final_loss)
    return {"per_subject": rows, "summary": summary, "settings": settings}


__all__ = ["LATENT_OBJECTIVES", "LATENT_REACHES", "SAMPLING_PENALTY_DB", "canvas_side", "check_fit_settings",
           "conditional_mean_baseline", "latent_mean_baseline", "network_batch"]
