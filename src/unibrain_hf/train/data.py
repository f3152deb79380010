"""The training data of one process: the cohort streamed from parquet into token-budgeted packs.

``load_radgenome(data.path, split=data.split, streaming=True, decode=False)`` gives the cohort
as a ``datasets.IterableDataset``; :class:`~unibrain_hf.data.packed_dataset.PackedDataset`
splits it by rank and DataLoader worker with ``split_dataset_by_node`` and decodes one subject
at a time, so memory holds a shuffle window of subjects, never the cohort.

    python -c "from unibrain_hf.train.data import build_dataset; help(build_dataset)"
"""

from __future__ import annotations

import functools

from ..errors import ConfigError


def training_processor(model_config, tokenizer, data):
    """The processor a run packs its images with: the model's geometry and ``data``'s (a DataSection) sizes."""
    from ..processing.processor import UniBrainProcessor

    return UniBrainProcessor.for_model(model_config, tokenizer, vae_max_size=data.vae_max_size,
                                       vae_min_size=data.vae_min_size, vit_max_size=data.vit_max_size,
                                       vit_min_size=data.vit_min_size)


def build_dataset(config, processor, rank: int, world_size: int, latent_cache=None):
    """The :class:`PackedDataset` of this rank for ``config`` (stage task, budget, dropout, stream).

    ``latent_cache`` (a :class:`~unibrain_hf.data.latent_cache.LatentCache`) is looked up for every pack.
    """
    from ..data.packed_dataset import PackedDataset, TokenBudget
    from ..data.radgenome import load_radgenome, resolve_parquet_files, split_subjects
    from ..data.sequence_builder import build_recon_sample, build_unified_sample
    from ..processing.packing import DropoutProbabilities
    from .stages import STAGES

    data = config.data
    files = resolve_parquet_files(data.path)
    if data.split and not split_subjects(files, data.split):
        raise ConfigError(f"data.split {data.split!r} of data.path {data.path} lists no subject")
    task = build_recon_sample if STAGES[config.stage].data_task == "recon" else \
        functools.partial(build_unified_sample, image_size=data.image_size)
    budget = TokenBudget(expected_num_tokens=data.expected_num_tokens, max_num_tokens=data.max_num_tokens,
                         max_num_tokens_per_sample=data.max_num_tokens_per_sample,
                         prefer_buffer_before=data.prefer_buffer_before)
    dropout = DropoutProbabilities(text=data.text_dropout, vit=data.vit_dropout, vae=data.vae_dropout)
    rows = load_radgenome(data.path, split=data.split, streaming=True, decode=False)
    return PackedDataset(rows, task=task, processor=processor, dropout=dropout, budget=budget,
                         seed=config.train.data_seed, num_epochs=data.num_epochs, rank=rank, world_size=world_size,
                         stream_shuffle_buffer=data.stream_shuffle_buffer, latent_cache=latent_cache)


def first_subjects(config):
    """A lazy iterator over the cohort's subjects (for the sample-panel writer, which needs one)."""
    from ..data.radgenome import iter_subject_records

    return iter_subject_records(config.data.path, split=config.data.split)
