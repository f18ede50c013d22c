"""Torch's fused SDPA ops that return lse and have a backward op: CPU flash, and CUDA flash / mem-efficient.

They take ``[b, h, s, d]``; we pass transposed views of bshd tensors. GQA is expanded here (the aten ops
want equal head counts) and the kv gradients are summed back.
"""
from __future__ import annotations

import torch

from .base import accumulation_dtype, expand_kv_heads, reduce_kv_heads


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


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
