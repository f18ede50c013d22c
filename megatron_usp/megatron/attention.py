"""USPAttention: a megatron-core ``core_attention`` module that runs ``usp_attn`` over the CP group."""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from ..usp import usp_attn
from .grid import get_usp_attn_backend, get_usp_groups, get_usp_ring_impl

_CAUSAL = {AttnMaskType.causal: True, AttnMaskType.no_mask: False}


def _is_causal(attn_mask_type) -> bool:
    if attn_mask_type not in _CAUSAL:
        raise ValueError(
            f"USPAttention supports attn_mask_type causal or no_mask, got {attn_mask_type}; padding and arbitrary "
            "masks are not supported yet (use causal masking with packed-free batches)"
        )
    return _CAUSAL[attn_mask_type]


class USPAttention(MegatronModule):
    """Core attention over sbhd tensors ``[s_local, b, heads_per_tp, d]`` whose sequence is sharded over the
    ulysses x ring grid; returns ``[s_local, b, heads_per_tp * d]`` like megatron-core's core attention."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        model_comm_pgs=None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        **unused,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout and dropout > 0:
            raise ValueError(
                f"USPAttention does not support attention dropout ({dropout}) yet: set --attention-dropout 0"
            )
        if attention_type != "self":
            raise ValueError(f"USPAttention supports self-attention only, got attention_type={attention_type!r}")
        self.layer_number = layer_number
        self.causal = _is_causal(attn_mask_type)
        head_dim = k_channels if k_channels is not None else config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.groups = get_usp_groups()
        self.ring_impl = get_usp_ring_impl()
        self.backend = get_usp_attn_backend()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("USPAttention does not support attention_bias yet")
        if packed_seq_params is not None:
            raise ValueError("USPAttention does not support packed sequences (THD packed_seq_params) yet")
        causal = self.causal if attn_mask_type is None else _is_causal(attn_mask_type)
        seq_local, batch = query.shape[0], query.shape[1]
        out = usp_attn(
            query.transpose(0, 1),
            key.transpose(0, 1),
            value.transpose(0, 1),
            self.groups,
            causal=causal,
            ring_impl=self.ring_impl,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
        )
        return out.transpose(0, 1).reshape(seq_local, batch, -1)
