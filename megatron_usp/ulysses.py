"""Ulysses: all-to-all that trades sequence shards for head shards, with GQA/MQA kv-head replication."""
from __future__ import annotations

import torch

from . import comm
from .groups import USPGroups


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_head_counts(heads: int, kv_heads: int, ulysses_degree: int) -> None:
    """``ValueError`` unless ``heads`` split over ``ulysses_degree`` ranks and kv heads can follow them."""
    if heads % kv_heads != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads}) for grouped-query attention")
    if heads % ulysses_degree != 0:
        raise ValueError(
            f"heads ({heads}) are not divisible by ulysses_degree ({ulysses_degree}): use a ulysses_degree among "
            f"{_divisors(heads)} and put the rest of the parallelism in ring_degree"
        )
    if kv_heads % ulysses_degree != 0 and ulysses_degree % kv_heads != 0:
        valid = [d for d in _divisors(heads) if kv_heads % d == 0 or d % kv_heads == 0]
        raise ValueError(
            f"kv_heads ({kv_heads}) cannot be split or replicated over ulysses_degree ({ulysses_degree}): need "
            f"ulysses_degree % kv_heads == 0 or kv_heads % ulysses_degree == 0; valid ulysses degrees: {valid}"
        )


def kv_replication(kv_heads: int, ulysses_degree: int) -> int:
    """How many copies of each kv head the all-to-all needs (1 unless kv_heads < ulysses_degree)."""
    return ulysses_degree // kv_heads if kv_heads < ulysses_degree else 1


def replicate_kv_heads(x: torch.Tensor, ulysses_degree: int) -> torch.Tensor:
    """``[b, s, kv_heads, d]`` -> ``[b, s, max(kv_heads, u), d]``; the backward sums the replicas."""
    copies = kv_replication(x.shape[2], ulysses_degree)
    return x if copies == 1 else x.repeat_interleave(copies, dim=2)


def seq_to_heads(xs: tuple[torch.Tensor, ...], groups: USPGroups, order: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each ``[b, s_local, h_i, d]`` -> ``[b, u*s_local, h_i/u, d]`` in ring-level layout (``order`` sorts by
    position). All tensors travel in ONE all-to-all: every rank's head slices of each are packed side by side."""
    ulysses_degree = groups.ulysses_degree
    if ulysses_degree == 1:
        return tuple(xs)
    batch, seq_local, _, head_dim = xs[0].shape
    heads = [x.shape[2] // ulysses_degree for x in xs]
    packed = torch.cat([x.reshape(batch, seq_local, ulysses_degree, h, head_dim) for x, h in zip(xs, heads)], dim=3)
    packed = packed.reshape(batch, seq_local, ulysses_degree * sum(heads), head_dim)
    gathered = comm.all_to_all(packed, groups.ulysses, scatter_dim=2, gather_dim=1).index_select(1, order)
    return tuple(gathered.split(heads, dim=2))


def heads_to_seq(x: torch.Tensor, groups: USPGroups, order: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: ``[b, u*s_local, h/u, d]`` -> ``[b, s_local, h, d]``."""
    if groups.ulysses_degree == 1:
        return x
    unsorted = x.index_select(1, torch.argsort(order))
    return comm.all_to_all(unsorted, groups.ulysses, scatter_dim=1, gather_dim=2)
