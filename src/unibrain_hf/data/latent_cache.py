"""Latent cache: the frozen VAE's posterior of every training image, computed once and read back.

The VAE never trains in any UniBrain stage, yet a plain training step encodes every image of its
pack again. Like diffusers' training scripts (``--cache_latents``), a cache stores each image's
posterior *parameters* — mean and log-variance, not a sample — so the trainer still draws
``sample = mean + std·ε`` with ε from the pack's seeded generator (or the recorded noise in a
parity replay), exactly as without the cache.

Keys. What determines a latent is the VAE, the encoder input tensor and nothing else. Entries are
keyed by a hash of that exact tensor (shape, dtype and bytes of the padded pack row, after the
image transform), so two slices, two modalities, two resize settings or two pack canvases (a
smaller image zero-padded to a larger pack's size is a different encoder input: GroupNorm sees
the padding) can never share an entry. The offline pass records subject, modality and slice in
each entry's metadata for inspection.

Staleness. ``manifest.json`` holds a content hash of the VAE (config and every weight) and the
image transform (resize rule and normalisation). Opening a cache with another VAE or transform
raises :class:`StaleLatentCacheError` naming what differs; a stale cache is never read.

Exactness. :func:`encode_distribution` runs each distinct image through the encoder on its own:
CPU convolution kernels are not batch-invariant (a batch of 4 and 4 single images differ in the
last bits), so encoding one image per call is what makes a cached latent bit-identical to a
freshly encoded one, whatever else was in the pack. The trainer uses it with and without a cache.

Filled two ways: offline, ``unibrain cache-latents --config <training yaml>``
(:mod:`.latent_cache_cli`), or on first use by the trainer (``data.latent_cache: DIR``). Entries
are written atomically, one small safetensors file each, so ranks may fill one cache together.

    python -c "from unibrain_hf.data.latent_cache import image_key; import torch; print(image_key(torch.zeros(3, 8, 8)))"
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, CorruptFileError, InputFileNotFoundError
# The posterior sample and normalisation live with the VAE helpers; re-exported for the cache's users.
from ..modeling.vae import sample_latents

FORMAT = "unibrain-latent-cache/1"
MANIFEST = "manifest.json"
# How an image becomes an encoder input (``processing.image_transforms.to_model_tensor``) and how it
# is encoded; part of the transform fingerprint so a change to either invalidates old caches.
NORMALISATION = "uint8/255*2-1"
ENCODER = "one image per encoder call, posterior mean and clamped log-variance"


class StaleLatentCacheError(ConfigError):
    """A latent cache made with another VAE or another image transform than this run's."""


# ------------------------------------------------------------------------------------- fingerprints
def vae_fingerprint(vae) -> str:
    """SHA-256 over the VAE's config and every weight (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def transform_description(vae_resize) -> dict:
    """The image transform that turns a picture into an encoder input, as stored in the manifest."""
    resize = vae_resize.to_dict() if hasattr(vae_resize, "to_dict") else dict(vae_resize)
    return {"vae_resize": {k: int(v) for k, v in resize.items()}, "normalisation": NORMALISATION,
            "encoder": ENCODER}


def image_key(image: torch.Tensor) -> str:
    """Content key of one encoder input (C, H, W): BLAKE2b of its dtype, shape and bytes."""
    image = image.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(f"{image.dtype}:{tuple(image.shape)}".encode(), digest_size=20)
    digest.update(image.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_distribution(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, clamped log-variance) of each image (N, 3, H, W), one encoder call per image."""
    means, logvars = [], []
    for image in images:
        dist = vae.encode(image[None].to(dtype=vae.dtype)).latent_dist
        means.append(dist.mean)
        logvars.append(dist.logvar)
    return torch.cat(means), torch.cat(logvars)


@dataclass
class CachedLatents:
    """What a pack found in the cache: the key of each padded row and the entries that were present."""

    keys: list[str]
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [k for k in dict.fromkeys(self.keys) if k not in self.entries]


def pack_distributions(vae, images: torch.Tensor, cache: "LatentCache | None" = None,
                       cached: CachedLatents | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) of every row of a pack's ``padded_images``, each distinct image encoded at most once.

    With a ``cache``, rows found there (``cached``, as the packed dataset looked them up, else looked up
    now) are read instead of encoded, and the rest are encoded and written to it.
    """
    keys = cached.keys if cached is not None else [image_key(row) for row in images]
    entries = dict(cached.entries) if cached is not None else {}
    if cache is not None:
        for key in dict.fromkeys(keys):
            if key not in entries and (entry := cache.get(key)) is not None:  # filled since the lookup
                entries[key] = entry
    first_row = {}
    for row, key in enumerate(keys):
        first_row.setdefault(key, row)
    missing = [k for k in first_row if k not in entries]
    if cache is not None:
        cache.hits += len(first_row) - len(missing)
        cache.misses += len(missing)
    if missing:
        mean, logvar = encode_distribution(vae, images[[first_row[k] for k in missing]])
        for index, key in enumerate(missing):
            entries[key] = (mean[index], logvar[index])
            if cache is not None:
                cache.put(key, mean[index], logvar[index])
    device = images.device
    mean = torch.stack([entries[k][0].to(device) for k in keys])
    logvar = torch.stack([entries[k][1].to(device) for k in keys])
    return mean, logvar


# ------------------------------------------------------------------------------------- the cache
class LatentCache:
    """A directory of posterior parameters for one VAE and one image transform (see the module docstring).

    Open it with :meth:`open`; the object is small and picklable (the packed dataset's DataLoader
    workers read entries through it). ``hits`` / ``misses`` / ``writes`` count this process's use.
    """

    def __init__(self, root: str | os.PathLike, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.hits = self.misses = self.writes = 0

    @classmethod
    def open(cls, root: str | os.PathLike, vae, vae_resize, create: bool = True,
             what: str = "data.latent_cache") -> "LatentCache":
        """The cache at ``root`` for this ``vae`` and transform; created when absent (if ``create``).

        Raises :class:`StaleLatentCacheError` if it was made for another VAE or transform.
        """
        root = Path(root)
        expected = {"format": FORMAT, "vae_sha256": vae_fingerprint(vae), "vae_dtype": str(vae.dtype),
                    "transform": transform_description(vae_resize)}
        path = root / MANIFEST
        if path.exists():
            from ..utils.readers import read_json

            found = read_json(path, what=f"{what} manifest")
            if not isinstance(found, dict) or found.get("format") != FORMAT:
                raise StaleLatentCacheError(f"{what} {root}: {MANIFEST} is not a {FORMAT} manifest "
                                            f"(format {found.get('format') if isinstance(found, dict) else None!r}); "
                                            "delete the directory or choose another")
            differences = [f"{name}: cache {found.get(name)!r}, this run {value!r}"
                           for name, value in expected.items() if found.get(name) != value]
            if differences:
                raise StaleLatentCacheError(
                    f"{what} {root} is stale: it was made with another "
                    f"{'VAE' if any(d.startswith('vae') for d in differences) else 'image transform'} "
                    f"({'; '.join(differences)}). Its latents would be wrong for this run: delete it, or "
                    f"point {what} at a new directory (`unibrain cache-latents` refills it)")
            return cls(root, found)
        if root.exists() and any(root.iterdir()):
            raise StaleLatentCacheError(f"{what} {root} exists but holds no {MANIFEST}; it is not a latent cache "
                                        "(choose an empty or new directory)")
        if not create:
            raise InputFileNotFoundError(f"{what} {root} does not exist (write it with `unibrain cache-latents`)")
        from ..utils.atomic import atomic_file

        root.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # another rank may have written it meanwhile: same content either way
            with atomic_file(path) as temporary:
                temporary.write_text(json.dumps(expected, indent=2))
        return cls(root, expected)

    def _path(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()

    def __len__(self) -> int:
        return sum(1 for _ in (self.root / "entries").glob("*/*.safetensors"))

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, log-variance) stored under ``key``, or None."""
        path = self._path(key)
        if not path.exists():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            return tensors["mean"], tensors["logvar"]
        except (SafetensorError, KeyError, OSError) as exc:
            raise CorruptFileError(f"latent cache entry {path} is unreadable ({exc}); delete it and it will be "
                                   "encoded again") from None

    def put(self, key: str, mean: torch.Tensor, logvar: torch.Tensor, metadata: dict | None = None) -> None:
        """Store one image's posterior parameters (atomically; an existing entry is left as it is)."""
        path = self._path(key)
        if path.exists():
            return
        from safetensors.torch import save_file

        from ..utils.atomic import atomic_file

        with atomic_file(path, suffix=".safetensors") as temporary:
            save_file({"mean": mean.detach().to("cpu").contiguous(), "logvar": logvar.detach().to("cpu").contiguous()},
                      str(temporary), metadata={k: str(v) for k, v in (metadata or {}).items()})
        self.writes += 1

    def lookup(self, images: torch.Tensor) -> CachedLatents:
        """Keys of a pack's padded rows and the entries already cached (what the packed dataset attaches)."""
        keys = [image_key(row) for row in images]
        entries = {}
        for key in dict.fromkeys(keys):
            entry = self.get(key)
            if entry is not None:
                entries[key] = entry
        return CachedLatents(keys, entries)

    def __getstate__(self):
        return {"root": str(self.root), "manifest": self.manifest}

    def __setstate__(self, state):
        self.__init__(state["root"], state["manifest"])


__all__ = ["LatentCache", "CachedLatents", "StaleLatentCacheError", "encode_distribution", "sample_latents",
           "pack_distributions", "image_key", "vae_fingerprint", "transform_description"]
