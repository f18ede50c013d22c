"""Native varlen entry points of the kernel adapters, checked on CPU against fakes of the real signatures.

Each fake takes the arguments of one real release (names, order, defaults, returned tuple, in-place dq/dk/dv, lse
layout) as read from the sources and computes every segment with our math kernel, interpreting the arguments the
way the real kernel does (flattened tokens, int32 offsets, lse layout). Rows the real kernels leave undefined (query
rows of segments without keys, key rows of segments without queries) get NaN / +inf in the fakes: the adapters must
turn them into out 0, lse -inf and zero gradients. The reference is ``kernels.varlen``'s per-segment fallback over
the math kernel. GPU tests at the end run the real kernels when CUDA (and the package) are present.
"""
import inspect
from typing import Optional, Tuple

import pytest
import torch

from megatron_usp import kernels
from megatron_usp.kernels import _adapt, te as te_module, varlen
from megatron_usp.kernels.flash import FlashAttn2Kernel, FlashAttn3Kernel
from megatron_usp.kernels.math import MathKernel
from megatron_usp.kernels.te import MODULE as TE_MODULE
from megatron_usp.kernels.te import TEFusedKernel
from megatron_usp.kernels.torch_sdpa import TorchCPUKernel, TorchCUDAEfficientKernel, TorchCUDAFlashKernel
from megatron_usp.kernels.varlen import Segments
from megatron_usp.testing import random_segments
from reference import relative_error
from test_kernel_adapters import (
    SCALE,
    _FusedAttnBackend,
    _module,
    _TexDType,
    _TE_DTYPE,
    fa2_v263_backward,
    fa2_v263_forward,
    fa3_head_backward,
    fa3_head_forward,
    fa3_v274_backward,
    fa3_v274_forward,
    rand,
    te_main_bwd,
    te_main_fwd,
    te_v112_bwd,
    te_v112_fwd,
    te_v24_bwd,
    te_v24_fwd,
)

MATH = MathKernel()
NAN, INF = float("nan"), float("inf")


# ---- the math every fake does: segments of flattened tokens ----
def _offsets(cu_q, cu_k, max_q, max_k, total_q, total_k):
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32 and cu_q.is_contiguous()
    cq, ck = cu_q.tolist(), cu_k.tolist()
    assert len(cq) == len(ck) and cq[0] == 0 and ck[0] == 0 and cq[-1] == total_q and ck[-1] == total_k
    lens_q, lens_k = [b - a for a, b in zip(cq, cq[1:])], [b - a for a, b in zip(ck, ck[1:])]
    assert (max_q, max_k) == (max(lens_q), max(lens_k))  # the maxima the kernels size their grids with
    return list(zip(cq, cq[1:], ck, ck[1:]))


def varlen_math_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    """Flat ``q [Tq, h, d]``, ``k, v [Tk, kv_h, d]`` -> ``out [Tq, h, dv]``, ``lse [h, Tq]``; rows of segments
    without keys: out NaN, lse +inf (undefined in the real kernels: the adapter must not pass them on)."""
    assert q.dim() == 3 and k.dim() == 3 and q.shape[1] % k.shape[1] == 0
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.full((q.shape[0], q.shape[1], v.shape[2]), NAN, dtype=q.dtype)
    lse = torch.full((q.shape[1], q.shape[0]), INF, dtype=acc)
    for a, b, c, d in _offsets(cu_q, cu_k, max_q, max_k, q.shape[0], k.shape[0]):
        if b > a and d > c:
            assert not causal or b - a == d - c, "causal is asked of square segments only"
            o, l = MATH.forward(q[None, a:b], k[None, c:d], v[None, c:d], causal=bool(causal), softmax_scale=scale)
            out[a:b], lse[:, a:b] = o[0], l[0]
    return out, lse


def varlen_math_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, dq, dk, dv):
    """Writes dq, dk, dv in place from the given ``lse [h, Tq]``; NaN where the real kernels may leave garbage."""
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous()
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    dq.fill_(NAN), dk.fill_(NAN), dv.fill_(NAN)
    for a, b, c, d in _offsets(cu_q, cu_k, max_q, max_k, q.shape[0], k.shape[0]):
        if b > a and d > c:
            grads = MATH.backward(dout[None, a:b], q[None, a:b], k[None, c:d], v[None, c:d], out[None, a:b],
                                  lse[None, :, a:b], causal=bool(causal), softmax_scale=scale)
            for buf, g, rows in zip((dq, dk, dv), grads, (slice(a, b), slice(c, d), slice(c, d))):
                buf[rows] = g[0]


def _no_ngroups_swap(q, k, cu_q, max_q):
    """flash-attn 2's mha_varlen_fwd (also torch's copy) reshapes q to (num_segments, kv_heads, groups, d) when
    max_seqlen_q == 1 with GQA: that fails unless every segment has exactly one query."""
    if max_q == 1 and q.shape[1] > k.shape[1] and q.shape[0] != cu_q.numel() - 1:
        raise RuntimeError("shape '[num_segments, kv_heads, groups, d]' is invalid for input of size ...")


def _no_options(dropout_p=0.0, window=(-1, -1), softcap=0.0, alibi=None, return_softmax=False):
    assert dropout_p == 0.0 and tuple(window) == (-1, -1) and softcap == 0.0 and alibi is None
    assert return_softmax is False


# ---- torch 2.13's aten varlen ops (names checked against the installed schema below) ----
def _pad32(n):
    return -(-n // 32) * 32


class FakeAten:
    """Stands in for torch.ops.aten: the flash and mem-efficient varlen ops as torch 2.13 declares them."""

    @staticmethod
    def _flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                 return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                                 seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
        assert dropout_p == 0.0 and not return_debug_mask and seqused_k is None and block_table is None
        assert window_size_left in (None, -1) and window_size_right in (None, -1) and alibi_slopes is None
        _no_ngroups_swap(query, key, cum_seq_q, max_q)  # GQA is otherwise native
        out, lse = varlen_math_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, scale, is_causal)
        return out, lse, torch.zeros(2, dtype=torch.int64), torch.empty(()), torch.empty(0)

    @staticmethod
    def _flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                                  dropout_p, is_causal, rng_state, unused, *, scale=None, window_size_left=None,
                                  window_size_right=None):
        assert dropout_p == 0.0 and window_size_left in (None, -1) and window_size_right in (None, -1)
        dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        varlen_math_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                             scale, is_causal, dq, dk, dv)
        return dq, dk, dv

    @staticmethod
    def _efficient_attention_forward(query, key, value, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, dropout_p, custom_mask_type, compute_log_sumexp=False, *,
                                     scale=None, seqlen_k=None, window_size=None):
        assert query.shape[0] == 1 and query.shape[2] == key.shape[2], "batch 1, equal head counts"
        assert bias is None and dropout_p == 0.0 and compute_log_sumexp and seqlen_k is None and window_size is None
        assert custom_mask_type in (0, 1, 2)  # none, causal top-left, causal bottom-right
        out, lse = varlen_math_forward(query[0], key[0], value[0], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, scale, custom_mask_type != 0)
        cu = cu_seqlens_q.tolist()
        padded = torch.full((len(cu) - 1, query.shape[2], _pad32(max_seqlen_q)), 77.0, dtype=lse.dtype)  # garbage
        for i, (a, b) in enumerate(zip(cu, cu[1:])):
            padded[i, :, : b - a] = lse[:, a:b]
        seed = torch.zeros((), dtype=torch.int64)
        return out[None], padded, seed, seed, max_seqlen_q, max_seqlen_k

    @staticmethod
    def _efficient_attention_backward(grad_out_, query, key, value, bias, out, cu_seqlens_q, cu_seqlens_k,
                                      max_seqlen_q, max_seqlen_k, logsumexp, dropout_p, philox_seed, philox_offset,
                                      custom_mask_type, bias_requires_grad, *, scale=None, num_splits_key=None,
                                      window_size=None, shared_storage_dqdkdv=False):
        assert query.shape[0] == 1 and query.shape[2] == key.shape[2] and bias is None and not bias_requires_grad
        assert max_seqlen_q > 0 and max_seqlen_k > 0  # TORCH_CHECKs of the real op
        cu = cu_seqlens_q.tolist()
        assert logsumexp.shape == (len(cu) - 1, query.shape[2], _pad32(max_seqlen_q)) and logsumexp.is_contiguous()
        rows = torch.cat([logsumexp[i, :, : b - a] for i, (a, b) in enumerate(zip(cu, cu[1:]))], dim=1)
        dq, dk, dv = torch.empty_like(query[0]), torch.empty_like(key[0]), torch.empty_like(value[0])
        varlen_math_backward(grad_out_[0], query[0], key[0], value[0], out[0], rows.contiguous(), cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, custom_mask_type != 0, dq, dk, dv)
        return dq[None], dk[None], dv[None], torch.empty(0)


# ---- flash-attn 2 varlen: v2.6.3 (plain, window_size tuple, 8-tuple), v2.7.0 (plain, left/right, 4-tuple),
# v2.8.3 (torch.library.custom_op, zero_tensors), v2.5.9 (padded lse, no softcap: not used natively) ----
def fa2_v263_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                            causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, return_softmax=False,
                            block_table=None, leftpad_k=None, seqused_k=None):
    _no_options(dropout_p, window_size, softcap, alibi_slopes, return_softmax)
    assert block_table is None and leftpad_k is None and seqused_k is None
    _no_ngroups_swap(q, k, cu_seqlens_q, max_seqlen_q)
    out, lse = varlen_math_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                   causal)
    return out, q, k, v, out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)


def fa2_v263_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                             deterministic, rng_state=None):
    _no_options(dropout_p, window_size, softcap, alibi_slopes)
    varlen_math_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, dq, dk, dv)
    return dq, dk, dv, torch.zeros(q.shape[1], q.shape[0])



def fa2_v27_varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False,
    block_table: Optional[torch.Tensor] = None, leftpad_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None, zero_tensors: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _no_options(dropout_p, (window_size_left, window_size_right), softcap, alibi_slopes, return_softmax)
    assert block_table is None and leftpad_k is None and seqused_k is None and not zero_tensors
    _no_ngroups_swap(q, k, cu_seqlens_q, max_seqlen_q)
    out, lse = varlen_math_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                   causal)
    return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)


def fa2_v27_varlen_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor], dv: Optional[torch.Tensor],
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
    softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int, softcap: float,
    alibi_slopes: Optional[torch.Tensor], deterministic: bool, rng_state: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> torch.Tensor:
    _no_options(dropout_p, (window_size_left, window_size_right), softcap, alibi_slopes)
    varlen_math_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, dq, dk, dv)
    return torch.zeros(q.shape[1], q.shape[0])


fa2_custom_varlen_forward = torch.library.custom_op(
    "usp_fake_flash_attn::_flash_attn_varlen_forward", mutates_args=())(fa2_v27_varlen_forward)
fa2_custom_varlen_backward = torch.library.custom_op(
    "usp_fake_flash_attn::_flash_attn_varlen_backward", mutates_args=("dq", "dk", "dv"))(fa2_v27_varlen_backward)


def fa2_v259_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_softmax):
    _no_options(dropout_p, window_size, 0.0, alibi_slopes, return_softmax)
    out, lse = MATH.forward(q, k, v, causal=bool(causal), softmax_scale=softmax_scale)
    return out, q, k, v, out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)


def fa2_v259_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
                      alibi_slopes, deterministic, rng_state=None):
    _no_options(dropout_p, window_size, 0.0, alibi_slopes)
    for buf, g in zip((dq, dk, dv), MATH.backward(dout, q, k, v, out, softmax_lse, causal=bool(causal),
                                                   softmax_scale=softmax_scale)):
        buf.copy_(g)
    return dq, dk, dv, torch.zeros(0)


def fa2_v259_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                            softmax_scale, causal, window_size=(-1, -1), alibi_slopes=None, return_softmax=False,
                            block_table=None):
    raise AssertionError("2.5.x keeps the varlen lse padded per segment: the adapter must not call it")


def fa2_v259_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                             rng_state=None):
    raise AssertionError("2.5.x keeps the varlen lse padded per segment: the adapter must not call it")


# ---- flash-attn 3 beta (hopper/ at v2.7.0): separate varlen functions, 6-tuple forward ----
def fa3_beta_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                            block_table=None, window_size=(-1, -1), seqused_q=None, seqused_k=None):
    _no_options(window=window_size)
    assert block_table is None and seqused_q is None and seqused_k is None
    out, lse = varlen_math_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                   causal)
    return out, q, k, v, out, lse


def fa3_beta_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, softmax_scale, causal, window_size, deterministic=False, seqused_q=None,
                             seqused_k=None):
    _no_options(window=window_size)
    varlen_math_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, dq, dk, dv)
    return dq, dk, dv, torch.zeros(q.shape[1], q.shape[0])


def _like(model, impl):
    """A fake with ``model``'s exact signature (read by the adapter through inspect / the custom-op schema) whose
    body gets every argument by name, defaults applied."""
    signature = inspect.signature(model)

    def fake(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return impl(**bound.arguments)

    fake.__signature__ = signature
    fake.__name__ = model.__name__
    return fake


# ---- flash-attn 3 >= 2.7.4: one _flash_attn_forward/_backward for dense and varlen (signatures of the dense
# fakes in test_kernel_adapters, read from hopper/flash_attn_interface.py at v2.7.4 and main) ----
def _fa3_forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                      **options):
    window = options.get("window_size", (options.get("window_size_left", -1), options.get("window_size_right", -1)))
    _no_options(window=window, softcap=options.get("softcap", 0.0))
    unused = ("k_new", "v_new", "qv", "out", "out_", "cu_seqlens_k_new", "seqused_q", "seqused_k", "page_table",
              "kv_batch_idx", "leftpad_k", "rotary_cos", "rotary_sin", "seqlens_rotary", "q_descale", "k_descale",
              "v_descale")
    assert all(options.get(name) is None for name in unused)
    assert cu_seqlens_q is not None and cu_seqlens_k is not None, "the varlen test calls varlen"
    out, lse = varlen_math_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                   causal)
    # out, lse, then split-kv accumulators (3-d lse accumulator [splits, h, Tq]: must not be taken for the lse)
    return out, lse, torch.zeros(1, q.shape[0], q.shape[1], v.shape[2]), torch.zeros(1, q.shape[1], q.shape[0])


def _fa3_backward_impl(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dq,
                       dk, dv, softmax_scale, **options):
    causal = options["causal"] if "causal" in options else options["is_causal"]
    window = options.get("window_size", (options.get("window_size_left", -1), options.get("window_size_right", -1)))
    _no_options(window=window, softcap=options.get("softcap", 0.0))
    assert options["sequed_q"] is None and options["sequed_k"] is None
    varlen_math_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, dq, dk, dv)
    return torch.zeros(q.shape[1], q.shape[0])


fa3_v274_varlen_forward = _like(fa3_v274_forward, _fa3_forward_impl)
fa3_v274_varlen_backward = _like(fa3_v274_backward, lambda **a: (a["dq"], a["dk"], a["dv"], _fa3_backward_impl(**a)))
fa3_custom_varlen_forward = torch.library.custom_op(
    "usp_fake_flash_attn_3_varlen::_flash_attn_forward", mutates_args=())(_like(fa3_head_forward, _fa3_forward_impl))
fa3_custom_varlen_backward = torch.library.custom_op(
    "usp_fake_flash_attn_3_varlen::_flash_attn_backward", mutates_args=("dq", "dk", "dv"))(
    _like(fa3_head_backward, _fa3_backward_impl))


# ---- Transformer Engine thd (signatures of the dense fakes in test_kernel_adapters: v1.12, v2.4, main) ----
TE_STATS = {"ragged": True}  # the cuDNN runtime's choice (>= 9.6: ragged [Tq, h, 1]; older: [S, h, max_q, 1])


def _te_varlen_inputs(a, total_q, total_k):
    """TE's own arguments for thd; returns (causal, segments offsets)."""
    assert a["qkv_layout"] == "thd_thd_thd" and a["attn_bias_type"] == "no_bias" and a["dropout"] == 0.0
    assert a["fused_attention_backend"] == _FusedAttnBackend.F16_arbitrary_seqlen
    for name in ("o_format", "do_format"):
        assert a.get(name, "thd") == "thd"  # releases without them read o/do in the qkv layout's format
    assert a.get("dqkv_layout", "thd_thd_thd") == "thd_thd_thd"
    assert torch.equal(a["cu_seqlens_q_padded"], a["cu_seqlens_q"])  # no padding between segments
    assert torch.equal(a["cu_seqlens_kv_padded"], a["cu_seqlens_kv"])
    assert a["attn_mask_type"] in ("padding", "padding_causal")
    causal = a["attn_mask_type"] == "padding_causal"
    assert tuple(a["window_size"]) == ((-1, 0) if causal else (-1, -1))
    _offsets(a["cu_seqlens_q"], a["cu_seqlens_kv"], a["max_seqlen_q"], a["max_seqlen_kv"], total_q, total_k)
    return causal


def _te_dtype_ok(a, q):
    if "qkv_dtype" in a:
        assert a["qkv_dtype"] == _TE_DTYPE[q.dtype]
    if "fake_dtype" in a:
        assert a["fake_dtype"] == q.dtype


def _te_fwd_impl(**a):
    q, k, v = a["q"], a["k"], a["v"]
    assert a["is_training"] and a.get("softmax_type", "vanilla") == "vanilla" and not a.get("return_max_logit")
    _te_dtype_ok(a, q)
    causal = _te_varlen_inputs(a, q.shape[0], k.shape[0])
    scale = q.shape[-1] ** -0.5 if a["attn_scale"] is None else a["attn_scale"]
    out, lse = varlen_math_forward(q, k, v, a["cu_seqlens_q"], a["cu_seqlens_kv"], a["max_seqlen_q"],
                                   a["max_seqlen_kv"], scale, causal)
    if TE_STATS["ragged"]:
        stats = lse.t().unsqueeze(-1).contiguous()
    else:
        cu = a["cu_seqlens_q"].tolist()
        stats = torch.full((len(cu) - 1, q.shape[1], a["max_seqlen_q"], 1), 55.0, dtype=lse.dtype)
        for i, (s, e) in enumerate(zip(cu, cu[1:])):
            stats[i, :, : e - s, 0] = lse[:, s:e]
    return out, [stats, torch.zeros(2, dtype=torch.int64)]


def _te_bwd_impl(**a):
    q, k, v = a["q"], a["k"], a["v"]
    _te_dtype_ok(a, q)
    if "dqkv_dtype" in a:
        assert a["dqkv_dtype"] == _TE_DTYPE[q.dtype]
    causal = _te_varlen_inputs(a, q.shape[0], k.shape[0])
    stats, rng_state = a["aux_ctx_tensors"]
    assert rng_state.numel() == 2
    cu = a["cu_seqlens_q"].tolist()
    if TE_STATS["ragged"]:
        assert stats.shape == (q.shape[0], q.shape[1], 1)
        lse = stats[..., 0].t().contiguous()
    else:
        assert stats.shape == (len(cu) - 1, q.shape[1], a["max_seqlen_q"], 1)
        lse = torch.cat([stats[i, :, : e - s, 0] for i, (s, e) in enumerate(zip(cu, cu[1:]))], dim=1).contiguous()
    scale = q.shape[-1] ** -0.5 if a["attn_scale"] is None else a["attn_scale"]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    varlen_math_backward(a["d_o"], q, k, v, a["o"], lse, a["cu_seqlens_q"], a["cu_seqlens_kv"], a["max_seqlen_q"],
                         a["max_seqlen_kv"], scale, causal, dq, dk, dv)
    return [dq, dk, dv, None]


TE_FAKES = {version: (_like(fwd, _te_fwd_impl), _like(bwd, _te_bwd_impl))
            for version, fwd, bwd in (("1.12", te_v112_fwd, te_v112_bwd), ("2.4", te_v24_fwd, te_v24_bwd),
                                      ("main", te_main_fwd, te_main_bwd))}


def _install(monkeypatch, variant):
    """Put the fakes of ``variant`` where the adapter imports them from; returns the adapter."""
    family, version = variant.split("@")
    if family == "aten":
        monkeypatch.setattr(torch.ops, "aten", FakeAten())
        return {"flash": TorchCUDAFlashKernel, "efficient": TorchCUDAEfficientKernel}[version]()
    if family == "fa2":
        dense = {"2.5.9": (fa2_v259_forward, fa2_v259_backward)}.get(version, (fa2_v263_forward, fa2_v263_backward))
        fwd, bwd = {"2.5.9": (fa2_v259_varlen_forward, fa2_v259_varlen_backward),
                    "2.6.3": (fa2_v263_varlen_forward, fa2_v263_varlen_backward),
                    "2.7": (fa2_v27_varlen_forward, fa2_v27_varlen_backward),
                    "2.8-custom-op": (fa2_custom_varlen_forward, fa2_custom_varlen_backward)}[version]
        _module(monkeypatch, "flash_attn")
        _module(monkeypatch, "flash_attn.flash_attn_interface", _flash_attn_forward=dense[0],
                _flash_attn_backward=dense[1], _flash_attn_varlen_forward=fwd, _flash_attn_varlen_backward=bwd)
        return FlashAttn2Kernel()
    if family == "fa3":
        if version == "beta":
            entry = {"_flash_attn_varlen_forward": fa3_beta_varlen_forward,
                     "_flash_attn_varlen_backward": fa3_beta_varlen_backward}
        else:
            fwd, bwd = {"2.7.4": (fa3_v274_varlen_forward, fa3_v274_varlen_backward),
                        "main-custom-op": (fa3_custom_varlen_forward, fa3_custom_varlen_backward)}[version]
            entry = {"_flash_attn_forward": fwd, "_flash_attn_backward": bwd}
        _module(monkeypatch, "flash_attn_interface", **entry)
        return FlashAttn3Kernel()
    assert family == "te"
    version, _, stats = version.partition("-")
    monkeypatch.setitem(TE_STATS, "ragged", stats == "ragged")
    monkeypatch.setattr(te_module, "_RAGGED_STATS", {})  # what a fresh process knows
    fwd, bwd = TE_FAKES[version]
    backend = _FusedAttnBackend if version == "main" else {m.name: m for m in _FusedAttnBackend}
    tex = type("tex", (), {"DType": _TexDType})
    _module(monkeypatch, TE_MODULE, fused_attn_fwd=fwd, fused_attn_bwd=bwd, FusedAttnBackend=backend, tex=tex)
    return TEFusedKernel()


VARIANTS = ["aten@flash", "aten@efficient", "fa2@2.6.3", "fa2@2.7", "fa2@2.8-custom-op", "fa2@2.5.9", "fa3@beta",
            "fa3@2.7.4", "fa3@main-custom-op", "te@1.12-padded", "te@2.4-ragged", "te@2.4-padded", "te@main-ragged",
            "te@main-padded"]


def _case(segments, kv_heads, dtype, heads=4, batch=2, d=8, device="cpu"):
    tq, tk = segments.cu_q[-1], segments.cu_k[-1]
    q, g = (rand(batch, tq, heads, d, dtype=dtype, seed=s).to(device) for s in (1, 4))
    k, v = (rand(batch, tk, kv_heads, d, dtype=dtype, seed=s).to(device) for s in (2, 3))
    return q, k, v, g


def _final(out, lse):
    """What the ring hands a block's backward: the rows' final out and lse (finite for every row)."""
    return out * 0.5, torch.where(torch.isinf(lse), torch.full_like(lse, 0.3), lse + 0.25)


def _reference(q, k, v, g, segments, causal):
    """The per-segment fallback over the math kernel, in float64."""
    q64, k64, v64, g64 = (x.double() for x in (q, k, v, g))
    out, lse = varlen.varlen_forward(MATH, q64, k64, v64, segments, causal=causal, softmax_scale=SCALE)
    final_out, final_lse = _final(out, lse)
    grads = varlen.varlen_backward(MATH, g64, q64, k64, v64, final_out, final_lse, segments, causal=causal,
                                   softmax_scale=SCALE)
    return out, lse, final_out, final_lse, grads


def _check_forward(out, lse, ref_out, ref_lse, q, v, tol):
    b, tq, h = q.shape[:3]
    assert out.shape == (b, tq, h, v.shape[3]) and out.dtype == q.dtype
    assert lse.shape == (b, h, tq) and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    empty = torch.isinf(ref_lse)  # rows of segments without keys: exactly out 0, lse -inf
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty)
    assert not out.isnan().any() and (out.transpose(1, 2)[empty] == 0).all()
    finite = ~empty
    assert relative_error(out, ref_out) < tol and relative_error(lse[finite], ref_lse[finite]) < tol


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_varlen_adapter_equals_per_segment_fallback(monkeypatch, variant, dtype, causal, kv_heads):
    if variant in ("te@1.12-padded", "te@2.4-ragged", "te@2.4-padded") and dtype == torch.float64:
        pytest.skip("these TE releases take a tex.DType, which has no float64")
    kernel = _install(monkeypatch, variant)
    segments = random_segments(seed=7 + causal, causal=causal)
    q, k, v, g = _case(segments, kv_heads, dtype)
    ref_out, ref_lse, final_out, final_lse, ref_grads = _reference(q, k, v, g, segments, causal)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    if variant.startswith("te"):  # the backward before any forward: the stats layout comes from a probe
        grads = varlen.varlen_backward(kernel, g, q, k, v, final_out.to(dtype), final_lse, segments, causal=causal,
                                       softmax_scale=SCALE)
        for mine, ref in zip(grads, ref_grads):
            assert relative_error(mine, ref) < tol
    out, lse = varlen.varlen_forward(kernel, q, k, v, segments, causal=causal, softmax_scale=SCALE)
    _check_forward(out, lse, ref_out, ref_lse, q, v, tol)
    # the backward uses the final out/lse it is given (not this call's), also for rows other calls gave keys
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grads = varlen.varlen_backward(kernel, g, q, k, v, final_out.to(dtype), final_lse.to(lse_dtype), segments,
                                   causal=causal, softmax_scale=SCALE)
    for mine, ref, x in zip(grads, ref_grads, (q, k, v)):
        assert mine.shape == x.shape and not mine.isnan().any() and relative_error(mine, ref) < tol


@pytest.mark.parametrize("variant", ["aten@flash", "aten@efficient", "fa2@2.7", "fa3@main-custom-op", "te@main-ragged"])
def test_varlen_single_query_segments_with_gqa(monkeypatch, variant):
    """max_q == 1 with GQA and empty segments: flash-attn 2's ngroups swap would reshape q wrongly; the adapters
    give those calls full kv heads."""
    kernel = _install(monkeypatch, variant)
    segments = Segments((0, 1, 1, 2, 3), (0, 4, 6, 6, 9))  # query lengths 1, 0, 1, 1; one segment without keys
    q, k, v, g = _case(segments, kv_heads=2, dtype=torch.float64)
    ref_out, ref_lse, final_out, final_lse, ref_grads = _reference(q, k, v, g, segments, False)
    out, lse = varlen.varlen_forward(kernel, q, k, v, segments, causal=False, softmax_scale=SCALE)
    _check_forward(out, lse, ref_out, ref_lse, q, v, 1e-12)
    grads = varlen.varlen_backward(kernel, g, q, k, v, final_out, final_lse, segments, causal=False,
                                   softmax_scale=SCALE)
    for mine, ref in zip(grads, ref_grads):
        assert relative_error(mine, ref) < 1e-12


@pytest.mark.parametrize("variant", ["aten@flash", "aten@efficient", "fa2@2.7", "fa3@beta", "te@main-padded"])
def test_varlen_without_any_pair_does_not_call_the_kernel(monkeypatch, variant):
    kernel = _install(monkeypatch, variant)
    monkeypatch.setattr(_adapt, "call_by_name", lambda *a, **k: pytest.fail("no kernel call expected"))
    for segments in (Segments((0, 3, 3), (0, 0, 2)), Segments((0,), (0,)), Segments((0, 0), (0, 0))):
        q, k, v, g = _case(segments, kv_heads=2, dtype=torch.float32)
        out, lse = varlen.varlen_forward(kernel, q, k, v, segments, causal=False, softmax_scale=SCALE)
        assert (out == 0).all() and torch.isneginf(lse).all() and lse.shape == (2, 4, segments.cu_q[-1])
        grads = varlen.varlen_backward(kernel, g, q, k, v, out, torch.zeros_like(lse), segments, causal=False,
                                       softmax_scale=SCALE)
        assert all((x == 0).all() and x.shape == y.shape for x, y in zip(grads, (q, k, v)))


def test_kernels_without_native_varlen_fall_back():
    assert not hasattr(TorchCPUKernel(), "varlen_forward")  # the CPU flash op has no varlen
    assert not hasattr(MathKernel(), "varlen_forward")
    for name in ("torch_flash", "torch_efficient", "flash_attn2", "flash_attn3", "te"):
        kernel = kernels.registry._KERNELS[name].factory()
        assert callable(kernel.varlen_forward) and callable(kernel.varlen_backward)


def test_te_stats_layout_is_remembered_per_device(monkeypatch):
    kernel = _install(monkeypatch, "te@main-padded")
    segments = random_segments(seed=3, causal=False)
    q, k, v, g = _case(segments, kv_heads=2, dtype=torch.float32)
    kernel.varlen_forward(q, k, v, segments, causal=False, softmax_scale=SCALE)
    assert te_module._RAGGED_STATS == {torch.device("cpu"): False}


def test_fake_aten_signatures_mirror_the_installed_torch():
    names = lambda fn: [n for n, _ in _adapt.parameters(fn)]  # noqa: E731
    for op in ("_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
               "_efficient_attention_backward"):
        assert names(getattr(torch.ops.aten, op)) == names(getattr(FakeAten, op)), op
    assert names(fa2_custom_varlen_forward) == names(fa2_v27_varlen_forward)
    assert names(fa3_custom_varlen_forward) == names(fa3_head_forward)
    assert "softcap" not in names(fa2_v259_varlen_forward) and "softcap" in names(fa2_v263_varlen_forward)


def test_real_aten_schemas_and_lse_layouts_on_meta_tensors():
    """The adapters' calls bind to the installed torch's real ops, and the lse layouts they assume are the real
    ones: torch's meta kernels (shape inference, no GPU) return flash ``[h, total_q]`` and mem-efficient
    ``[num_segments, h, ceil(max_q / 32) * 32]``."""
    segments = Segments((0, 3, 3, 8, 10), (0, 4, 6, 6, 11))  # one segment without queries, one without keys
    meta = torch.device("meta")
    q = torch.empty(2, 10, 4, 64, device=meta, dtype=torch.bfloat16)
    k = torch.empty(2, 11, 2, 64, device=meta, dtype=torch.bfloat16)
    cu_q, cu_k = segments.batched(2, meta)
    flash = torch.ops.aten._flash_attention_forward(q.reshape(20, 4, 64), k.reshape(22, 2, 64), k.reshape(22, 2, 64),
                                                    cu_q, cu_k, 5, 4, 0.0, False, False)
    assert flash[1].shape == (4, 20)
    efficient = torch.ops.aten._efficient_attention_forward(q.reshape(1, 20, 4, 64), *[k.new_empty(1, 22, 4, 64)] * 2,
                                                            None, cu_q, cu_k, 5, 4, 0.0, 0, True)
    assert efficient[1].shape == (8, 4, 32)
    for kernel in (TorchCUDAFlashKernel(), TorchCUDAEfficientKernel()):
        out, lse = kernel.varlen_forward(q, k, k, segments, causal=False, softmax_scale=SCALE)
        assert out.shape == q.shape and lse.shape == (2, 4, 10) and lse.dtype == torch.float32
    grads = TorchCUDAFlashKernel().varlen_backward(q, q, k, k, q, lse, segments, causal=True, softmax_scale=SCALE)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    # torch's meta of the mem-efficient backward rejects its own keywords: bind on CPU tensors instead, where the
    # call gets as far as the dispatcher (no CPU kernel), i.e. every argument matched the schema
    cpu = [torch.zeros(x.shape, dtype=x.dtype) for x in (q, k)]
    with pytest.raises(NotImplementedError, match="CPU"):
        TorchCUDAEfficientKernel().varlen_backward(cpu[0], cpu[0], cpu[1], cpu[1], cpu[0], torch.zeros(2, 4, 10),
                                                   segments, causal=False, softmax_scale=SCALE)


def test_plan_offsets_and_masks():
    segments = Segments((0, 2, 2, 5), (0, 0, 3, 4))  # 2 x 0, 0 x 3, 3 x 1
    plan = _adapt.varlen_plan(segments, 2, torch.device("cpu"))
    assert plan.cu_q.tolist() == [0, 2, 2, 5, 7, 7, 10] and plan.cu_k.tolist() == [0, 0, 3, 4, 4, 7, 8]
    assert (plan.max_q, plan.max_k, plan.num_segments, plan.trivial) == (3, 3, 6, False)
    assert plan.q_without_keys.tolist() == [True, True, False, False, False] * 2
    assert plan.k_without_queries.tolist() == [True, True, True, False] * 2
    segment, position = plan.padded_index()
    assert segment.tolist() == [0, 0, 2, 2, 2, 3, 3, 5, 5, 5] and position.tolist() == [0, 1, 0, 1, 2] * 2
    lse = torch.arange(20.0).view(2, 10)
    assert torch.equal(_adapt.lse_from_padded(_adapt.lse_to_padded(lse, plan, 32), plan), lse)


# ---- the real kernels, when this machine has them ----
GPU_BACKENDS = ["torch_flash", "torch_efficient", "flash_attn2", "flash_attn3", "te"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_real_varlen_kernel_against_fallback_on_gpu(backend, causal):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the native varlen kernels are CUDA-only (checked with fakes above on CPU)")
    device = torch.device("cuda")
    entry = kernels.registry._KERNELS[backend]
    reason = entry.unavailable_reason(device, torch.bfloat16, 128)
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")
    kernel = entry.factory()
    segments = random_segments(seed=11 + causal, causal=causal, count=24, max_len=300)
    q, k, v, g = _case(segments, kv_heads=2, dtype=torch.bfloat16, heads=8, d=128, device=device)
    ref_out, ref_lse, final_out, final_lse, ref_grads = _reference(q, k, v, g, segments, causal)
    out, lse = varlen.varlen_forward(kernel, q, k, v, segments, causal=causal, softmax_scale=SCALE)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape and out.shape == ref_out.shape
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty) and (out.transpose(1, 2)[empty] == 0).all()
    assert relative_error(out, ref_out) < 2e-2 and relative_error(lse[~empty], ref_lse[~empty]) < 1e-3
    grads = varlen.varlen_backward(kernel, g, q, k, v, final_out.to(q.dtype), final_lse.float(), segments,
                                   causal=causal, softmax_scale=SCALE)
    for mine, ref in zip(grads, ref_grads):
        assert mine.shape == ref.shape and not mine.isnan().any() and relative_error(mine, ref) < 3e-2
