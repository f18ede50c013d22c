"""Ring attention: schedules as data, one executor for forward and backward.

Tensors here are in the ring-level layout (after the Ulysses all-to-all): ``[batch, n, heads, head_dim]`` with
``n = seq_len / ring_degree`` tokens per ring rank, sorted by global position (see ``layout.py``).

A schedule is a list of steps. In a ``pass_kv`` schedule, step ``s`` uses the K/V of ring rank
``(ring_rank - s) mod r`` (K/V travel to the next rank each step). In an ``allgather`` schedule (zigzag layout)
the lower and the upper halves of every ring rank's K/V are all-gathered into two buffers; the lower buffer is
then sorted by position and the upper one reversed by chunks, so each block is a contiguous range of one buffer
and nothing is re-sorted (key order does not matter to a fully visible block). Each step lists the blocks to
compute: rows of q against rows of K/V, fully visible or causal. Causal blocks are always square, so top-left and
bottom-right causal alignment coincide and every kernel agrees.

With ring-local documents (``layout.py``'s ``local`` document layout) only the rows of cut documents travel: a
schedule's ``travel`` names them per ring rank; the own step sees all own rows, every later step the travelling
rows of the rank they came from, and a step whose sender holds none passes nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import comm
from .groups import USPGroups
from .caching import cached_plain_property, plain_tensors
from .blocks import (Block, TouchedRows, backward_blocks, forward_blocks, group_blocks, own_blocks, plan_work,
                     position_blocks, position_runs)
from .kernels import AttentionKernel, accumulation_dtype
from .layout import RING_SCHEDULE_IMPLS, check_ring_impl, ring_documents_of, ring_local, ring_positions
from .masks import BlockMasker
from .merge import merge_sink, nan_query_rows, sink_gradient


@dataclass(frozen=True)
class Step:
    kv_rank: Optional[int]  # pass_kv: ring rank whose K/V this step sees
    blocks: tuple[Block, ...]
    gathered_half: Optional[int] = None  # allgather: 0 = every ring rank's lower K/V half, 1 = upper halves

    @cached_plain_property
    def grouped(self):
        """The step's kernel calls when no mask cuts its blocks (built once per schedule)."""
        return group_blocks(self.blocks)


@dataclass(frozen=True, eq=False)
class RingSchedule:
    """The steps one ring rank runs, and the ring-level positions of every ring rank's rows (sorted,
    ``layout.ring_positions``): what the K/V rows of each step are."""

    ring_impl: str
    transport: str  # "pass_kv" or "allgather"
    steps: tuple[Step, ...]
    positions: tuple[torch.Tensor, ...]
    travel: Optional[tuple[torch.Tensor, ...]] = None  # pass_kv: the rows of each ring rank that travel (None: all)
    _travel_on: dict = field(default_factory=dict, repr=False)

    def travel_on(self, ring_rank: int, device: torch.device) -> torch.Tensor:
        """:attr:`travel` of ``ring_rank`` on ``device`` (copied once per device)."""
        if (ring_rank, device) not in self._travel_on:
            with plain_tensors():
                self._travel_on[ring_rank, device] = self.travel[ring_rank].to(device)
        return self._travel_on[ring_rank, device]

    @cached_plain_property
    def _travelling_positions(self) -> tuple[torch.Tensor, ...]:
        return tuple(held[rows] for held, rows in zip(self.positions, self.travel))

    def kv_positions(self, step: Step) -> torch.Tensor:
        """Global positions of the K/V rows ``step`` sees (what its blocks' kv ranges index)."""
        if step.gathered_half is None:
            if self.travel is None or step.kv_rank == self.steps[0].kv_rank:  # the own step sees every own row
                return self.positions[step.kv_rank]
            return self._travelling_positions[step.kv_rank]
        half = len(self.positions[0]) // 2
        rows = slice(step.gathered_half * half, (step.gathered_half + 1) * half)
        return torch.cat([held[rows] for held in self.positions])


def _contiguous_blocks(rank: int, kv_rank: int, n: int) -> tuple[Block, ...]:
    """Chunk j sees all of every earlier chunk, nothing of later ones."""
    return (Block(0, n, 0, n, False),) if kv_rank < rank else ()


def _zigzag_blocks(rank: int, kv_rank: int, n: int) -> tuple[Block, ...]:
    """Chunks j and 2r-1-j against chunks k and 2r-1-k: a lower kv rank's lower chunk is visible to both q chunks;
    a higher kv rank is visible (all of it) to the upper q chunk only."""
    half = n // 2
    if kv_rank < rank:
        return (Block(0, n, 0, half, False),)
    return (Block(half, n, 0, n, False),)


def _stripe_blocks(rank: int, kv_rank: int, n: int) -> tuple[Block, ...]:
    """q token i*r+j sees kv token m*r+k iff m <= i (k < j) or m < i (k > j)."""
    if kv_rank < rank:
        return (Block(0, n, 0, n, True),)
    return (Block(1, n, 0, n - 1, True),) if n > 1 else ()


# the causal blocks of a pass-K/V step between two different ring ranks, per layout (layout.RING_IMPL_TABLE)
BLOCK_RULES = {"contiguous": _contiguous_blocks, "zigzag": _zigzag_blocks, "stripe": _stripe_blocks}


def _pass_kv_blocks(layout: str, rank: int, kv_rank: int, n: int, causal: bool) -> tuple[Block, ...]:
    if not causal:
        return (Block(0, n, 0, n, False),)
    if kv_rank == rank:
        return (Block(0, n, 0, n, True),)  # for zigzag too: chunk 2r-1-j sees all of chunk j
    return BLOCK_RULES[layout](rank, kv_rank, n)


def pass_kv_step_classes(ring_impl: str, seq_len: int, ring_degree: int,
                         causal: bool) -> tuple[tuple[tuple[tuple[Block, ...], int], ...], ...]:
    """Without documents, per pass-K/V step ``s``: the distinct block lists the ring ranks run and how many ranks
    run each, in O(r) (what a cost model needs, without building r schedules of r steps). Step 0: every rank its
    own square; step s >= 1: ranks s..r-1 see a lower kv rank, ranks 0..s-1 a higher one, and every rule of
    :data:`BLOCK_RULES` depends on the two ranks only through their order."""
    layout, n = check_ring_impl(ring_impl).layout, seq_len // ring_degree
    own = (((_pass_kv_blocks(layout, 0, 0, n, causal), ring_degree),),)
    below, above = _pass_kv_blocks(layout, 1, 0, n, causal), _pass_kv_blocks(layout, 0, 1, n, causal)
    if below == above:  # non-causal: every rank the same
        return own + tuple(((below, ring_degree),) for _ in range(1, ring_degree))
    return own + tuple(((below, ring_degree - s), (above, s)) for s in range(1, ring_degree))


def allgather_step_classes(seq_len: int, ring_degree: int,
                           causal: bool) -> tuple[tuple[tuple[Block, ...], int], ...]:
    """Without documents, the all-gather schedule as one step (its steps are buffers, not synchronised): each
    ring rank's blocks over both gathered halves, equal lists counted once."""
    n, counts = seq_len // ring_degree, {}
    for rank in range(ring_degree):
        blocks = tuple(block for step in _allgather_steps(ring_degree, rank, n, causal) for block in step.blocks)
        counts[blocks] = counts.get(blocks, 0) + 1
    return tuple(counts.items())


def _allgather_steps(ring_degree: int, rank: int, n: int, causal: bool) -> tuple[Step, ...]:
    """Blocks over the gathered halves. The lower buffer holds ring chunks 0..r-1 in order, the upper buffer
    ring chunks 2r-1..r (rank i's upper half is chunk 2r-1-i). q rows [0, c) are chunk ``rank``, rows [c, n) are
    chunk ``2r-1-rank``, which sees all lower chunks and the upper chunks of ranks rank+1..r-1."""
    c = n // 2
    everything = ring_degree * c
    if not causal:
        return tuple(Step(None, (Block(0, n, 0, everything, False),), half) for half in (0, 1))
    own = slice(rank * c, (rank + 1) * c)
    lower = [Block(0, c, 0, own.start, False)] if rank > 0 else []
    lower += [Block(0, c, own.start, own.stop, True), Block(c, n, 0, everything, False)]
    upper = [Block(c, n, own.stop, everything, False)] if rank < ring_degree - 1 else []
    upper += [Block(c, n, own.start, own.stop, True)]
    return Step(None, tuple(lower), 0), Step(None, tuple(upper), 1)


def _travelling_rows(positions: tuple[torch.Tensor, ...], offsets: tuple[int, ...], ring_degree: int,
                     ring_impl: str) -> tuple[torch.Tensor, ...]:
    """Per ring rank, the rows (indices into its positions) of documents the ring-local layout cuts."""
    owner = torch.tensor(ring_documents_of(offsets, ring_degree, ring_impl).owner, dtype=torch.long)
    starts = torch.tensor(offsets[:-1], dtype=torch.long)
    return tuple(torch.nonzero(owner[torch.searchsorted(starts, held, right=True) - 1] < 0).flatten()
                 for held in positions)


def build_schedule(
    ring_impl: str, seq_len: int, ulysses_degree: int, ring_degree: int, ring_rank: int, causal: bool,
    cu_seqlens: Optional[tuple[int, ...]] = None, document_layout: str = "local",
    positions: Optional[tuple[torch.Tensor, ...]] = None,
) -> RingSchedule:
    """The schedule of ring rank ``ring_rank`` for a sequence of ``seq_len`` tokens on a u x r grid. With
    ``cu_seqlens`` (validated offsets) the blocks come from the positions of the document layout
    ``document_layout``; ring-local documents stay home (only cut documents' rows travel). ``positions``: every
    ring rank's ``ring_positions`` when the caller has them (another rank's schedule of the same call shape)."""
    return _ScheduleBuilder(ring_impl, seq_len, ulysses_degree, ring_degree, causal, cu_seqlens, document_layout,
                            positions).schedule(ring_rank)


def build_schedules(
    ring_impl: str, seq_len: int, ulysses_degree: int, ring_degree: int, causal: bool,
    cu_seqlens: Optional[tuple[int, ...]] = None, document_layout: str = "local",
    positions: Optional[tuple[torch.Tensor, ...]] = None,
) -> tuple[RingSchedule, ...]:
    """Every ring rank's :func:`build_schedule` at once (what a cost model needs): the positions, the travelling
    rows and each K/V rank's position runs are found once, not once per rank."""
    builder = _ScheduleBuilder(ring_impl, seq_len, ulysses_degree, ring_degree, causal, cu_seqlens, document_layout,
                               positions)
    return tuple(builder.schedule(rank) for rank in range(ring_degree))


class _ScheduleBuilder:
    """What the schedules of one call shape share: the ring ranks' positions, the travelling rows and, with
    documents, the position runs of each rank's rows and of the K/V rows each rank sends."""

    def __init__(self, ring_impl, seq_len, ulysses_degree, ring_degree, causal, cu_seqlens, document_layout,
                 positions) -> None:
        self.impl = check_ring_impl(ring_impl)
        if self.impl.transport not in ("pass_kv", "allgather"):  # usp_attn checked the name; this catches mqsp
            raise ValueError(f"ring_impl {ring_impl!r} has no ring schedule: choose one of "
                             f"{', '.join(RING_SCHEDULE_IMPLS)} (mqsp passes Q: megatron_usp.mqsp)")
        self.ring_degree, self.causal, self.cu_seqlens = ring_degree, causal, cu_seqlens
        self.n = seq_len // ring_degree
        self.transport = self.impl.transport if ring_degree > 1 else "pass_kv"  # r = 1: the local block of any impl
        if positions is None:
            positions = tuple(ring_positions(seq_len, ulysses_degree, ring_degree, rank, ring_impl,
                                             cu_seqlens=cu_seqlens, document_layout=document_layout)
                              for rank in range(ring_degree))
        self.positions = positions
        self.travel = None
        if cu_seqlens is not None and self.transport == "pass_kv" and ring_degree > 1 and ring_local(
                ring_impl, document_layout):
            self.travel = _travelling_rows(positions, cu_seqlens, ring_degree, ring_impl)
        self._runs: dict = {}  # (kind, rank or half) -> position runs

    def _runs_of(self, key, rows: torch.Tensor):
        if key not in self._runs:
            self._runs[key] = position_runs(rows, self.cu_seqlens)
        return self._runs[key]

    def schedule(self, ring_rank: int) -> RingSchedule:
        ring_degree, n, causal = self.ring_degree, self.n, self.causal
        if self.transport == "allgather":
            shells = _allgather_steps(ring_degree, ring_rank, n, causal)
        else:
            shells = tuple(Step(kv_rank, _pass_kv_blocks(self.impl.layout, ring_rank, kv_rank, n, causal))
                           for kv_rank in ((ring_rank - s) % ring_degree for s in range(ring_degree)))
        schedule = RingSchedule(self.impl.name, self.transport, shells, self.positions, self.travel)
        if self.cu_seqlens is None:
            return schedule
        # documents: the same transports; each step's blocks are the visible pieces of its positions (the q runs
        # are this rank's in every step; each K/V rank's runs the same for every rank it reaches)
        held = self.positions[ring_rank]
        q_runs = self._runs_of(("q", ring_rank), held)
        steps = []
        for shell in shells:
            if shell.kv_rank == ring_rank:
                blocks = own_blocks(held, causal, self.cu_seqlens)
            else:
                kv_positions = schedule.kv_positions(shell)
                kv_key = ("kv", shell.kv_rank, shell.gathered_half)
                blocks = position_blocks(held, kv_positions, causal, self.cu_seqlens, q_runs,
                                         self._runs_of(kv_key, kv_positions))
            steps.append(Step(shell.kv_rank, tuple(blocks), shell.gathered_half))
        return RingSchedule(self.impl.name, self.transport, tuple(steps), self.positions, self.travel)


def _gather_halves(kv: torch.Tensor, ring_comm: comm.RingComm) -> list[torch.Tensor]:
    """``[2, b, n, h, d]`` -> the lower and upper halves of every ring rank's K/V, ``[2, b, r*n/2, h, d]`` each."""
    half = kv.shape[2] // 2
    return [ring_comm.all_gather(kv[:, :, :half], dim=2), ring_comm.all_gather(kv[:, :, half:], dim=2)]


def _scatter_halves(dkv_halves: list[torch.Tensor], ring_comm: comm.RingComm) -> torch.Tensor:
    """Inverse of :func:`_gather_halves` for gradients: reduce-scatter (sum) each buffer, rejoin the halves."""
    return torch.cat([ring_comm.reduce_scatter(dkv, dim=2) for dkv in dkv_halves], dim=2)


def _step_work(schedule: RingSchedule, step: Step, masker: Optional[BlockMasker], kernel: AttentionKernel):
    """The kernel calls of ``step``: its grouped blocks, or the pieces ``masker``'s mask leaves of them."""
    kv_positions = schedule.kv_positions(step) if masker is not None else None
    return plan_work(step.blocks, step.grouped, kv_positions, masker, kernel)


def ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    schedule: RingSchedule,
    ring_comm: comm.RingComm,
    kernel: AttentionKernel,
    softmax_scale: float,
    masker: Optional[BlockMasker] = None,
    max_logit: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``schedule`` (restricted by ``masker``'s mask when given). Returns ``out [b, n, h, d]`` and
    ``lse [b, h, n]``, both in the accumulation dtype; raises ``max_logit [h]`` (when given) to the largest
    visible logit of this rank's blocks."""
    acc = accumulation_dtype(q.dtype)
    batch, n, heads, head_dim = q.shape
    out = torch.zeros(batch, n, heads, head_dim, dtype=acc, device=q.device)
    lse = torch.full((batch, heads, n), float("-inf"), dtype=acc, device=q.device)
    touched = TouchedRows()

    def compute(step: Step, kv: torch.Tensor) -> None:
        work = _step_work(schedule, step, masker, kernel)
        forward_blocks(q, kv[0], kv[1], work, kernel, softmax_scale, out, lse, max_logit, touched)

    transport = _forward_allgather if schedule.transport == "allgather" else _forward_pass_kv
    transport(torch.stack([k, v]), schedule, ring_comm, compute)
    nan_query_rows(q, out, lse)
    return out, lse


def _travelling(schedule: RingSchedule, kv: torch.Tensor):
    """``(own rows that travel, the travelling row indices, a function owner -> its travelling row count)``: all
    rows (``kv`` itself, no copy) unless the schedule is ring-local."""
    if schedule.travel is None:
        return kv, None, lambda owner: None  # every rank sends all its rows: like-shaped buffers
    own = schedule.steps[0].kv_rank
    rows = schedule.travel_on(own, kv.device)
    sizes = [len(t) for t in schedule.travel]
    return kv.index_select(2, rows), rows, lambda owner: sizes[owner % len(sizes)]


def _forward_pass_kv(kv: torch.Tensor, schedule: RingSchedule, ring_comm: comm.RingComm, compute) -> None:
    """Pass K/V: each step computes on the K/V at hand while they travel on to the next ring rank. The own step
    sees every own row; with ring-local documents only the travelling rows set off (and arrive)."""
    steps = schedule.steps
    exchanger = ring_comm.exchanger() if len(steps) > 1 else None
    buffer, _, rows_of = _travelling(schedule, kv)
    own = steps[0].kv_rank
    for index, step in enumerate(steps):
        more = index + 1 < len(steps)
        if more:  # the next step's K/V travel while this step computes
            exchanger.post(buffer, recv_rows=rows_of(own - index - 1))
        compute(step, kv if index == 0 else buffer)
        if more:
            buffer = exchanger.wait()


def _forward_allgather(kv: torch.Tensor, schedule: RingSchedule, ring_comm: comm.RingComm, compute) -> None:
    """All-gather: both halves of every ring rank's K/V gathered once; each step reads one buffer."""
    gathered = _gather_halves(kv, ring_comm)
    for step in schedule.steps:
        compute(step, gathered[step.gathered_half])


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    schedule: RingSchedule,
    ring_comm: comm.RingComm,
    kernel: AttentionKernel,
    softmax_scale: float,
    masker: Optional[BlockMasker] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ring_forward`. dq accumulates here in fp32; dK/dV accumulate in fp32 (while they
    travel the ring back to their owner, or in the gathered buffers); each is cast to its input dtype once."""
    acc = accumulation_dtype(q.dtype)
    # Rows that saw no key: lse = +inf makes their probabilities exp(s - inf) = 0 (and gradients 0) in every kernel.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)

    def compute(step: Step, kv: torch.Tensor, dkv: torch.Tensor) -> None:
        work = _step_work(schedule, step, masker, kernel)
        backward_blocks(dout, q, kv[0], kv[1], out, lse, work, kernel, softmax_scale, dq, dkv[0], dkv[1])

    transport = _backward_allgather if schedule.transport == "allgather" else _backward_pass_kv
    dkv = transport(torch.stack([k, v]), schedule, ring_comm, compute, acc)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _backward_pass_kv(kv: torch.Tensor, schedule: RingSchedule, ring_comm: comm.RingComm, compute,
                      acc: torch.dtype) -> torch.Tensor:
    """Pass K/V as in the forward; each step's dK/dV share follows the K/V it belongs to around the ring, summing
    the shares of the ranks it passes, and is home after r sends. With ring-local documents the own step's dK/dV
    cover every own row and only the travelling rows' shares go round. Returns this rank's dK/dV ``[2, ...]``."""
    steps = schedule.steps
    dkv_own = torch.zeros(kv.shape, dtype=acc, device=kv.device)
    if len(steps) == 1:  # ring degree 1: the own K/V only, nothing travels
        compute(steps[0], kv, dkv_own)
        return dkv_own
    buffer, rows, rows_of = _travelling(schedule, kv)
    own = steps[0].kv_rank
    kv_exchanger, dkv_exchanger = ring_comm.exchanger(), ring_comm.exchanger()
    for index, step in enumerate(steps):
        more = index + 1 < len(steps)
        if more:
            kv_exchanger.post(buffer, recv_rows=rows_of(own - index - 1))
        if index == 0:
            compute(step, kv, dkv_own)
            dkv = dkv_own if rows is None else dkv_own.index_select(2, rows)
        else:
            dkv = torch.zeros(buffer.shape, dtype=acc, device=kv.device)
            compute(step, buffer, dkv)
            # the buffer arriving from the previous rank carries the shares of the ranks before us for these rows
            dkv += dkv_exchanger.wait()
        dkv_exchanger.post(dkv, recv_rows=rows_of(own - index - 1))
        if more:
            buffer = kv_exchanger.wait()
    home = dkv_exchanger.wait()  # after r sends, the shares of every rank for our own (travelling) rows
    if rows is None:
        return home
    dkv_own.index_copy_(2, rows, home)
    return dkv_own


def _backward_allgather(kv: torch.Tensor, schedule: RingSchedule, ring_comm: comm.RingComm, compute,
                        acc: torch.dtype) -> torch.Tensor:
    """All-gather as in the forward; the gradients of each gathered buffer accumulate in place and are
    reduce-scattered (summed) back to their owners once. Returns this rank's dK/dV ``[2, ...]``."""
    gathered = _gather_halves(kv, ring_comm)
    grads = [torch.zeros(g.shape, dtype=acc, device=g.device) for g in gathered]
    for step in schedule.steps:
        compute(step, gathered[step.gathered_half], grads[step.gathered_half])
    return _scatter_halves(grads, ring_comm)


def refuse_double_backward() -> None:
    """Called first in the attention backward: with ``create_graph=True`` (double backward: gradient penalties,
    Hessian-vector products) autograd runs it with grad mode on, and the hand-written backward is not itself
    differentiable; its gradients would have no graph (second-order terms silently missing) or fail deep inside
    with an in-place error. Every rank reaches this point, so every rank raises: no hang."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "usp_attn does not support double backward: its backward (ring / mqsp schedule over hand-written "
            "kernel gradients) is not differentiable, so torch.autograd.grad(..., create_graph=True) / "
            "backward(create_graph=True) through it cannot give second-order gradients. Differentiate once "
            "(create_graph=False), or run attention for the higher-order term on one device."
        )


class ScheduledAttention(torch.autograd.Function):
    """The autograd node of every schedule (ring and MQSP): ``forward(q, k, v) -> (out, lse)`` in the accumulation
    dtype and ``backward(dout, q, k, v, out, lse) -> (dq, dk, dv)`` from the rows' FINAL out and lse. A
    ``softmax_offset [h]`` (attention sink) is one more term of that final lse (:func:`merge.merge_sink`): the
    backward with the final out / lse is then exact for q, k, v, and the offset's gradient is this rank's rows'
    share (:func:`merge.sink_gradient`)."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_offset, forward, backward):
        out, lse = forward(q, k, v)
        if softmax_offset is not None:
            out, lse = merge_sink(out, lse, softmax_offset)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, softmax_offset)
        ctx.backward_fn = backward
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_double_backward()
        q, k, v, out, lse, softmax_offset = ctx.saved_tensors
        dq, dk, dv = ctx.backward_fn(dout, q, k, v, out, lse)
        d_offset = None if softmax_offset is None else sink_gradient(dout, out, lse, softmax_offset)
        return dq, dk, dv, d_offset, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    schedule: RingSchedule,
    groups: USPGroups,
    kernel: AttentionKernel,
    softmax_scale: float,
    masker: Optional[BlockMasker] = None,
    softmax_offset: Optional[torch.Tensor] = None,
    max_logit: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Differentiable ring attention over ring-level-layout tensors; returns ``[b, n, heads, head_dim]``.
    ``softmax_offset [heads]``: an attention sink per head held here (:class:`ScheduledAttention`); ``max_logit
    [heads]`` (fp32): raised to the largest visible logit of this rank's blocks."""
    settings = dict(schedule=schedule, ring_comm=comm.RingComm(groups), kernel=kernel, softmax_scale=softmax_scale,
                    masker=masker)
    return ScheduledAttention.apply(q, k, v, softmax_offset,
                                    functools.partial(ring_forward, **settings, max_logit=max_logit),
                                    functools.partial(ring_backward, **settings))
