"""Adapters for flash-attn 2/3, Transformer Engine and torch's cuDNN op, checked on CPU against fakes.

Each fake mirrors one real release's signature (parameter names, order, defaults, returned tuple, in-place
dq/dk/dv) as read from the projects' sources, and does the math with our math kernel, interpreting the arguments
the way the real kernel does (scale, causal flag, layouts). A wrong mapping gives wrong numbers or an error here.
GPU tests at the end run the real kernels when CUDA and the package are present.
"""
import enum
import sys
import types
from typing import List, Optional, Tuple

import pytest
import torch

from megatron_usp import kernels
from megatron_usp.kernels import _adapt, resolve_kernel
from megatron_usp.kernels.flash import (
    FlashAttn2Kernel,
    FlashAttn3Kernel,
    flash_attn2_unavailable,
    flash_attn3_unavailable,
)
from megatron_usp.kernels.math import MathKernel
from megatron_usp.kernels.te import MODULE as TE_MODULE
from megatron_usp.kernels.te import TEFusedKernel, te_unavailable
from megatron_usp.kernels.torch_sdpa import TorchCUDAEfficientKernel, TorchCUDAFlashKernel, TorchCUDNNKernel
from reference import relative_error

MATH = MathKernel()
SCALE = 0.37  # not 1/sqrt(d): a dropped softmax_scale shows


def _fixed(dropout_p=0.0, window=(-1, -1), softcap=0.0, alibi=None, return_softmax=False):
    """What every adapter must pass: the real kernels would do something else (dropout, local window, ...)."""
    assert dropout_p == 0.0 and tuple(window) == (-1, -1) and softcap == 0.0 and alibi is None
    assert return_softmax is False


def _fwd(q, k, v, scale, causal):
    assert k.shape[2] == v.shape[2] and q.shape[2] % k.shape[2] == 0  # kv heads passed natively
    return MATH.forward(q, k, v, causal=bool(causal), softmax_scale=scale)


def _bwd_into(dout, q, k, v, out, lse, dq, dk, dv, scale, causal):
    b, s_q, h = q.shape[:3]
    assert lse.shape == (b, h, s_q) and lse.is_contiguous()
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert dq is not None and dk.shape == k.shape and dv.shape == v.shape
    grads = MATH.backward(dout, q, k, v, out, lse, causal=bool(causal), softmax_scale=scale)
    for buf, g in zip((dq, dk, dv), grads):
        buf.copy_(g)
    return torch.zeros(b, h, s_q)  # softmax_d


# ---- flash-attn 2: v2.6.3 (plain functions, window_size tuple, 8-tuple forward, bwd returns dq/dk/dv) ----
def fa2_v263_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax):
    _fixed(dropout_p, window_size, softcap, alibi_slopes, return_softmax)
    out, lse = _fwd(q, k, v, softmax_scale, causal)
    return out, q, k, v, out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)


def fa2_v263_backward(
    dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size, softcap,
    alibi_slopes, deterministic, rng_state=None,
):
    _fixed(dropout_p, window_size, softcap, alibi_slopes)
    d = _bwd_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    return dq, dk, dv, d


# ---- flash-attn 2: v2.7.0 .. v2.8.3 (window_size_left/right, 4-tuple forward, bwd returns softmax_d only) ----
def fa2_v27_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
    return_softmax: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _fixed(dropout_p, (window_size_left, window_size_right), softcap, alibi_slopes, return_softmax)
    out, lse = _fwd(q, k, v, softmax_scale, causal)
    return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)


def fa2_v27_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor], dv: Optional[torch.Tensor],
    dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
    softcap: float, alibi_slopes: Optional[torch.Tensor], deterministic: bool, rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    _fixed(dropout_p, (window_size_left, window_size_right), softcap, alibi_slopes)
    return _bwd_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)


# ≥2.7 registers them with torch.library.custom_op when torch has it: then the Python signature is (*a, **k)
fa2_custom_forward = torch.library.custom_op("usp_fake_flash_attn::_flash_attn_forward", mutates_args=())(
    fa2_v27_forward
)
fa2_custom_backward = torch.library.custom_op(
    "usp_fake_flash_attn::_flash_attn_backward", mutates_args=("dq", "dk", "dv")
)(fa2_v27_backward)


# ---- flash-attn 3 beta (hopper/ at v2.7.0): (q, k, v, softmax_scale, causal, window_size, ...), 7-tuple ----
def fa3_beta_forward(q, k, v, softmax_scale, causal, window_size, descale_q=None, descale_k=None, descale_v=None,
                     gqa_parallel=False):
    _fixed(window=window_size)
    assert descale_q is None and descale_k is None and descale_v is None
    out, lse = _fwd(q, k, v, softmax_scale, causal)
    return out, q, k, v, out, lse, None


def fa3_beta_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, window_size,
                      deterministic=False):
    _fixed(window=window_size)
    d = _bwd_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    return dq, dk, dv, d


# ---- flash-attn 3 at v2.7.4: many required optional inputs (None), window_size tuple, sink_token_length ----
def fa3_v274_forward(q, k, v, k_new, v_new, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q, seqused_k,
                     max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k, rotary_cos, rotary_sin,
                     q_descale, k_descale, v_descale, softmax_scale, causal, window_size=(-1, -1),
                     sink_token_length=0, softcap=0.0, rotary_interleaved=True, num_splits=1, pack_gqa=None,
                     sm_margin=0):
    unused = (k_new, v_new, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q, seqused_k,
              max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k, rotary_cos, rotary_sin,
              q_descale, k_descale, v_descale)
    assert all(x is None for x in unused)
    _fixed(window=window_size, softcap=softcap)
    out, lse = _fwd(q, k, v, softmax_scale, causal)
    return out, lse, torch.empty(0), torch.empty(0)


def fa3_v274_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k, max_seqlen_q,
                      max_seqlen_k, dq, dk, dv, softmax_scale, causal, window_size=(-1, -1), sink_token_length=0,
                      softcap=0.0, deterministic=False, sm_margin=0):
    assert all(x is None for x in (cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k, max_seqlen_q, max_seqlen_k))
    _fixed(window=window_size, softcap=softcap)
    d = _bwd_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    return dq, dk, dv, d


# ---- flash-attn 3 main (flash_attn_3:: custom ops): keywords with defaults, out_, is_causal, returns softmax_d --
def fa3_head_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_new: Optional[torch.Tensor] = None,
    v_new: Optional[torch.Tensor] = None, qv: Optional[torch.Tensor] = None, out_: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None, seqused_q: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
    page_table: Optional[torch.Tensor] = None, kv_batch_idx: Optional[torch.Tensor] = None,
    leftpad_k: Optional[torch.Tensor] = None, rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None, seqlens_rotary: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None, k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size_left: int = -1, window_size_right: int = -1, attention_chunk: int = 0, softcap: float = 0.0,
    rotary_interleaved: bool = True, scheduler_metadata: Optional[torch.Tensor] = None, num_splits: int = 1,
    pack_gqa: Optional[bool] = None, sm_margin: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    assert all(x is None for x in (k_new, v_new, qv, out_, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, page_table))
    _fixed(window=(window_size_left, window_size_right), softcap=softcap)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out, lse = _fwd(q, k, v, scale, causal)
    return out, lse, torch.empty(0), torch.empty(0)


def fa3_head_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    sequed_q: Optional[torch.Tensor] = None, sequed_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, dq: Optional[torch.Tensor] = None,
    dk: Optional[torch.Tensor] = None, dv: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
    is_causal: bool = False, window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
    deterministic: bool = False, sm_margin: int = 0,
) -> torch.Tensor:
    _fixed(window=(window_size_left, window_size_right), softcap=softcap)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _bwd_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, scale, is_causal)


fa3_custom_forward = torch.library.custom_op("usp_fake_flash_attn_3::_flash_attn_forward", mutates_args=())(
    fa3_head_forward
)
fa3_custom_backward = torch.library.custom_op(
    "usp_fake_flash_attn_3::_flash_attn_backward", mutates_args=("dq", "dk", "dv")
)(fa3_head_backward)


# ---- Transformer Engine: cpp_extensions.fused_attn at v1.12, v2.4 and main ----
class _TexDType(enum.Enum):
    kFloat16 = 0
    kBFloat16 = 1
    kFloat32 = 2


class _FusedAttnBackend(enum.IntEnum):  # main's IntEnum; 1.x/2.x have a dict with the same keys
    No_Backend = -1
    F16_max512_seqlen = 0
    F16_arbitrary_seqlen = 1
    FP8 = 2


_TE_DTYPE = {torch.float16: _TexDType.kFloat16, torch.bfloat16: _TexDType.kBFloat16, torch.float32: _TexDType.kFloat32}


def _te_inputs(q, k, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, fused_attention_backend, qkv_layout,
               attn_bias_type, attn_mask_type, window_size, dropout):
    """Checks TE's own arguments and returns whether the mask is causal."""
    b, s_q, s_k = q.shape[0], q.shape[1], k.shape[1]
    assert qkv_layout == "bshd_bshd_bshd", qkv_layout  # any other layout reads the same memory differently
    assert (max_seqlen_q, max_seqlen_kv) == (s_q, s_k)
    assert torch.equal(cu_seqlens_q, torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32))
    assert torch.equal(cu_seqlens_kv, torch.arange(0, (b + 1) * s_k, s_k, dtype=torch.int32))
    assert fused_attention_backend == _FusedAttnBackend.F16_arbitrary_seqlen and attn_bias_type == "no_bias"
    assert attn_mask_type in ("causal", "no_mask") and dropout == 0.0
    causal = attn_mask_type == "causal"
    assert tuple(window_size) == ((-1, 0) if causal else (-1, -1))
    return causal


def _te_scale(q, attn_scale):
    return q.shape[-1] ** -0.5 if attn_scale is None else attn_scale


def _te_forward_math(q, k, v, attn_scale, causal):
    out, lse = _fwd(q, k, v, _te_scale(q, attn_scale), causal)
    return out, [lse.unsqueeze(-1), torch.zeros(2, dtype=torch.int64)]


def _te_backward_math(q, k, v, o, d_o, aux_ctx_tensors, attn_scale, causal):
    lse, rng_state = aux_ctx_tensors
    b, s_q, h = q.shape[:3]
    assert lse.shape == (b, h, s_q, 1) and rng_state.numel() == 2
    dq, dk, dv = MATH.backward(d_o, q, k, v, o, lse.squeeze(-1), causal=causal, softmax_scale=_te_scale(q, attn_scale))
    return [dq, dk, dv, None]


def te_v112_fwd(
    is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, qkv_dtype, fused_attention_backend,
    attn_bias=None, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None, d_scale_qkv=None, d_scale_qkv_offset=0,
    d_scale_s=None, d_scale_s_offset=1, q_scale_s=None, q_scale_s_offset=1, q_scale_o=None, q_scale_o_offset=2,
    amax_s=None, amax_s_offset=1, amax_o=None, amax_o_offset=2, attn_scale=None, dropout=0.0, fast_zero_fill=True,
    qkv_layout="sbh3d", attn_bias_type="no_bias", attn_mask_type="padding", window_size=(-1, -1), rng_gen=None,
):
    assert is_training and qkv_dtype == _TE_DTYPE[q.dtype]
    causal = _te_inputs(q, k, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, fused_attention_backend,
                        qkv_layout, attn_bias_type, attn_mask_type, window_size, dropout)
    return _te_forward_math(q, k, v, attn_scale, causal)


def te_v112_bwd(
    max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, o, d_o, qkv_dtype, dqkv_dtype, aux_ctx_tensors,
    fused_attention_backend, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None, d_scale_qkv=None, d_scale_s=None,
    d_scale_o=None, d_scale_do=None, d_scale_dp=None, q_scale_s=None, q_scale_dp=None, q_scale_dqkv=None, amax_dp=None,
    amax_dqkv=None, attn_scale=None, dropout=0.0, fast_zero_fill=True, qkv_layout="sbh3d", attn_bias_type="no_bias",
    attn_mask_type="padding", window_size=(-1, -1), deterministic=False,
):
    assert qkv_dtype == _TE_DTYPE[q.dtype] and dqkv_dtype == _TE_DTYPE[q.dtype]
    causal = _te_inputs(q, k, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, fused_attention_backend,
                        qkv_layout, attn_bias_type, attn_mask_type, window_size, dropout)
    return _te_backward_math(q, k, v, o, d_o, aux_ctx_tensors, attn_scale, causal)


def te_v24_fwd(
    is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, fake_dtype, fused_attention_backend,
    attn_bias=None, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None, page_table_k=None, page_table_v=None,
    s_quantizer=None, o_quantizer=None, attn_scale=None, dropout=0.0, fast_zero_fill=True, qkv_layout="sbh3d",
    attn_bias_type="no_bias", attn_mask_type="padding", window_size=(-1, -1), rng_gen=None,
):
    assert is_training and fake_dtype == q.dtype
    causal = _te_inputs(q, k, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, fused_attention_backend,
                        qkv_layout, attn_bias_type, attn_mask_type, window_size, dropout)
    return _te_forward_math(q, k, v, attn_scale, causal)


def te_v24_bwd(
    max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, o, d_o, fake_dtype, dqkv_dtype, aux_ctx_tensors,
    fused_attention_backend, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None, s_quantizer=None, dp_quantizer=None,
    dqkv_quantizer=None, attn_scale=None, dropout=0.0, fast_zero_fill=True, qkv_layout="sbh3d",
    attn_bias_type="no_bias", attn_mask_type="padding", window_size=(-1, -1), deterministic=False,
):
    assert fake_dtype == q.dtype and dqkv_dtype == _TE_DTYPE[q.dtype]
    causal = _te_inputs(q, k, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, fused_attention_backend,
                        qkv_layout, attn_bias_type, attn_mask_type, window_size, dropout)
    return _te_backward_math(q, k, v, o, d_o, aux_ctx_tensors, attn_scale, causal)


def _sbhd_to_bshd(x, fmt):
    assert fmt in ("bshd", "sbhd")
    return x if fmt == "bshd" else x.transpose(0, 1)  # what the real kernel does with that format string


def te_main_fwd(
    is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, fake_dtype, fused_attention_backend,
    attn_bias=None, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None, page_table_k=None, page_table_v=None,
    s_quantizer=None, o_quantizer=None, attn_scale=None, dropout=0.0, fast_zero_fill=True, qkv_layout="sbh3d",
    o_format="sbhd", qkv_scale_inv_format=None, attn_bias_type="no_bias", attn_mask_type="padding",
    softmax_type="vanilla", window_size=(-1, -1), bottom_right_diagonal=None, rng_gen=None, softmax_offset=None,
    return_max_logit=False, cuda_graph=False,
):
    assert is_training and fake_dtype == q.dtype and softmax_type == "vanilla" and not return_max_logit
    causal = _te_inputs(q, k, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, fused_attention_backend,
                        qkv_layout, attn_bias_type, attn_mask_type, window_size, dropout)
    out, aux = _te_forward_math(q, k, v, attn_scale, causal)
    return _sbhd_to_bshd(out, o_format), aux


def te_main_bwd(
    max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, o, d_o, fake_dtype, aux_ctx_tensors,
    fused_attention_backend, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None, s_quantizer=None, dp_quantizer=None,
    dqkv_quantizer=None, attn_scale=None, dropout=0.0, fast_zero_fill=True, qkv_layout="sbh3d", o_format="sbhd",
    do_format="sbhd", dqkv_layout="sbh3d", qkv_scale_inv_format=None, do_scale_inv_format=None,
    attn_bias_type="no_bias", attn_mask_type="padding", softmax_type="vanilla", window_size=(-1, -1),
    bottom_right_diagonal=None, deterministic=False, cuda_graph=False,
):
    assert fake_dtype == q.dtype and dqkv_layout == "bshd_bshd_bshd"
    causal = _te_inputs(q, k, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, fused_attention_backend,
                        qkv_layout, attn_bias_type, attn_mask_type, window_size, dropout)
    o, d_o = _sbhd_to_bshd(o, o_format), _sbhd_to_bshd(d_o, do_format)
    return _te_backward_math(q, k, v, o, d_o, aux_ctx_tensors, attn_scale, causal)


# ---- torch 2.13's aten cuDNN ops (schema checked against the installed torch below) ----
class _FakeCudnnAten:
    """Stands in for torch.ops.aten: the two cuDNN ops in bhsd, lse [b, h, s_q, 1] as torch 2.13 returns it."""

    @staticmethod
    def _scaled_dot_product_cudnn_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0,
                                            is_causal=False, return_debug_mask=False, *, scale=None):
        assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0 and not return_debug_mask
        assert query.shape[1] == key.shape[1]  # the op wants equal head counts: GQA expanded by the adapter
        out, lse = _fwd(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale, is_causal)
        seed = torch.zeros((), dtype=torch.int64)
        return out.transpose(1, 2), lse.unsqueeze(-1), None, None, query.shape[2], key.shape[2], seed, seed, None

    @staticmethod
    def _scaled_dot_product_cudnn_attention_backward(grad_out, query, key, value, out, logsumexp, philox_seed,
                                                     philox_offset, attn_bias, cum_seq_q, cum_seq_k, max_q, max_k,
                                                     dropout_p, is_causal, *, scale=None):
        b, h, s_q = query.shape[:3]
        assert logsumexp.shape == (b, h, s_q, 1) and attn_bias is None and dropout_p == 0.0
        assert (max_q, max_k) == (s_q, key.shape[2])
        t = [x.transpose(1, 2) for x in (grad_out, query, key, value, out)]
        grads = MATH.backward(*t, logsumexp.squeeze(-1), causal=is_causal, softmax_scale=scale)
        return tuple(g.transpose(1, 2) for g in grads)


def _module(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def _install(monkeypatch, variant):
    """Put the fake of ``variant`` where the adapter imports it from; returns the adapter."""
    family, version = variant.split("@")
    if family == "fa2":
        fwd, bwd = {"2.6.3": (fa2_v263_forward, fa2_v263_backward), "2.7": (fa2_v27_forward, fa2_v27_backward),
                    "2.8-custom-op": (fa2_custom_forward, fa2_custom_backward)}[version]
        _module(monkeypatch, "flash_attn")
        _module(monkeypatch, "flash_attn.flash_attn_interface", _flash_attn_forward=fwd, _flash_attn_backward=bwd)
        return FlashAttn2Kernel()
    if family == "fa3":
        fwd, bwd = {"beta": (fa3_beta_forward, fa3_beta_backward), "2.7.4": (fa3_v274_forward, fa3_v274_backward),
                    "main-custom-op": (fa3_custom_forward, fa3_custom_backward)}[version]
        _module(monkeypatch, "flash_attn_interface", _flash_attn_forward=fwd, _flash_attn_backward=bwd)
        return FlashAttn3Kernel()
    if family == "te":
        fwd, bwd = {"1.12": (te_v112_fwd, te_v112_bwd), "2.4": (te_v24_fwd, te_v24_bwd),
                    "main": (te_main_fwd, te_main_bwd)}[version]
        backend = _FusedAttnBackend if version == "main" else {m.name: m for m in _FusedAttnBackend}
        tex = types.SimpleNamespace(DType=_TexDType)
        _module(monkeypatch, TE_MODULE, fused_attn_fwd=fwd, fused_attn_bwd=bwd, FusedAttnBackend=backend, tex=tex)
        return TEFusedKernel()
    assert family == "cudnn"
    monkeypatch.setattr(torch.ops, "aten", _FakeCudnnAten())
    return TorchCUDNNKernel()


VARIANTS = ["fa2@2.6.3", "fa2@2.7", "fa2@2.8-custom-op", "fa3@beta", "fa3@2.7.4", "fa3@main-custom-op",
            "te@1.12", "te@2.4", "te@main", "cudnn@torch2.13"]


def rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_adapter_equals_math_kernel(monkeypatch, variant, dtype, causal, kv_heads):
    if variant in ("te@1.12", "te@2.4") and dtype == torch.float64:
        pytest.skip("these TE releases take a tex.DType, which has no float64")
    kernel = _install(monkeypatch, variant)
    s_k = 7 if causal else 11  # rectangular when not causal: q/k swaps show
    q, g = rand(2, 7, 4, 8, dtype=dtype, seed=1), rand(2, 7, 4, 8, dtype=dtype, seed=4)
    k, v = rand(2, s_k, kv_heads, 8, dtype=dtype, seed=2), rand(2, s_k, kv_heads, 8, dtype=dtype, seed=3)
    out, lse = kernel.forward(q, k, v, causal=causal, softmax_scale=SCALE)
    ref_out, ref_lse = MATH.forward(q, k, v, causal=causal, softmax_scale=SCALE)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.shape == q.shape and lse.shape == (2, 4, 7) and lse.dtype == ref_lse.dtype
    assert relative_error(out, ref_out) < tol and relative_error(lse, ref_lse) < tol
    # the backward must use the out/lse it is given (the ring passes the final ones), not recompute them
    final_out, final_lse = ref_out * 0.5, ref_lse + 0.25
    grads = kernel.backward(g, q, k, v, final_out, final_lse, causal=causal, softmax_scale=SCALE)
    ref_grads = MATH.backward(g, q, k, v, final_out, final_lse, causal=causal, softmax_scale=SCALE)
    for mine, ref in zip(grads, ref_grads):
        assert mine.shape == ref.shape and relative_error(mine, ref) < tol


def test_fake_signatures_mirror_the_real_ones():
    """Names the adapters rely on, per release, as read from the sources (and torch's installed schema)."""
    names = lambda fn: [n for n, _ in _adapt.parameters(fn)]  # noqa: E731
    assert names(fa2_custom_forward) == names(fa2_v27_forward)  # custom_op objects are read through their schema
    assert "window_size" in names(fa2_v263_forward) and "window_size_left" in names(fa2_v27_forward)
    assert "is_causal" in names(fa3_custom_backward) and "out_" in names(fa3_custom_forward)
    assert [(n, d) for n, d in _adapt.parameters(torch.ops.aten._scaled_dot_product_cudnn_attention)][:5] == [
        ("query", False), ("key", False), ("value", False), ("attn_bias", False), ("compute_log_sumexp", False)]
    real_bwd = [n for n, _ in _adapt.parameters(torch.ops.aten._scaled_dot_product_cudnn_attention_backward)]
    fake_bwd = names(_FakeCudnnAten._scaled_dot_product_cudnn_attention_backward)
    assert real_bwd == fake_bwd


def test_unknown_required_parameter_fails_loudly(monkeypatch):
    def future_forward(q, k, v, softmax_scale, causal, mystery_flag):
        raise AssertionError("must not be called")

    _module(monkeypatch, "flash_attn_interface", _flash_attn_forward=future_forward, _flash_attn_backward=None)
    x = torch.zeros(1, 2, 1, 8)
    with pytest.raises(TypeError, match="mystery_flag"):
        FlashAttn3Kernel().forward(x, x, x, causal=False, softmax_scale=1.0)


# ---- availability ----
CUDA = torch.device("cuda")  # only a name here: the probes below are replaced, nothing touches a GPU


@pytest.fixture
def gpu(monkeypatch):
    """Pretend an sm90 GPU with cuDNN 9.1; returns a setter for other capabilities / cuDNN versions."""
    state = {"capability": (9, 0), "cudnn": 90100}
    monkeypatch.setattr(_adapt, "cuda_capability", lambda device: state["capability"])
    monkeypatch.setattr(_adapt, "cudnn_version", lambda: state["cudnn"])
    return state


@pytest.mark.parametrize(
    "check, module",
    [(flash_attn2_unavailable, "flash_attn.flash_attn_interface"), (flash_attn3_unavailable, "flash_attn_interface"),
     (te_unavailable, TE_MODULE)],
    ids=["flash_attn2", "flash_attn3", "te"],
)
def test_unavailable_reasons(monkeypatch, gpu, check, module):
    monkeypatch.setitem(sys.modules, module, None)  # "not installed", whatever this machine has
    monkeypatch.setitem(sys.modules, "flash_attn_3", None)
    assert "not installed" in check(CUDA, torch.bfloat16, 128)
    assert "needs CUDA" in check(torch.device("cpu"), torch.bfloat16, 128)
    assert "float16/bfloat16" in check(CUDA, torch.float32, 128)
    assert "head_dim" in check(CUDA, torch.bfloat16, 512) and "head_dim" in check(CUDA, torch.bfloat16, 100)
    gpu["capability"] = (7, 5)
    assert "compute capability" in check(CUDA, torch.bfloat16, 128)


def test_availability_with_fakes(monkeypatch, gpu):
    _install(monkeypatch, "fa2@2.7")
    _install(monkeypatch, "fa3@main-custom-op")
    _install(monkeypatch, "te@main")
    assert flash_attn2_unavailable(CUDA, torch.float16, 256) is None
    assert flash_attn3_unavailable(CUDA, torch.bfloat16, 256) is None
    assert te_unavailable(CUDA, torch.bfloat16, 128) is None and "head_dim" in te_unavailable(CUDA, torch.bfloat16, 256)
    gpu["capability"] = (8, 0)
    assert flash_attn2_unavailable(CUDA, torch.bfloat16, 128) is None
    assert "9.0" in flash_attn3_unavailable(CUDA, torch.bfloat16, 128)
    gpu["capability"] = (10, 0)
    assert "Hopper" in flash_attn3_unavailable(CUDA, torch.bfloat16, 128)
    _module(monkeypatch, "flash_attn.flash_attn_interface", _flash_attn_forward=fa2_v27_forward)
    assert "_flash_attn_backward" in flash_attn2_unavailable(CUDA, torch.bfloat16, 128)
    from megatron_usp.kernels import _cuda_cudnn

    assert _cuda_cudnn(CUDA, torch.bfloat16, 128) is None
    assert "head_dim" in _cuda_cudnn(CUDA, torch.bfloat16, 256)
    gpu["cudnn"] = 8906
    assert "cuDNN >= 9.0" in _cuda_cudnn(CUDA, torch.bfloat16, 128)
    gpu["cudnn"] = None
    assert "no cuDNN" in _cuda_cudnn(CUDA, torch.bfloat16, 128)


def test_auto_follows_the_policy(monkeypatch, gpu):
    for variant in ("fa2@2.7", "fa3@main-custom-op", "te@main"):
        _install(monkeypatch, variant)
    pick = lambda dtype=torch.bfloat16, head_dim=128, backend="auto": type(  # noqa: E731
        resolve_kernel(backend, CUDA, dtype, head_dim))
    assert pick() is FlashAttn3Kernel
    assert pick(backend="torch") is TorchCUDNNKernel
    gpu["capability"] = (8, 0)  # Ampere: no flash-attn 3
    assert pick() is FlashAttn2Kernel
    gpu["capability"] = (9, 0)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "flash_attn_3", None)
    assert pick() is FlashAttn2Kernel
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", None)
    assert pick() is TorchCUDNNKernel
    assert pick(head_dim=256) is TorchCUDAFlashKernel  # cuDNN and TE stop at 128
    gpu["cudnn"] = None
    assert pick() is TEFusedKernel
    monkeypatch.setitem(sys.modules, TE_MODULE, None)
    assert pick() is TorchCUDAFlashKernel
    assert pick(dtype=torch.float32) is TorchCUDAEfficientKernel
    ranked = sorted(kernels.AUTO_PRIORITY, key=kernels.AUTO_PRIORITY.get, reverse=True)
    assert ranked[:6] == ["flash_attn3", "flash_attn2", "torch_cudnn", "te", "torch_flash", "torch_efficient"]


# ---- the real kernels, when this machine has them ----
GPU_BACKENDS = ["flash_attn2", "flash_attn3", "te", "torch_cudnn", "torch_flash", "torch_efficient"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_real_kernel_against_math_on_gpu(backend, causal):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda")
    entry = kernels.registry._KERNELS[backend]
    reason = entry.unavailable_reason(device, torch.bfloat16, 128)
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")
    kernel = entry.factory()
    s_k = 256 if causal else 384
    q = rand(2, 256, 8, 128, dtype=torch.bfloat16, seed=1).to(device)
    k, v = (rand(2, s_k, 2, 128, dtype=torch.bfloat16, seed=s).to(device) for s in (2, 3))
    g = rand(2, 256, 8, 128, dtype=torch.bfloat16, seed=4).to(device)
    out, lse = kernel.forward(q, k, v, causal=causal, softmax_scale=SCALE)
    ref_out, ref_lse = MATH.forward(q.double(), k.double(), v.double(), causal=causal, softmax_scale=SCALE)
    assert lse.dtype == torch.float32 and lse.shape == (2, 8, 256)
    assert relative_error(out, ref_out) < 2e-2 and relative_error(lse, ref_lse) < 1e-3
    grads = kernel.backward(g, q, k, v, ref_out.to(q.dtype), ref_lse.float(), causal=causal, softmax_scale=SCALE)
    ref_grads = MATH.backward(g.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, causal=causal,
                              softmax_scale=SCALE)
    for mine, ref in zip(grads, ref_grads):
        assert mine.shape == ref.shape and relative_error(mine, ref) < 3e-2
