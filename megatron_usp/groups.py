"""USPGroups: the Ulysses and ring process groups of this rank (passed explicitly, never global state)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch.distributed as dist


@dataclass(frozen=True)
class USPGroups:
    """This rank's place on the ``ulysses_degree x ring_degree`` sequence-parallel grid.

    ``ulysses`` and ``ring`` are process groups of size ``ulysses_degree`` and ``ring_degree``;
    ``ring_ranks`` are the global ranks of the ring group in ring-rank order (for point-to-point sends).
    """

    ulysses: Optional[dist.ProcessGroup]
    ring: Optional[dist.ProcessGroup]
    ulysses_degree: int
    ring_degree: int
    ulysses_rank: int
    ring_rank: int
    ring_ranks: tuple[int, ...]

    @property
    def sp_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def cp_rank(self) -> int:
        """Layout index of this rank (Megatron's CP rank with ulysses inner)."""
        return self.ring_rank * self.ulysses_degree + self.ulysses_rank

    @classmethod
    def single(cls) -> "USPGroups":
        """A 1 x 1 grid: plain attention, no communication."""
        return cls(None, None, 1, 1, 0, 0, (dist.get_rank() if dist.is_initialized() else 0,))

    @classmethod
    def from_groups(cls, ulysses: dist.ProcessGroup, ring: dist.ProcessGroup) -> "USPGroups":
        """Wrap existing groups (e.g. Megatron's hierarchical context-parallel groups)."""
        return cls(
            ulysses=ulysses,
            ring=ring,
            ulysses_degree=dist.get_world_size(ulysses),
            ring_degree=dist.get_world_size(ring),
            ulysses_rank=dist.get_rank(ulysses),
            ring_rank=dist.get_rank(ring),
            ring_ranks=tuple(dist.get_process_group_ranks(ring)),
        )


def check_degree(name: str, value: object) -> int:
    """``TypeError`` unless an int, ``ValueError`` unless >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def grid_rank_lists(
    ranks: Sequence[int], ulysses_degree: int, ring_degree: int, ulysses_inner: bool = True
) -> tuple[list[list[int]], list[list[int]]]:
    """Split ``ranks`` into SP blocks of ``u*r`` consecutive ranks and each block into its groups.

    Returns ``(ulysses_groups, ring_groups)``, lists of rank lists in a deterministic order. With
    ``ulysses_inner`` the ``u`` adjacent ranks of a block form a Ulysses group (fast intra-node links);
    otherwise the ``r`` adjacent ranks form a ring group.
    """
    sp_size = ulysses_degree * ring_degree
    if len(ranks) % sp_size != 0:
        raise ValueError(
            f"world size {len(ranks)} is not a multiple of ulysses_degree x ring_degree = {ulysses_degree} x "
            f"{ring_degree} = {sp_size}: choose degrees whose product divides {len(ranks)}"
        )
    ulysses_groups, ring_groups = [], []
    for start in range(0, len(ranks), sp_size):
        block = list(ranks[start : start + sp_size])
        if ulysses_inner:
            ulysses_groups += [block[j * ulysses_degree : (j + 1) * ulysses_degree] for j in range(ring_degree)]
            ring_groups += [block[i::ulysses_degree] for i in range(ulysses_degree)]
        else:
            ring_groups += [block[i * ring_degree : (i + 1) * ring_degree] for i in range(ulysses_degree)]
            ulysses_groups += [block[j::ring_degree] for j in range(ring_degree)]
    return ulysses_groups, ring_groups


def init_groups(
    ulysses_degree: int,
    ring_degree: int,
    *,
    ulysses_inner: bool = True,
    group: Optional[dist.ProcessGroup] = None,
) -> USPGroups:
    """Create the Ulysses and ring groups for every SP block of ``group`` (default: the world).

    Collective: every rank of the default group calls it with the same arguments. The world (or ``group``)
    may hold several SP blocks of ``u*r`` consecutive ranks (data parallel beside sequence parallel).
    """
    check_degree("ulysses_degree", ulysses_degree)
    check_degree("ring_degree", ring_degree)
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    ulysses_lists, ring_lists = grid_rank_lists(ranks, ulysses_degree, ring_degree, ulysses_inner)
    me = dist.get_rank()
    ulysses_group = ring_group = None
    my_ulysses = my_ring = None
    for rank_list in ulysses_lists:
        pg = dist.new_group(rank_list)
        if me in rank_list:
            ulysses_group, my_ulysses = pg, rank_list
    for rank_list in ring_lists:
        pg = dist.new_group(rank_list)
        if me in rank_list:
            ring_group, my_ring = pg, rank_list
    if my_ulysses is None or my_ring is None:
        raise ValueError(f"rank {me} is not a member of the group passed to init_groups")
    return USPGroups(
        ulysses=ulysses_group,
        ring=ring_group,
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        ulysses_rank=my_ulysses.index(me),
        ring_rank=my_ring.index(me),
        ring_ranks=tuple(my_ring),
    )
