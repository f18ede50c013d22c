"""Reference kernel in plain torch (any device and dtype): explicit scores, exact lse, closed-form backward."""
from __future__ import annotations

import torch

from .base import accumulation_dtype, expand_kv_heads, reduce_kv_heads


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, softmax_scale: float, mask=None) -> torch.Tensor:
    acc = accumulation_dtype(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * softmax_scale
    if mask is not None:  # bool [b|1, h|1, s_q, s_k], True = visible
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:
        s_q, s_k = q.shape[1], k.shape[1]
        visible = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


class MathKernel:
    name = "math"
    supports_mask = True

    def forward(self, q, k, v, *, causal, softmax_scale, mask=None):
        heads = q.shape[2]
        acc = accumulation_dtype(q.dtype)
        scores = _scores(q, expand_kv_heads(k, heads), causal, softmax_scale, mask)
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, expand_kv_heads(v, heads).to(acc))
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, *, causal, softmax_scale, mask=None):
        heads, kv_heads = q.shape[2], k.shape[2]
        acc = accumulation_dtype(q.dtype)
        k_full, v_full = expand_kv_heads(k, heads).to(acc), expand_kv_heads(v, heads).to(acc)
        probs = torch.exp(_scores(q, k_full, causal, softmax_scale, mask) - lse.to(acc).unsqueeze(-1))
        dout, out = dout.to(acc), out.to(acc)
        dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout)
        dprobs = torch.einsum("bqhd,bkhd->bhqk", dout, v_full)
        delta = (dout * out).sum(-1).transpose(1, 2).unsqueeze(-1)  # [b, h, q, 1]
        dscores = probs * (dprobs - delta) * softmax_scale
        dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_full)
        dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.to(acc))
        return dq, reduce_kv_heads(dk, kv_heads), reduce_kv_heads(dv, kv_heads)
