"""The USP grid beside TP/PP/DP: megatron-core's context-parallel group split into ulysses x ring.

Megatron keeps one global registry of process groups (``parallel_state``); this module is its USP twin, set by
:func:`initialize_model_parallel` and reset by :func:`destroy_model_parallel`. The engine itself never reads it:
``USPAttention`` and the batch hook fetch the groups here and pass them explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state

from ..groups import USPGroups, check_degree, grid_rank_lists, group_timeout
from ..kernels import check_backend_name
from ..layout import check_ring_impl
from ..mqsp import check_micro_q


@dataclass(frozen=True)
class USPState:
    groups: USPGroups
    ring_impl: str
    backend: str
    micro_q: Optional[int] = None
    check_every: Optional[int] = None


_STATE: Optional[USPState] = None


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
    **kwargs,
) -> USPGroups:
    """``parallel_state.initialize_model_parallel`` with ``context_parallel_size = u*r``, plus this rank's
    :class:`USPGroups`. The CP group stays the whole SP group (data slicing, RoPE, dp x cp reductions use it).
    ``micro_q``: query rows per MQSP micro-chunk (``ring_impl="mqsp"``). ``usp_check`` (``--usp-check``): None =
    off, 0 = USPAttention checks each layer's first call (:func:`megatron_usp.check.verify_usp_attn`), N = that and
    every N-th call. Extra ``kwargs`` go to megatron-core
    unchanged."""
    global _STATE
    check_ring_impl(ring_impl)
    check_backend_name(attn_backend)
    check_degree("ulysses_degree", ulysses_degree)
    check_degree("ring_degree", ring_degree)
    check_micro_q(micro_q)
    if usp_check is not None and (isinstance(usp_check, bool) or not isinstance(usp_check, int) or usp_check < 0):
        raise ValueError(f"usp_check must be None (off), 0 (first call of each layer) or N >= 1, got {usp_check!r}")
    if kwargs.get("context_parallel_size", ulysses_degree * ring_degree) != ulysses_degree * ring_degree:
        raise ValueError(
            f"context_parallel_size={kwargs['context_parallel_size']} conflicts with ulysses_degree x ring_degree = "
            f"{ulysses_degree * ring_degree}: drop context_parallel_size, USP sets it"
        )
    kwargs.pop("context_parallel_size", None)
    sp_size = ulysses_degree * ring_degree
    hierarchical = [ulysses_degree, ring_degree] if ulysses_inner and sp_size > 1 else None
    parallel_state.initialize_model_parallel(
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
    _STATE = USPState(groups, ring_impl, attn_backend, micro_q, usp_check)
    from .batch import install_rope_hook  # RoPE must follow the USP layout for every ring_impl

    install_rope_hook()
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


def destroy_model_parallel() -> None:
    """Reset megatron-core's groups and ours (and the documents of the last batch)."""
    global _STATE
    from .documents import set_current

    _STATE = None
    set_current(None)
    parallel_state.destroy_model_parallel()


def usp_is_initialized() -> bool:
    return _STATE is not None


def _state() -> USPState:
    if _STATE is None:
        raise RuntimeError(
            "USP is not initialized: call megatron_usp.megatron.initialize_model_parallel(..., ulysses_degree=..., "
            "ring_degree=...) instead of parallel_state.initialize_model_parallel"
        )
    return _STATE


def get_usp_groups() -> USPGroups:
    return _state().groups


def get_usp_ring_impl() -> str:
    return _state().ring_impl


def get_usp_attn_backend() -> str:
    return _state().backend


def get_usp_micro_q() -> Optional[int]:
    return _state().micro_q


def get_usp_check() -> Optional[int]:
    """``--usp-check``: None (off, also before :func:`initialize_model_parallel`: an opt-in check), 0 (each layer's
    first call) or N (and every N-th call)."""
    return None if _STATE is None else _STATE.check_every
