"""flash-attn 2 (``flash_attn`` package) and flash-attn 3 (``flash_attn_interface`` from its hopper/ build).

Both are called through their private ``_flash_attn_forward`` / ``_flash_attn_backward``, the only entry points
that take a given (out, lse) in the backward. Their signatures changed across releases (``window_size`` tuple vs
``window_size_left/right``, ``softcap``/``alibi_slopes`` added, ``causal`` vs ``is_causal``, 8/7/4-tuple
returns, dq/dk/dv returned or only written in place, plain functions vs ``torch.library.custom_op``), so
arguments are filled by parameter name and the lse is found in the returned tuple by shape.

Layout is bshd natively; GQA is native (k/v and dk/dv keep kv_heads). lse is ``[b, h, s_q]`` fp32.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from . import _adapt
from .base import accumulation_dtype

# Required parameters of some releases that are optional inputs we never use (varlen, kv-cache, rotary, fp8).
_ABSENT = frozenset(
    """k_new v_new qv out_ cu_seqlens_q cu_seqlens_k cu_seqlens_k_new seqused_q seqused_k sequed_q sequed_k
    max_seqlen_q max_seqlen_k page_table kv_batch_idx leftpad_k rotary_cos rotary_sin seqlens_rotary
    q_descale k_descale v_descale descale_q descale_k descale_v alibi_slopes rng_state""".split()
)


def _options(causal: bool, softmax_scale: float) -> dict:
    """Every spelling of the options we fix: no dropout, no sliding window, no softcap, no alibi."""
    return {
        "softmax_scale": softmax_scale,
        "causal": causal,
        "is_causal": causal,
        "dropout_p": 0.0,
        "window_size": (-1, -1),
        "window_size_left": -1,
        "window_size_right": -1,
        "softcap": 0.0,
        "alibi_slopes": None,
        "deterministic": False,
    }


class _FlashKernel:
    name = "flash"
    package = ""

    def module(self) -> ModuleType:
        raise NotImplementedError

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, softmax_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """bshd q/k/v (k, v may have fewer heads) -> ``out [b, s_q, h, d]``, ``lse [b, h, s_q]`` fp32."""
        values = _options(causal, softmax_scale)
        # the forward's `out` (fa3) is an optional output buffer, not the attention output
        values.update(q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), out=None, return_softmax=False)
        fwd = self.module()._flash_attn_forward
        result = _adapt.call_by_name(fwd, values, absent=_ABSENT, what=f"{self.package}._flash_attn_forward")
        return result[0], _adapt.lse_bhs(_adapt.first_lse(result), q)

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
        """Gradients ``dq [b, s_q, h, d]``, ``dk, dv [b, s_k, kv_heads, d]`` in q's dtype, from the final out/lse."""
        # dq/dk/dv are written in place by every release; only some also return them
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        values = _options(causal, softmax_scale)
        values.update(
            dout=dout.to(q.dtype).contiguous(),
            q=q.contiguous(),
            k=k.contiguous(),
            v=v.contiguous(),
            out=out.to(q.dtype).contiguous(),
            softmax_lse=lse.to(accumulation_dtype(q.dtype)).contiguous(),
            dq=dq,
            dk=dk,
            dv=dv,
        )
        bwd = self.module()._flash_attn_backward
        _adapt.call_by_name(bwd, values, absent=_ABSENT, what=f"{self.package}._flash_attn_backward")
        return dq, dk, dv


def _entry_points_reason(module: ModuleType, package: str) -> Optional[str]:
    missing = [f for f in ("_flash_attn_forward", "_flash_attn_backward") if not hasattr(module, f)]
    return f"{package} has no {' / '.join(missing)}" if missing else None


class FlashAttn2Kernel(_FlashKernel):
    """``flash_attn.flash_attn_interface`` (flash-attn 2.x): fp16/bf16, head_dim <= 256, sm80+."""

    name = "flash_attn2"
    package = "flash_attn"

    def module(self) -> ModuleType:
        module, reason = _adapt.optional_import("flash_attn.flash_attn_interface")
        if module is None:
            raise RuntimeError(reason)
        return module


class FlashAttn3Kernel(_FlashKernel):
    """``flash_attn_interface`` built from flash-attention's hopper/ (flash-attn 3): fp16/bf16, head_dim <= 256,
    Hopper (sm90)."""

    name = "flash_attn3"
    package = "flash_attn_interface"

    def module(self) -> ModuleType:
        module, reason = _fa3_module()
        if module is None:
            raise RuntimeError(reason)
        return module


def _fa3_module() -> tuple[Optional[ModuleType], Optional[str]]:
    # hopper/setup.py installs the top-level module flash_attn_interface; newer builds also ship a flash_attn_3
    # package re-exporting the same functions
    module, reason = _adapt.optional_import("flash_attn_interface")
    if module is None:
        module, _ = _adapt.optional_import("flash_attn_3")
    if module is not None:
        return module, None
    return None, reason.replace("flash_attn_interface", "flash_attn_interface (flash-attn 3, hopper/)")


def flash_attn2_unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why flash-attn 2 cannot run for these inputs, or ``None``."""
    reason = _adapt.cuda_half_reason(device, dtype, head_dim, max_head_dim=256, min_capability=(8, 0))
    if reason is not None:
        return reason
    module, reason = _adapt.optional_import("flash_attn.flash_attn_interface")
    return reason if module is None else _entry_points_reason(module, "flash_attn.flash_attn_interface")


def flash_attn3_unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why flash-attn 3 cannot run for these inputs, or ``None``. Its kernels are built for sm90 only."""
    reason = _adapt.cuda_half_reason(device, dtype, head_dim, max_head_dim=256, min_capability=(9, 0))
    if reason is not None:
        return reason
    major, minor = _adapt.cuda_capability(device)
    if major != 9:
        return f"it needs a Hopper GPU (compute capability 9.x), got {major}.{minor}"
    module, reason = _fa3_module()
    return reason if module is None else _entry_points_reason(module, "flash_attn_interface")
