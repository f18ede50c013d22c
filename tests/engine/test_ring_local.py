"""Ring-local documents (``document_layout="local"``): documents whole on one ring rank where they fit, only the cut
ones travel, every rank holds S / P tokens, the ring stays balanced, and the bytes sent are the analytic count.
Exactness against the float64 reference is tests/engine/test_documents.py (every grid, both layouts)."""
from __future__ import annotations

import statistics

import pytest
import torch

from megatron_usp.cost import analytic_bytes_per_rank, block_pairs, document_pairs, document_work, piece_work
from megatron_usp.document_mixes import packed_rows
from megatron_usp.layout import ring_documents_of, ring_positions
from megatron_usp.plan import attention_plan
from megatron_usp import ring_local
from megatron_usp.ring_local import ring_documents

IMPLS = ["basic", "zigzag", "stripe"]


def documents_of(cu: tuple[int, ...]) -> torch.Tensor:
    return torch.searchsorted(torch.tensor(cu[1:-1]), torch.arange(cu[-1]), right=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ulysses_degree,ring_degree", [(1, 2), (2, 2), (1, 4), (2, 4)])
def test_local_documents_stay_on_their_ring_rank_and_only_cut_ones_travel(impl, ulysses_degree, ring_degree):
    seq_len = 64 * ulysses_degree * ring_degree
    capacity = seq_len // ring_degree
    rows = {"mixed": (0, 3, 10, 11, 20, 30 + capacity, seq_len - 7, seq_len),  # one longer than a ring rank
            "every_local": tuple(range(0, seq_len + 1, capacity)),
            "one_document": (0, seq_len)}
    for name, cu in rows.items():
        layout = ring_documents_of(cu, ring_degree, impl)
        ids = documents_of(cu)
        held = [ring_positions(seq_len, ulysses_degree, ring_degree, j, impl, cu_seqlens=cu) for j in range(ring_degree)]
        assert all(len(h) == capacity for h in held)
        for document, owner in enumerate(layout.owner):
            if owner >= 0 and cu[document + 1] > cu[document]:
                assert int((ids[held[owner]] == document).sum()) == cu[document + 1] - cu[document], (name, document)
        cut = torch.tensor([o < 0 for o in layout.owner])
        schedule = attention_plan(seq_len, ulysses_degree, ring_degree, 0, impl, True, None, cu).schedule
        for j in range(ring_degree):
            assert torch.equal(held[j][schedule.travel[j]], held[j][cut[ids[held[j]]]]), name
            assert len(schedule.travel[j]) == layout.cut_tokens[j]
        if name == "every_local":
            assert layout.cut_documents == 0 and all(len(t) == 0 for t in schedule.travel)
            assert all(not step.blocks for step in schedule.steps[1:])  # nothing arrives, nothing to compute
        if name == "one_document":
            assert layout.owner == (-1,) and all(len(t) == capacity for t in schedule.travel)
    assert ring_documents_of(rows["mixed"], ring_degree, impl).owner[:2] != (-1, -1)  # short ones stay local


def step_synchronous_cost(seq_len: int, ring_degree: int, cu: tuple[int, ...], pieces: bool) -> float:
    """Sum over ring steps of the busiest rank's work, over the ideal (monolithic work / r): computed pairs, and
    with ``pieces`` each kernel piece's fixed cost too (``cost.piece_work``: what the executor's time follows)."""
    steps = [attention_plan(seq_len, 1, ring_degree, j, "zigzag", True, None, cu).schedule.steps
             for j in range(ring_degree)]
    computed = [[sum(block_pairs(b.q_stop - b.q_start, b.kv_stop - b.kv_start, b.causal) for b in step.blocks)
                 for step in rank_steps] for rank_steps in steps]
    assert sum(map(sum, computed)) == document_pairs(cu)  # exactly the visible pairs, each once
    if pieces:
        computed = [[piece_work(step.blocks) for step in rank_steps] for rank_steps in steps]
    total = document_work(cu) if pieces else document_pairs(cu)
    return sum(max(computed[j][s] for j in range(ring_degree)) for s in range(ring_degree)) / (total / ring_degree)


@pytest.mark.parametrize("mix", ["dcp", "lognormal", "stdlib"])
def test_ring_local_layout_keeps_the_ring_balanced(mix):
    """The slowest rank's pairs, step by step as the executor runs them, stay within 5 % of the ideal (median over
    rows) and 10 % (worst), at 2,048 tokens per rank on 4 ring ranks."""
    ring_degree = 4
    seq_len = 2048 * ring_degree
    costs = []
    for cu in packed_rows(mix, seq_len, 6, 0):
        ring_local.clear_caches()
        costs.append(step_synchronous_cost(seq_len, ring_degree, cu, pieces=False))
    assert statistics.median(costs) <= 1.05 and max(costs) <= 1.10, costs


@pytest.mark.parametrize("mix, fewer", [("dcp", 3), ("lognormal", 1)])
def test_counting_each_piece_cuts_fewer_documents_and_costs_less(mix, fewer, monkeypatch):
    """With each kernel piece's fixed cost in its model the solver cuts fewer documents, and the ring's work
    counted with that cost (pairs + ``PIECE_PAIRS`` per piece) is never above the pairs-only choice, and lower on
    ``fewer`` of 6 rows or more at P = 8 (short documents, dcp, gain most)."""

    ring_degree, seq_len = 8, 2048 * 8

    def layout(cu, piece_pairs):
        monkeypatch.setattr(ring_local, "PIECE_PAIRS", piece_pairs)
        ring_local.clear_caches()
        attention_plan.cache_clear()
        return (step_synchronous_cost(seq_len, ring_degree, cu, pieces=True),
                ring_documents(cu, ring_degree).cut_documents)

    rows = packed_rows(mix, seq_len, 6, 0)
    counted = [layout(cu, ring_local.PIECE_PAIRS) for cu in rows]
    pairs_only = [layout(cu, 0) for cu in rows]
    assert all(c[0] <= p[0] + 1e-9 and c[1] <= p[1] for c, p in zip(counted, pairs_only)), (counted, pairs_only)
    assert sum(c[0] < p[0] - 0.01 for c, p in zip(counted, pairs_only)) >= fewer, (counted, pairs_only)


@pytest.mark.parametrize("document_layout", ["local", "split"])
def test_ring_bytes_sent_are_the_analytic_count(rank_pool, document_layout):
    """Counted p2p bytes per rank = the analytic count; the ring-local layout sends only the cut documents."""
    cu = tuple(range(0, 161, 16)) + (256,)  # ten short documents stay local, one (96 > 64 a ring rank) is cut
    reports = rank_pool(4).run("perf_cases:ring_local_traffic", ring_degree=4, cu_seqlens=cu,
                               document_layout=document_layout)
    for report in reports:
        assert report["sent"] == report["analytic"] > 0, reports
    if document_layout == "local":  # against every row travelling (fp32 K/V and dK/dV of 2 heads x 8 per token)
        split = analytic_bytes_per_rank(batch=1, seq_len=256, heads=2, kv_heads=2, head_dim=8, dtype=torch.float32,
                                        ulysses_degree=1, ring_degree=4, ring_impl="zigzag")["ring_p2p"]
        assert sum(r["sent"] for r in reports) <= 0.5 * 4 * split  # 96 cut + 2 short fillers of 256


def test_an_unknown_document_layout_is_refused_where_it_enters():
    from megatron_usp.config import USPConfig
    from megatron_usp.layout import global_positions

    with pytest.raises(ValueError, match="document_layout 'whole' is unknown: choose 'local'"):
        USPConfig(document_layout="whole")
    with pytest.raises(ValueError, match="document_layout"):
        global_positions(16, 1, 2, 0, 0, "zigzag", cu_seqlens=(0, 5, 16), document_layout="whole")


@pytest.mark.parametrize("document_layout", ["local", "split"])
def test_the_own_step_is_one_block_per_document(document_layout):
    """A rank's own rows against themselves: each document it holds is ONE square (a zigzag document's two halves
    included), not one per run of positions: fewer kernel calls and merges."""
    cu = packed_rows("dcp", 8192, 1, 0)[0]
    for ring_rank in range(4):
        plan = attention_plan(8192, 1, 4, ring_rank, "zigzag", True, None, cu, document_layout)
        held = documents_of(cu)[plan.schedule.positions[ring_rank]]
        own = plan.schedule.steps[0].blocks
        assert len(own) == len(torch.unique(held)) and all(b.causal for b in own)
        assert [(b.q_start, b.q_stop) for b in own] == [(b.kv_start, b.kv_stop) for b in own]


def test_documents_that_fit_nowhere_fill_the_room_in_ring_order():
    """The short documents left over are poured into the remaining room one after another: each meets consecutive
    ring ranks, and a ring rank boundary cuts at most one of them."""
    from megatron_usp.ring_local import _pour

    rooms = [5, 0, 7, 3]
    shares = [[share.get(j, 0) for j in range(len(rooms))] for share in _pour([4, 3, 6, 2], rooms)]
    assert [sum(s) for s in shares] == [4, 3, 6, 2]
    assert [sum(column) for column in zip(*shares)] == rooms
    for share in shares:
        ranks = [j for j, s in enumerate(share) if s]
        assert len(ranks) == 1 or all(rooms[j] == 0 for j in range(ranks[0] + 1, ranks[-1])
                                      if j not in ranks), share
    assert shares == [[4, 0, 0, 0], [1, 0, 2, 0], [0, 0, 5, 1], [0, 0, 0, 2]]


def _shares_reference(lengths, quotas):
    """The even split stated plainly: round what each bin is owed, then settle the rounding one token at a time on
    the bin owed most (adding; ties: the lowest bin) or least (removing), by a full scan each time."""
    total, given, shares, seen = sum(lengths), [0] * len(quotas), [], 0
    for length in lengths:
        seen += length
        want = [quota * seen / total - g for quota, g in zip(quotas, given)]
        room = [quota - g for quota, g in zip(quotas, given)]
        share = [min(max(0, round(x)), r) for x, r in zip(want, room)]
        while sum(share) != length:
            adding = sum(share) < length
            movable = [j for j in range(len(quotas)) if (share[j] < room[j] if adding else share[j] > 0)]
            j = min(movable, key=lambda j: ((share[j] - want[j]) if adding else (want[j] - share[j]), j))
            share[j] += 1 if adding else -1
        given = [g + s for g, s in zip(given, share)]
        shares.append(share)
    return shares


def test_even_shares_are_the_plain_rule_and_fill_every_quota(monkeypatch):
    """``ring_local._shares`` (Python lists for few bins, tensors for many: both forced here) = the rule stated
    plainly, on random documents and quotas (equal quotas, as the even cut has, and arbitrary ones; ties of .5
    included): every document gets its length, every bin exactly its quota."""
    import random

    from megatron_usp import ring_local

    # more tokens to settle than bins that can take them: a bin takes a second one once it is owed most again
    assert ring_local._settle([(-0.4, 0), (-0.3, 1)], [5, 5], 3, [0, 0], [0.4, 0.3]) == {0: 2, 1: 1}
    rng = random.Random(0)
    for case in range(300):
        bins = rng.choice([1, 2, 3, 4, 7, 8, 16, 33, 64, 300])
        lengths = [rng.choice([1, 2, 3, 5, 8, 100, rng.randint(1, 3000)]) for _ in range(rng.randint(1, 10))]
        total = sum(lengths)
        if rng.random() < 0.5:
            quotas = [total // bins + (j < total % bins) for j in range(bins)]
        else:
            cuts = sorted(rng.randint(0, total) for _ in range(bins - 1))
            quotas = [b - a for a, b in zip([0] + cuts, cuts + [total])]
        expected = _shares_reference(lengths, quotas)
        for tensor_bins in (1, 1 << 30):
            monkeypatch.setattr(ring_local, "TENSOR_BINS", tensor_bins)
            shares = ring_local._shares(lengths, quotas)
            assert shares == expected, (lengths, quotas, tensor_bins)
        assert [sum(s) for s in shares] == lengths and [sum(c) for c in zip(*shares)] == quotas
