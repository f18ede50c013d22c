"""Variable-length ("varlen") attention: many independent segments in one kernel call.

Packed documents cut a ring block into pieces (a query run against a key run of the same document), each fully
visible or an aligned causal square. The engine packs the pieces of one kind side by side and makes one call:

``q [b, Tq, h, d]``, ``k, v [b, Tk, kv_h, d]``; segment ``i`` is query rows ``cu_q[i]:cu_q[i+1]`` against key rows
``cu_k[i]:cu_k[i+1]`` (``cu_q``, ``cu_k``: :class:`Segments`), the same segments in every batch row. ``causal`` is
asked only of segments with as many queries as keys, so top-left and bottom-right alignment agree. Returns
``out [b, Tq, h, d]`` and ``lse [b, h, Tq]`` (fp32; -inf for rows of empty segments), like the dense interface;
the backward takes the FINAL out and lse of the rows, as the dense backward does.

Kernels that have a native varlen entry point implement ``varlen_forward`` / ``varlen_backward`` with this
signature (they flatten the batch into the token dimension themselves). Any other kernel gets
:func:`varlen_forward` / :func:`varlen_backward` below, which call its dense entry points once per segment.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .base import AttentionKernel, accumulation_dtype


@dataclass(frozen=True)
class Segments:
    """Offsets of the segments of one varlen call (python ints; device tensors built once on demand)."""

    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]

    @cached_property
    def max_q(self) -> int:
        return max((b - a for a, b in zip(self.cu_q, self.cu_q[1:])), default=0)

    @cached_property
    def max_k(self) -> int:
        return max((b - a for a, b in zip(self.cu_k, self.cu_k[1:])), default=0)

    def __len__(self) -> int:
        return len(self.cu_q) - 1

    def batched(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 ``cu_q, cu_k`` over ``batch`` rows flattened into the token dimension (what native varlen
        kernels take: ``[batch * Tq, h, d]`` with the segments of row ``i`` shifted by ``i * Tq``)."""
        cu_q, cu_k = torch.tensor(self.cu_q, dtype=torch.int32), torch.tensor(self.cu_k, dtype=torch.int32)
        if batch > 1:
            rows = torch.arange(batch, dtype=torch.int32)[:, None]
            cu_q = torch.cat([cu_q[:1], (cu_q[None, 1:] + rows * cu_q[-1]).reshape(-1)])
            cu_k = torch.cat([cu_k[:1], (cu_k[None, 1:] + rows * cu_k[-1]).reshape(-1)])
        return cu_q.to(device), cu_k.to(device)


def _segment_slices(segments: Segments):
    for i in range(len(segments)):
        yield slice(segments.cu_q[i], segments.cu_q[i + 1]), slice(segments.cu_k[i], segments.cu_k[i + 1])


def varlen_forward(kernel: AttentionKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                   *, causal: bool, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One varlen forward with ``kernel``'s native entry point, else one dense call per non-empty segment."""
    native = getattr(kernel, "varlen_forward", None)
    if native is not None:
        return native(q, k, v, segments, causal=causal, softmax_scale=softmax_scale)
    batch, rows, heads, _ = q.shape
    out = torch.zeros(batch, rows, heads, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.full((batch, heads, rows), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    for q_rows, kv_rows in _segment_slices(segments):
        if q_rows.stop > q_rows.start and kv_rows.stop > kv_rows.start:
            out[:, q_rows], lse[:, :, q_rows] = kernel.forward(
                q[:, q_rows], k[:, kv_rows], v[:, kv_rows], causal=causal, softmax_scale=softmax_scale
            )
    return out, lse


def varlen_backward(kernel: AttentionKernel, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, segments: Segments, *, causal: bool,
                    softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`varlen_forward` given the rows' final ``out`` and ``lse`` (finite for every row)."""
    native = getattr(kernel, "varlen_backward", None)
    if native is not None:
        return native(dout, q, k, v, out, lse, segments, causal=causal, softmax_scale=softmax_scale)
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for q_rows, kv_rows in _segment_slices(segments):
        if q_rows.stop > q_rows.start and kv_rows.stop > kv_rows.start:
            grads = kernel.backward(dout[:, q_rows], q[:, q_rows], k[:, kv_rows], v[:, kv_rows], out[:, q_rows],
                                    lse[:, :, q_rows], causal=causal, softmax_scale=softmax_scale)
            dq[:, q_rows] += grads[0]
            dk[:, kv_rows] += grads[1]
            dv[:, kv_rows] += grads[2]
    return dq, dk, dv
