"""The local attention kernel interface every backend implements.

Layout is bshd: ``q [batch, seq_q, heads, head_dim]``, ``k, v [batch, seq_k, kv_heads, head_dim]`` with
``heads % kv_heads == 0`` (GQA: query head h uses kv head ``h // (heads // kv_heads)``).
``causal=True`` is only asked for square blocks (seq_q == seq_k), where top-left and bottom-right alignment
agree, so kernels need not care which one they implement.

Kernels with ``supports_mask = True`` also take ``mask=`` (bool ``[b|1, h|1, seq_q, seq_k]``, True = visible) in
forward and backward; rows a mask empties give out 0 and lse -inf. Blocks with a mask go to the math kernel when
the chosen kernel has no mask support.
"""
from __future__ import annotations

from typing import Protocol

import torch


class AttentionKernel(Protocol):
    name: str

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, softmax_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``out [b, s_q, h, d]`` (q's dtype) and ``lse [b, h, s_q]`` (fp32, fp64 for fp64 inputs)."""
        ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        softmax_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients for one block given the FINAL ``out`` and ``lse`` of the rows (not this block's own):
        then the per-block gradients sum to the exact gradient. Finite ``lse`` only."""
        ...


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64: merges and gradient sums never run in bf16/fp16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim has stride 1, else a contiguous copy. Fused kernels (torch's CPU flash op,
    the CUDA aten ops, flash-attn) read head_dim rows as dense vectors: given a view such as ``x[..., ::2]`` or a
    ``[b, s, d, h]`` tensor permuted to bshd, the CPU op silently computes garbage. Copies only when needed."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def expand_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[b, s, kv_heads, d] -> [b, s, heads, d]`` by repeating each kv head for its query group."""
    groups = heads // x.shape[2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def reduce_kv_heads(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Inverse of :func:`expand_kv_heads` for gradients: sum each query group's replicas."""
    b, s, heads, d = grad.shape
    if heads == kv_heads:
        return grad
    return grad.view(b, s, kv_heads, heads // kv_heads, d).sum(dim=3)
