"""USPGroups: the Ulysses and ring process groups of this rank (passed explicitly, never global state)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from numbers import Real
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class USPGroups:
    """This rank's place on the ``ulysses_degree x ring_degree`` sequence-parallel grid.

    ``ulysses`` and ``ring`` are process groups of size ``ulysses_degree`` and ``ring_degree``;
    ``ring_ranks`` are the global ranks of the ring group in ring-rank order (for point-to-point sends).
    ``sp`` (optional) is the whole ``u x r`` group of this rank (Megatron's CP group): with it the per-call
    agreement check of ``usp_attn`` is one collective instead of two.
    """

    ulysses: Optional[dist.ProcessGroup]
    ring: Optional[dist.ProcessGroup]
    ulysses_degree: int
    ring_degree: int
    ulysses_rank: int
    ring_rank: int
    ring_ranks: tuple[int, ...]
    sp: Optional[dist.ProcessGroup] = None

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
    def from_groups(
        cls,
        ulysses: dist.ProcessGroup,
        ring: dist.ProcessGroup,
        *,
        sp: Optional[dist.ProcessGroup] = None,
        check: bool = True,
        check_group: Optional[dist.ProcessGroup] = None,
    ) -> "USPGroups":
        """Wrap existing groups (e.g. Megatron's hierarchical context-parallel groups); ``sp``: optionally the
        whole ``u x r`` group of this rank (Megatron's CP group), which must hold exactly the grid's ranks.

        With ``check`` (default) this is a collective over ``check_group`` (default: the world): every rank of it
        calls ``from_groups`` at the same point, and one ``all_gather_object`` of each rank's ``(ulysses ranks,
        ring ranks)`` lets every rank verify that the groups form ``u x r`` grids — same sizes everywhere, peers
        agree on their groups, a rank's ulysses and ring groups meet only in it, each SP block of ``u*r`` ranks is
        covered exactly once, ring peers share their ulysses rank and ulysses peers their ring rank (the layout
        needs both). Otherwise every rank raises the same ``ValueError`` (groups that do not form a grid compute
        garbage). ``check=False`` skips it (no communication).
        """
        groups = cls(
            ulysses=ulysses,
            ring=ring,
            ulysses_degree=dist.get_world_size(ulysses),
            ring_degree=dist.get_world_size(ring),
            ulysses_rank=dist.get_rank(ulysses),
            ring_rank=dist.get_rank(ring),
            ring_ranks=tuple(dist.get_process_group_ranks(ring)),
            sp=sp,
        )
        if check:
            sp_ranks = None if sp is None else tuple(sorted(dist.get_process_group_ranks(sp)))
            mine = (dist.get_rank(), tuple(dist.get_process_group_ranks(ulysses)), groups.ring_ranks, sp_ranks)
            table: list = [None] * dist.get_world_size(check_group)
            dist.all_gather_object(table, mine, group=check_group)
            problem = grid_problem(table)
            if problem is not None:
                raise ValueError(f"USPGroups.from_groups: the ulysses and ring groups do not form a ulysses x ring grid: "
                                 f"{problem}. Build them with megatron_usp.init_groups or groups.grid_rank_lists")
            if groups.ring_degree > 1 and dist.get_backend(ring) == "nccl":
                # NCCL wants every rank of a group in its first batched P2P call; ring-local documents post only
                # the sides that move something, so the ring's communicator is set up here, by all of it at once
                dist.barrier(group=ring)
        return groups


def grid_problem(table: Sequence[tuple]) -> Optional[str]:
    """What is wrong with every rank's ``(global rank, ulysses ranks, ring ranks[, sp ranks or None])`` as a set of
    u x r grids, or None. Deterministic (ranks in order), so every rank holding the same table reports the same."""
    entries = {row[0]: (tuple(row[1]), tuple(row[2])) for row in sorted(table)}
    sp_of = {row[0]: (row[3] if len(row) > 3 else None) for row in table}
    ranks = sorted(entries)
    u, r = len(entries[ranks[0]][0]), len(entries[ranks[0]][1])
    for rank in ranks:
        ulysses, ring = entries[rank]
        if len(ulysses) != u or len(ring) != r:
            return (f"rank {rank} has a ulysses group of {len(ulysses)} and a ring group of {len(ring)} ranks, rank "
                    f"{ranks[0]} has {u} and {r}: every rank needs the same degrees")
        if set(ulysses) & set(ring) != {rank}:
            return (f"rank {rank}'s ulysses group {list(ulysses)} and ring group {list(ring)} must share exactly "
                    f"rank {rank}, they share {sorted(set(ulysses) & set(ring))}")
        for kind, index, members in (("ulysses", 0, ulysses), ("ring", 1, ring)):
            for peer in members:
                if peer not in entries:
                    return f"rank {rank}'s {kind} group {list(members)} holds rank {peer}, which took no part"
                if entries[peer][index] != members:
                    return (f"rank {rank}'s {kind} group is {list(members)} but its member rank {peer} has "
                            f"{list(entries[peer][index])}")
    for rank in ranks:
        ulysses, ring = entries[rank]
        ulysses_rank, ring_rank = ulysses.index(rank), ring.index(rank)
        for peer in ring:
            if entries[peer][0].index(peer) != ulysses_rank:
                return (f"ring group {list(ring)} mixes ulysses ranks: rank {rank} is ulysses rank {ulysses_rank}, "
                        f"rank {peer} is ulysses rank {entries[peer][0].index(peer)} (a ring must join ranks that "
                        "hold the same heads)")
        for peer in ulysses:
            if entries[peer][1].index(peer) != ring_rank:
                return (f"ulysses group {list(ulysses)} mixes ring ranks: rank {rank} is ring rank {ring_rank}, rank "
                        f"{peer} is ring rank {entries[peer][1].index(peer)}")
        block = {member for peer in ulysses for member in entries[peer][1]}
        if len(block) != u * r:
            return (f"the ring groups of rank {rank}'s ulysses group {list(ulysses)} cover {len(block)} ranks, a "
                    f"{u} x {r} SP block needs {u * r} distinct ranks")
        if sp_of[rank] is not None and set(sp_of[rank]) != block:
            return f"rank {rank}'s sp group {list(sp_of[rank])} is not its grid {sorted(block)}"
    return None


TimeoutLike = Union[timedelta, Real, None]


def group_timeout(group: Optional[dist.ProcessGroup] = None) -> Optional[timedelta]:
    """The timeout the collectives of ``group`` (default: the default group, i.e. what the caller gave
    ``init_process_group``) wait for, read from its backend's options; None where torch does not expose it."""
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        devices = list(getattr(pg, "_device_types", None) or [torch.device("cpu")])
    except Exception:  # private API moved: fall back to torch's default
        return None
    for device in devices:
        try:
            backend = pg._get_backend(device)
        except Exception:
            continue
        timeout = getattr(getattr(backend, "options", None), "_timeout", None)
        if isinstance(timeout, timedelta):
            return timeout
    return None


def check_timeout(timeout: TimeoutLike) -> Optional[timedelta]:
    """``timedelta``, seconds (a positive number) or None -> ``timedelta`` or None."""
    if timeout is None or isinstance(timeout, timedelta):
        if timeout is not None and timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, Real) or not timeout > 0:
        raise ValueError(f"timeout must be a datetime.timedelta or a positive number of seconds, got {timeout!r}")
    return timedelta(seconds=float(timeout))


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
    timeout: TimeoutLike = None,
) -> USPGroups:
    """Create the Ulysses and ring groups for every SP block of ``group`` (default: the world).

    Collective: every rank of the default group calls it with the same arguments. The world (or ``group``)
    may hold several SP blocks of ``u*r`` consecutive ranks (data parallel beside sequence parallel).
    ``timeout`` (``timedelta`` or seconds): how long a collective on the new groups waits before it fails (a rank
    that never joins, ranks that disagree); default: the timeout of ``group``, else of the default group (what
    was given to ``init_process_group``), not torch's default for new groups (30 minutes on gloo).
    """
    check_degree("ulysses_degree", ulysses_degree)
    check_degree("ring_degree", ring_degree)
    timeout = check_timeout(timeout)
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    if timeout is None:
        timeout = group_timeout(group) or (group_timeout() if group is not None else None)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    ulysses_lists, ring_lists = grid_rank_lists(ranks, ulysses_degree, ring_degree, ulysses_inner)
    me = dist.get_rank()
    ulysses_group = ring_group = sp_group = None
    my_ulysses = my_ring = None
    for rank_list in ulysses_lists:
        pg = dist.new_group(rank_list, timeout=timeout)
        if me in rank_list:
            ulysses_group, my_ulysses = pg, rank_list
    for rank_list in ring_lists:
        pg = dist.new_group(rank_list, timeout=timeout)
        if me in rank_list:
            ring_group, my_ring = pg, rank_list
    sp_size = ulysses_degree * ring_degree
    if ulysses_degree > 1 and ring_degree > 1:  # else the one nontrivial group is the SP group
        for start in range(0, len(ranks), sp_size):
            pg = dist.new_group(ranks[start : start + sp_size], timeout=timeout)
            sp_group = pg if me in ranks[start : start + sp_size] else sp_group
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
        sp=sp_group if sp_group is not None else (ulysses_group if ring_degree == 1 else ring_group),
    )
