"""Cost facts computed from shapes alone (no process groups): attention FLOPs, (query, key) pairs of a block,
and what one ``usp_attn`` forward + backward sends per rank.

Benchmarks compare it with :func:`megatron_usp.comm.count_traffic`, which counts what the code really sends.
It is also the minimum for these algorithms: every K/V block must reach the other ``r - 1`` ring ranks, every dK/dV
block must visit all ``r`` ring ranks and come home (``r`` hops), and an all-to-all keeps ``1/u`` of its input.
"""
from __future__ import annotations

from typing import Optional

import torch

from .kernels import accumulation_dtype
from .layout import check_ring_impl, ring_documents_of, ring_local
from .ring_local import PIECE_PAIRS
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
    cu_seqlens: Optional[tuple[int, ...]] = None,
    document_layout: str = "local",
    ring_rank: int = 0,
) -> dict[str, int]:
    """Bytes one rank sends in one forward + backward, per collective kind (keys as ``TrafficCounter``). With
    ring-local documents (``cu_seqlens``, ``document_layout="local"``, a pass-K/V impl) only the cut documents' rows
    travel: ring rank ``ring_rank`` forwards every other rank's but one, ``r - 1`` times, and their gradients ``r``
    times (:class:`.ring_local.RingDocuments` ``cut_tokens``)."""
    transport = check_ring_impl(ring_impl).transport
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
        if transport == "allgather":
            result["all_gather"] = 2 * (r - 1) * kv_block  # forward, and again in backward
            result["reduce_scatter"] = (r - 1) * dkv_block
        elif cu_seqlens is not None and ring_local(ring_impl, document_layout):
            travelling = ring_documents_of(tuple(cu_seqlens), r, ring_impl).cut_tokens
            row, grad_row = kv_block // ring_tokens, dkv_block // ring_tokens
            forwarded = sum(travelling) - travelling[(ring_rank + 1) % r]  # the next rank's rows never come back
            result["ring_p2p"] = 2 * forwarded * row + sum(travelling) * grad_row
        else:
            result["ring_p2p"] = 2 * (r - 1) * kv_block + r * dkv_block
    return result


# ---------------------------------------------------------------------------------------------------------------
# Packed documents: visible (query, key) pairs counted from position runs, never from an S x S tensor.


def document_runs(positions: torch.Tensor, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximal runs of consecutive positions inside one document of SORTED ``positions``: ``(document, start,
    stop)`` LongTensors (``stop`` exclusive). ``cu_seqlens``: document offsets ``[0, ..., seq_len]``."""
    positions = torch.as_tensor(positions, dtype=torch.long).cpu()
    if len(positions) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long)
    document = torch.searchsorted(cu, positions, right=True) - 1
    breaks = (positions[1:] != positions[:-1] + 1) | (document[1:] != document[:-1])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(breaks).flatten() + 1])
    ends = torch.cat([starts[1:], torch.tensor([len(positions)])]) - 1
    return document[starts], positions[starts], positions[ends] + 1


def _pairs_up_to(t: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """sum_{i < t} min(i + 1, length): causal pairs of the first ``t`` queries from a key run's start."""
    t = t.clamp(min=0)
    inside = torch.minimum(t, length)
    return inside * (inside + 1) // 2 + (t - inside) * length


def run_pairs(q_runs, kv_runs, causal: bool = True) -> int:
    """Visible (query, key) pairs between two sets of :func:`document_runs`: same document and, if ``causal``,
    key position <= query position. Vectorised over every pair of runs that share a document."""
    q_doc, q_start, q_stop = q_runs
    kv_doc, kv_start, kv_stop = kv_runs
    if len(q_doc) == 0 or len(kv_doc) == 0:
        return 0
    documents = int(max(q_doc.max(), kv_doc.max())) + 1
    order = torch.argsort(kv_doc, stable=True)
    kv_doc, kv_start, kv_stop = kv_doc[order], kv_start[order], kv_stop[order]
    count = torch.bincount(kv_doc, minlength=documents)
    first = torch.cumsum(count, 0) - count
    matches = count[q_doc]
    total = int(matches.sum())
    if total == 0:
        return 0
    q_index = torch.repeat_interleave(torch.arange(len(q_doc)), matches, output_size=total)
    kv_index = torch.arange(total) + torch.repeat_interleave(first[q_doc] - (torch.cumsum(matches, 0) - matches),
                                                             matches, output_size=total)
    a, b = q_start[q_index], q_stop[q_index]
    c, e = kv_start[kv_index], kv_stop[kv_index]
    if not causal:
        return int(((b - a) * (e - c)).sum())
    length = e - c
    return int((_pairs_up_to(b - c, length) - _pairs_up_to(a - c, length)).sum())


def visible_pairs(q_positions: torch.Tensor, kv_positions: torch.Tensor, cu_seqlens, causal: bool = True) -> int:
    """(query, key) pairs of two sets of sorted global positions that attend: same document of ``cu_seqlens``
    and, if ``causal``, key <= query."""
    return run_pairs(document_runs(q_positions, cu_seqlens), document_runs(kv_positions, cu_seqlens), causal)


def document_pairs(cu_seqlens, causal: bool = True) -> int:
    """All visible pairs of a packed row: sum of L (L + 1) / 2 (causal) or L^2 over its documents."""
    lengths = torch.as_tensor(cu_seqlens, dtype=torch.long).diff()
    return int((lengths * (lengths + 1) // 2).sum() if causal else (lengths * lengths).sum())


def piece_work(blocks) -> int:
    """What the executor's pieces ``blocks`` cost, in pairs: their pairs plus :data:`.ring_local.PIECE_PAIRS` for
    each non-empty piece (one kernel call, or one segment of a varlen call)."""
    return sum(block_pairs(b.q_stop - b.q_start, b.kv_stop - b.kv_start, b.causal) + PIECE_PAIRS
               for b in blocks if b.q_stop > b.q_start and b.kv_stop > b.kv_start)


def document_work(cu_seqlens) -> int:
    """:func:`piece_work` of monolithic attention over packed documents: one causal piece per document."""
    lengths = torch.as_tensor(cu_seqlens, dtype=torch.long).diff()
    return document_pairs(cu_seqlens) + PIECE_PAIRS * int((lengths > 0).sum())


def step_synchronous_cost(pairs) -> float:
    """Ring-step cost over its ideal: ``pairs[j][s]`` is ring rank j's work at step s of a pass-K/V ring (its
    queries against ring rank (j - s) mod r's keys). A step lasts as long as its busiest rank, so the cost is
    sum_s max_j pairs[j][s] divided by the ideal (all pairs) / r."""
    pairs = torch.as_tensor(pairs, dtype=torch.float64)
    ideal = pairs.sum() / pairs.shape[0]
    return float(pairs.max(dim=0).values.sum() / ideal) if ideal > 0 else 1.0
