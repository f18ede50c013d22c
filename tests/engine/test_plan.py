"""The one attention plan (megatron_usp/plan.py) and the ring_impl table it reads (layout.RING_IMPL_TABLE)."""
from __future__ import annotations

import pytest
import torch

from megatron_usp import layout
from megatron_usp.layout import RING_IMPL_TABLE, RingImpl, gathered_order, global_positions, ring_positions
from megatron_usp.plan import attention_plan
from megatron_usp.ring import build_schedule

CU = (0, 7, 20, 21, 48)


@pytest.mark.parametrize("impl", list(RING_IMPL_TABLE))
@pytest.mark.parametrize("cu_seqlens", [None, CU], ids=["rows", "documents"])
@pytest.mark.parametrize("grid", [(1, 4), (2, 2), (3, 1)], ids=lambda g: f"u{g[0]}r{g[1]}")
def test_plan_holds_the_layout_and_the_schedule_of_its_transport(impl, cu_seqlens, grid):
    u, r = grid
    seq_len = 48
    for ring_rank in range(r):
        plan = attention_plan(seq_len, u, r, ring_rank, impl, True, None, cu_seqlens)
        assert plan is attention_plan(seq_len, u, r, ring_rank, impl, True, None, cu_seqlens)  # cached
        for rank in range(r):
            assert torch.equal(plan.positions[rank], ring_positions(seq_len, u, r, rank, impl, cu_seqlens=cu_seqlens))
        gathered = torch.cat([global_positions(seq_len, u, r, ulysses_rank, ring_rank, impl, cu_seqlens=cu_seqlens)
                              for ulysses_rank in range(u)])
        assert torch.equal(gathered[plan.order], plan.q_positions)
        assert torch.equal(plan.order, gathered_order(seq_len, u, r, ring_rank, impl, cu_seqlens=cu_seqlens))
        pass_q = RING_IMPL_TABLE[impl].transport == "pass_q"
        assert (plan.mqsp is not None) == pass_q and (plan.schedule is not None) != pass_q
        if plan.schedule is not None:  # a step sees one ring rank's rows, or one half of every rank's; with
            travel = plan.schedule.travel  # ring-local documents a later step only the cut documents' rows
            for index, step in enumerate(plan.schedule.steps):
                rows = seq_len // 2 if step.gathered_half is not None else seq_len // r
                if travel is not None and index > 0:
                    rows = len(travel[step.kv_rank])
                assert len(plan.schedule.kv_positions(step)) == rows


def test_a_new_ring_impl_is_one_table_row(monkeypatch):
    """A row that reuses a layout and a transport needs nothing else: its layout, granularity, document cut and
    schedule come from the row (here a copy of zigzag under another name)."""
    monkeypatch.setitem(RING_IMPL_TABLE, "zigzag_copy", RingImpl("zigzag_copy", "zigzag", "pass_kv"))
    assert layout.layout_granularity(2, 2, "zigzag_copy") == 8 and layout.document_parts("zigzag_copy", 4) == 8
    for ring_rank in range(4):
        for cu in (None, CU):
            copy = build_schedule("zigzag_copy", 48, 1, 4, ring_rank, True, cu)
            zigzag = build_schedule("zigzag", 48, 1, 4, ring_rank, True, cu)
            assert [s.blocks for s in copy.steps] == [s.blocks for s in zigzag.steps]
            assert all(torch.equal(a, b) for a, b in zip(copy.positions, zigzag.positions))


def test_the_table_names_every_impl_once():
    assert layout.RING_IMPLS == ("basic", "zigzag", "stripe", "allgather", "mqsp")
    assert {impl.transport for impl in RING_IMPL_TABLE.values()} == {"pass_kv", "allgather", "pass_q"}
    assert layout.ZIGZAG_LAYOUT_IMPLS == ("zigzag", "allgather", "mqsp")
    assert layout.RING_SCHEDULE_IMPLS == ("basic", "zigzag", "stripe", "allgather")
