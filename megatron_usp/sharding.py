"""shard / unshard / positions: the user-facing views of ``layout.global_positions``."""
from __future__ import annotations

from typing import Optional

import torch

from . import comm
from .groups import USPGroups
from .layout import CuSeqlens, global_positions


def positions(seq_len: int, groups: USPGroups, *, ring_impl: str = "zigzag",
              cu_seqlens: Optional[CuSeqlens] = None, document_layout: str = "local") -> torch.LongTensor:
    """Global positions of the tokens this rank holds, in local order (use them for RoPE). With ``cu_seqlens``
    (document offsets of the row) the document layout ``document_layout`` (see ``layout.py``)."""
    return global_positions(
        seq_len, groups.ulysses_degree, groups.ring_degree, groups.ulysses_rank, groups.ring_rank, ring_impl,
        cu_seqlens=cu_seqlens, document_layout=document_layout,
    )


def _check_dim(x: torch.Tensor, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a {x.dim()}-D tensor")
    return dim % x.dim()


def shard(x: torch.Tensor, groups: USPGroups, *, dim: int = 1, ring_impl: str = "zigzag",
          cu_seqlens: Optional[CuSeqlens] = None, document_layout: str = "local") -> torch.Tensor:
    """The part of the full tensor ``x`` (sequence along ``dim``) that this rank holds. No communication."""
    dim = _check_dim(x, dim)
    held = positions(x.shape[dim], groups, ring_impl=ring_impl, cu_seqlens=cu_seqlens,
                     document_layout=document_layout)
    return x.index_select(dim, held.to(x.device))


def unshard(x_local: torch.Tensor, groups: USPGroups, *, dim: int = 1, ring_impl: str = "zigzag",
            cu_seqlens: Optional[CuSeqlens] = None, document_layout: str = "local") -> torch.Tensor:
    """All-gather every rank's shard and restore sequence order (inverse of :func:`shard`). Differentiable:
    the gradient of a shard is the sum over ranks of the gradient at its positions."""
    dim = _check_dim(x_local, dim)
    seq_len = x_local.shape[dim] * groups.sp_size
    held = []
    for ring_rank in range(groups.ring_degree):
        for ulysses_rank in range(groups.ulysses_degree):
            held.append(
                global_positions(
                    seq_len, groups.ulysses_degree, groups.ring_degree, ulysses_rank, ring_rank, ring_impl,
                    cu_seqlens=cu_seqlens, document_layout=document_layout,
                )
            )
    gathered = x_local
    if groups.ulysses_degree > 1:
        gathered = comm.all_gather(gathered, groups.ulysses, dim=dim)
    if groups.ring_degree > 1:
        gathered = comm.all_gather(gathered, groups.ring, dim=dim)
    # gathered is ordered ring-major, ulysses-minor: the same order as `held`
    return gathered.index_select(dim, torch.argsort(torch.cat(held)).to(gathered.device))
