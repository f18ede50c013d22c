"""Masks (sliding window, packed documents, mask_mod) for every ring_impl and grid: forward and backward against
the float64 reference with the dense mask; empty rows give 0 and 0 gradient."""
from __future__ import annotations

import pytest
import torch

import megatron_usp as usp
from conftest import record_error
from megatron_usp.masks import AS_SCHEDULED, SKIP, AttentionMask, BlockMasker, check_mask

IMPLS = ["basic", "zigzag", "stripe", "allgather", "mqsp"]
MASKS = ["window", "window_both_sides", "documents", "mask_mod", "window_and_documents"]
GRIDS = [(1, 1, 1), (2, 1, 2), (4, 2, 2), (4, 1, 4), (4, 4, 1), (8, 2, 4)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g[0]}-u{g[1]}-r{g[2]}")
def test_masked_attention_matches_float64_reference(rank_pool, grid, impl):
    world_size, ulysses_degree, ring_degree = grid
    sp_size = ulysses_degree * ring_degree
    configs = [dict(batch=2, seq_len=max(24, 6 * sp_size), heads=4, kv_heads=2, head_dim=8, ring_impl=impl,
                    causal=causal, mask=mask, seed=i)
               for i, (mask, causal) in enumerate((m, c) for m in MASKS for c in (True, False))]
    configs.append(dict(configs[0], dtype="bfloat16", mask="documents", seed=99))
    if impl == "mqsp":
        configs += [dict(configs[0], mask=mask, micro_q=3, seed=100 + i) for i, mask in enumerate(MASKS)]
    reports = rank_pool(world_size).run("engine_cases:attention_matrix", ulysses_degree=ulysses_degree,
                                        ring_degree=ring_degree, ulysses_inner=True, configs=configs)
    for rank_report in reports:
        for entry in rank_report:
            dtype = entry["config"].get("dtype", "float32")
            for name, err in entry["errors"].items():
                record_error(f"mask {entry['config']['mask']} {impl} {dtype} {name}", err)


def test_window_skips_blocks_by_position_range_alone():
    masker = BlockMasker(AttentionMask(window=(4, 0)), torch.arange(100, 110), torch.arange(2), 1, torch.device("cpu"))
    assert masker.visibility(slice(0, 10), torch.arange(0, 10), causal=False) == SKIP  # far behind the window
    assert masker.visibility(slice(0, 10), torch.arange(200, 210), causal=False) == SKIP  # ahead (right = 0)
    partial = masker.visibility(slice(0, 10), torch.arange(95, 105), causal=False)
    assert isinstance(partial, torch.Tensor) and partial.shape == (1, 1, 10, 10)
    wide = BlockMasker(AttentionMask(window=(50, -1)), torch.arange(100, 110), torch.arange(2), 1, torch.device("cpu"))
    assert wide.visibility(slice(0, 10), torch.arange(60, 100), causal=False) == AS_SCHEDULED


def test_documents_skip_blocks_of_other_documents():
    ids = torch.tensor([[0] * 8 + [1] * 8])
    masker = BlockMasker(AttentionMask(document_ids=ids), torch.arange(8, 16), torch.arange(1), 1, torch.device("cpu"))
    assert masker.visibility(slice(0, 8), torch.arange(0, 8), causal=False) == SKIP
    assert masker.visibility(slice(0, 8), torch.arange(8, 16), causal=True) == AS_SCHEDULED


@pytest.mark.parametrize("mask, error, match", [
    (AttentionMask(window=(3,)), TypeError, "pair of ints"),
    (AttentionMask(window=(3, -2)), ValueError, ">= -1"),
    (AttentionMask(document_ids=torch.zeros(2, 16)), TypeError, "integer tensor"),
    (AttentionMask(document_ids=torch.zeros(2, 8, dtype=torch.long)), ValueError, "whole sequence"),
    (AttentionMask(mask_mod="causal"), TypeError, "callable"),
])
def test_bad_masks_are_rejected(mask, error, match):
    with pytest.raises(error, match=match):
        check_mask(mask, batch=2, seq_len=16)


def test_usp_attn_rejects_a_bad_mask_before_any_collective():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="whole sequence"):
        usp.usp_attn(q, q, q, usp.USPGroups.single(), document_ids=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("micro_q", [0, -1, 2.5, True])
def test_bad_micro_q_is_rejected(micro_q):
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="micro_q"):
        usp.usp_attn(q, q, q, usp.USPGroups.single(), ring_impl="mqsp", micro_q=micro_q)


def test_mqsp_blocks_cover_exactly_the_causal_pairs():
    from megatron_usp.mqsp import MQSPPlan

    seq_len, ring_degree = 48, 4
    for rank in range(ring_degree):
        for micro_q in (None, 2, 5):
            plan = MQSPPlan(seq_len, 1, ring_degree, rank, True, micro_q)
            for q_positions, blocks in zip(plan.gathered_positions, plan.blocks):
                counts = torch.zeros(len(q_positions), len(plan.kv_positions), dtype=torch.long)
                for block in blocks:
                    visible = torch.ones(block.q_stop - block.q_start, block.kv_stop - block.kv_start,
                                         dtype=torch.long)
                    counts[block.q_start:block.q_stop, block.kv_start:block.kv_stop] += (
                        visible.tril() if block.causal else visible)
                expected = (plan.kv_positions[None, :] <= q_positions[:, None]).long()
                assert torch.equal(counts, expected), (rank, micro_q)
