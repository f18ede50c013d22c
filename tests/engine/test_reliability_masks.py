"""Reliability of masks (issue 15, items 4 and 8): the mask tensors a masked call allocates are bounded by a fixed
budget whatever the sequence length (masked blocks are tiled), tiling keeps the result exact, and a ``mask_mod``
that returns something unusable is named in a clear error."""
from __future__ import annotations

import re

import pytest
import torch

import megatron_usp as usp
from megatron_usp import masks as masks_module
from megatron_usp.kernels import MathKernel, TorchCPUKernel
from reference import dense_mask, reference_attention, relative_error

IMPLS = ["basic", "zigzag", "stripe", "allgather", "mqsp"]
DEFAULT_BUDGET = 1 << 22


def _budget() -> int:
    return getattr(masks_module, "MASK_TILE_ELEMENTS", DEFAULT_BUDGET)


def recording_visibility(visibility, sizes: list):
    """``BlockMasker.visibility`` that also appends the element count of every mask tensor it returns to ``sizes``."""

    def recording(self, *args, **kwargs):
        result = visibility(self, *args, **kwargs)
        if isinstance(result, torch.Tensor):
            sizes.append(result.numel())
        return result

    return recording


@pytest.fixture
def mask_sizes(monkeypatch):
    """Records the element count of every mask tensor a call builds: what ``BlockMasker.visibility`` returns, what
    ``mask_mod`` returns, and the ``mask`` every kernel is handed (the additive bias has that mask's shape)."""
    sizes: list[int] = []
    monkeypatch.setattr(masks_module.BlockMasker, "visibility",
                        recording_visibility(masks_module.BlockMasker.visibility, sizes))
    for cls in (TorchCPUKernel, MathKernel):
        for name in ("forward", "backward"):
            original = getattr(cls, name)

            def recording(self, *args, _original=original, **kwargs):
                if kwargs.get("mask") is not None:
                    sizes.append(kwargs["mask"].numel())
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, name, recording)
    return sizes


def _band_mod(batch_idx, head_idx, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 300 + 100 * head_idx


def _long_documents(batch: int, seq_len: int) -> torch.Tensor:
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    for boundary in (1000, 1700, 3001):
        ids[:, boundary:] += 1
    return ids


@pytest.mark.parametrize("mask", ["window", "documents", "mask_mod"])
def test_largest_mask_tensor_is_bounded_at_r1(mask_sizes, mask):
    """r = 1, S = 4096: the whole sequence is one block. Before tiling, any mask built a 4096 x 4096 (16.8M
    elements) mask and bias; now no mask tensor exceeds the budget (2^22 elements)."""
    seq_len, heads = 4096, 2
    kwargs = {"window": dict(window=(700, 0)), "documents": dict(document_ids=_long_documents(1, seq_len)),
              "mask_mod": dict(mask_mod=_band_mod)}[mask]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, heads, 4, generator=gen).requires_grad_() for _ in range(3))
    out = usp.usp_attn(q, k, v, usp.USPGroups.single(), causal=True, ring_impl="zigzag", backend="torch_cpu",
                       **kwargs)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert mask_sizes, "the mask cut no block: the test measures nothing"
    assert max(mask_sizes) <= _budget() < seq_len * seq_len, (max(mask_sizes), _budget())


def _tiny_mod(batch_idx, head_idx, q_idx, kv_idx):
    """Empty rows 0..2, head- and batch-dependent, like the parity tests' mask_mod."""
    return ((q_idx >= 3) & (kv_idx % (head_idx + 1) == 0)
            & ((kv_idx <= q_idx) | (batch_idx == 1) & (kv_idx <= q_idx + 2)))


def _tiny_documents(batch: int, seq_len: int) -> torch.Tensor:
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        for boundary in (5 + b, seq_len // 2, seq_len - 3):
            ids[b, boundary:] += 1
    return ids


TINY_MASKS = {
    "window": dict(window=(5, 0)),
    "window_both_sides": dict(window=(7, 4)),
    "documents": dict(document_ids=_tiny_documents(2, 48)),
    "mask_mod": dict(mask_mod=_tiny_mod),
    "window_and_documents": dict(window=(6, 2), document_ids=_tiny_documents(2, 48)),
}


@pytest.mark.parametrize("backend", ["torch_cpu", "math"])
@pytest.mark.parametrize("impl", ["zigzag", "mqsp"])  # at r = 1 every pass-K/V impl is the same one block
def test_tiled_masks_are_exact(monkeypatch, mask_sizes, impl, backend):
    """A budget of 96 elements cuts the 48 x 48 block (mqsp with micro_q = 7: 7 x 48 blocks) into tiles (odd
    sizes, causal diagonal tiles): forward and gradients still equal the float64 reference with the dense mask, and
    no mask tensor exceeds the budget."""
    budget = 96
    monkeypatch.setattr(masks_module, "MASK_TILE_ELEMENTS", budget, raising=False)
    batch, seq_len, heads, kv_heads, head_dim = 2, 48, 4, 2, 8
    gen = torch.Generator().manual_seed(1)
    for name, kwargs in TINY_MASKS.items():
        for causal in (True, False):
            q, k, v, grad = (torch.randn(batch, seq_len, h, head_dim, generator=gen, dtype=torch.float64)
                             for h in (heads, kv_heads, kv_heads, heads))
            ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            mask = dense_mask(batch, heads, seq_len, causal=causal, **kwargs)
            reference_attention(*ref_inputs, causal=causal, mask=mask).backward(grad)
            ref_out = reference_attention(*[t.detach() for t in ref_inputs], causal=causal, mask=mask)
            local = [t.clone().requires_grad_() for t in (q, k, v)]
            out = usp.usp_attn(*local, usp.USPGroups.single(), causal=causal, ring_impl=impl, backend=backend,
                               micro_q=7 if impl == "mqsp" else None, **kwargs)
            out.backward(grad)
            for what, actual, expected in zip(("out", "dq", "dk", "dv"), (out, *(x.grad for x in local)),
                                              (ref_out, *(x.grad for x in ref_inputs))):
                assert relative_error(actual, expected) < 1e-10, (name, causal, what)
    assert mask_sizes and max(mask_sizes) <= budget, max(mask_sizes)


def tiled_masks_on_ranks(rank, world_size, ulysses_degree, ring_degree, budget, configs):
    """Rank-pool body: the parity matrix of tests/engine/test_masks.py under a tiny tile budget; returns the largest
    mask tensor built (visibility's result) on this rank."""
    import engine_cases

    sizes = [0]
    visibility = masks_module.BlockMasker.visibility
    previous = getattr(masks_module, "MASK_TILE_ELEMENTS", None)
    masks_module.MASK_TILE_ELEMENTS = budget
    masks_module.BlockMasker.visibility = recording_visibility(visibility, sizes)
    try:
        engine_cases.attention_matrix(rank, world_size, ulysses_degree, ring_degree, True, configs)
    finally:
        masks_module.BlockMasker.visibility = visibility
        if previous is None:
            del masks_module.MASK_TILE_ELEMENTS
        else:
            masks_module.MASK_TILE_ELEMENTS = previous
    return max(sizes)


def test_tiled_masks_are_exact_on_ranks(rank_pool):
    """u = 2 (global head indices in mask_mod) x r = 2 (ring steps, allgather halves, mqsp micro-chunks), budget 40:
    every impl still matches the float64 reference (engine_cases' tolerances) with tiles of at most 40 elements."""
    world_size, ulysses_degree, ring_degree, budget = 4, 2, 2, 40
    configs = [dict(batch=2, seq_len=48, heads=4, kv_heads=2, head_dim=8, ring_impl=impl, causal=causal, mask=mask,
                    seed=i, micro_q=5 if impl == "mqsp" else None)
               for i, (impl, mask, causal) in enumerate(
                   (impl, mask, causal) for impl in IMPLS
                   for mask in ("mask_mod", "window_and_documents") for causal in (True, False))]
    largest = rank_pool(world_size).run("test_reliability_masks:tiled_masks_on_ranks",
                                        ulysses_degree=ulysses_degree, ring_degree=ring_degree, budget=budget,
                                        configs=configs)
    assert 0 < max(largest) <= budget, largest


# --- item 8: a mask_mod that returns something unusable -------------------------------------------------------

@pytest.mark.parametrize("returned, error, shape_words", [
    (lambda b, h, q, kv: None, TypeError, "NoneType"),
    (lambda b, h, q, kv: [[True]], TypeError, "list"),
    (lambda b, h, q, kv: torch.ones(3, 5, dtype=torch.bool), ValueError, r"\(3, 5\)"),
    (lambda b, h, q, kv: (q >= kv).transpose(-1, -2)[..., :3, :], ValueError, r"\(1, 1, 3, 16\)"),
    (lambda b, h, q, kv: torch.ones(2, 2, 1, 16, 16, dtype=torch.bool), ValueError, r"\(2, 2, 1, 16, 16\)"),
    (lambda b, h, q, kv: (b + h + q + kv)[:, :, :, :4], ValueError, r"\(2, 2, 16, 4\)"),
])
def test_bad_mask_mod_result_is_named(returned, error, shape_words):
    q = torch.randn(2, 16, 2, 4)
    with pytest.raises(error, match="mask_mod") as info:
        usp.usp_attn(q, q, q, usp.USPGroups.single(), causal=False, mask_mod=returned)
    message = str(info.value)
    assert "[b|1, h|1, nq, nk]" in message and "[2|1, 2|1, 16, 16]" in message, message
    assert re.search(shape_words, message), message


def test_broadcastable_mask_mod_results_are_accepted():
    q = torch.randn(2, 16, 2, 4, dtype=torch.float64)
    single = usp.USPGroups.single()
    cases = {  # (mask_mod, the dense mask it means)
        "kv only [1,1,1,nk]": (lambda b, h, qi, kv: kv % 2 == 0, torch.arange(16) % 2 == 0),
        "2-D [nq, nk]": (lambda b, h, qi, kv: (qi >= kv)[0, 0], torch.ones(16, 16, dtype=torch.bool).tril()),
        "python bool": (lambda b, h, qi, kv: True, torch.ones(16, 16, dtype=torch.bool)),
    }
    for name, (mask_mod, dense) in cases.items():
        out = usp.usp_attn(q, q, q, single, causal=False, mask_mod=mask_mod, backend="math")
        expected = reference_attention(q, q, q, causal=False, mask=dense.expand(2, 2, 16, 16))
        assert relative_error(out, expected) < 1e-10, name
