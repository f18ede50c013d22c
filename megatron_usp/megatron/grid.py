"""The USP grid beside TP/PP/DP: megatron-core's context-parallel group split into ulysses x ring.

Megatron keeps one global registry of process groups (``parallel_state``); :mod:`.state` is its USP twin, set by
:func:`initialize_model_parallel` (the one place that validates the USP settings of the megatron-core path) and
reset by :func:`destroy_model_parallel`. The engine itself never reads it: ``USPAttention`` and the batch hook
fetch the groups there and pass them explicitly; ``USPAttention`` takes them through :func:`usp_groups_for`, which
checks them against the CP group megatron-core hands the layer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state

from ..config import USPConfig
from ..groups import USPGroups, grid_rank_lists, group_timeout
from ..patching import original_of
from .rope import install_rope_hook
from .state import (  # noqa: F401  (the grid's getters: megatron_usp.megatron and megatron_lm read them here)
    USPState,
    get_usp_attn_backend,
    get_usp_check,
    get_usp_groups,
    get_usp_micro_q,
    get_usp_ring_impl,
    set_state,
    usp_is_initialized,
    usp_state,
)


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    ring_impl: str = "zigzag",
    ulysses_inner: bool = True,
    attn_backend: str = "auto",
    micro_q: Optional[int] = None,
    usp_check: Optional[int] = None,
    document_layout: str = "local",
    config: Optional[USPConfig] = None,
    **kwargs,
) -> USPGroups:
    """``parallel_state.initialize_model_parallel`` with ``context_parallel_size = u*r``, plus this rank's
    :class:`USPGroups`. The CP group stays the whole SP group (data slicing, RoPE, dp x cp reductions use it).
    ``micro_q``: query rows per MQSP micro-chunk (``ring_impl="mqsp"``). ``usp_check`` (``--usp-check``): None =
    off, 0 = USPAttention checks each layer's first call (:func:`megatron_usp.check.verify_usp_attn`), N = that and
    every N-th call. ``document_layout`` of packed documents: ``local`` or ``split`` (:mod:`megatron_usp.layout`).
    Or ``config``: a :class:`USPConfig` (e.g. ``USPConfig.from_args(args)``) instead of those
    keywords. Extra ``kwargs`` go to megatron-core unchanged."""
    keywords = USPConfig(ulysses_degree, ring_degree, ring_impl, attn_backend, micro_q, ulysses_inner, usp_check,
                         document_layout)
    if config is not None and keywords != USPConfig():
        raise ValueError("initialize_model_parallel takes the USP settings as config=USPConfig(...) or as keywords, "
                         "not both")
    config = keywords if config is None else config  # validated once (USPConfig), for every layer of the grid
    ulysses_degree, ring_degree, ulysses_inner = config.ulysses_degree, config.ring_degree, config.ulysses_inner
    if kwargs.get("context_parallel_size", ulysses_degree * ring_degree) != ulysses_degree * ring_degree:
        raise ValueError(
            f"context_parallel_size={kwargs['context_parallel_size']} conflicts with ulysses_degree x ring_degree = "
            f"{ulysses_degree * ring_degree}: drop context_parallel_size, USP sets it"
        )
    kwargs.pop("context_parallel_size", None)
    sp_size = ulysses_degree * ring_degree
    hierarchical = [ulysses_degree, ring_degree] if ulysses_inner and sp_size > 1 else None
    # megatron-core's own function, not Megatron-LM's hook around it (megatron_lm.py), which would land here again
    original_of(parallel_state.initialize_model_parallel)(
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        context_parallel_size=sp_size,
        hierarchical_context_parallel_sizes=hierarchical,
        **kwargs,
    )
    if sp_size == 1:
        groups = USPGroups.single()
    elif ulysses_inner:
        ulysses, ring = parallel_state.get_hierarchical_context_parallel_groups()
        groups = USPGroups.from_groups(ulysses, ring, sp=parallel_state.get_context_parallel_group())
    else:
        groups = _ring_inner_groups(ulysses_degree, ring_degree)
    hybrid = _hybrid_grids(config) if kwargs.get("hybrid_context_parallel") else {}
    set_state(USPState(groups, config, hybrid=hybrid))
    install_rope_hook()  # RoPE must follow the USP layout for every ring_impl
    return groups


def _ring_inner_groups(ulysses_degree: int, ring_degree: int) -> USPGroups:
    """Ring-inner groups inside every CP group; every rank creates every group in the same order, with the
    timeout megatron-core gave its CP group (``distributed_timeout_minutes``), not torch's default."""
    cp_ranks = parallel_state.get_context_parallel_global_ranks()
    timeout = group_timeout(parallel_state.get_context_parallel_group()) or group_timeout()
    every_cp_group: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_cp_group, tuple(cp_ranks))
    me = dist.get_rank()
    ulysses_group = ring_group = None
    for ranks in sorted(set(every_cp_group)):
        ulysses_lists, ring_lists = grid_rank_lists(list(ranks), ulysses_degree, ring_degree, ulysses_inner=False)
        for rank_list in ulysses_lists:
            group = dist.new_group(rank_list, timeout=timeout)
            ulysses_group = group if me in rank_list else ulysses_group
        for rank_list in ring_lists:
            group = dist.new_group(rank_list, timeout=timeout)
            ring_group = group if me in rank_list else ring_group
    return USPGroups.from_groups(ulysses_group, ring_group, sp=parallel_state.get_context_parallel_group())


def hybrid_degrees(config: USPConfig, size: int) -> tuple[int, int]:
    """The (ulysses, ring) degrees USP runs on a hybrid CP group of ``size`` ranks: Ulysses inner, as many as the
    grid's ``ulysses_degree`` and ``size`` share (the heads allow the grid's, so they allow a divisor of it), the
    rest a ring."""
    ulysses = math.gcd(config.ulysses_degree, size)
    return ulysses, size // ulysses


def _hybrid_grids(config: USPConfig) -> dict:
    """A ulysses x ring grid in every hybrid DP x CP group megatron-core made (``hybrid_context_parallel``: blocks of
    2, 4, ... consecutive ranks of each DP x CP group, and the whole group), keyed by its sorted ranks; every rank
    creates every group in the same order. Returns this rank's grids."""
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    timeout = group_timeout(dp_cp) or group_timeout()
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, tuple(dist.get_process_group_ranks(dp_cp)))
    me, mine = dist.get_rank(), {}
    for ranks in sorted(set(every)):
        sizes = [2 ** i for i in range(1, int(math.log2(len(ranks))))] + [len(ranks)]  # as megatron-core's
        for size in sizes:
            ulysses_degree, ring_degree = hybrid_degrees(config, size)
            for start in range(0, len(ranks), size):
                block = list(ranks[start:start + size])
                ulysses_lists, ring_lists = grid_rank_lists(block, ulysses_degree, ring_degree,
                                                            ulysses_inner=True)
                found = {}
                for kind, lists in (("ulysses", ulysses_lists), ("ring", ring_lists)):
                    for rank_list in lists:
                        group = dist.new_group(rank_list, timeout=timeout)
                        if me in rank_list:
                            found[kind] = group
                if me in block:
                    sp = parallel_state.get_hybrid_data_context_parallel_groups(group_size=size)
                    mine[tuple(sorted(block))] = USPGroups.from_groups(found["ulysses"], found["ring"], sp=sp,
                                                                        check=False)
    return mine


def usp_groups_of_cp_group(cp_group) -> USPGroups:
    """The :class:`USPGroups` that run attention over ``cp_group``: the grid's for its CP group (or None), a single
    rank for a group of one, else the sub-grid of that hybrid CP group (``hybrid_context_parallel``). ValueError
    for any other group: USP cannot place tokens over ranks it has no grid for."""
    groups = get_usp_groups()
    if cp_group is None or cp_group.size() == 1 and groups.sp_size == 1:
        return groups
    if cp_group.size() == 1:
        return USPGroups.single()
    ranks = _ranks(cp_group)
    if groups.sp is not None and ranks == _ranks(groups.sp):
        return groups
    hybrid = usp_state().hybrid.get(ranks)
    if hybrid is None:
        raise ValueError(f"the CP group of ranks {list(ranks)} is neither the USP grid's sequence-parallel group nor "
                         "a hybrid CP group it has a sub-grid for: build the model after "
                         "megatron_usp.megatron.initialize_model_parallel (with hybrid_context_parallel=True for "
                         "megatron-core's hybrid CP groups)")
    return hybrid


def destroy_model_parallel() -> None:
    """Reset megatron-core's groups and ours (with the grid's batch records)."""
    set_state(None)
    parallel_state.destroy_model_parallel()


def usp_groups_for(pg_collection=None) -> USPGroups:
    """The grid's :class:`USPGroups` for a core attention that megatron-core built with ``pg_collection``
    (``model_comm_pgs`` before 0.15): its ``cp`` group must hold exactly the ranks of the grid's SP group, which the
    grid splits into ulysses x ring. Without a collection (or one without ``cp``), the grid's groups. Local (no
    collective): a ValueError names the mismatch and the fix before the layer ever communicates.

    The collection's hierarchical CP groups (``hcp``) are not read: megatron-core uses them only for
    ``cp_comm_type="a2a+p2p"``, which USP refuses, and ``parallel_state.destroy_model_parallel`` leaves them set, so
    after a re-initialization they can be those of an earlier grid."""
    groups = get_usp_groups()
    cp = None if pg_collection is None else getattr(pg_collection, "cp", None)
    if cp is None:
        return groups
    if groups.sp is not None:
        sp_ranks = _ranks(groups.sp)
    else:  # a 1 x 1 grid: this rank alone
        sp_ranks = (dist.get_rank(),) if groups.sp_size == 1 else None
    cp_ranks = _ranks(cp)
    if len(cp_ranks) != groups.sp_size or (sp_ranks is not None and cp_ranks != sp_ranks):
        grid = f"ulysses {groups.ulysses_degree} x ring {groups.ring_degree} = {groups.sp_size} ranks"
        raise ValueError(
            f"pg_collection.cp (ranks {list(cp_ranks)}) is not the USP grid's sequence-parallel group ({grid}"
            f"{'' if sp_ranks is None else f': {list(sp_ranks)}'}): USPAttention splits the CP group megatron-core "
            "hands it by the grid of megatron_usp.megatron.initialize_model_parallel; build the model after it "
            "with that CP group (parallel_state.get_context_parallel_group(), as "
            "ProcessGroupCollection.use_mpu_process_groups() does)"
        )
    return groups


def _ranks(group) -> tuple[int, ...]:
    return tuple(sorted(dist.get_process_group_ranks(group)))
