"""What tests and tools check against: float64 single-process attention on the full sequence (the ground truth),
its masks and max logits, the relative error every comparison reports, and random varlen segments with every kind
of emptiness. Float64 and obvious on purpose: slow, for checking only."""
from __future__ import annotations

import random
from typing import Optional, Sequence, Tuple

import torch

from .kernels.varlen import Segments


def dense_mask(batch, heads, seq_len, *, causal, window=None, document_ids=None, mask_mod=None) -> torch.Tensor:
    """The full ``[b, h, s, s]`` boolean mask (True = visible), built the obvious way (checking only)."""
    q_idx, kv_idx = torch.arange(seq_len).view(-1, 1), torch.arange(seq_len).view(1, -1)
    visible = torch.ones(batch, heads, seq_len, seq_len, dtype=torch.bool)
    if causal:
        visible &= kv_idx <= q_idx
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= q_idx - kv_idx <= left
        if right >= 0:
            visible &= kv_idx - q_idx <= right
    if document_ids is not None:
        visible &= (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
    if mask_mod is not None:
        for b in range(batch):
            for h in range(heads):
                visible[b, h] &= mask_mod(torch.tensor(b), torch.tensor(h), q_idx, kv_idx)
    return visible


def reference_attention(q, k, v, *, causal: bool, softmax_scale=None, mask=None, softmax_offset=None) -> torch.Tensor:
    """``q [b, s, h, d]``, ``k [b, s, kv_heads, d]``, ``v [b, s, kv_heads, d_v]`` in float64 -> ``[b, s, h, d_v]``.
    Explicit masked softmax; ``mask [b, h, s, s]`` (True = visible) on top of ``causal``; ``softmax_offset [h]``:
    one more key of that logit and value 0 in every row's softmax; rows that see nothing give 0."""
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        s = q.shape[1]
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if softmax_offset is not None:
        sink = softmax_offset.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row is all -inf: NaN -> 0
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def reference_max_logit(q, k, *, causal: bool, softmax_scale=None, mask=None) -> torch.Tensor:
    """Per head ``[h]``: the largest scaled logit over batch, rows and visible keys (float64; -inf if none)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    scale = q.shape[3] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(heads // kv_heads, dim=2)) * scale
    visible = torch.ones(scores.shape[2:], dtype=torch.bool)
    visible = visible.tril() if causal else visible
    visible = visible if mask is None else visible & mask
    return scores.masked_fill(~visible, float("-inf")).amax(dim=(0, 2, 3))


def relative_error(actual: torch.Tensor, expected: torch.Tensor, full: torch.Tensor = None) -> float:
    """max |actual - expected| / max |full| (``full``: the whole tensor ``expected`` is a shard of, default
    ``expected``; a rank may hold only rows whose exact gradient is 0, e.g. the first token of every document)."""
    expected = expected.to(torch.float64)
    norm = (expected if full is None else full.to(torch.float64)).abs().max().clamp_min(1e-30)
    return ((actual.to(torch.float64) - expected).abs().max() / norm).item()


def random_segments(seed: int, causal: bool, count: int = 9, max_len: int = 7, *,
                    fixed: Optional[Sequence[Tuple[int, int]]] = None, min_len: int = 0) -> Segments:
    """``count`` segments, shuffled: the ``fixed`` (q, k) lengths, then random ones in ``[min_len, max_len]`` (equal
    when ``causal``). ``fixed`` defaults to every kind of emptiness (0 x 0, and when not causal m x 0 and 0 x n) among
    small non-empty ones."""
    rng = random.Random(seed)
    if fixed is None:
        fixed = [(0, 0), (3, 3), (1, 1)] if causal else [(0, 0), (4, 0), (0, 3), (1, 5), (6, 2)]
    lens = list(fixed)
    while len(lens) < count:
        n = rng.randint(min_len, max_len)
        lens.append((n, n) if causal else (n, rng.randint(min_len, max_len)))
    rng.shuffle(lens)
    cu_q, cu_k = [0], [0]
    for lq, lk in lens:
        cu_q.append(cu_q[-1] + lq)
        cu_k.append(cu_k[-1] + lk)
    return Segments(tuple(cu_q), tuple(cu_k))
