"""Merging partial attention results: the one place the online-softmax combination lives."""
from __future__ import annotations

import torch


def merge_partial(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial results over disjoint key sets.

    ``out, block_out [b, s, h, d]`` (accumulation dtype for ``out``), ``lse, block_lse [b, h, s]``.
    Stable form: ``out -= sigmoid(lse_b - lse) * (out - out_b)``; ``lse = logaddexp(lse, lse_b)``.
    Rows that see no key on either side (both lse = -inf) stay 0 with lse -inf, never NaN.
    """
    block_lse = block_lse.to(lse.dtype)
    diff = (block_lse - lse).nan_to_num(nan=float("-inf"))  # -inf - -inf: nothing to add
    weight = torch.sigmoid(diff).transpose(1, 2).unsqueeze(-1)
    block_out = block_out.to(out.dtype)
    block_out = torch.where(weight > 0, block_out, torch.zeros_like(block_out))  # a kernel's empty rows may be NaN
    return out - weight * (out - block_out), torch.logaddexp(lse, block_lse)


def merge_rows(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
               rows: torch.Tensor) -> None:
    """Merge partial results of rows ``rows [t]`` (repeats allowed: one row may get several partials) into
    ``out [b, n, h, d]`` / ``lse [b, h, n]`` in place; ``part_out [b, t, h, d]``, ``part_lse [b, h, t]``.

    All partials of a row are combined at once against their common maximum lse (stable for any count);
    rows that see no key anywhere stay 0 with lse -inf.
    """
    part_lse = part_lse.to(lse.dtype)
    batch, heads = lse.shape[:2]
    index = rows.view(1, 1, -1).expand(batch, heads, -1)
    peak = lse.scatter_reduce(2, index, part_lse, reduce="amax", include_self=True)
    shift = torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak)
    own_weight = torch.exp(lse - shift)
    part_weight = torch.exp(part_lse - shift.index_select(2, rows))
    total = own_weight.index_add(2, rows, part_weight)
    part_out = torch.where(part_weight.transpose(1, 2).unsqueeze(-1) > 0, part_out.to(out.dtype), 0.0)
    weighted = (out * own_weight.transpose(1, 2).unsqueeze(-1)).index_add_(
        1, rows, part_out * part_weight.transpose(1, 2).unsqueeze(-1))
    scale = torch.where(total > 0, 1.0 / total, torch.zeros_like(total)).transpose(1, 2).unsqueeze(-1)
    out.copy_(weighted * scale)
    lse.copy_(torch.log(total) + shift)
