"""One attention plan: everything a ring rank needs to run one call shape, derived once and cached.

A plan is keyed by (sequence length, u, r, ring rank, ring_impl, causal, micro_q, cu_seqlens) and holds the
permutation that sorts the Ulysses-gathered tokens into the ring-level layout, the ring-level positions of every
ring rank, and the schedule of the impl's transport (``layout.RING_IMPL_TABLE``): a :class:`.ring.RingSchedule`
for pass-K/V and all-gather, an :class:`.mqsp.MQSPPlan` for pass-Q. :func:`.usp.attend` validates, takes the plan,
runs the all-to-all, the schedule and the inverse all-to-all; masks, simulation and the planner read the same
plan. Masks are not part of the key: they are evaluated per call on the plan's positions (:mod:`.masks`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .caching import layout_cache, plain_tensors
from .layout import RingImpl, check_ring_impl, gathered_order
from .mqsp import MQSPPlan
from .ring import RingSchedule, build_schedule


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    impl: RingImpl
    seq_len: int
    ulysses_degree: int
    ring_degree: int
    ring_rank: int
    causal: bool
    order: torch.Tensor  # gathered[:, order] is in the ring-level layout; argsort(order) undoes it
    positions: tuple[torch.Tensor, ...]  # sorted global positions of every ring rank's rows
    schedule: Optional[RingSchedule] = None  # pass_kv / allgather
    mqsp: Optional[MQSPPlan] = None  # pass_q
    _orders: dict = field(default_factory=dict, repr=False)

    @property
    def q_positions(self) -> torch.Tensor:
        """Global positions of this ring rank's rows after the all-to-all."""
        return self.positions[self.ring_rank]

    def order_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`order` on ``device`` (copied once per device)."""
        if device not in self._orders:
            with plain_tensors():
                self._orders[device] = self.order.to(device)
        return self._orders[device]


@layout_cache
def attention_plan(seq_len: int, ulysses_degree: int, ring_degree: int, ring_rank: int, ring_impl: str,
                   causal: bool, micro_q: Optional[int], cu_seqlens: Optional[tuple[int, ...]],
                   document_layout: str = "local") -> AttentionPlan:
    """The cached plan of one call shape (``cu_seqlens``: validated offsets, or None; ``micro_q`` only matters for
    pass-Q impls, ``document_layout`` only with ``cu_seqlens``)."""
    impl = check_ring_impl(ring_impl)
    grid = (seq_len, ulysses_degree, ring_degree, ring_rank)
    order = gathered_order(*grid, ring_impl, cu_seqlens=cu_seqlens, document_layout=document_layout)
    if impl.transport == "pass_q":
        mqsp = MQSPPlan(*grid, causal, micro_q, cu_seqlens)
        return AttentionPlan(impl, *grid, causal, order, tuple(mqsp.positions), mqsp=mqsp)
    schedule = build_schedule(ring_impl, *grid, causal, cu_seqlens, document_layout)
    return AttentionPlan(impl, *grid, causal, order, schedule.positions, schedule=schedule)
