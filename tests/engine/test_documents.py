"""Packed documents (``cu_seqlens``): the document layout and every ring_impl against the float64 reference."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import record_error
from megatron_usp.blocks import position_blocks
from megatron_usp.layout import RING_IMPL_TABLE, RING_IMPLS, check_cu_seqlens, global_positions, ring_positions

IMPLS = ["basic", "zigzag", "stripe", "allgather", "mqsp"]
# (world_size, ulysses_degree, ring_degree)
GRIDS = [(2, 1, 2), (2, 2, 1), (3, 1, 3), (4, 2, 2), (4, 1, 4), (4, 4, 1), (8, 2, 4)]


def document_mixes(seq_len: int, sp_size: int) -> dict[str, list[int]]:
    """Offsets of packed rows that stress the layout: one document, length-1 and shorter-than-2P documents,
    boundaries on every chunk edge of the row, and a seeded random mix."""
    rng = random.Random(seq_len * 31 + sp_size)
    tiny = [0, 1, 2, 2 * sp_size - 1 + 2, 2 * sp_size + 2]  # lengths 1, 1, 2P-1, 1 ... then the rest
    tiny = [x for x in tiny if x < seq_len] + [seq_len]
    chunk = seq_len // (2 * sp_size)
    edges = list(range(0, seq_len + 1, chunk))
    cuts = sorted(rng.sample(range(1, seq_len), 5))
    return {"one": [0, seq_len], "tiny": tiny, "edges": edges, "random": [0] + cuts + [seq_len]}


def ring_local_mixes(seq_len: int, ring_degree: int) -> dict[str, list[int]]:
    """Rows for the ring-local layout: every document local (one per ring rank, nothing travels), half of them
    local (short ones beside one that must be cut)."""
    capacity = seq_len // ring_degree
    every_local = list(range(0, seq_len + 1, capacity))
    half = [0, 1, 3, capacity - 1, seq_len]  # lengths 1, 2, capacity - 4, then one longer than a ring rank
    return {"every_local": every_local, "long_and_short": sorted(set(half))}


def configs_for(sp_size: int, impl: str, ring_degree: int = 1) -> list[dict]:
    seq_len = 6 * sp_size if sp_size > 1 else 12
    base = dict(batch=2, seq_len=seq_len, head_dim=8, ring_impl=impl, heads=4, kv_heads=2)
    configs = []
    mixes = {**document_mixes(seq_len, sp_size), **ring_local_mixes(seq_len, ring_degree)}
    for name, cu in mixes.items():
        for causal in (True, False):
            configs.append(dict(base, cu_seqlens=cu, causal=causal, seed=len(configs), mix=name))
    if RING_IMPL_TABLE[impl].ring_local_documents:  # today's layout stays exact when asked for
        configs += [dict(base, cu_seqlens=mixes[name], causal=True, seed=30 + i, document_layout="split")
                    for i, name in enumerate(("random", "tiny"))]
    random_mix = document_mixes(seq_len, sp_size)["random"]
    configs.append(dict(base, cu_seqlens=random_mix, causal=True, dtype="bfloat16", seed=20))
    configs.append(dict(base, cu_seqlens=random_mix, causal=True, mask="window", seed=21))
    configs.append(dict(base, cu_seqlens=random_mix, causal=False, mask="window_both_sides", seed=22))
    configs.append(dict(base, cu_seqlens=random_mix, causal=True, mask="mask_mod", seed=23))
    configs.append(dict(base, cu_seqlens=random_mix, causal=True, heads=8, kv_heads=1, seed=24))
    if impl == "mqsp":
        configs += [dict(base, cu_seqlens=random_mix, causal=causal, micro_q=3, seed=25) for causal in (True, False)]
    # the varlen path (rows packed per kind, merged back, gradients scattered), as CUDA kernels run it
    configs += [dict(base, cu_seqlens=cu, causal=causal, backend="test_packing", seed=26)
                for cu in (random_mix, document_mixes(seq_len, sp_size)["tiny"]) for causal in (True, False)]
    configs.append(dict(base, cu_seqlens=random_mix, causal=True, mask="window", backend="test_packing", seed=27))
    return configs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g[0]}-u{g[1]}-r{g[2]}")
def test_documents_match_float64_reference(rank_pool, grid, impl):
    world_size, ulysses_degree, ring_degree = grid
    reports = rank_pool(world_size).run(
        "engine_cases:attention_matrix", ulysses_degree=ulysses_degree, ring_degree=ring_degree, ulysses_inner=True,
        configs=configs_for(ulysses_degree * ring_degree, impl, ring_degree),
    )
    for rank_report in reports:
        for entry in rank_report:
            for name, err in entry["errors"].items():
                record_error(f"{impl} documents {entry['config'].get('dtype', 'float32')} {name}", err)


@pytest.mark.parametrize("impl", RING_IMPLS)
@pytest.mark.parametrize("ulysses_degree,ring_degree", [(1, 1), (2, 1), (1, 4), (2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize("document_layout", ["local", "split"])
def test_document_layout_partitions_the_row_evenly(impl, ulysses_degree, ring_degree, document_layout):
    sp_size = ulysses_degree * ring_degree
    seq_len = 10 * sp_size
    for name, cu in {**document_mixes(seq_len, sp_size), **ring_local_mixes(seq_len, ring_degree)}.items():
        held = [global_positions(seq_len, ulysses_degree, ring_degree, i, j, impl, cu_seqlens=cu,
                                 document_layout=document_layout)
                for j in range(ring_degree) for i in range(ulysses_degree)]
        assert all(len(h) == seq_len // sp_size for h in held), (name, [len(h) for h in held])
        assert torch.equal(torch.sort(torch.cat(held)).values, torch.arange(seq_len)), name
        assert all(torch.equal(h, torch.sort(h).values) for h in held)  # position order


def test_split_document_layout_is_zigzag_per_document():
    """The split document layout: CP rank i holds chunks i and 2P-1-i of every document; the remainders rotate over the documents."""
    cu = [0, 9, 9, 10, 27, 40]  # lengths 9, 0, 1, 17, 13 with 2P = 4 parts
    held = [global_positions(40, 2, 1, i, 0, "zigzag", cu_seqlens=cu, document_layout="split").tolist()
            for i in range(2)]
    # 2P = 4 chunks per document; the +1 of each remainder goes to chunk 0, 1, 2, 3 in turn:
    # doc 0 (9): [0,3) [3,5) [5,7) [7,9); doc 2 (1): [9,9) [9,10) ...; doc 3 (17): [10,14) [14,18) [18,23) [23,27);
    # doc 4 (13): [27,30) [30,33) [33,36) [36,40). Rank 0 takes chunks 0 and 3, rank 1 chunks 1 and 2.
    bounds = {0: [(0, 3), (7, 9), (10, 14), (23, 27), (27, 30), (36, 40)], 1: [(3, 5), (5, 7), (9, 10), (14, 18),
                                                                                 (18, 23), (30, 33), (33, 36)]}
    for rank, ranges in bounds.items():
        assert held[rank] == [p for a, b in ranges for p in range(a, b)], (rank, held[rank])


def test_cu_seqlens_is_checked():
    with pytest.raises(ValueError, match="seq_len=16"):
        check_cu_seqlens([0, 5, 12], 16)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens([0, 9, 5, 16], 16)
    with pytest.raises(TypeError, match="integer"):
        check_cu_seqlens(torch.tensor([0.0, 16.0]), 16)
    with pytest.raises(TypeError, match="1-D"):
        check_cu_seqlens(torch.tensor([[0, 16]]), 16)
    assert check_cu_seqlens(torch.tensor([0, 3, 16]), 16) == (0, 3, 16)


def test_position_blocks_cover_exactly_the_visible_pairs():
    """Blocks from any layout's positions cover every same-document causal pair exactly once, nothing else."""
    cu = [0, 1, 2, 7, 20, 21, 33, 48]
    ids = torch.searchsorted(torch.tensor(cu), torch.arange(48), right=True) - 1
    for impl in ("zigzag", "basic", "mqsp"):
        for causal in (True, False):
            q = ring_positions(48, 2, 3, 1, impl, cu_seqlens=cu)
            kv = torch.cat([ring_positions(48, 2, 3, rank, impl, cu_seqlens=cu) for rank in (2, 0)])
            covered = torch.zeros(len(q), len(kv), dtype=torch.long)
            for block in position_blocks(q, kv, causal, cu):
                part = torch.ones(block.q_stop - block.q_start, block.kv_stop - block.kv_start, dtype=torch.long)
                covered[block.q, block.kv] += part.tril() if block.causal else part
            visible = (ids[q][:, None] == ids[kv][None, :]) & ((kv[None, :] <= q[:, None]) | (not causal))
            assert torch.equal(covered, visible.long()), (impl, causal)
