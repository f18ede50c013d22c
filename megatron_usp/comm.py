"""Communication: autograd-aware all-to-all / all-gather / reduce-scatter, and the ring exchanger.

Our own autograd functions: ``torch.distributed.nn`` treats group ranks as global ranks on gloo subgroups.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist


@dataclass
class TrafficCounter:
    """Bytes this rank sent to other ranks, per collective kind, and the number of calls (a debug counter)."""

    bytes_sent: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1


_active_counter: contextvars.ContextVar[Optional[TrafficCounter]] = contextvars.ContextVar("usp_traffic", default=None)


@contextlib.contextmanager
def count_traffic() -> Iterator[TrafficCounter]:
    """``with count_traffic() as counter: ...`` counts what this rank sends inside the block."""
    counter = TrafficCounter()
    token = _active_counter.set(counter)
    try:
        yield counter
    finally:
        _active_counter.reset(token)


def _record(kind: str, nbytes: int) -> None:
    counter = _active_counter.get()
    if counter is not None:
        counter.add(kind, nbytes)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    send = torch.stack(torch.chunk(x, world, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    _record("all_to_all", _nbytes(send) * (world - 1) // world)  # the chunk kept here does not travel
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into ``world`` chunks along ``scatter_dim``, send chunk i to rank i, concatenate what
    arrives along ``gather_dim`` (in rank order). Differentiable; the backward is the inverse all-to-all."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


# torch >= 2.13 renames the tensor collectives; detect the new names by feature, fall back to the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _record("all_gather", _nbytes(x) * (world - 1))  # ring algorithm: each rank forwards world-1 chunks
    _all_gather_single(out, x.contiguous(), group=group)
    return torch.cat(out.view((world,) + tuple(x.shape)).unbind(0), dim=dim)


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    chunks = torch.chunk(x, world, dim=dim)
    out = torch.empty_like(chunks[0], memory_format=torch.contiguous_format)
    _record("reduce_scatter", _nbytes(out) * (world - 1))
    _reduce_scatter_single(out, torch.cat(chunks, dim=0).contiguous(), group=group)
    return out


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order. Backward: reduce-scatter (sum)."""
    return _AllGather.apply(x, group, dim)


def all_gather_no_grad(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    return _all_gather(x, group, dim)


def reduce_scatter_no_grad(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Sum ``x`` over ranks and keep chunk ``rank`` of ``world`` along ``dim``."""
    return _reduce_scatter(x, group, dim)


def _collective_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """A device whose tensors the backend of ``group`` takes: CPU where gloo serves it, else the current GPU."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _grid_stages(groups) -> list:
    """The groups to gather over so that every rank of the grid sees every other: the SP group where known, else
    the ulysses group then the ring group (each only where its degree is > 1)."""
    if groups.sp is not None:
        return [(groups.sp_size, groups.sp)]
    return [(d, g) for d, g in ((groups.ulysses_degree, groups.ulysses), (groups.ring_degree, groups.ring)) if d > 1]


def grid_all_gather_ints(values: list[int], groups) -> list[list[int]]:
    """Every rank's ``values`` (same length everywhere) over the ``u x r`` grid of ``groups`` (in no promised
    order): one small all-gather over ``groups.sp`` where set, else one over the ulysses group and one over the
    ring group. Not counted by :func:`count_traffic` (a check, not the algorithm's traffic). Collective over the
    grid; on NCCL the result comes back to the host (a device sync)."""
    stages = _grid_stages(groups)
    device = _collective_device(stages[0][1]) if stages else torch.device("cpu")
    x = torch.tensor(values, dtype=torch.int64, device=device).unsqueeze(0)
    for degree, group in stages:
        out = torch.empty((degree * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=device)
        _all_gather_single(out, x, group=group)
        x = out
    return x.cpu().tolist()


def grid_all_gather_objects(obj, groups) -> list:
    """``grid_all_gather_ints`` for picklable objects (slow: for error paths)."""
    gathered = [obj]
    for degree, group in _grid_stages(groups):
        out: list = [None] * degree
        dist.all_gather_object(out, gathered, group=group)
        gathered = [item for part in out for item in part]
    return gathered


class RingExchanger:
    """Sends a tensor to the next ring rank while receiving one from the previous rank.

    Send and receive are posted together in one ``batch_isend_irecv`` (paired, so NCCL cannot deadlock);
    ``post`` returns at once so the caller can compute while the transfer runs, ``wait`` returns what arrived.
    """

    def __init__(self, ring_ranks: tuple[int, ...], ring_rank: int, group: Optional[dist.ProcessGroup]):
        self.group = group
        size = len(ring_ranks)
        self.next_rank = ring_ranks[(ring_rank + 1) % size]
        self.prev_rank = ring_ranks[(ring_rank - 1) % size]
        self._pending: Optional[tuple[list, torch.Tensor, torch.Tensor]] = None

    def post(self, send: torch.Tensor, recv_rows: Optional[int] = None, dim: int = 2) -> None:
        """Send ``send``; receive a tensor like it, or with ``recv_rows`` rows along ``dim`` (the senders' sizes
        differ). An empty side is not posted: a ring step with nothing to pass moves nothing."""
        if self._pending is not None:
            raise RuntimeError("RingExchanger: wait() for the previous transfer before posting another")
        send = send.contiguous()
        if recv_rows is None:
            recv = torch.empty_like(send)
        else:
            shape = list(send.shape)
            shape[dim] = recv_rows
            recv = torch.empty(shape, dtype=send.dtype, device=send.device)
        ops = []
        if send.numel():
            _record("ring_p2p", _nbytes(send))
            ops.append(dist.P2POp(dist.isend, send, self.next_rank, self.group))
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, self.prev_rank, self.group))
        self._pending = (dist.batch_isend_irecv(ops) if ops else [], recv, send)

    def wait(self) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError("RingExchanger: nothing posted")
        requests, recv, _send = self._pending
        for request in requests:
            request.wait()
        self._pending = None
        return recv


class RingComm:
    """The ring group's transfers as ring.py and mqsp.py use them: exchangers, all-gather, reduce-scatter,
    all-reduce. A ring of one rank communicates nothing."""

    def __init__(self, groups) -> None:
        self.groups = groups
        self.rank = groups.ring_rank
        self.alone = groups.ring_degree == 1

    def exchanger(self) -> RingExchanger:
        return RingExchanger(self.groups.ring_ranks, self.groups.ring_rank, self.groups.ring)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.alone else all_gather_no_grad(x, self.groups.ring, dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.alone else reduce_scatter_no_grad(x, self.groups.ring, dim)

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In place; returns ``x``."""
        if not self.alone:
            _record("all_reduce", _nbytes(x) * 2 * (self.groups.ring_degree - 1) // self.groups.ring_degree)
            dist.all_reduce(x, op=op, group=self.groups.ring)
        return x
