"""Transformer Engine fused attention (cuDNN "F16_arbitrary_seqlen" sub-backend) through
``transformer_engine.pytorch.cpp_extensions.fused_attn.fused_attn_fwd / fused_attn_bwd``.

Layout ``bshd_bshd_bshd`` (no copies), GQA native. TE returns the softmax stats (the lse of the scaled scores)
as ``aux_ctx_tensors[0]`` with shape ``[b, h, s_q, 1]`` fp32 and wants ``[stats, rng_state]`` back in the
backward. Parameters differ across releases (``qkv_dtype``/``dqkv_dtype`` as ``tex.DType`` in 1.x,
``fake_dtype`` as a torch dtype in 2.x, ``o_format``/``do_format``/``dqkv_layout`` added later with sbhd
defaults), so they are filled by name.

Native varlen (``varlen_forward`` / ``varlen_backward``, see ``kernels/varlen.py``): layout ``thd_thd_thd`` with
``cu_seqlens_q/kv`` (and the same offsets as ``cu_seqlens_*_padded``: no padding between segments), mask
``padding`` / ``padding_causal``. The softmax stats then come in one of two layouts, chosen inside TE by the cuDNN
runtime (fused_attn_f16_arbitrary_seqlen.cu, ``use_ragged_stats = is_ragged_q && cudnn_runtime_version >= 90600
&& sm_arch != 120``; TE >= 1.13): ragged ``[total_q, h, 1]`` (token-major at ``cu_seqlens_q_padded`` offsets),
else ``[num_segments, h, max_seqlen_q, 1]``. The backward must hand back the layout the forward produced; it is
learned from a forward's output (a tiny probe forward when the backward comes first) and kept per device.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from . import _adapt
from .base import accumulation_dtype

MODULE = "transformer_engine.pytorch.cpp_extensions.fused_attn"
_TEX_DTYPE = {torch.float16: "kFloat16", torch.bfloat16: "kBFloat16", torch.float32: "kFloat32"}


def _module() -> ModuleType:
    module, reason = _adapt.optional_import(MODULE)
    if module is None:
        raise RuntimeError(reason)
    return module


def _cu_seqlens(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)


def _options(module: ModuleType, q: torch.Tensor, k: torch.Tensor, causal: bool, softmax_scale: float) -> dict:
    b, s_q, s_k = q.shape[0], q.shape[1], k.shape[1]
    return {
        **_common(module, q, causal, softmax_scale),
        "max_seqlen_q": s_q,
        "max_seqlen_kv": s_k,
        "cu_seqlens_q": _cu_seqlens(b, s_q, q.device),
        "cu_seqlens_kv": _cu_seqlens(b, s_k, q.device),
        "qkv_layout": "bshd_bshd_bshd",
        "o_format": "bshd",
        "do_format": "bshd",
        "dqkv_layout": "bshd_bshd_bshd",
        "attn_mask_type": "causal" if causal else "no_mask",
    }


def _varlen_options(module: ModuleType, q: torch.Tensor, plan, causal: bool, softmax_scale: float) -> dict:
    return {
        **_common(module, q, causal, softmax_scale),
        "max_seqlen_q": plan.max_q,
        "max_seqlen_kv": plan.max_k,
        "cu_seqlens_q": plan.cu_q,
        "cu_seqlens_kv": plan.cu_k,
        # token offsets of the segments in q/k/v/o (and of the ragged stats): no padding between segments
        "cu_seqlens_q_padded": plan.cu_q,
        "cu_seqlens_kv_padded": plan.cu_k,
        "qkv_layout": "thd_thd_thd",
        "o_format": "thd",
        "do_format": "thd",
        "dqkv_layout": "thd_thd_thd",
        # thd needs a padding mask type; "padding_causal" is top-left aligned (= bottom-right on square segments)
        "attn_mask_type": "padding_causal" if causal else "padding",
    }


def _common(module: ModuleType, q: torch.Tensor, causal: bool, softmax_scale: float) -> dict:
    tex = getattr(module, "tex", None)  # transformer_engine_torch, imported by the module under that name
    tex_dtype = getattr(tex.DType, _TEX_DTYPE[q.dtype]) if tex is not None and q.dtype in _TEX_DTYPE else None
    return {
        "fake_dtype": q.dtype,
        "qkv_dtype": tex_dtype,
        "dqkv_dtype": tex_dtype,
        "fused_attention_backend": module.FusedAttnBackend["F16_arbitrary_seqlen"],
        "attn_scale": softmax_scale,
        "dropout": 0.0,
        "attn_bias_type": "no_bias",
        # TE's own normalisation (check_set_window_size): (padding_)causal <-> (-1, 0), no mask/padding <-> (-1, -1)
        "window_size": (-1, 0) if causal else (-1, -1),
    }


class TEFusedKernel:
    """TE fused attention: fp16/bf16, head_dim <= 128 (multiple of 8), sm80+."""

    name = "te"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, softmax_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """bshd q/k/v -> ``out [b, s_q, h, d]``, ``lse [b, h, s_q]`` fp32."""
        module = _module()
        values = _options(module, q, k, causal, softmax_scale)
        values.update(is_training=True, q=q.contiguous(), k=k.contiguous(), v=v.contiguous())
        out, aux = _adapt.call_by_name(module.fused_attn_fwd, values, absent=frozenset(), what="te fused_attn_fwd")[:2]
        return out.reshape(q.shape[:3] + v.shape[3:]), _adapt.lse_bhs(aux[0], q)

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        softmax_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients ``dq [b, s_q, h, d]``, ``dk, dv [b, s_k, kv_heads, d]`` from the final out/lse."""
        module = _module()
        values = _options(module, q, k, causal, softmax_scale)
        # rng_state is only read for dropout, which is 0 here
        rng_state = torch.zeros(2, dtype=torch.int64, device=q.device)
        values.update(
            q=q.contiguous(),
            k=k.contiguous(),
            v=v.contiguous(),
            o=out.to(q.dtype).contiguous(),
            d_o=dout.to(q.dtype).contiguous(),
            aux_ctx_tensors=[lse.to(accumulation_dtype(q.dtype)).unsqueeze(-1).contiguous(), rng_state],
        )
        grads = _adapt.call_by_name(module.fused_attn_bwd, values, absent=frozenset(), what="te fused_attn_bwd")
        return grads[0], grads[1], grads[2]

    def varlen_forward(self, q, k, v, segments, *, causal: bool, softmax_scale: float):
        """thd fused attention over the segments (batch rows flattened into tokens) -> ``out [b, Tq, h, d_v]``,
        ``lse [b, h, Tq]`` fp32; rows of segments without keys: 0 / -inf."""
        plan = _adapt.varlen_plan(segments, q.shape[0], q.device)
        if plan.trivial:
            return _adapt.empty_varlen_forward(q, v)
        module = _module()
        values = _varlen_options(module, q, plan, causal, softmax_scale)
        values.update(is_training=True, q=_adapt.flat(q), k=_adapt.flat(k), v=_adapt.flat(v))
        out, aux = _adapt.call_by_name(module.fused_attn_fwd, values, absent=frozenset(), what="te fused_attn_fwd")[:2]
        lse = _stats_to_rows(aux[0], plan, q.shape[2])
        return _adapt.varlen_forward_result(out.reshape(plan.total_q, q.shape[2], v.shape[3]), lse, plan, q, v)

    def varlen_backward(self, dout, q, k, v, out, lse, segments, *, causal: bool, softmax_scale: float):
        """Gradients of :meth:`varlen_forward` from the rows' final out / lse, the stats in the layout TE's
        forward uses on this device."""
        plan = _adapt.varlen_plan(segments, q.shape[0], q.device)
        if plan.trivial:
            return _adapt.empty_varlen_backward(q, k, v)
        module = _module()
        lse_rows = _adapt.lse_to_rows(lse, q)
        if _ragged_stats(module, q, v):
            stats = lse_rows.t().unsqueeze(-1).contiguous()
        else:
            stats = _adapt.lse_to_padded(lse_rows, plan, plan.max_q).unsqueeze(-1)
        values = _varlen_options(module, q, plan, causal, softmax_scale)
        values.update(
            q=_adapt.flat(q),
            k=_adapt.flat(k),
            v=_adapt.flat(v),
            o=_adapt.flat(out.to(q.dtype)),
            d_o=_adapt.flat(dout.to(q.dtype)),
            aux_ctx_tensors=[stats, torch.zeros(2, dtype=torch.int64, device=q.device)],
        )
        grads = _adapt.call_by_name(module.fused_attn_bwd, values, absent=frozenset(), what="te fused_attn_bwd")
        return _adapt.varlen_backward_result(grads[0], grads[1], grads[2], plan, q, k, v)


# device -> True when TE's thd softmax stats are ragged ([total_q, h, 1]), False when padded per segment
_RAGGED_STATS: dict[torch.device, bool] = {}


def _stats_to_rows(stats: torch.Tensor, plan, heads: int) -> torch.Tensor:
    """TE's thd softmax stats (either layout) -> ``[h, total_q]``; remembers the layout for the backward."""
    ragged = stats.dim() == 3
    if ragged and tuple(stats.shape) == (plan.total_q, heads, 1):
        rows = stats[..., 0].t()
    elif not ragged and stats.dim() == 4 and stats.shape[:2] == (plan.num_segments, heads) and stats.shape[3] == 1:
        rows = _adapt.lse_from_padded(stats[..., 0], plan)
    else:
        raise RuntimeError(f"unexpected TE thd softmax stats shape {tuple(stats.shape)} for {plan.num_segments} "
                           f"segments, {heads} heads, {plan.total_q} query rows")
    _RAGGED_STATS[plan.device] = ragged
    return rows


def _ragged_stats(module: ModuleType, q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether TE's thd forward on this device gives ragged stats: known from an earlier forward, else a probe
    forward of one 2-token segment with one head (ragged ``[2, 1, 1]`` vs padded ``[1, 1, 2, 1]``)."""
    if q.device not in _RAGGED_STATS:
        from .varlen import Segments

        probe_q = q.new_zeros(2, 1, q.shape[-1])
        probe_v = v.new_zeros(2, 1, v.shape[-1])
        plan = _adapt.varlen_plan(Segments((0, 2), (0, 2)), 1, q.device)
        values = _varlen_options(module, probe_q, plan, False, 1.0)
        values.update(is_training=True, q=probe_q, k=probe_q, v=probe_v)
        aux = _adapt.call_by_name(module.fused_attn_fwd, values, absent=frozenset(), what="te fused_attn_fwd")[1]
        _RAGGED_STATS[q.device] = aux[0].dim() == 3
    return _RAGGED_STATS[q.device]


def te_unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why TE fused attention cannot run for these inputs, or ``None``."""
    reason = _adapt.cuda_half_reason(device, dtype, head_dim, max_head_dim=128, min_capability=(8, 0))
    if reason is not None:
        return reason
    module, reason = _adapt.optional_import(MODULE)
    if module is None:
        return reason.replace("package transformer_engine", "package transformer_engine (pytorch)")
    missing = [n for n in ("fused_attn_fwd", "fused_attn_bwd", "FusedAttnBackend") if not hasattr(module, n)]
    return f"{MODULE} has no {' / '.join(missing)}" if missing else None
