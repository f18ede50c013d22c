"""verify_usp_attn: a production spot check of ``usp_attn`` against the same rows computed from all-gathered K/V.

One sampled query head and a few query rows per rank are recomputed in float64 from the whole sequence's K/V of
that head (all-gathered over the SP grid, sequence order restored) with the same masks (causal, documents from
``cu_seqlens`` or ``document_ids``, window) and compared with ``out``. The errors of all ranks are gathered first, so
every rank raises the same ``RuntimeError`` (no rank hangs in the next collective). It also checks that CP is on:
the grid has the size the caller expects and the ranks hold distinct sequence positions.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import comm
from .groups import USPGroups
from .layout import CuSeqlens
from .sharding import positions, unshard

_TOLERANCE = {torch.float64: (1e-6, 1e-6), torch.float32: (1e-4, 1e-4)}  # (atol, rtol); 16-bit: 2e-2, 2e-2


def _gather(x: torch.Tensor, groups: USPGroups) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in layout order (ring-major, ulysses-minor = ``cp_rank``)."""
    if groups.ulysses_degree > 1:
        x = comm.all_gather_no_grad(x, groups.ulysses, 0)
    if groups.ring_degree > 1:
        x = comm.all_gather_no_grad(x, groups.ring, 0)
    return x


def _document_of(cu_seqlens: CuSeqlens, seq_len: int) -> torch.Tensor:
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long).cpu()
    return torch.searchsorted(cu, torch.arange(seq_len), right=True)


def verify_usp_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    groups: USPGroups,
    *,
    ring_impl: str,
    causal: bool,
    softmax_scale: Optional[float] = None,
    cu_seqlens: Optional[CuSeqlens] = None,
    document_layout: str = "local",
    document_ids: Optional[torch.Tensor] = None,
    window: Optional[Sequence[int]] = None,
    softmax_offset: Optional[torch.Tensor] = None,
    heads: int = 1,
    rows: int = 4,
    seed: int = 0,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    expected_sp_size: Optional[int] = None,
    name: str = "usp_attn",
) -> float:
    """Check ``out = usp_attn(q, k, v, groups, ...)`` (all ``[b, s_local, heads|kv_heads, d]``, ``v`` and ``out`` may
    have another head dim (MLA); this rank's tokens in the layout of ``ring_impl`` / ``cu_seqlens`` /
    ``document_layout``; the same ``softmax_offset`` (attention sinks) when the call had one) on ``heads`` sampled query heads and ``rows`` sampled local query
    rows per rank. A collective over the SP grid: every rank calls it with the same arguments except the tensors.

    Raises ``RuntimeError`` on every rank naming ``name``, the grid and the error when some rank's rows differ by
    more than ``atol + rtol * |expected|`` (default by ``out.dtype``: 1e-4 for float32, 2e-2 for 16-bit floats),
    when ``groups.sp_size != expected_sp_size``, or when two ranks hold the same sequence position. Returns the
    largest absolute error over all ranks. Cost: two K/V all-gathers of one head and 2-3 tiny collectives.
    """
    grid = f"u={groups.ulysses_degree} r={groups.ring_degree} ring_impl={ring_impl}"
    where = f"USP check of {name} ({grid})"
    if expected_sp_size is not None and groups.sp_size != expected_sp_size:
        raise RuntimeError(f"{where}: the USP grid has {groups.sp_size} ranks but {expected_sp_size} were expected: "
                           "context parallelism is not set up as asked (check --ulysses-degree/--ring-degree and how "
                           "the groups were built)")
    for group, size, label in ((groups.ulysses, groups.ulysses_degree, "ulysses"),
                               (groups.ring, groups.ring_degree, "ring"), (groups.sp, groups.sp_size, "sp")):
        if group is not None and dist.get_world_size(group) != size:
            raise RuntimeError(f"{where}: the {label} group has {dist.get_world_size(group)} ranks, the grid says {size}")
    atol_default, rtol_default = _TOLERANCE.get(out.dtype, (2e-2, 2e-2))
    atol = atol_default if atol is None else atol
    rtol = rtol_default if rtol is None else rtol
    batch, s_local, n_heads, head_dim = q.shape
    seq_len = s_local * groups.sp_size
    gen = torch.Generator().manual_seed(seed)
    sampled_heads = torch.randperm(n_heads, generator=gen)[:heads].tolist()
    picked = torch.randperm(s_local, generator=gen)[:max(rows - 2, 0)].tolist()
    local_rows = torch.tensor(sorted({0, s_local - 1, *picked})[:max(rows, 1)], dtype=torch.long)
    held = positions(seq_len, groups, ring_impl=ring_impl, cu_seqlens=cu_seqlens, document_layout=document_layout)
    row_positions = held[local_rows]

    # CP is on: the ranks of the grid hold distinct positions
    every_position = _gather(row_positions.to(out.device), groups).cpu()
    duplicated = every_position.numel() != torch.unique(every_position).numel()

    scale = float(softmax_scale) if softmax_scale is not None else head_dim**-0.5
    kv_idx = torch.arange(seq_len).view(1, -1)
    q_pos = row_positions.view(-1, 1)
    visible = torch.ones(len(local_rows), seq_len, dtype=torch.bool)
    if causal:
        visible &= kv_idx <= q_pos
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= q_pos - kv_idx <= left
        if right >= 0:
            visible &= kv_idx - q_pos <= right
    if cu_seqlens is not None:
        doc = _document_of(cu_seqlens, seq_len)
        visible &= doc[q_pos] == doc[kv_idx]
    group_size = n_heads // k.shape[2]
    worst = torch.zeros(2, dtype=torch.float64)  # (max |error| / tolerance, max |error|)
    for head in sampled_heads:
        kv_head = head // group_size
        k_full, v_full = (unshard(x[:, :, kv_head].detach(), groups, dim=1, ring_impl=ring_impl,
                                  cu_seqlens=cu_seqlens, document_layout=document_layout).cpu().double()
                           for x in (k, v))
        for b in range(batch):
            mask = visible
            if document_ids is not None:
                ids = document_ids[b].cpu()
                mask = mask & (ids[q_pos] == ids[kv_idx])
            scores = q[b, local_rows.to(q.device), head].detach().cpu().double() @ k_full[b].T * scale
            scores = scores.masked_fill(~mask, float("-inf"))
            if softmax_offset is not None:  # the sink: one more key of that logit and value 0
                sink = softmax_offset[head].detach().cpu().double().expand(scores.shape[0], 1)
                probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[:, :-1]
            else:
                probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            expected = probs @ v_full[b]
            actual = out[b, local_rows.to(out.device), head].detach().cpu().double()
            error = (actual - expected).abs()
            error = error.nan_to_num(float("inf"))
            worst = torch.maximum(worst, torch.stack([(error / (atol + rtol * expected.abs())).max(), error.max()]))
    per_rank = torch.cat([worst, torch.tensor([float(duplicated)], dtype=torch.float64)]).view(1, 3)
    table = _gather(per_rank.to(out.device), groups).cpu()
    max_error = table[:, 1].max().item()
    if bool((table[:, 2] > 0).any()):
        raise RuntimeError(f"{where}: ranks hold the same sequence positions (sampled rows at {every_position.tolist()}"
                           "): the sequence is not sharded over the grid, so context parallelism is not really on")
    bad = [rank for rank in range(table.shape[0]) if not table[rank, 0] <= 1.0]
    if bad:
        raise RuntimeError(
            f"{where}: output differs from attention recomputed on all-gathered K/V by up to {max_error:.3e} "
            f"(tolerance atol={atol:g} + rtol={rtol:g}*|expected|) on SP rank(s) {bad} (layout order), sampled "
            f"head(s) {sampled_heads}; errors per rank: {[f'{e:.2e}' for e in table[:, 1].tolist()]}. The USP "
            "result is wrong: stop and report this (grid, ring_impl, kernel, masks)")
    return max_error
