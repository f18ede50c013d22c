"""MQSP (micro-query sequence parallelism): pass Q, keep K/V local, combine with a distributed softmax.

Over the ring group, every rank's queries are processed in micro-chunks of ``micro_q`` rows: the ring all-gathers
chunk ``c`` of every rank's q (``[b, r*m, h, d]``), each rank attends it to its OWN K/V (partial out and lse), and
a distributed softmax hands each rank the exact output of its own rows: the global lse comes from two small
all-reduces (max, then sum of exp), every rank weights its partial output by ``exp(lse_part - lse)`` (computed as
``exp(lse_part - max) / sum``, see :func:`_distributed_softmax`) and one fp32
reduce-scatter sums the weighted parts into the rows' owners. The backward gathers the chunk's q, dout, out and lse,
computes dq for the gathered rows (reduce-scattered home) and accumulates dK/dV locally: K/V never move. Extra
memory is a few ``r * micro_q``-row buffers, whatever the sequence length.

Tensors are in the ring-level layout (after the Ulysses all-to-all, zigzag positions): ``q [b, n, h, d]``,
``k, v [b, n, kv_h, d]``. Causal structure comes from positions: contiguous runs of q and K/V positions give
fully visible blocks and aligned causal squares, so the kernels see only plain causal / full blocks.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from .blocks import backward_blocks, forward_blocks, group_blocks, plan_work, position_blocks, position_runs
from .kernels import AttentionKernel, accumulation_dtype
from .layout import ring_positions
from .masks import AttentionMask, BlockMasker
from .merge import nan_query_rows
from .ring import ScheduledAttention


def check_micro_q(micro_q: Optional[int]) -> None:
    if micro_q is not None and (isinstance(micro_q, bool) or not isinstance(micro_q, int) or micro_q < 1):
        raise ValueError(f"micro_q must be a positive int (query rows per micro-chunk) or None, got {micro_q!r}")


class MQSPPlan:
    """Everything one rank needs to run MQSP for a sequence length and grid (built once, reused per layer)."""

    def __init__(self, seq_len: int, ulysses_degree: int, ring_degree: int, ring_rank: int, causal: bool,
                 micro_q: Optional[int], cu_seqlens: Optional[tuple[int, ...]] = None,
                 shared: Optional["MQSPPlan"] = None):
        """``shared``: another ring rank's plan of the same call shape, whose positions and gathered queries (the
        same on every rank) this one reuses (a cost model building every rank's plan)."""
        grid = (seq_len, ulysses_degree, ring_degree)
        self.ring_degree = ring_degree
        self.positions = shared.positions if shared is not None else tuple(
            ring_positions(*grid, rank, "mqsp", cu_seqlens=cu_seqlens) for rank in range(ring_degree))
        self.kv_positions = self.positions[ring_rank]
        n = len(self.kv_positions)
        self.micro_q = min(micro_q or n, n)
        self.chunks = [slice(start, min(start + self.micro_q, n)) for start in range(0, n, self.micro_q)]
        if shared is not None:
            self.gathered_positions, self._q_runs = shared.gathered_positions, shared._q_runs
        else:
            self.gathered_positions = [torch.cat([p[rows] for p in self.positions]) for rows in self.chunks]
            self._q_runs = [position_runs(q_pos, cu_seqlens) for q_pos in self.gathered_positions]
        self.blocks = [position_blocks(q_pos, self.kv_positions, causal, cu_seqlens, q_runs)
                       for q_pos, q_runs in zip(self.gathered_positions, self._q_runs)]
        self.grouped = [group_blocks(blocks) for blocks in self.blocks]


def _chunk_work(plan: MQSPPlan, chunk: int, mask: AttentionMask, heads: Optional[torch.Tensor], batch: int,
                kernel: AttentionKernel, device: torch.device):
    """The kernel calls of one micro-chunk under the mask (see blocks.plan_work)."""
    masker = BlockMasker(mask, plan.gathered_positions[chunk], heads, batch, device) if mask.active else None
    return plan_work(plan.blocks[chunk], plan.grouped[chunk], plan.kv_positions, masker, kernel)


def _distributed_softmax(lse_part: torch.Tensor, ring_comm) -> tuple[torch.Tensor, torch.Tensor]:
    """The global lse of each row over the ranks' partial lse, and this rank's weight ``exp(lse_part - lse)``.

    The weight is computed as ``exp(lse_part - max) / sum``, never through the absolute lse: with large logits the
    lse is large (|lse| ~ 1e4 at softmax_scale 1000) and rounding it to fp32 moves it by ~1e-3, which
    ``exp(lse_part - lse)`` would turn into a 0.1% error of every weight (measured: out 18x, dq 45x, dk 90x less
    accurate than single-device attention). Rows no rank sees: lse -inf, weight 0. NaN among the partials (NaN
    in q or k): lse and weights NaN; +inf (an infinite logit): lse +inf, weights NaN; the row comes out NaN."""
    lse_max = ring_comm.all_reduce(lse_part.clone(), op=dist.ReduceOp.MAX)
    shift = torch.where(torch.isneginf(lse_max), torch.zeros_like(lse_max), lse_max)
    scaled = torch.exp(lse_part - shift)
    total = ring_comm.all_reduce(scaled.clone(), op=dist.ReduceOp.SUM)
    weight = torch.where(total == 0, torch.zeros_like(total), scaled / total)
    # an infinite logit somewhere: lse +inf (weights NaN: the row comes out NaN), as single-device kernels keep it
    return torch.where(torch.isposinf(lse_max), lse_max, torch.log(total) + shift), weight


def mqsp_forward(q, k, v, plan: MQSPPlan, ring_comm, kernel: AttentionKernel, softmax_scale: float,
                 mask: AttentionMask, heads: Optional[torch.Tensor],
                 max_logit: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns this rank's ``out [b, n, h, d]`` and ``lse [b, h, n]`` in the accumulation dtype; raises
    ``max_logit [h]`` (when given) to the largest visible logit of the blocks computed here."""
    acc = accumulation_dtype(q.dtype)
    batch, n, num_heads, head_dim = q.shape
    out = torch.empty(batch, n, num_heads, head_dim, dtype=acc, device=q.device)
    lse = torch.empty(batch, num_heads, n, dtype=acc, device=q.device)
    for chunk, rows in enumerate(plan.chunks):
        gathered_q = ring_comm.all_gather(q[:, rows], dim=1)  # [b, r*m, h, d], rank i's rows at [i*m, (i+1)*m)
        part = torch.zeros(batch, gathered_q.shape[1], num_heads, head_dim, dtype=acc, device=q.device)
        part_lse = torch.full((batch, num_heads, gathered_q.shape[1]), float("-inf"), dtype=acc, device=q.device)
        work = _chunk_work(plan, chunk, mask, heads, batch, kernel, q.device)
        forward_blocks(gathered_q, k, v, work, kernel, softmax_scale, part, part_lse, max_logit)
        chunk_lse, weight = _distributed_softmax(part_lse, ring_comm)
        weighted = part * weight.transpose(1, 2).unsqueeze(-1)
        out[:, rows] = ring_comm.reduce_scatter(weighted, dim=1)
        chunk_rows = weighted.shape[1] // plan.ring_degree
        lse[:, :, rows] = chunk_lse[:, :, ring_comm.rank * chunk_rows:(ring_comm.rank + 1) * chunk_rows]
    nan_query_rows(q, out, lse)
    return out, lse


def mqsp_backward(dout, q, k, v, out, lse, plan: MQSPPlan, ring_comm, kernel: AttentionKernel,
                  softmax_scale: float, mask: AttentionMask, heads: Optional[torch.Tensor]):
    """Exact gradients: per chunk, gathered rows' dq reduce-scattered home; dK/dV accumulate locally in fp32."""
    acc = accumulation_dtype(q.dtype)
    batch = q.shape[0]
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)  # empty rows: p = 0
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    dout = dout.to(q.dtype)
    for chunk, rows in enumerate(plan.chunks):
        gathered = ring_comm.all_gather(torch.stack([q[:, rows], dout[:, rows], out[:, rows]]), dim=2)
        gathered_q, gathered_dout, gathered_out = gathered.unbind(0)
        gathered_lse = ring_comm.all_gather(lse[:, :, rows].contiguous(), dim=2)
        part_dq = torch.zeros(gathered_q.shape, dtype=acc, device=q.device)
        work = _chunk_work(plan, chunk, mask, heads, batch, kernel, q.device)
        backward_blocks(gathered_dout, gathered_q, k, v, gathered_out, gathered_lse, work, kernel, softmax_scale,
                        part_dq, dk, dv)
        dq[:, rows] = ring_comm.reduce_scatter(part_dq, dim=1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def mqsp_attention(q, k, v, plan: MQSPPlan, ring_comm, kernel: AttentionKernel, softmax_scale: float,
                   mask: AttentionMask, heads: Optional[torch.Tensor],
                   softmax_offset: Optional[torch.Tensor] = None,
                   max_logit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable MQSP over ring-level tensors; returns ``[b, n, heads, head_dim]``. ``softmax_offset
    [heads]``: an attention sink per head held here (:class:`.ring.ScheduledAttention`); ``max_logit [heads]``:
    raised to the largest visible logit of the blocks computed here."""
    settings = dict(plan=plan, ring_comm=ring_comm, kernel=kernel, softmax_scale=softmax_scale, mask=mask,
                    heads=heads)
    return ScheduledAttention.apply(q, k, v, softmax_offset,
                                    functools.partial(mqsp_forward, **settings, max_logit=max_logit),
                                    functools.partial(mqsp_backward, **settings))
