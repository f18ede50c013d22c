"""Transformer Engine fused attention (cuDNN "F16_arbitrary_seqlen" sub-backend) through
``transformer_engine.pytorch.cpp_extensions.fused_attn.fused_attn_fwd / fused_attn_bwd``.

Layout ``bshd_bshd_bshd`` (no copies), GQA native. TE returns the softmax stats (the lse of the scaled scores)
as ``aux_ctx_tensors[0]`` with shape ``[b, h, s_q, 1]`` fp32 and wants ``[stats, rng_state]`` back in the
backward. Parameters differ across releases (``qkv_dtype``/``dqkv_dtype`` as ``tex.DType`` in 1.x,
``fake_dtype`` as a torch dtype in 2.x, ``o_format``/``do_format``/``dqkv_layout`` added later with sbhd
defaults), so they are filled by name.
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
    tex = getattr(module, "tex", None)  # transformer_engine_torch, imported by the module under that name
    tex_dtype = getattr(tex.DType, _TEX_DTYPE[q.dtype]) if tex is not None and q.dtype in _TEX_DTYPE else None
    return {
        "max_seqlen_q": s_q,
        "max_seqlen_kv": s_k,
        "cu_seqlens_q": _cu_seqlens(b, s_q, q.device),
        "cu_seqlens_kv": _cu_seqlens(b, s_k, q.device),
        "fake_dtype": q.dtype,
        "qkv_dtype": tex_dtype,
        "dqkv_dtype": tex_dtype,
        "fused_attention_backend": module.FusedAttnBackend["F16_arbitrary_seqlen"],
        "attn_scale": softmax_scale,
        "dropout": 0.0,
        "qkv_layout": "bshd_bshd_bshd",
        "o_format": "bshd",
        "do_format": "bshd",
        "dqkv_layout": "bshd_bshd_bshd",
        "attn_bias_type": "no_bias",
        "attn_mask_type": "causal" if causal else "no_mask",
        # TE's own normalisation (check_set_window_size): causal <-> (-1, 0), no mask <-> (-1, -1)
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
