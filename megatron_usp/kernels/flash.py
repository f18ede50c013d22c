"""flash-attn 2 (``flash_attn`` package) and flash-attn 3 (``flash_attn_interface`` from its hopper/ build).

Both are called through their private ``_flash_attn_forward`` / ``_flash_attn_backward``, the only entry points
that take a given (out, lse) in the backward. Their signatures changed across releases (``window_size`` tuple vs
``window_size_left/right``, ``softcap``/``alibi_slopes`` added, ``causal`` vs ``is_causal``, 8/7/4-tuple
returns, dq/dk/dv returned or only written in place, plain functions vs ``torch.library.custom_op``), so
arguments are filled by parameter name and the lse is found in the returned tuple by shape.

Layout is bshd natively; GQA is native (k/v and dk/dv keep kv_heads). lse is ``[b, h, s_q]`` fp32.

Native varlen (``varlen_forward`` / ``varlen_backward``, see ``kernels/varlen.py``): flash-attn 2's
``_flash_attn_varlen_forward/_backward``; flash-attn 3 beta's ``_flash_attn_varlen_forward/_backward``, later
flash-attn 3's ``_flash_attn_forward/_backward`` with ``cu_seqlens_q/k``. Inputs ``[total, h, d]``, lse
``[h, total_q]`` fp32: flash-attn 2 since 2.6.0 ("unpadded lse": ``mha_varlen_fwd`` allocates
``softmax_lse = torch::empty({num_heads, total_q})``; 2.5.x kept ``[num_segments, h, max_seqlen_q]``), flash-attn 3
in every release (hopper/flash_api.cpp). Releases without such an entry point (flash-attn 2 < 2.6, recognised by
its varlen forward lacking ``softcap``, added in the same release) get one dense call per segment instead.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from . import _adapt
from . import varlen as _varlen
from .base import accumulation_dtype, expand_kv_heads

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


    # ---- varlen ----

    def _varlen_entry(self, which: str):
        """The release's varlen forward/backward, or None: ``_flash_attn_varlen_<which>`` (flash-attn 2, flash-attn
        3 beta), else ``_flash_attn_<which>`` when it takes ``cu_seqlens_q`` (flash-attn 3 >= 2.7.4)."""
        module = self.module()
        fn = getattr(module, f"_flash_attn_varlen_{which}", None)
        if fn is not None:
            return fn if self._unpadded_lse(fn) else None
        fn = getattr(module, f"_flash_attn_{which}", None)
        return fn if fn is not None and "cu_seqlens_q" in dict(_adapt.parameters(fn)) else None

    def _unpadded_lse(self, fn) -> bool:
        return True

    def _varlen_values(self, plan, causal: bool, softmax_scale: float) -> dict:
        values = _options(causal, softmax_scale)
        values.update(cu_seqlens_q=plan.cu_q, cu_seqlens_k=plan.cu_k, max_seqlen_q=plan.max_q,
                      max_seqlen_k=plan.max_k)
        return values

    def varlen_forward(self, q, k, v, segments, *, causal: bool, softmax_scale: float):
        """Segments of q ``[b, Tq, h, d]`` against k, v ``[b, Tk, kv_h, d]`` in one call (batch rows flattened into
        tokens) -> ``out [b, Tq, h, d]``, ``lse [b, h, Tq]`` fp32; rows of segments without keys: 0 / -inf."""
        fwd = self._varlen_entry("forward")
        if fwd is None:
            return _varlen.varlen_forward(_adapt.dense_only(self), q, k, v, segments, causal=causal,
                                          softmax_scale=softmax_scale)
        plan = _adapt.varlen_plan(segments, q.shape[0], q.device)
        if plan.trivial:
            return _adapt.empty_varlen_forward(q, v)
        heads = q.shape[2]
        if plan.max_q == 1 and k.shape[2] != heads:
            # flash-attn 2's mha_varlen_fwd reshapes q to (num_segments, kv_heads, groups, d) when max_seqlen_q == 1
            # with GQA, which assumes exactly one query per segment: give it full heads
            k, v = expand_kv_heads(k, heads), expand_kv_heads(v, heads)
        values = self._varlen_values(plan, causal, softmax_scale)
        values.update(q=_adapt.flat(q), k=_adapt.flat(k), v=_adapt.flat(v), out=None, return_softmax=False)
        name = getattr(fwd, "__name__", "varlen forward")
        result = _adapt.call_by_name(fwd, values, absent=_ABSENT, what=f"{self.package}.{name}")
        lse = _adapt.varlen_lse(result, heads, plan.total_q)
        return _adapt.varlen_forward_result(result[0], lse, plan, q, v)

    def varlen_backward(self, dout, q, k, v, out, lse, segments, *, causal: bool, softmax_scale: float):
        """Gradients of :meth:`varlen_forward` from the rows' final out / lse: ``dq [b, Tq, h, d]``,
        ``dk, dv [b, Tk, kv_h, d]`` in q's dtype."""
        bwd = self._varlen_entry("backward")
        if bwd is None or self._varlen_entry("forward") is None:
            return _varlen.varlen_backward(_adapt.dense_only(self), dout, q, k, v, out, lse, segments,
                                           causal=causal, softmax_scale=softmax_scale)
        plan = _adapt.varlen_plan(segments, q.shape[0], q.device)
        if plan.trivial:
            return _adapt.empty_varlen_backward(q, k, v)
        q_flat, k_flat, v_flat = _adapt.flat(q), _adapt.flat(k), _adapt.flat(v)
        # written in place by every release; only some also return them
        dq, dk, dv = torch.empty_like(q_flat), torch.empty_like(k_flat), torch.empty_like(v_flat)
        values = self._varlen_values(plan, causal, softmax_scale)
        values.update(dout=_adapt.flat(dout.to(q.dtype)), q=q_flat, k=k_flat, v=v_flat,
                      out=_adapt.flat(out.to(q.dtype)), softmax_lse=_adapt.lse_to_rows(lse, q), dq=dq, dk=dk, dv=dv)
        name = getattr(bwd, "__name__", "varlen backward")
        _adapt.call_by_name(bwd, values, absent=_ABSENT, what=f"{self.package}.{name}")
        return _adapt.varlen_backward_result(dq, dk, dv, plan, q, k, v)


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

    def _unpadded_lse(self, fn) -> bool:
        # 2.6.0 made the varlen lse [h, total_q] and added softcap; 2.5.x lse is padded per segment
        return "softcap" in dict(_adapt.parameters(fn))


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
