"""One rank's complete ring schedule in one process: real kernels and merges, no communication.

The ring transfers are replaced by a loopback that hands back same-shaped tensors, so a single GPU (or CPU) can
time what one rank of a ``u x r`` grid computes, and compare it with monolithic attention over the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .cost import block_pairs
from .kernels import AttentionKernel
from .layout import check_cu_seqlens
from .masks import AttentionMask
from .mqsp import mqsp_backward, mqsp_forward
from .plan import AttentionPlan, attention_plan
from .ring import ring_backward, ring_forward
from .ulysses import check_head_counts, kv_replication


class _LoopbackExchanger:
    def __init__(self, received: dict) -> None:
        self._pending: Optional[torch.Tensor] = None
        self._received = received

    def post(self, send: torch.Tensor, recv_rows: Optional[int] = None, dim: int = 2) -> None:
        if recv_rows is None or recv_rows == send.shape[dim]:
            self._pending = send
            return
        # senders of ring-local schedules hold different row counts. A real receive allocates with torch.empty
        # (no fill); a buffer of that shape made once stands in for it, so the timing holds no fill either.
        shape = list(send.shape)
        shape[dim] = recv_rows
        key = (tuple(shape), send.dtype, send.device)
        if key not in self._received:
            self._received[key] = torch.zeros(shape, dtype=send.dtype, device=send.device)
        self._pending = self._received[key]

    def wait(self) -> torch.Tensor:
        received, self._pending = self._pending, None
        return received


class LoopbackRingComm:
    """Stands in for :class:`megatron_usp.comm.RingComm`: same shapes, no transfer (values are not meaningful)."""

    def __init__(self, ring_degree: int) -> None:
        self.ring_degree = ring_degree
        self.rank = 0
        self._received: dict = {}  # shape, dtype, device -> the buffer standing in for a receive of that shape

    def all_reduce(self, x: torch.Tensor, op=None) -> torch.Tensor:
        return x

    def exchanger(self) -> _LoopbackExchanger:
        return _LoopbackExchanger(self._received)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([x] * self.ring_degree, dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.chunk(self.ring_degree, dim=dim)[0].clone()


@dataclass(frozen=True)
class RankProblem:
    """Attention over ``seq_len`` tokens on a ``ulysses_degree x ring_degree`` grid, seen from one ring rank.
    With ``cu_seqlens`` the row is packed documents in the document layout (what ``usp_attn(..., cu_seqlens=)``
    runs): attention stays inside each document and the blocks are the visible pieces of each step."""

    ring_impl: str
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    ulysses_degree: int
    ring_degree: int
    causal: bool
    batch: int = 1
    micro_q: Optional[int] = None  # mqsp only
    cu_seqlens: Optional[tuple[int, ...]] = None  # packed documents: offsets [0, ..., seq_len] of the row
    document_layout: str = "local"  # of packed documents (layout.py)

    def __post_init__(self) -> None:
        if self.cu_seqlens is not None:  # validated once, kept as a tuple of ints (hashable, cacheable)
            object.__setattr__(self, "cu_seqlens", check_cu_seqlens(self.cu_seqlens, self.seq_len))

    def plan(self, ring_rank: int) -> AttentionPlan:
        """What ring rank ``ring_rank`` runs (:func:`megatron_usp.plan.attention_plan`)."""
        return attention_plan(self.seq_len, self.ulysses_degree, self.ring_degree, ring_rank, self.ring_impl,
                              self.causal, self.micro_q, self.cu_seqlens, self.document_layout)


def _inputs(batch, tokens, heads, kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, dout = (torch.randn(batch, tokens, h, head_dim, generator=gen, device=device, dtype=dtype)
                     for h in (heads, kv_heads, kv_heads, heads))
    return q, k, v, dout


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rank_step(problem: RankProblem, ring_rank: int, kernel: AttentionKernel, dtype: torch.dtype,
              device: torch.device) -> Callable[[], None]:
    """A function running ring rank ``ring_rank``'s forward and backward once (what a step costs it); its
    ``input_bytes`` is the size of the q, k, v and output gradient it holds."""
    check_head_counts(problem.heads, problem.kv_heads, problem.ulysses_degree)
    u, r = problem.ulysses_degree, problem.ring_degree
    kv_heads = problem.kv_heads * kv_replication(problem.kv_heads, u) // u
    q, k, v, dout = _inputs(problem.batch, problem.seq_len // r, problem.heads // u, kv_heads, problem.head_dim,
                            dtype, device)
    ring_comm = LoopbackRingComm(r)
    scale = problem.head_dim ** -0.5
    plan = problem.plan(ring_rank)
    if plan.mqsp is not None:
        def step() -> None:
            out, lse = mqsp_forward(q, k, v, plan.mqsp, ring_comm, kernel, scale, AttentionMask(), None)
            mqsp_backward(dout, q, k, v, out.to(dtype), lse, plan.mqsp, ring_comm, kernel, scale, AttentionMask(),
                          None)

        step.input_bytes = _nbytes(q, k, v, dout)
        return step

    def step() -> None:
        out, lse = ring_forward(q, k, v, plan.schedule, ring_comm, kernel, scale)
        ring_backward(dout, q, k, v, out.to(dtype), lse, plan.schedule, ring_comm, kernel, scale)

    step.input_bytes = _nbytes(q, k, v, dout)
    return step


def monolithic_step(problem: RankProblem, kernel: AttentionKernel, dtype: torch.dtype,
                    device: torch.device) -> Callable[[], None]:
    """Single-device attention over the whole sequence, forward and backward, with the same kernel. With
    documents: what ``usp_attn`` on one rank runs (``u = r = 1`` with ``cu_seqlens``): the row's pieces, one
    causal square per document, in one varlen call per kind."""
    if problem.cu_seqlens is not None:
        single = replace(problem, ring_impl="zigzag", ulysses_degree=1, ring_degree=1, micro_q=None)
        return rank_step(single, 0, kernel, dtype, device)
    q, k, v, dout = _inputs(problem.batch, problem.seq_len, problem.heads, problem.kv_heads, problem.head_dim,
                            dtype, device)
    scale = problem.head_dim ** -0.5

    def step() -> None:
        out, lse = kernel.forward(q, k, v, causal=problem.causal, softmax_scale=scale)
        kernel.backward(dout, q, k, v, out, lse, causal=problem.causal, softmax_scale=scale)

    step.input_bytes = _nbytes(q, k, v, dout)
    return step


def attention_pairs(problem: RankProblem, ring_rank: int) -> int:
    """(query, key) pairs ring rank ``ring_rank`` computes per head: its share of the attention work (pass-K/V
    and allgather schedules; with documents, the visible pieces only)."""
    return sum(block_pairs(block.q_stop - block.q_start, block.kv_stop - block.kv_start, block.causal)
               for step in problem.plan(ring_rank).schedule.steps for block in step.blocks)
