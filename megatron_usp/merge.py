"""Merging partial attention results: the one place the online-softmax combination lives.

Contract of both merges (what single-device softmax gives): a row that sees no key on any side (every lse -inf)
is 0 with lse -inf, never NaN; a NaN lse on any side (NaN in q or k) makes the row's out and lse NaN, an
infinite one (an infinite logit: softmax is inf - inf) makes its out NaN with lse +inf; so NaN in means NaN out
(and NaN gradients), as single-device attention gives.
"""
from __future__ import annotations

import torch


def merge_partial(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial results over disjoint key sets.

    ``out, block_out [b, s, h, d]`` (accumulation dtype for ``out``), ``lse, block_lse [b, h, s]``.
    Stable form: ``out -= sigmoid(lse_b - lse) * (out - out_b)``; ``lse = logaddexp(lse, lse_b)``.
    Rows that see no key on either side (both lse = -inf) stay 0 with lse -inf; NaN / +inf lse: NaN out.
    """
    block_lse = block_lse.to(lse.dtype)
    diff = block_lse - lse
    # -inf - -inf (no key on either side): nothing to add. Any other NaN difference (a NaN logit, +inf on both
    # sides) stays NaN and makes the row NaN.
    diff = torch.where(torch.isneginf(lse) & torch.isneginf(block_lse), float("-inf"), diff)
    weight = torch.sigmoid(diff).transpose(1, 2).unsqueeze(-1)
    block_out = block_out.to(out.dtype)
    # a kernel's empty rows (lse -inf) may hold NaN: weight 0 must mean "adds nothing"
    block_out = torch.where(weight == 0, torch.zeros_like(block_out), block_out)
    return _infinite_logit_is_nan(out - weight * (out - block_out), torch.logaddexp(lse, block_lse))


def first_partial(block_out: torch.Tensor, block_lse: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`merge_partial` makes of a row's first partial (onto 0 with lse -inf), without the merge:
    ``block_out`` in ``dtype`` with rows that saw no key 0, rows with a NaN or +inf lse NaN."""
    block_lse = block_lse.to(dtype)
    rows = block_lse.transpose(1, 2).unsqueeze(-1)
    out = torch.where(torch.isneginf(rows), 0.0, block_out.to(dtype))  # a kernel's empty rows may hold NaN
    return out.masked_fill(torch.isnan(rows) | torch.isposinf(rows), float("nan")), block_lse


def _infinite_logit_is_nan(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row with lse = +inf saw an infinite logit: its softmax is NaN (inf - inf), so is its out, whatever a
    kernel wrote for it. Its lse stays +inf, as single-device kernels keep it: the backward then gives NaN exactly
    where theirs does (the infinite key's entries), not in every gradient row the query touches."""
    # unconditional: asking whether any row is infinite would make the host wait for the device at every merge
    return out.masked_fill(torch.isposinf(lse).transpose(1, 2).unsqueeze(-1), float("nan")), lse


def merge_rows(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
               rows: torch.Tensor) -> None:
    """Merge partial results of rows ``rows [t]`` (repeats allowed: one row may get several partials) into
    ``out [b, n, h, d]`` / ``lse [b, h, n]`` in place; ``part_out [b, t, h, d]``, ``part_lse [b, h, t]``.

    All partials of a row are combined at once against their common maximum lse (stable for any count);
    rows that see no key anywhere stay 0 with lse -inf; a NaN or +inf lse among a row's partials: NaN row.
    """
    part_lse = part_lse.to(lse.dtype)
    batch, heads = lse.shape[:2]
    index = rows.view(1, 1, -1).expand(batch, heads, -1)
    peak = lse.scatter_reduce(2, index, part_lse, reduce="amax", include_self=True)
    shift = torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak)
    own_weight = torch.exp(lse - shift)
    part_weight = torch.exp(part_lse - shift.index_select(2, rows))
    total = own_weight.index_add(2, rows, part_weight)
    part_out = torch.where(part_weight.transpose(1, 2).unsqueeze(-1) == 0, 0.0, part_out.to(out.dtype))
    weighted = (out * own_weight.transpose(1, 2).unsqueeze(-1)).index_add_(
        1, rows, part_out * part_weight.transpose(1, 2).unsqueeze(-1))
    # total 0: no key anywhere (0, lse -inf); a NaN total (a NaN or +inf lse among the partials) stays NaN
    scale = torch.where(total == 0, torch.zeros_like(total), 1.0 / total).transpose(1, 2).unsqueeze(-1)
    merged_lse = torch.where(torch.isposinf(peak), peak, torch.log(total) + shift)  # an infinite logit: +inf
    merged, merged_lse = _infinite_logit_is_nan(weighted * scale, merged_lse)
    out.copy_(merged)
    lse.copy_(merged_lse)


def nan_query_rows(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Make the rows of ``q [b, n, h, d]`` that hold a NaN NaN in ``out [b, n, h, d]`` / ``lse [b, h, n]`` (in
    place) when they saw any key. Needed because kernels may hide them: torch 2.13's CPU flash op returns out 0,
    lse 0 for a NaN query row of a short block, which the merges then treat as a finite partial. One pass over q
    per forward; rows that see no key keep their exact 0 and lse -inf."""
    bad = torch.isnan(q).any(-1).transpose(1, 2) & ~torch.isneginf(lse)  # [b, h, n]
    if bad.any():
        lse.masked_fill_(bad, float("nan"))
        out.masked_fill_(bad.transpose(1, 2).unsqueeze(-1), float("nan"))


def merge_sink(out: torch.Tensor, lse: torch.Tensor, softmax_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add an attention sink to the rows' final result: one more key per head with logit ``softmax_offset[h]`` and
    value 0 (megatron-core's ``softmax_type`` "off-by-one" = zeros, "learnable"). ``out [b, n, h, d]``, ``lse [b, h,
    n]`` (accumulation dtype), ``softmax_offset [h]``. Returns the new ``(out, lse)``: ``out * exp(lse - lse')``,
    ``lse' = logaddexp(lse, offset)``; a row that saw no key stays 0 (its lse becomes the offset)."""
    sink = softmax_offset.detach().to(lse.dtype).view(1, -1, 1).expand_as(lse)
    total = torch.logaddexp(lse, sink)
    weight = torch.exp(lse - total)  # lse -inf (no key): 0; +inf or NaN (an infinite / NaN logit): NaN
    return out * weight.transpose(1, 2).unsqueeze(-1).to(out.dtype), total


def sink_gradient(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, softmax_offset: torch.Tensor) -> torch.Tensor:
    """d loss / d ``softmax_offset [h]`` over these rows, from the FINAL ``out [b, n, h, d]`` / ``lse [b, h, n]``
    (sink included): ``-sum_rows p_sink * (dout . out)``, with ``p_sink = exp(offset - lse)``."""
    acc = lse.dtype
    p_sink = torch.exp(softmax_offset.detach().to(acc).view(1, -1, 1) - lse)
    dot = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [b, h, n]
    return -(p_sink * dot).sum(dim=(0, 2)).to(softmax_offset.dtype)
