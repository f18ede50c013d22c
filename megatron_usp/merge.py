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
