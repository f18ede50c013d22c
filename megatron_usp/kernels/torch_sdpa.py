"""Torch's fused SDPA ops that return lse and have a backward op: CPU flash, and CUDA flash / mem-efficient.

They take ``[b, h, s, d]``; we pass transposed views of bshd tensors. GQA is expanded here (the aten ops
want equal head counts) and the kv gradients are summed back.

The CUDA flash and mem-efficient ops also have native varlen entry points (``varlen_forward`` /
``varlen_backward``, see ``kernels/varlen.py``): ``aten::_flash_attention_forward/_backward`` and
``aten::_efficient_attention_forward/_backward`` with cumulative offsets. The CPU op has none.
"""
from __future__ import annotations

import torch

from . import _adapt
from .base import accumulation_dtype, expand_kv_heads, last_dim_contiguous, reduce_kv_heads

# Optional inputs of the aten varlen ops we never use (sliding window, paged kv, alibi, bias, split counts).
_ATEN_ABSENT = frozenset("bias seqused_k alibi_slopes block_table seqlen_k window_size".split())


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """bshd -> the ``[b, h, s, d]`` view the aten ops take, with a dense last dim (every aten attention op assumes
    it; the CPU flash op silently computes garbage without it). Copies only a view whose last dim is strided."""
    return last_dim_contiguous(x).transpose(1, 2)


class _AtenKernel:
    """Shared GQA expansion and layout handling; subclasses call one aten forward/backward pair."""

    name = "aten"

    def forward(self, q, k, v, *, causal, softmax_scale):
        heads = q.shape[2]
        out, lse = self._forward(
            _bhsd(q), _bhsd(expand_kv_heads(k, heads)), _bhsd(expand_kv_heads(v, heads)), causal, softmax_scale
        )
        return out.transpose(1, 2), lse[..., : q.shape[1]].to(accumulation_dtype(q.dtype))

    def backward(self, dout, q, k, v, out, lse, *, causal, softmax_scale):
        heads, kv_heads = q.shape[2], k.shape[2]
        dq, dk, dv = self._backward(
            _bhsd(dout.to(q.dtype)),
            _bhsd(q),
            _bhsd(expand_kv_heads(k, heads)),
            _bhsd(expand_kv_heads(v, heads)),
            _bhsd(out.to(q.dtype)),
            lse.contiguous(),
            causal,
            softmax_scale,
        )
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
        return dq, reduce_kv_heads(dk, kv_heads), reduce_kv_heads(dv, kv_heads)


def additive_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool ``[b|1, h|1, s_q, s_k]`` (True = visible) -> the 0 / -inf bias ``[b, h, s_q, s_k]`` aten ops take."""
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return bias.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])


class TorchCPUKernel(_AtenKernel):
    """``aten._scaled_dot_product_flash_attention_for_cpu`` (fp32, fp64, bf16, fp16); also takes a block mask."""

    name = "torch_cpu"
    supports_mask = True

    def forward(self, q, k, v, *, causal, softmax_scale, mask=None):
        if mask is None:
            return super().forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
        heads = q.shape[2]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _bhsd(q), _bhsd(expand_kv_heads(k, heads)), _bhsd(expand_kv_heads(v, heads)), 0.0, False,
            attn_mask=additive_mask(mask, q, k), scale=softmax_scale,
        )
        # the op reports lse 0 for rows the mask empties; they saw nothing: -inf
        lse = lse.to(accumulation_dtype(q.dtype)).masked_fill(~mask.any(-1).expand_as(lse), float("-inf"))
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, *, causal, softmax_scale, mask=None):
        if mask is None:
            return super().backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale)
        heads, kv_heads = q.shape[2], k.shape[2]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout.to(q.dtype)), _bhsd(q), _bhsd(expand_kv_heads(k, heads)), _bhsd(expand_kv_heads(v, heads)),
            _bhsd(out.to(q.dtype)), lse.to(accumulation_dtype(q.dtype)).contiguous(), 0.0, False,
            attn_mask=additive_mask(mask, q, k), scale=softmax_scale,
        )
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
        return dq, reduce_kv_heads(dk, kv_heads), reduce_kv_heads(dv, kv_heads)

    def _forward(self, q, k, v, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )


class TorchCUDAFlashKernel(_AtenKernel):
    """``aten._scaled_dot_product_flash_attention`` on CUDA (fp16/bf16, head_dim <= 256)."""

    name = "torch_flash"

    def _forward(self, q, k, v, causal, scale):
        result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return result[0], result[1]

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        seq_q, seq_k = q.shape[2], k.shape[2]
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.float(), empty, empty, seq_q, seq_k, 0.0, causal, empty, empty, scale=scale
        )


    def varlen_forward(self, q, k, v, segments, *, causal, softmax_scale):
        """``aten::_flash_attention_forward`` with ``cum_seq_q/k``: inputs ``[total, h, d]``, GQA native, lse
        ``[h, total_q]`` fp32 (flash-attn >= 2.6 "unpadded lse": torch's vendored ``mha_varlen_fwd`` allocates
        ``softmax_lse = at::empty({num_heads, total_q})``, and ``meta__flash_attention_forward`` in
        torch/_meta_registrations.py gives ``(num_heads, total_q)`` for the 3-d varlen path). Causal is
        bottom-right aligned per segment (the same as top-left for the square segments it is asked for)."""
        plan = _adapt.varlen_plan(segments, q.shape[0], q.device)
        if plan.trivial:
            return _adapt.empty_varlen_forward(q, v)
        heads = q.shape[2]
        if plan.max_q == 1 and k.shape[2] != heads:
            # mha_varlen_fwd reshapes q to (num_segments, kv_heads, groups, d) when max_q == 1 with GQA
            # ("seqlenq_ngroups_swapped"), which assumes every segment has exactly one query: give it full heads
            k, v = expand_kv_heads(k, heads), expand_kv_heads(v, heads)
        values = {
            "query": _adapt.flat(q), "key": _adapt.flat(k), "value": _adapt.flat(v),
            "cum_seq_q": plan.cu_q, "cum_seq_k": plan.cu_k, "max_q": plan.max_q, "max_k": plan.max_k,
            "dropout_p": 0.0, "is_causal": causal, "return_debug_mask": False, "scale": softmax_scale,
        }
        result = _adapt.call_by_name(torch.ops.aten._flash_attention_forward, values, absent=_ATEN_ABSENT,
                                     what="aten._flash_attention_forward")
        lse = _adapt.varlen_lse(result[:2], heads, plan.total_q)
        return _adapt.varlen_forward_result(result[0], lse, plan, q, v)

    def varlen_backward(self, dout, q, k, v, out, lse, segments, *, causal, softmax_scale):
        """``aten::_flash_attention_backward`` with ``cum_seq_q/k`` and the rows' final lse as ``[h, total_q]``;
        dk/dv come back with kv_heads (the kernel sums the query groups)."""
        plan = _adapt.varlen_plan(segments, q.shape[0], q.device)
        if plan.trivial:
            return _adapt.empty_varlen_backward(q, k, v)
        empty = torch.empty(0, dtype=torch.int64, device=q.device)  # rng state: only read with dropout
        values = {
            "grad_out": _adapt.flat(dout.to(q.dtype)), "query": _adapt.flat(q), "key": _adapt.flat(k),
            "value": _adapt.flat(v), "out": _adapt.flat(out.to(q.dtype)), "logsumexp": _adapt.lse_to_rows(lse, q),
            "cum_seq_q": plan.cu_q, "cum_seq_k": plan.cu_k, "max_q": plan.max_q, "max_k": plan.max_k,
            "dropout_p": 0.0, "is_causal": causal, "rng_state": empty, "unused": empty, "philox_seed": empty,
            "philox_offset": empty, "scale": softmax_scale,
        }
        dq, dk, dv = _adapt.call_by_name(torch.ops.aten._flash_attention_backward, values, absent=_ATEN_ABSENT,
                                         what="aten._flash_attention_backward")[:3]
        return _adapt.varlen_backward_result(dq, dk, dv, plan, q, k, v)


# custom_mask_type of the mem-efficient op (sdp::CustomMaskType): 0 none, 1 causal from the top left,
# 2 causal from the bottom right. Top-left is what the dense op and the math kernel do.
_NO_MASK, _CAUSAL_TOP_LEFT = 0, 1


def _lse_width(max_q: int) -> int:
    """The mem-efficient kernel pads each segment's lse to a multiple of kAlignLSE = 32 rows."""
    return -(-max_q // 32) * 32


class TorchCUDAEfficientKernel(_AtenKernel):
    """``aten._scaled_dot_product_efficient_attention`` on CUDA (fp32/fp16/bf16). Its lse may be padded to a
    multiple of 32 rows: the forward slices it, the backward pads it back."""

    name = "torch_efficient"

    def _forward(self, q, k, v, causal, scale):
        result = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
        return result[0], result[1]

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        seq_q = q.shape[2]
        padded = -(-seq_q // 32) * 32
        lse = torch.nn.functional.pad(lse.float(), (0, padded - seq_q)).contiguous()
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, empty, empty, 0.0, [True, True, True, False], causal, scale=scale
        )
        return dq, dk, dv

    def varlen_forward(self, q, k, v, segments, *, causal, softmax_scale):
        """``aten::_efficient_attention_forward`` with ``cu_seqlens_q/k``: inputs ``[1, total, h, d]`` (batch 1 is
        required in varlen mode), equal head counts (GQA expanded here), v may have its own head dim. Its lse is
        per segment and padded: ``[num_segments, h, ceil(max_q / 32) * 32]`` (``logsumexp = at::empty({
        seqstart_q->size(0) - 1, num_heads, ceil_div(max_seqlen_q, kAlignLSE) * kAlignLSE})`` in
        aten/src/ATen/native/transformers/cuda/attention.cu; the same in meta__efficient_attention_forward)."""
        plan = _adapt.varlen_plan(segments, q.shape[0], q.device)
        if plan.trivial:
            return _adapt.empty_varlen_forward(q, v)
        heads = q.shape[2]
        values = {
            "query": _adapt.flat(q)[None], "key": _adapt.flat(expand_kv_heads(k, heads))[None],
            "value": _adapt.flat(expand_kv_heads(v, heads))[None], "bias": None,
            "cu_seqlens_q": plan.cu_q, "cu_seqlens_k": plan.cu_k,
            "max_seqlen_q": plan.max_q, "max_seqlen_k": plan.max_k, "dropout_p": 0.0,
            "custom_mask_type": _CAUSAL_TOP_LEFT if causal else _NO_MASK, "compute_log_sumexp": True,
            "scale": softmax_scale,
        }
        result = _adapt.call_by_name(torch.ops.aten._efficient_attention_forward, values, absent=_ATEN_ABSENT,
                                     what="aten._efficient_attention_forward")
        lse = _adapt.lse_from_padded(result[1], plan)
        return _adapt.varlen_forward_result(result[0][0], lse, plan, q, v)

    def varlen_backward(self, dout, q, k, v, out, lse, segments, *, causal, softmax_scale):
        """``aten::_efficient_attention_backward`` with ``cu_seqlens_q/k``; the final lse goes back into the
        forward's padded per-segment layout; dk/dv of the expanded heads are summed per query group."""
        plan = _adapt.varlen_plan(segments, q.shape[0], q.device)
        if plan.trivial:
            return _adapt.empty_varlen_backward(q, k, v)
        heads, kv_heads = q.shape[2], k.shape[2]
        empty = torch.empty(0, dtype=torch.int64, device=q.device)  # philox seed/offset: only read with dropout
        values = {
            "grad_out_": _adapt.flat(dout.to(q.dtype))[None], "query": _adapt.flat(q)[None],
            "key": _adapt.flat(expand_kv_heads(k, heads))[None], "value": _adapt.flat(expand_kv_heads(v, heads))[None],
            "bias": None, "out": _adapt.flat(out.to(q.dtype))[None], "cu_seqlens_q": plan.cu_q,
            "cu_seqlens_k": plan.cu_k, "max_seqlen_q": plan.max_q, "max_seqlen_k": plan.max_k,
            "logsumexp": _adapt.lse_to_padded(_adapt.lse_to_rows(lse, q), plan, _lse_width(plan.max_q)),
            "dropout_p": 0.0, "philox_seed": empty, "philox_offset": empty,
            "custom_mask_type": _CAUSAL_TOP_LEFT if causal else _NO_MASK, "bias_requires_grad": False,
            "scale": softmax_scale,
        }
        dq, dk, dv = _adapt.call_by_name(torch.ops.aten._efficient_attention_backward, values, absent=_ATEN_ABSENT,
                                         what="aten._efficient_attention_backward")[:3]
        dk, dv = (reduce_kv_heads(g, kv_heads)[0] for g in (dk, dv))
        return _adapt.varlen_backward_result(dq[0], dk, dv, plan, q, k, v)


class TorchCUDNNKernel(_AtenKernel):
    """``aten._scaled_dot_product_cudnn_attention`` on CUDA (fp16/bf16, head_dim <= 128, sm80+, cuDNN >= 9).
    Its lse is ``[b, h, s_q, 1]``: the forward drops the trailing 1, the backward puts it back."""

    name = "torch_cudnn"

    def _forward(self, q, k, v, causal, scale):
        aten = torch.ops.aten
        result = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
        lse = result[1]
        return result[0], lse.squeeze(-1) if lse.dim() == 4 else lse

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        seq_q, seq_k = q.shape[2], k.shape[2]
        # philox seed/offset are only read for dropout (0 here); no bias, no varlen offsets
        philox = torch.zeros((), dtype=torch.int64, device=q.device)
        lse = lse.to(accumulation_dtype(q.dtype)).unsqueeze(-1).contiguous()
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, philox, philox, None, None, None, seq_q, seq_k, 0.0, causal, scale=scale
        )
