"""Issue 24 (reliability round 2), item 5: an evaluation call under ``torch.inference_mode()`` left an inference
tensor in the engine's layout cache and every later training call with those shapes failed on every rank
("Inference tensors cannot be saved for backward"). Cache audit: every cache of the library builds its values with
inference and grad mode off (megatron_usp/caching.py); this runs an inference-mode call, then training, for every
ring_impl, with and without packed documents, masks and the varlen path."""
from __future__ import annotations

import pytest
import torch

from megatron_usp import caching

IMPLS = ("basic", "zigzag", "stripe", "allgather", "mqsp")
BASE = dict(batch=2, heads=4, kv_heads=2, head_dim=8, causal=True)


def _configs(sp_size: int) -> list[dict]:
    seq_len = 8 * sp_size
    cu = (0, 5, seq_len // 2 + 1, seq_len)
    configs = []
    for impl in IMPLS:
        configs.append(dict(BASE, seq_len=seq_len, ring_impl=impl))
        configs.append(dict(BASE, seq_len=seq_len, ring_impl=impl, cu_seqlens=cu))
        # the varlen path (its cached index tensors) and a mask (its per-call masker)
        configs.append(dict(BASE, seq_len=seq_len, ring_impl=impl, cu_seqlens=cu, backend="test_packing",
                            mask="window"))
    configs.append(dict(BASE, seq_len=seq_len, ring_impl="mqsp", micro_q=3, cu_seqlens=cu, backend="test_packing"))
    configs.append(dict(BASE, seq_len=seq_len, ring_impl="zigzag", causal=False, mask="documents"))
    return configs


@pytest.mark.parametrize("grid", [(2, 2), (2, 1), (1, 4)], ids=lambda g: f"u{g[0]}r{g[1]}")
def test_training_after_an_inference_mode_call(rank_pool, grid):
    configs = _configs(grid[0] * grid[1])
    results = rank_pool(grid[0] * grid[1]).run("cache_cases:evaluation_then_training", timeout=240,
                                               ulysses_degree=grid[0], ring_degree=grid[1], configs=configs)
    assert all(len(result) == len(configs) for result in results)


def test_cached_values_are_plain_tensors_whatever_the_callers_mode():
    @caching.plain_lru_cache(4)
    def build(n):
        return torch.arange(n)

    class Holder:
        @caching.cached_plain_property
        def index(self):
            return torch.arange(3)

    with torch.inference_mode():
        cached, held = build(3), Holder().index
    assert not cached.is_inference() and not held.is_inference()
    weight = torch.ones(3, requires_grad=True)
    (weight * cached).sum().backward()  # saving it for backward works
    with torch.enable_grad():
        assert not build(5).requires_grad
