"""``unibrain cache-latents``: encode every image a training run can draw from a cohort, once.

Reads the *training config* (the same YAML and ``key=value`` overrides as ``python -m
unibrain_hf.train``), so the VAE, the image transform and the cohort are exactly the run's. For
each subject of ``data.split`` it writes the posterior of every image the stage's sample builder
can pick — stage 2/3 (``unified``): every modality at every candidate axial slice (the lesion
slices when the mask has any, else all), padded to ``data.image_size``; stage 1 (``recon``): every
modality, axis, candidate slice and rotation — into ``data.latent_cache`` (default
``<data.path>/latent_cache``). Packs whose images differ in size are encoded on a larger canvas
(zero padding) than their images' own; those keys are filled by the trainer on first use.

    unibrain cache-latents --config configs/tiny_unified.yaml data.path=out/cohort --threads 2
    python -m unibrain_hf.train --config configs/tiny_unified.yaml data.path=out/cohort \\
        data.latent_cache=out/cohort/latent_cache

Exit status: 0 done, 2 bad config or input (a stale cache is refused, nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="training YAML (see configs/); overrides may replace it")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.path=out/cohort")
    parser.add_argument("--stage", default=None, choices=("align", "unified", "dhs"),
                        help="the stage whose images to cache (default: the config's stage)")
    parser.add_argument("--out", default=None, help="cache directory (default: data.latent_cache, else "
                                                    "<data.path>/latent_cache)")
    parser.add_argument("--limit-subjects", type=int, default=None, help=argparse.SUPPRESS)


def candidate_images(record, task: str, image_size: int):
    """(metadata, uint8 RGB image) for every image the ``task`` builder can draw from ``record``."""
    from .intensity import lesion_slice_indices, minmax_uint8, rescale_intensity, slice_to_rgb
    from .sequence_builder import RECON_AXIS_PERMUTATIONS

    if task == "unified":
        candidates = lesion_slice_indices(record.mask)
        slices = candidates if len(candidates) else np.arange(record.shape_zyx[0])
        for modality, volume in record.volumes.items():
            scaled = rescale_intensity(volume)
            for index in slices:
                yield ({"subject": record.subject_id, "modality": modality, "slice": int(index)},
                       slice_to_rgb(scaled, int(index), image_size))
        return
    for modality, volume in record.volumes.items():
        for axis, permutation in RECON_AXIS_PERMUTATIONS.items():
            moved = np.transpose(volume, permutation)
            candidates = lesion_slice_indices(record.mask, axis=axis)
            for index in candidates if len(candidates) else range(moved.shape[2]):
                plane = np.repeat(minmax_uint8(moved[:, :, int(index)])[..., None], 3, axis=-1)
                for rotation in range(4):
                    yield ({"subject": record.subject_id, "modality": modality, "axis": axis, "slice": int(index),
                            "rotation": rotation}, np.ascontiguousarray(np.rot90(plane, k=rotation)))


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..errors import UniBrainError
    from ..processing.image_transforms import StrideResize, to_model_tensor
    from ..processing.sequence_plan import to_rgb_pil
    from ..train.config import load_config
    from ..train.stages import STAGES
    from ..train.trainer import load_model_config, load_vae, open_latent_cache
    from .latent_cache import encode_distribution, image_key
    from .radgenome import iter_subject_records

    try:
        config = load_config(args.config, args.overrides)
        data = config.data
        out = Path(args.out or data.latent_cache or Path(data.path) / "latent_cache")
        config.data.latent_cache = str(out)
        vae = load_vae(config)
        cache = open_latent_cache(config, vae, load_model_config(config),
                                  what="--out" if args.out else "data.latent_cache")
        vae_resize = StrideResize(**cache.manifest["transform"]["vae_resize"])
    except UniBrainError as exc:
        print(f"unibrain cache-latents: {exc}", file=sys.stderr)
        return 2
    task = STAGES[args.stage or config.stage].data_task
    existing = 0
    subjects = iter_subject_records(data.path, split=data.split or None)
    with torch.no_grad():
        for number, record in enumerate(tqdm(subjects, desc="subjects", unit="subject")):
            if args.limit_subjects is not None and number >= args.limit_subjects:
                break
            for metadata, image in candidate_images(record, task, data.image_size):
                tensor = to_model_tensor(vae_resize(to_rgb_pil(image)))
                key = image_key(tensor)
                if key in cache:
                    existing += 1
                    continue
                mean, logvar = encode_distribution(vae, tensor[None])
                cache.put(key, mean[0], logvar[0], metadata)
    print(f"latent cache {out}: {cache.writes} entries written, {existing} already present "
          f"({task} images of split {data.split!r}); train with data.latent_cache={out}")
    return 0


__all__ = ["add_arguments", "run", "candidate_images"]
