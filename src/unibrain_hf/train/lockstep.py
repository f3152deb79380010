"""One sequence of module calls for all ranks, when each rank's own sequence depends on its data.

Under parameter sharding (FSDP2, DeepSpeed ZeRO-3) every call of a sharded unit is a collective
(an all-gather of its weights, and in the backward pass another one plus a reduce-scatter) that
every rank must join in the same order; FSDP2 also plans its backward prefetches from the order
of the forward calls. A forward whose calls depend on the pack — stage 3's self-forcing rollout
makes one decoder call per text run and per image — therefore cannot run as it is on sharded
ranks. :func:`common_schedule` lets the ranks agree, once per pack, on a sequence of call *kinds*
that contains every rank's own sequence (a common supersequence, built the same way on every
rank from their all-gathered sequences), and tells each rank which slots its own calls fill; the
caller runs a padding call of the slot's kind in every other slot.

No maintained library offers this (FSDP2 and DeepSpeed both require the ranks to call the same
units); the merge is the textbook shortest-common-supersequence dynamic programme, folded over
the ranks.

    python -c "from unibrain_hf.train.lockstep import merge_sequences; print(merge_sequences([[0, 2, 0, 1], [0, 1, 0, 1]]))"
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def _shortest_common_supersequence(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """A shortest sequence containing both ``a`` and ``b`` as subsequences (ties: ``a``'s element first)."""
    n, m = len(a), len(b)
    # rest[i][j]: length of a shortest common supersequence of a[i:] and b[j:]
    rest = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n, -1, -1):
        for j in range(m, -1, -1):
            if i == n or j == m:
                rest[i][j] = (n - i) + (m - j)
            elif a[i] == b[j]:
                rest[i][j] = 1 + rest[i + 1][j + 1]
            else:
                rest[i][j] = 1 + min(rest[i + 1][j], rest[i][j + 1])
    merged, i, j = [], 0, 0
    while i < n or j < m:
        if j == m or (i < n and a[i] != b[j] and rest[i + 1][j] <= rest[i][j + 1]):
            merged.append(a[i])
            i += 1
        elif i == n or a[i] != b[j]:
            merged.append(b[j])
            j += 1
        else:
            merged.append(a[i])
            i += 1
            j += 1
    return merged


def merge_sequences(sequences: Sequence[Sequence[int]]) -> list[int]:
    """A common supersequence of every rank's call kinds (pairwise shortest ones, folded in rank order)."""
    merged: list[int] = []
    for sequence in sequences:
        merged = _shortest_common_supersequence(merged, list(sequence))
    return merged


def place(own: Sequence[int], merged: Sequence[int]) -> list[bool]:
    """For each slot of ``merged``: does the next of this rank's calls (``own``, in order) fill it?"""
    filled, cursor = [], 0
    for kind in merged:
        mine = cursor < len(own) and own[cursor] == kind
        filled.append(mine)
        cursor += mine
    if cursor != len(own):
        raise RuntimeError(f"the common call schedule lacks {len(own) - cursor} of this rank's calls")
    return filled


def _collective_device() -> torch.device:
    """Where this process group's collectives take tensors: the CPU under gloo, the accelerator otherwise."""
    if dist.get_backend() == "gloo" or not torch.accelerator.is_available():
        return torch.device("cpu")
    return torch.accelerator.current_accelerator()


def _gather_sequences(kinds: Sequence[int]) -> list[list[int]]:
    """Every rank's ``kinds`` (non-negative ints), in rank order: two small collectives."""
    device = _collective_device()
    length = torch.tensor([len(kinds)], dtype=torch.long, device=device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    if int(length.item()) == 0:
        return [[] for _ in range(dist.get_world_size())]
    padded = torch.full((int(length.item()),), -1, dtype=torch.long, device=device)
    padded[:len(kinds)] = torch.tensor(list(kinds), dtype=torch.long)
    gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, padded)
    return [[k for k in g.tolist() if k >= 0] for g in gathered]


def common_schedule(kinds: Sequence[int]) -> list[tuple[int, bool]]:
    """The call kinds every rank runs for this pack, each with whether this rank's own next call fills it.

    All ranks must call this together (``kinds``: this rank's own calls in order, non-negative
    ints). In one process it returns ``kinds`` unchanged, all filled.
    """
    if any(k < 0 for k in kinds):
        raise ValueError("call kinds must be non-negative integers")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [(int(k), True) for k in kinds]
    sequences = _gather_sequences(kinds)
    merged = merge_sequences(sequences)
    return list(zip(merged, place(sequences[dist.get_rank()], merged)))


__all__ = ["common_schedule", "merge_sequences", "place"]
