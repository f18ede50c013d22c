"""Layout and schedules, checked exhaustively without processes."""
from __future__ import annotations

import pytest
import torch

import megatron_usp as usp
from megatron_usp.groups import USPGroups, grid_rank_lists
from megatron_usp.layout import check_seq_len, gathered_order, global_positions, ring_positions
from megatron_usp.layout import RING_SCHEDULE_IMPLS
from megatron_usp.ring import build_schedule

GRIDS = [(1, 1), (1, 2), (2, 1), (1, 4), (2, 2), (4, 1), (2, 4), (4, 2), (3, 2)]


def fake_groups(u, r, ulysses_rank, ring_rank) -> USPGroups:
    return USPGroups(None, None, u, r, ulysses_rank, ring_rank, tuple(range(r)))


@pytest.mark.parametrize("impl", usp.RING_IMPLS)
@pytest.mark.parametrize("grid", GRIDS)
def test_positions_partition_the_sequence(grid, impl):
    u, r = grid
    seq_len = 2 * u * r * 3
    held = [global_positions(seq_len, u, r, i, j, impl) for j in range(r) for i in range(u)]
    assert all(len(p) == seq_len // (u * r) for p in held)
    assert torch.equal(torch.sort(torch.cat(held)).values, torch.arange(seq_len))


@pytest.mark.parametrize("impl", usp.RING_IMPLS)
@pytest.mark.parametrize("grid", GRIDS)
def test_shard_agrees_with_positions(grid, impl):
    u, r = grid
    x = torch.randn(2, 4 * u * r, 3)
    for j in range(r):
        for i in range(u):
            groups = fake_groups(u, r, i, j)
            pos = usp.positions(x.shape[1], groups, ring_impl=impl)
            assert torch.equal(usp.shard(x, groups, ring_impl=impl), x[:, pos])
            assert torch.equal(usp.shard(x.transpose(0, 1), groups, dim=0, ring_impl=impl), x[:, pos].transpose(0, 1))


def megatron_cp_slice(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """Megatron's get_batch_on_this_cp_rank: 2*cp chunks, rank i keeps chunks i and 2*cp-1-i."""
    x = x.view(*x.shape[:dim], 2 * cp_size, x.shape[dim] // (2 * cp_size), *x.shape[dim + 1 :])
    index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1])
    x = x.index_select(dim, index)
    return x.view(*x.shape[:dim], -1, *x.shape[dim + 2 :])


@pytest.mark.parametrize("grid", GRIDS)
def test_zigzag_with_ulysses_inner_is_megatrons_cp_layout(grid):
    u, r = grid
    x = torch.randn(2, 2 * u * r * 5, 3)
    for j in range(r):
        for i in range(u):
            cp_rank = j * u + i  # Megatron's CP rank with the ulysses (level-0) group inner
            groups = fake_groups(u, r, i, j)
            assert torch.equal(usp.shard(x, groups, ring_impl="zigzag"), megatron_cp_slice(x, u * r, cp_rank))


@pytest.mark.parametrize("impl", usp.RING_IMPLS)
@pytest.mark.parametrize("grid", GRIDS)
def test_ulysses_gather_then_order_gives_ring_layout(grid, impl):
    u, r = grid
    seq_len = 2 * u * r * 2
    for j in range(r):
        gathered = torch.cat([global_positions(seq_len, u, r, i, j, impl) for i in range(u)])
        in_ring_layout = gathered[gathered_order(seq_len, u, r, j, impl)]
        assert torch.equal(in_ring_layout, ring_positions(seq_len, u, r, j, impl))
        n = seq_len // r
        if impl == "basic":
            assert torch.equal(in_ring_layout, torch.arange(j * n, (j + 1) * n))
        elif impl == "stripe":
            assert torch.equal(in_ring_layout, torch.arange(j, seq_len, r))
        else:
            c = n // 2
            expected = torch.cat([torch.arange(j * c, (j + 1) * c), torch.arange((2 * r - 1 - j) * c, (2 * r - j) * c)])
            assert torch.equal(in_ring_layout, expected)


def schedule_mask(impl, seq_len, u, r, j, causal):
    """Dense [n, seq_len] mask of (q row, global kv position) pairs the schedule computes, counting repeats."""
    schedule = build_schedule(impl, seq_len, u, r, j, causal)
    n = seq_len // r
    counts = torch.zeros(n, seq_len, dtype=torch.long)
    for step in schedule.steps:
        kv_pos = schedule.kv_positions(step)
        for block in step.blocks:
            rows, cols = block.q_stop - block.q_start, block.kv_stop - block.kv_start
            assert not block.causal or rows == cols, "causal blocks must be square"
            visible = torch.ones(rows, cols, dtype=torch.long)
            if block.causal:
                visible = visible.tril()
            counts[block.q_start : block.q_stop].index_add_(1, kv_pos[block.kv_start : block.kv_stop], visible)
    return counts


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", RING_SCHEDULE_IMPLS)
@pytest.mark.parametrize("grid", GRIDS)
def test_schedule_covers_exactly_the_mask(grid, impl, causal):
    u, r = grid
    seq_len = 2 * u * r * 3
    for j in range(r):
        q_pos = ring_positions(seq_len, u, r, j, impl)
        expected = torch.ones(len(q_pos), seq_len, dtype=torch.long)
        if causal:
            expected = (torch.arange(seq_len)[None, :] <= q_pos[:, None]).long()
        assert torch.equal(schedule_mask(impl, seq_len, u, r, j, causal), expected), (impl, j)


@pytest.mark.parametrize("impl", ["zigzag", "allgather"])
def test_zigzag_causal_work_is_balanced(impl):
    r, seq_len = 4, 64
    work = [int(schedule_mask(impl, seq_len, 1, r, j, True).sum()) for j in range(r)]
    assert max(work) == min(work)


def test_pass_kv_schedule_degenerates_without_ring():
    schedule = build_schedule("zigzag", 16, 4, 1, 0, True)
    assert schedule.transport == "pass_kv" and len(schedule.steps) == 1
    assert build_schedule("allgather", 16, 2, 1, 0, True).transport == "pass_kv"


def test_grid_rank_lists_both_orders_and_dp_blocks():
    ulysses, ring = grid_rank_lists(list(range(8)), 2, 2, ulysses_inner=True)
    assert ulysses == [[0, 1], [2, 3], [4, 5], [6, 7]] and ring == [[0, 2], [1, 3], [4, 6], [5, 7]]
    ulysses, ring = grid_rank_lists(list(range(8)), 2, 2, ulysses_inner=False)
    assert ring == [[0, 1], [2, 3], [4, 5], [6, 7]] and ulysses == [[0, 2], [1, 3], [4, 6], [5, 7]]
    with pytest.raises(ValueError, match="not a multiple"):
        grid_rank_lists(list(range(6)), 2, 2)


@pytest.mark.parametrize("seq_len", [0, 7, 12])
def test_indivisible_lengths_name_the_fix(seq_len):
    with pytest.raises(ValueError, match="multiple of 2 x ulysses_degree x ring_degree = 8"):
        check_seq_len(seq_len, 2, 2, "zigzag")
