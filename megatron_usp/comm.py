"""Communication: autograd-aware all-to-all / all-gather / reduce-scatter, and the ring exchanger.

Our own autograd functions: ``torch.distributed.nn`` treats group ranks as global ranks on gloo subgroups.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    send = torch.stack(torch.chunk(x, world, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
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
    _all_gather_single(out, x.contiguous(), group=group)
    return torch.cat(out.view((world,) + tuple(x.shape)).unbind(0), dim=dim)


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    chunks = torch.chunk(x, world, dim=dim)
    out = torch.empty_like(chunks[0], memory_format=torch.contiguous_format)
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

    def post(self, send: torch.Tensor) -> None:
        if self._pending is not None:
            raise RuntimeError("RingExchanger: wait() for the previous transfer before posting another")
        send = send.contiguous()
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next_rank, self.group),
            dist.P2POp(dist.irecv, recv, self.prev_rank, self.group),
        ]
        self._pending = (dist.batch_isend_irecv(ops), recv, send)

    def wait(self) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError("RingExchanger: nothing posted")
        requests, recv, _send = self._pending
        for request in requests:
            request.wait()
        self._pending = None
        return recv
