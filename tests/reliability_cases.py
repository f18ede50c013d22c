"""Rank-side bodies of test_reliability_numerics.py (issue 15: items 1, 2, 5 and the double-backward half of 8)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import megatron_usp as usp
from engine_cases import get_groups, make_inputs, run_case, sp_block  # also registers the "test_packing" kernel
from reference import dense_mask, reference_attention, relative_error


def _noncontiguous(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf ``base`` and a view of it equal to ``x`` whose last dim is not contiguous: ``strided`` = every
    other element of a twice-as-wide tensor (``x[..., ::2]``), ``permuted`` = a ``[b, s, d, h]`` tensor seen as
    ``[b, s, h, d]``. Returns ``(base, view)``; the view's gradient is read back through the same view of
    ``base.grad``."""
    if kind == "strided":
        base = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        base[..., ::2] = x
        base.requires_grad_()
        return base, base[..., ::2]
    base = x.transpose(2, 3).contiguous().requires_grad_()
    return base, base.transpose(2, 3)


def _view_grad(base: torch.Tensor, kind: str) -> torch.Tensor:
    return base.grad[..., ::2] if kind == "strided" else base.grad.transpose(2, 3)


def noncontiguous_inputs(rank, world_size, ulysses_degree, ring_degree, impls, kinds, backend="auto",
                         cu_seqlens=None) -> dict:
    """q, k, v (and the output gradient) given as views whose last dim is not contiguous: forward and dq/dk/dv
    must match the float64 reference as contiguous inputs do. Returns the worst relative error per impl."""
    groups = get_groups(ulysses_degree, ring_degree)
    seq_len, heads, kv_heads, head_dim = 8 * groups.sp_size, 4, 2, 8
    q, k, v, grad = make_inputs(5 + 1000 * sp_block(groups), 2, seq_len, heads, kv_heads, head_dim, torch.float32)
    mask = None
    if cu_seqlens is not None:  # documents: id = number of inner offsets <= position
        ids = (torch.arange(seq_len)[:, None] >= torch.tensor(cu_seqlens)[None, 1:-1]).sum(1).expand(2, -1)
        mask = dense_mask(2, heads, seq_len, causal=True, document_ids=ids)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref, causal=True, mask=mask)
    ref_out.backward(grad)
    worst = {}
    for impl in impls:
        layout = dict(ring_impl=impl, cu_seqlens=cu_seqlens)
        for kind in kinds:
            bases, views = zip(*(_noncontiguous(usp.shard(t, groups, **layout).float(), kind) for t in (q, k, v)))
            assert all(view.stride(-1) != 1 for view in views)
            dout = _noncontiguous(usp.shard(grad, groups, **layout).float(), kind)[1].detach()
            out = usp.usp_attn(*views, groups, causal=True, backend=backend, **layout)
            out.backward(dout)
            errors = {"out": relative_error(out, usp.shard(ref_out, groups, **layout), ref_out)}
            for name, base, expected in zip(("dq", "dk", "dv"), bases, ref):
                errors[name] = relative_error(_view_grad(base, kind), usp.shard(expected.grad, groups, **layout),
                                              expected.grad)
            bad = {name: err for name, err in errors.items() if not err <= 1e-5}
            assert not bad, f"{impl} {kind} (u={ulysses_degree}, r={ring_degree}, {backend}): errors {bad}"
            worst[impl] = max(worst.get(impl, 0.0), *errors.values())
    return worst


# ---- NaN / inf propagation (item 2) ----


def _poison(q, k, case: str, seq_len: int):
    """Full-sequence q, k with one bad value: NaN in one q row, NaN in one k row, or +inf in one k element."""
    q, k = q.clone(), k.clone()
    row = seq_len // 2 + 1
    if case == "nan_q":
        q[0, row, 1, 3] = float("nan")
    elif case == "nan_k":
        k[0, row, 0, 2] = float("nan")
    elif case == "inf_k":
        k[0, row, 1, 0] = float("inf")
    else:
        raise ValueError(case)
    return q, k


def _sdpa(q, k, v, causal):
    """Single-device torch SDPA in fp32 on the whole sequence (what a user compares against); GQA expanded."""
    heads = q.shape[2]
    k, v = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal).transpose(1, 2)


def nan_inf_propagation(rank, world_size, ulysses_degree, ring_degree, impls, cases, causal=True) -> dict:
    """NaN/inf in q or k: out is NaN exactly where single-device SDPA's is (NaN in, NaN out) and equal to it
    elsewhere; with NaN inputs dq/dk/dv hold NaN only where SDPA's do (SDPA's dense backward also spreads NaN through masked
    entries, 0 * NaN, which a ring that skips invisible blocks need not copy). Returns this rank's NaN element
    counts ``{"impl case name": (ours, sdpa)}`` so the caller can check that every gradient SDPA poisons is
    poisoned somewhere in ours too."""
    groups = get_groups(ulysses_degree, ring_degree)
    seq_len, heads, kv_heads, head_dim = 8 * groups.sp_size, 4, 2, 8
    q, k, v, grad = (t.float() for t in make_inputs(3, 1, seq_len, heads, kv_heads, head_dim, torch.float32))
    counts = {}
    for case in cases:
        q_bad, k_bad = _poison(q, k, case, seq_len)
        ref = [t.clone().requires_grad_() for t in (q_bad, k_bad, v)]
        ref_out = _sdpa(*ref, causal)
        ref_out.backward(grad)
        expected = [ref_out.detach()] + [t.grad for t in ref]
        for impl in impls:
            local = [usp.shard(t, groups, ring_impl=impl).requires_grad_() for t in (q_bad, k_bad, v)]
            out = usp.usp_attn(*local, groups, causal=causal, ring_impl=impl)
            out.backward(usp.shard(grad, groups, ring_impl=impl))
            mine = [out.detach()] + [t.grad for t in local]
            for name, got, want in zip(("out", "dq", "dk", "dv"), mine, expected):
                want = usp.shard(want, groups, ring_impl=impl)
                ours_nan, sdpa_nan = torch.isnan(got), torch.isnan(want)
                where = (f"{impl} {case} {name}: NaN rows (b, s, h) ours {ours_nan.any(-1).nonzero().tolist()} vs "
                         f"single-device SDPA {sdpa_nan.any(-1).nonzero().tolist()}")
                if name == "out":
                    assert torch.equal(ours_nan, sdpa_nan), where
                elif case != "inf_k":
                    # +inf in k: torch's CPU kernel reports lse NaN (not +inf) for a row with an infinite logit
                    # when the block is short, so the gradients of that row's keys come out NaN in more places
                    # than SDPA's; a poisoned step either way. NaN inputs: never NaN where SDPA is finite.
                    assert not (ours_nan & ~sdpa_nan).any(), where
                finite = ~sdpa_nan & ~ours_nan
                torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)
                counts[f"{impl} {case} {name}"] = (int(ours_nan.sum()), int(sdpa_nan.sum()))
    return counts


def empty_rows_stay_zero(rank, world_size, ulysses_degree, ring_degree, impls) -> bool:
    """Rows that see no key (mask_mod empties rows 0..2) still give exactly 0 and 0 gradient, never NaN."""
    groups = get_groups(ulysses_degree, ring_degree)
    for impl in impls:
        config = dict(batch=2, seq_len=6 * groups.sp_size, heads=4, kv_heads=2, head_dim=8, causal=True,
                      ring_impl=impl, mask="mask_mod")
        errors = run_case(groups, config, torch.float32)  # asserts: finite everywhere, empty rows exactly 0
        assert max(errors.values()) <= 1e-5, (impl, errors)
    return True


# ---- accuracy with large logits (item 5) ----


def large_logit_accuracy(rank, world_size, ulysses_degree, ring_degree, impls, scales, seeds, causal=True,
                         heads=2, head_dim=16, rows_per_rank=16, input_scale=1.0) -> dict:
    """fp32 inputs with softmax_scale 100 / 1000 (near one-hot softmax): relative errors of out/dq/dk/dv against
    the float64 reference, ours (this rank's rows, normalised by the whole tensor) and single-device SDPA's
    (whole tensor). Returns ``{(impl, scale): {"ours": {...}, "sdpa": {...}}}`` maxed over ``seeds``."""
    groups = get_groups(ulysses_degree, ring_degree)
    seq_len, kv_heads = rows_per_rank * groups.sp_size, heads
    table = {}
    for seed in seeds:
        q, k, v, grad = make_inputs(seed, 1, seq_len, heads, kv_heads, head_dim, torch.float32)
        q, k = (t.mul(input_scale).float().double() for t in (q, k))
        for scale in scales:
            ref = [t.clone().requires_grad_() for t in (q, k, v)]
            ref_out = reference_attention(*ref, causal=causal, softmax_scale=scale)
            ref_out.backward(grad)
            expected = [ref_out.detach()] + [t.grad for t in ref]
            single = [t.float().requires_grad_() for t in (q, k, v)]
            heads_first = [t.transpose(1, 2) for t in single]
            single_out = F.scaled_dot_product_attention(*heads_first, is_causal=causal, scale=scale).transpose(1, 2)
            single_out.backward(grad.float())
            sdpa = [single_out.detach()] + [t.grad for t in single]
            sdpa_errors = {name: relative_error(got, want)
                           for name, got, want in zip(("out", "dq", "dk", "dv"), sdpa, expected)}
            sdpa_errors.update({f"{name} mean": _mean_error(got, want)
                                for name, got, want in zip(("out", "dq", "dk", "dv"), sdpa, expected)})
            for impl in impls:
                local = [usp.shard(t, groups, ring_impl=impl).float().requires_grad_() for t in (q, k, v)]
                out = usp.usp_attn(*local, groups, causal=causal, ring_impl=impl, softmax_scale=scale)
                out.backward(usp.shard(grad, groups, ring_impl=impl).float())
                ours = [out.detach()] + [t.grad for t in local]
                our_errors = {name: relative_error(got, usp.shard(want, groups, ring_impl=impl), want)
                              for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected)}
                our_errors.update({f"{name} mean": _mean_error(got, usp.shard(want, groups, ring_impl=impl), want)
                                   for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected)})
                entry = table.setdefault(f"{impl} {scale:g}", {"ours": {}, "sdpa": {}})
                for side, errors in (("ours", our_errors), ("sdpa", sdpa_errors)):
                    for name, err in errors.items():
                        entry[side][name] = max(entry[side].get(name, 0.0), err)
    return table


def _mean_error(actual: torch.Tensor, expected: torch.Tensor, full: torch.Tensor = None) -> float:
    """mean |actual - expected| / mean |full| (``full``: the whole tensor ``expected`` is a shard of)."""
    expected = expected.to(torch.float64)
    norm = (expected if full is None else full.to(torch.float64)).abs().mean().clamp_min(1e-30)
    return ((actual.to(torch.float64) - expected).abs().mean() / norm).item()


# ---- double backward (item 8, first half) ----


def double_backward_refused(rank, world_size, ulysses_degree, ring_degree, impls) -> bool:
    """create_graph=True raises a RuntimeError that says double backward is not supported, on every rank (no hang);
    a plain backward afterwards still works."""
    groups = get_groups(ulysses_degree, ring_degree)
    q, k, v, _ = make_inputs(1, 1, 4 * groups.sp_size, 4, 2, 8, torch.float32)
    for impl in impls:
        for backend in ("auto", "math"):
            local = [usp.shard(t, groups, ring_impl=impl).float().requires_grad_() for t in (q, k, v)]
            out = usp.usp_attn(*local, groups, ring_impl=impl, backend=backend)
            with pytest.raises(RuntimeError, match="double backward"):
                torch.autograd.grad(out.square().sum(), local, create_graph=True)
            out = usp.usp_attn(*local, groups, ring_impl=impl, backend=backend)
            grads = torch.autograd.grad(out.square().sum(), local)
            assert all(torch.isfinite(g).all() for g in grads)
    return True
