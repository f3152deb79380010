"""Stream subjects into token-budgeted packed training batches (BAGEL's "navit" packing policy).

:class:`PackedDataset` turns a cohort of :class:`~unibrain_hf.data.schema.SubjectRecord` into an
endless (or finite) stream of :class:`~unibrain_hf.processing.packing.PackedBatch`: one sample is
built per record (stage-1 recon, stage-2/3 unified, or a custom builder), then samples are packed
under a :class:`TokenBudget` exactly as the reference ``PackedDataset.__iter__`` does:

* samples are added until the pack holds ``expected_num_tokens`` (real, post-dropout tokens);
* a sample longer than ``max_num_tokens_per_sample`` (pre-dropout count) is skipped and counted;
* a sample whose pre-dropout count would push the pack past ``max_num_tokens`` goes to an
  overflow buffer (at most ``max_buffer_size``); when the buffer is full, the pack is yielded;
* while the pack holds fewer than ``prefer_buffer_before`` tokens, buffered samples come first.

Two deliberate differences from the reference, both so that no sample is ever lost: the sample
that forces a pack out starts the next pack (the reference discards it), and at the end of a
finite stream the buffer is drained and the partial last pack is yielded.

Determinism: every sample is built and packed (condition dropout, timesteps) with its own
generator seeded from ``(seed, epoch, record index)``; epoch orders come from ``(seed, epoch)``.
So the samples never depend on how many ranks or DataLoader workers there are, and a stream
position is fully described by a few integers plus the *keys* of the buffered samples (which
are rebuilt on resume) — no generator state has to be saved.

Sharding: records are split over ``world_size × num_workers`` shards. For a list of records,
each epoch is a fresh permutation of all records dealt round-robin to the shards; for a stream
(a callable returning an iterator, read again every epoch in the same order), record ``i`` goes
to shard ``i mod num_shards`` and each shard shuffles through a bounded shuffle buffer. A
streamed cohort from ``load_radgenome(..., streaming=True, decode=False)`` is split the
``datasets`` way, ``split_dataset_by_node`` by rank and then by DataLoader worker (by parquet
file when the file count divides the shard count, else one row in ``num_shards``), and each
row is decoded only when its subject is used: memory holds the shuffle window, never the cohort.

Shards can differ by one record, so in a finite run ranks may produce different numbers of
packs (distributed training should use the endless stream). A callable stream is read in full by
every shard (each keeps its share), and resuming a stream re-reads it up to the saved position.

Resume: ``state_dict()`` describes the position after the last pack handed to the trainer.
With ``num_workers=0`` the packs after ``load_state_dict`` equal the uninterrupted sequence.
With ``num_workers>0`` (iterate through :func:`packed_dataloader`, which reports every pack's
position back to the dataset in the main process) each worker's pack sequence resumes exactly
and workers are re-assigned so that the DataLoader's round-robin continues where it stopped:
the global sequence is identical in infinite mode (``num_epochs=None``, the training setting);
in a finite run the interleaving can differ once a worker has run dry. Packs a worker had
prefetched but the trainer had not consumed are regenerated, never skipped.

Latent cache: given a :class:`~unibrain_hf.data.latent_cache.LatentCache`, every pack handed out
carries ``cached_latents`` (the content key of each padded VAE row and the posterior parameters
already cached for them), read here — in the DataLoader workers when there are any — so the
trainer encodes only what the cache lacks.

    python -m unibrain_hf.data.packed_dataset   # packs a small synthetic cohort and prints the packs
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unibrain_hf.data.schema import SubjectRecord
from unibrain_hf.data.sequence_builder import BuiltSample, build_recon_sample, build_unified_sample
from unibrain_hf.processing.packing import DropoutProbabilities, PackedBatch

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# Distinct salts keep the epoch-order generator independent of the per-sample generators.
_ORDER_SALT = 0x5EED0
_SAMPLE_SALT = 0x5A3E1
TASK_BUILDERS = {"unified": build_unified_sample, "recon": build_recon_sample}
STAT_NAMES = ("records_read", "samples_packed", "invalid_records", "samples_too_long", "unpackable_samples",
              "packs") + PackedBatch.stat_names()  # the last: condition-dropout counts kept by the packer


@dataclass
class TokenBudget:
    """How many tokens a pack may hold (UniBrain stage 1/2 defaults; stage 3 uses 10240/13408/10240).

    Attributes:
        expected_num_tokens: a pack is yielded as soon as it holds at least this many tokens.
        max_num_tokens: hard upper bound of a pack's ``sequence_length``.
        max_num_tokens_per_sample: longer samples (pre-dropout) are skipped.
        max_buffer_size: overflow buffer for samples that do not fit the current pack.
        prefer_buffer_before: below this fill level buffered samples are used first (it may exceed
            ``max_num_tokens``: stage 3 keeps the default 16384 with a 13408 maximum, i.e. always prefers).

    Every pack except those made while draining the buffer at the end of a finite stream reaches
    ``expected_num_tokens`` when ``prefer_buffer_before + max_num_tokens_per_sample <= max_num_tokens``
    and the buffer never fills (true for the stage-1/2 defaults); otherwise, as in the reference,
    a buffered sample that does not fit closes the pack early.
    """

    expected_num_tokens: int = 32768
    max_num_tokens: int = 36864
    max_num_tokens_per_sample: int = 16384
    max_buffer_size: int = 50
    prefer_buffer_before: int = 16384

    def validate(self) -> "TokenBudget":
        for name, value in asdict(self).items():
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"TokenBudget.{name} must be an int; got {value!r}")
            lowest = 0 if name in ("max_buffer_size", "prefer_buffer_before") else 1
            if value < lowest:
                raise ValueError(f"TokenBudget.{name} must be >= {lowest}; got {value}")
        if self.expected_num_tokens > self.max_num_tokens:
            raise ValueError(f"expected_num_tokens ({self.expected_num_tokens}) exceeds max_num_tokens "
                             f"({self.max_num_tokens})")
        if self.max_num_tokens_per_sample > self.max_num_tokens:
            # Otherwise an accepted sample might not fit even an empty pack.
            raise ValueError(f"max_num_tokens_per_sample ({self.max_num_tokens_per_sample}) exceeds max_num_tokens "
                             f"({self.max_num_tokens})")
        return self


class SampleKey(NamedTuple):
    """Identity of one sample in a pack (``PackedBatch.sample_ids``): rebuilding it gives the same sample."""

    epoch: int
    record_index: int
    subject_id: str


@dataclass
class _ReadySample:
    key: SampleKey
    num_tokens: int  # pre-dropout, what the budget policy compares
    packed: PackedBatch  # this sample alone, dropout applied


def _new_stats() -> dict:
    return dict.fromkeys(STAT_NAMES, 0)


def _fresh_shard_state() -> dict:
    return {"epoch": 0, "consumed": 0, "buffer": [], "pending": [], "packs_yielded": 0, "finished": False,
            "stats": _new_stats()}


# ------------------------------------------------------------------------------------- merging packs
def concatenate_packs(packs: list[PackedBatch]) -> PackedBatch:
    """One pack from several, exactly as if their samples had been packed together.

    Used so that each sample's dropout and timesteps come from its own generator (independent
    of pack membership); the merge rules live with the batch format (:meth:`PackedBatch.concatenate`).
    """
    return PackedBatch.concatenate(packs)


# ------------------------------------------------------------------------------------- streamed rows
def _is_streamed_dataset(records) -> bool:
    try:
        from datasets import IterableDataset as StreamedDataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(records, StreamedDataset)


@dataclass
class _Record:
    """One raw RadGenome row of a streamed cohort, decoded into a ``SubjectRecord`` only when used."""

    row: dict

    @property
    def subject_id(self) -> str:
        return str(self.row.get("subject_id"))

    def decode(self) -> SubjectRecord:
        """The subject, with empty volumes dropped as ``iter_subject_records`` does (``ValueError`` if none is left)."""
        from unibrain_hf.data.radgenome import drop_empty_volumes
        from unibrain_hf.data.schema import row_to_record

        record = row_to_record(self.row)
        drop_empty_volumes(record)
        if not record.volumes:
            raise ValueError(f"subject {record.subject_id!r} has no non-empty volume")
        return record


# ------------------------------------------------------------------------------------- the dataset
class PackedDataset(IterableDataset):
    """Packed training batches from subject records under a token budget.

    Args:
        records: a list of ``SubjectRecord``; a callable returning a fresh iterator over them
            (called once per epoch; must give the same records in the same order every time); or a
            streamed cohort, ``load_radgenome(path, streaming=True, decode=False)``, which is split
            by rank and DataLoader worker with ``datasets.distributed.split_dataset_by_node`` and
            decoded one subject at a time (the cohort is never held in memory).
        task: ``"unified"`` (stage 2/3), ``"recon"`` (stage 1) or a callable
            ``(record, rng: numpy.random.Generator) -> BuiltSample``.
        processor: a ``UniBrainProcessor`` (tokenizer + image geometry).
        dropout: condition-dropout probabilities applied at packing (UniBrain: 0.1 / 0.3 / 0.3).
        budget: the :class:`TokenBudget`.
        seed: data seed (UniBrain: 42).
        num_epochs: ``None`` cycles forever, reshuffling every epoch; an int stops after that many.
        rank, world_size: this process's share of the records under distributed training.
        stream_shuffle_buffer: shuffle window (in subjects) for streamed sources.
        latent_cache: a :class:`~unibrain_hf.data.latent_cache.LatentCache` to look every pack's VAE
            images up in (attached as ``batch.cached_latents``); None: no lookup.

    ``stats`` counts records read, samples packed, invalid records (the builder raised
    ``ValueError``), too-long samples, samples the packer rejected, packs, and condition-dropout
    eligibility/drops per kind — summed over all workers' reported positions.
    """

    def __init__(self, records: list[SubjectRecord] | Callable[[], Iterable[SubjectRecord]] | "datasets.IterableDataset",
                 task: str | Callable[[SubjectRecord, np.random.Generator], BuiltSample], processor,
                 dropout: DropoutProbabilities | None = None, budget: TokenBudget | None = None, seed: int = 42,
                 num_epochs: int | None = None, rank: int = 0, world_size: int = 1,
                 stream_shuffle_buffer: int = 64, latent_cache=None):
        super().__init__()
        self.latent_cache = latent_cache
        self._record_list = self._record_stream = self._rows = None
        if _is_streamed_dataset(records):
            self._rows = records
        elif callable(records) and not isinstance(records, (list, tuple)):
            self._record_stream = records
        elif isinstance(records, (list, tuple)):
            if not records:
                raise ValueError("records is empty")
            bad = [type(r).__name__ for r in records if not isinstance(r, SubjectRecord)]
            if bad:
                raise ValueError(f"records must be SubjectRecord instances; found {sorted(set(bad))}")
            self._record_list = list(records)
        else:
            raise ValueError(f"records must be a list of SubjectRecord, a callable returning an iterator of them, or "
                             f"a streamed RadGenome datasets.IterableDataset; got {type(records).__name__}")
        if isinstance(task, str):
            if task not in TASK_BUILDERS:
                raise ValueError(f"task must be one of {sorted(TASK_BUILDERS)} or a callable; got {task!r}")
            self.task_name, self._build = task, TASK_BUILDERS[task]
        elif callable(task):
            self.task_name, self._build = getattr(task, "__name__", "custom"), task
        else:
            raise ValueError(f"task must be 'unified', 'recon' or a callable (record, rng) -> BuiltSample; "
                             f"got {task!r}")
        if processor is None or not hasattr(processor, "packer"):
            raise ValueError("processor must be a UniBrainProcessor (something with .packer(dropout))")
        for name, value, low in (("seed", seed, 0), ("rank", rank, 0), ("world_size", world_size, 1),
                                 ("stream_shuffle_buffer", stream_shuffle_buffer, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or isinstance(num_epochs, bool)
                                       or num_epochs < 1):
            raise ValueError(f"num_epochs must be None (infinite) or an int >= 1; got {num_epochs!r}")
        self.processor = processor
        self.dropout = dropout or DropoutProbabilities()
        self.budget = (budget or TokenBudget()).validate()
        self.seed, self.num_epochs = int(seed), num_epochs
        self.rank, self.world_size = int(rank), int(world_size)
        self.stream_shuffle_buffer = int(stream_shuffle_buffer)
        self._packer = processor.packer(self.dropout)
        self._start: dict | None = None  # a loaded state_dict; None = the beginning
        self._positions: dict[int, dict] = {}  # worker slot -> shard state after its last handed-out pack
        self._num_workers_seen = 1
        self._next_slot = 0

    # --------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Position after the last pack handed out (see the module docstring for the guarantee)."""
        start = self._start or {}
        shards = copy.deepcopy(start.get("shards", {}))
        shards.update(copy.deepcopy(self._positions))
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self._num_workers_seen, "next_slot": self._next_slot, "shards": shards}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; the next iteration continues right after that position."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a PackedDataset state (version {STATE_VERSION}): {str(state)[:80]}")
        for name in ("seed", "rank", "world_size"):
            if state[name] != getattr(self, name):
                raise ValueError(f"state was saved with {name}={state[name]}, this dataset has {getattr(self, name)}")
        self._start = copy.deepcopy(state)
        self._start["shards"] = {int(k): v for k, v in state["shards"].items()}
        self._positions = copy.deepcopy(self._start["shards"])
        self._num_workers_seen = int(state["num_workers"])
        self._next_slot = int(state["next_slot"])

    def note_position(self, batch: PackedBatch) -> None:
        """Record (in the trainer's process) the stream position a pack carries; called by the loader."""
        position = getattr(batch, "stream_position", None)
        if position is None:
            return
        slot, num_workers = position["slot"], position["num_workers"]
        self._positions[slot] = position["state"]
        self._num_workers_seen = num_workers
        self._next_slot = (slot + 1) % num_workers

    @property
    def stats(self) -> dict:
        """Counters summed over every worker's last reported position."""
        total = _new_stats()
        for state in self._positions.values():
            for name, value in state["stats"].items():
                total[name] += value
        return total

    # --------------------------------------------------------------------------- records
    def _sample_generators(self, epoch: int, record_index: int):
        seq = np.random.SeedSequence([self.seed, _SAMPLE_SALT, epoch, record_index])
        build_seed, pack_seed = seq.spawn(2)
        return np.random.default_rng(build_seed), np.random.default_rng(pack_seed)

    def _shard_order(self, epoch: int, shard: int, num_shards: int) -> Iterator[tuple[int, _Record]]:
        """This shard's (record index, record) pairs for one epoch, in their shuffled order."""
        order_rng = np.random.default_rng(np.random.SeedSequence([self.seed, _ORDER_SALT, epoch]))
        if self._record_list is not None:
            for index in order_rng.permutation(len(self._record_list))[shard::num_shards]:
                yield int(index), self._record_list[int(index)]
            return
        # A stream cannot be permuted; shuffle within a bounded window instead (per-shard generator).
        window_rng = np.random.default_rng(np.random.SeedSequence([self.seed, _ORDER_SALT, epoch, shard]))
        window: list = []
        for pair in self._shard_stream(shard, num_shards):
            window.append(pair)
            if len(window) >= self.stream_shuffle_buffer:
                yield window.pop(int(window_rng.integers(len(window))))
        while window:
            yield window.pop(int(window_rng.integers(len(window))))

    def _shard_stream(self, shard: int, num_shards: int) -> Iterator[tuple[int, _Record]]:
        """A streamed source's records of one shard, in stream order, as (record index, record).

        Record ``i`` of the stream belongs to shard ``i mod num_shards``; for a ``datasets`` stream the
        split is ``split_dataset_by_node`` by rank, then by worker (its rows come already split, so the
        index is rebuilt as ``local position × num_shards + shard``, unique across shards). Rows are
        decoded only when a record is used (:class:`_Record`), so skipping on resume is cheap.
        """
        if self._rows is not None:
            from datasets.distributed import split_dataset_by_node

            num_workers, slot = num_shards // self.world_size, shard % (num_shards // self.world_size)
            rows = split_dataset_by_node(self._rows, rank=self.rank, world_size=self.world_size)
            rows = split_dataset_by_node(rows, rank=slot, world_size=num_workers)
            # `.iter()` (not `iter(rows)`): inside a DataLoader worker the latter would split by worker again.
            for position, batch in enumerate(rows.iter(batch_size=1)):
                yield position * num_shards + shard, _Record(row={k: v[0] for k, v in batch.items()})
            return
        for index, record in enumerate(self._record_stream()):
            if index % num_shards == shard:
                yield index, record

    def _records_by_index(self, indices: set[int], shard: int, num_shards: int) -> dict[int, _Record]:
        if self._record_list is not None:
            return {i: self._record_list[i] for i in indices}
        found = {}
        for index, record in self._shard_stream(shard, num_shards):
            if index in indices:
                found[index] = record
                if len(found) == len(indices):
                    break
        if len(found) != len(indices):
            raise ValueError(f"the record stream no longer contains records {sorted(indices - set(found))[:5]}; "
                             "a resumable stream must give the same records in the same order every time")
        return found

    def _prepare(self, key_epoch: int, index: int, record, stats: dict) -> _ReadySample | None:
        """Build and pack one sample alone; None (counted, logged) when it cannot be used."""
        build_rng, pack_rng = self._sample_generators(key_epoch, index)
        subject = getattr(record, "subject_id", f"#{index}")
        try:
            record = record.decode() if isinstance(record, _Record) else record
            subject = record.subject_id
            built = self._build(record, build_rng)
        except ValueError as err:
            stats["invalid_records"] += 1
            logger.warning("skipping record %d (subject %r): %s [%d invalid so far]", index, subject, err,
                           stats["invalid_records"])
            return None
        key = SampleKey(key_epoch, index, built.subject_id)
        num_tokens = self._packer.count_tokens(built.items)
        if num_tokens > self.budget.max_num_tokens_per_sample:
            stats["samples_too_long"] += 1
            logger.warning("skipping sample of subject %r: %d tokens > max_num_tokens_per_sample %d "
                           "[%d skipped so far]",
                           subject, num_tokens, self.budget.max_num_tokens_per_sample, stats["samples_too_long"])
            return None
        try:
            packed = self._packer.pack([built.items], rng=pack_rng, sample_ids=[key])
        except ValueError as err:  # e.g. every item removed by condition dropout
            stats["unpackable_samples"] += 1
            logger.warning("skipping sample of subject %r: %s [%d so far]", subject, err, stats["unpackable_samples"])
            return None
        for name, value in packed.stats().items():
            stats[name] += value
        return _ReadySample(key, num_tokens, packed)

    def _rebuild(self, keys: list, shard: int, num_shards: int) -> list[_ReadySample]:
        """Samples named by saved keys (rebuilt deterministically; their stats were counted already)."""
        records = self._records_by_index({int(k[1]) for k in keys}, shard, num_shards)
        scratch = _new_stats()
        rebuilt = []
        for epoch, index, *_ in keys:
            sample = self._prepare(int(epoch), int(index), records[int(index)], scratch)
            if sample is None:
                raise ValueError(f"saved sample (epoch {epoch}, record {index}) can no longer be built")
            rebuilt.append(sample)
        return rebuilt

    # --------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        start = self._start
        if start is not None and start["num_workers"] != num_workers and start["shards"]:
            raise ValueError(f"the loaded state was saved with {start['num_workers']} DataLoader worker(s); "
                             f"resume with the same number (got {num_workers})")
        rotation = start["next_slot"] if start is not None else 0
        # Rotating slots makes the DataLoader's first worker continue where the round-robin stopped.
        slot = (worker_id + rotation) % num_workers
        state = copy.deepcopy(start["shards"].get(slot)) if start is not None else None
        return self._iterate_shard(slot, num_workers, state or _fresh_shard_state())

    def _iterate_shard(self, slot: int, num_workers: int, state: dict) -> Iterator[PackedBatch]:
        budget, stats = self.budget, state["stats"]
        num_shards = self.world_size * num_workers
        shard = self.rank * num_workers + slot
        if state["finished"]:
            return
        buffer = deque(self._rebuild(state["buffer"], shard, num_shards)) if state["buffer"] else deque()
        pack: list[_ReadySample] = self._rebuild(state["pending"], shard, num_shards) if state["pending"] else []
        fill = sum(s.packed.sequence_length for s in pack)

        def fresh_samples() -> Iterator[_ReadySample]:
            while self.num_epochs is None or state["epoch"] < self.num_epochs:
                usable_this_epoch, resumed_mid_epoch = 0, state["consumed"] > 0
                order = self._shard_order(state["epoch"], shard, num_shards)
                for position, (index, record) in enumerate(order):
                    if position < state["consumed"]:
                        continue  # resuming: these were used before the saved position
                    state["consumed"] += 1
                    stats["records_read"] += 1
                    sample = self._prepare(state["epoch"], index, record, stats)
                    if sample is not None:
                        usable_this_epoch += 1
                        yield sample
                if self.num_epochs is None and usable_this_epoch == 0 and not resumed_mid_epoch:
                    # Cycling forever over nothing would hang the trainer; say why instead.
                    raise ValueError(
                        f"shard {shard} of {num_shards} (rank {self.rank}, {num_workers} worker(s)) produced no usable "
                        f"sample in a whole epoch ({state['consumed']} records; stats {dict(stats)}); "
                        "use fewer workers/ranks, more records, or fix the records")
                state["epoch"] += 1
                state["consumed"] = 0

        def emit() -> PackedBatch:
            nonlocal pack, fill
            batch = concatenate_packs([s.packed for s in pack])
            if self.latent_cache is not None and batch.padded_images is not None:
                # Looked up on the final pack: its canvas (the padded size) is part of each key.
                batch.cached_latents = self.latent_cache.lookup(batch.padded_images)
            stats["samples_packed"] += len(pack)
            stats["packs"] += 1
            state["packs_yielded"] += 1
            pack, fill = [], 0
            return batch

        def snapshot(batch: PackedBatch) -> PackedBatch:
            saved = {**state, "buffer": [list(s.key) for s in buffer], "pending": [list(s.key) for s in pack],
                     "stats": dict(stats)}
            batch.stream_position = {"slot": slot, "num_workers": num_workers, "state": copy.deepcopy(saved)}
            self.note_position(batch)  # effective in-process (num_workers=0); workers report via the loader
            return batch

        incoming = fresh_samples()
        exhausted = False
        while True:
            if buffer and (fill < budget.prefer_buffer_before or exhausted):
                sample, from_buffer = buffer.popleft(), True
            else:
                sample = next(incoming, None)
                if sample is None:
                    exhausted = True
                    if buffer:
                        continue  # drain the buffer before finishing
                    break
                from_buffer = False
            if fill + sample.num_tokens > budget.max_num_tokens:
                if not from_buffer and not exhausted and len(buffer) < budget.max_buffer_size:
                    buffer.append(sample)
                    continue
                # The pack is as full as the policy allows: hand it out, start the next one with this sample.
                if pack:
                    batch = emit()
                    pack, fill = [sample], sample.packed.sequence_length
                    yield snapshot(batch)
                    if fill >= budget.expected_num_tokens:
                        yield snapshot(emit())
                    continue
            pack.append(sample)
            fill += sample.packed.sequence_length
            if fill >= budget.expected_num_tokens:
                yield snapshot(emit())
        state["finished"] = True
        if pack:
            yield snapshot(emit())
        else:
            self._positions[slot] = {**copy.deepcopy(state), "buffer": [], "pending": []}


# ------------------------------------------------------------------------------------- DataLoader
def _pack_unchanged(batch: PackedBatch) -> PackedBatch:
    """collate_fn: a pack already is a batch (module-level so worker processes can pickle it)."""
    return batch


class PackedDataLoader(DataLoader):
    """A DataLoader that reports each pack's stream position to its :class:`PackedDataset`."""

    def __iter__(self):
        for batch in super().__iter__():
            self.dataset.note_position(batch)
            yield batch


def packed_dataloader(dataset: PackedDataset, num_workers: int = 0, prefetch_factor: int = 2) -> PackedDataLoader:
    """DataLoader over packs: ``batch_size=None`` (one pack is one batch), packs returned unchanged.

    Use it (rather than a bare DataLoader) with ``num_workers > 0`` so that ``dataset.state_dict()``
    reflects the packs the trainer actually consumed.
    """
    if not isinstance(dataset, PackedDataset):
        raise ValueError(f"packed_dataloader needs a PackedDataset; got {type(dataset).__name__}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0; got {num_workers!r}")
    if not isinstance(prefetch_factor, int) or prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be an int >= 1; got {prefetch_factor!r}")
    return PackedDataLoader(
        dataset, batch_size=None, collate_fn=_pack_unchanged, num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available())  # pinning only helps host→GPU copies


def _demo() -> None:
    from unibrain_hf import UniBrainConfig, UniBrainProcessor
    from unibrain_hf.train.bootstrap import train_tokenizer

    tokenizer = train_tokenizer(["a glioma in the left frontal lobe", "Final Diagnosis: Glioma"] * 8, vocab_size=300)
    processor = UniBrainProcessor.for_model(UniBrainConfig.tiny(vocab_size=len(tokenizer)), tokenizer, vae_max_size=64,
                                            vae_min_size=32, vit_max_size=56, vit_min_size=28)
    rng = np.random.default_rng(0)
    records = []
    for s in range(6):
        mask = np.zeros((8, 40, 40), np.float32)
        mask[3:5, 15:22, 15:22] = 1
        records.append(SubjectRecord(f"demo-{s}", {c: (rng.random((8, 40, 40)) * 100 + 1).astype(np.float32)
                                                  for c in ("t1n", "t1c", "t2w")}, impression="x", disease=["Glioma"],
                                     mask=mask))
    dataset = PackedDataset(records, "unified", processor, DropoutProbabilities(0.1, 0.3, 0.3),
                            TokenBudget(600, 800, 600, 50, 300), num_epochs=1)
    for batch in packed_dataloader(dataset):
        print(batch.sequence_length, [f"{k.subject_id}@{k.epoch}" for k in batch.sample_ids])
    print(dataset.stats)


if __name__ == "__main__":
    _demo()
