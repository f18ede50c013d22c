"""Float64 single-process attention on the full sequence: the ground truth every test compares against."""
from __future__ import annotations

import torch


def reference_attention(q, k, v, *, causal: bool, softmax_scale=None) -> torch.Tensor:
    """``q [b, s, h, d]``, ``k, v [b, s, kv_heads, d]`` in float64 -> ``[b, s, h, d]``. Explicit masked softmax."""
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        s = q.shape[1]
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    expected = expected.to(torch.float64)
    return ((actual.to(torch.float64) - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
