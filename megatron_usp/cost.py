"""Cost facts computed from shapes alone (no process groups): attention FLOPs, (query, key) pairs of a block,
and what one ``usp_attn`` forward + backward sends per rank.

Benchmarks compare it with :func:`megatron_usp.comm.count_traffic`, which counts what the code really sends.
It is also the minimum for these algorithms: every K/V block must reach the other ``r - 1`` ring ranks, every dK/dV
block must visit all ``r`` ring ranks and come home (``r`` hops), and an all-to-all keeps ``1/u`` of its input.
"""
from __future__ import annotations

import torch

from .kernels import accumulation_dtype
from .layout import check_ring_impl
from .ulysses import check_head_counts, kv_replication


def attention_flops(batch: int, seq_len: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of attention over the whole sequence: 4·b·s²·h·d (QKᵀ and PV), halved when causal. The
    backward is counted as 2.5× the forward (flash-attention's convention)."""
    flops = 4.0 * batch * seq_len * seq_len * heads * head_dim
    return flops / 2 if causal else flops


def block_pairs(rows: int, cols: int, causal: bool) -> int:
    """(query, key) pairs a block computes: rows × cols, or rows (rows + 1) / 2 for a causal square."""
    return rows * (rows + 1) // 2 if causal else rows * cols


def analytic_bytes_per_rank(
    *,
    batch: int,
    seq_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    ulysses_degree: int,
    ring_degree: int,
    ring_impl: str,
) -> dict[str, int]:
    """Bytes one rank sends in one forward + backward, per collective kind (keys as ``TrafficCounter``)."""
    check_ring_impl(ring_impl)
    check_head_counts(heads, kv_heads, ulysses_degree)
    element = torch.empty((), dtype=dtype).element_size()
    acc_element = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    u, r = ulysses_degree, ring_degree
    kv_eff = kv_heads * kv_replication(kv_heads, u)
    tokens = seq_len // (u * r)
    result = {}
    if u > 1:
        # forward: packed q,k,v and out; backward: dout and packed dq,dk,dv — each keeps 1/u at home
        per_direction = batch * tokens * (2 * heads + 2 * kv_eff) * head_dim * element
        result["all_to_all"] = 2 * per_direction * (u - 1) // u
    if r > 1:
        ring_tokens, ring_kv_heads = seq_len // r, kv_eff // u
        kv_block = 2 * batch * ring_tokens * ring_kv_heads * head_dim * element
        dkv_block = 2 * batch * ring_tokens * ring_kv_heads * head_dim * acc_element
        if ring_impl == "allgather":
            result["all_gather"] = 2 * (r - 1) * kv_block  # forward, and again in backward
            result["reduce_scatter"] = (r - 1) * dkv_block
        else:
            result["ring_p2p"] = 2 * (r - 1) * kv_block + r * dkv_block
    return result
