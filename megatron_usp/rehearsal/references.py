"""The rehearsal's baseline references: NOT stand-ins, each gives a run *without* USP an attention Megatron's local
one lacks on CPU, so the USP run has something to be compared with. The launcher installs one when its option comes
before the script path (:data:`REFERENCES`):

``--thd-reference-attention``
    a THD (packed, ``--sft``) attention (:func:`install_thd_reference_attention`);
``--mla-reference-attention``
    Megatron's local attention takes multi-latent attention's q/k and v head dims
    (:func:`install_mla_reference_attention`).

Both refuse to serve while USP is active, so neither can stand in for the run it is compared with.
"""
from __future__ import annotations

import functools

import torch

from ..megatron import grid

THD_REFERENCE_FLAG = "--thd-reference-attention"


def thd_reference_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, 1, total, total]`` bool mask, True where a query may NOT see a key: other document or a later token.
    Tokens past ``cu_seqlens[-1]`` form one more document."""
    bounds = cu_seqlens.reshape(-1).to(torch.long)
    document = torch.bucketize(torch.arange(total), bounds[1:], right=True)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    same = document[:, None] == document[None, :]
    return ~(causal & same)[None, None]


def install_thd_reference_attention() -> None:
    """NOT a stand-in: a reference for the baseline run of the packed (THD, ``--sft``) case only.

    Megatron's local ``DotProductAttention`` refuses ``packed_seq_params`` (THD needs Transformer Engine, which does
    not run on CPU). Here a THD call ``[t, heads, d]`` becomes one sbhd row ``[t, 1, heads, d]`` with the dense
    per-document causal mask built from ``cu_seqlens_q`` (:func:`thd_reference_mask`): what TE's THD attention
    computes. Refused while USP is active, so it can never serve the run it is compared with. Also hands
    ``get_thd_batch_on_this_cp_rank`` 1-D ``cu_seqlens`` (below)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    original = DotProductAttention.forward

    @functools.wraps(original)
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return original(self, query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        if grid.usp_is_initialized() and grid.get_usp_groups().sp_size > 1:
            raise RuntimeError(f"{THD_REFERENCE_FLAG} is for runs without USP (the baseline)")
        if packed_seq_params.cu_seqlens_q_padded is not None and not torch.equal(
                packed_seq_params.cu_seqlens_q_padded, packed_seq_params.cu_seqlens_q):
            raise NotImplementedError(f"{THD_REFERENCE_FLAG}: padded cu_seqlens")
        mask = thd_reference_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
        out = original(self, query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask, attn_mask_type,
                       attention_bias, None)
        return out.reshape(query.shape[0], -1)  # [t, 1, heads*d] -> [t, heads*d], as the THD path expects

    DotProductAttention.forward = forward

    # Megatron-LM 0.16 hands get_thd_batch_on_this_cp_rank the collated cu_seqlens ([1, documents + 1] at micro-batch
    # 1); its non-fused THD RoPE (rope_utils: ``freqs.size(0) == cu_seqlens[-1]``) needs them 1-D. Later releases have
    # no such function (get_batch_on_this_cp_rank takes the batch's cu_seqlens).
    import megatron.core.utils as core_utils

    original_thd_batch = getattr(core_utils, "get_thd_batch_on_this_cp_rank", None)
    if original_thd_batch is None:
        return

    @functools.wraps(original_thd_batch)
    def get_thd_batch_on_this_cp_rank(batch, cu_seqlens, cu_seqlens_padded, max_seqlen, *args, **kwargs):
        def flat(offsets):
            return None if offsets is None else offsets.reshape(-1)

        return original_thd_batch(batch, flat(cu_seqlens), flat(cu_seqlens_padded), max_seqlen, *args, **kwargs)

    core_utils.get_thd_batch_on_this_cp_rank = get_thd_batch_on_this_cp_rank


MLA_REFERENCE_FLAG = "--mla-reference-attention"


def install_mla_reference_attention() -> None:
    """NOT a stand-in: a reference for the baseline run of the multi-latent-attention case only.

    MLASelfAttention builds its core attention with TE's keywords ``k_channels`` (q/k head dim) and ``v_channels``
    (v head dim); megatron-core 0.16's local ``DotProductAttention`` takes neither (TypeError) and sizes its output
    ``kv_channels x heads``. Its forward is already per-head-dim agnostic (``baddbmm`` over q/k's dim, ``bmm`` over
    v's) apart from that output view, and MLA passes its own ``softmax_scale`` (YaRN mscale). Here ``__init__`` takes
    the two keywords and sizes the output ``v_channels x heads``: what TE's attention computes. Refused while USP is
    active, so it can never serve the run it is compared with."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    original = DotProductAttention.__init__

    @functools.wraps(original)
    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        if grid.usp_is_initialized() and grid.get_usp_groups().sp_size > 1:
            raise RuntimeError(f"{MLA_REFERENCE_FLAG} is for runs without USP (the baseline)")
        original(self, *args, **kwargs)
        if k_channels is not None and kwargs.get("softmax_scale") is None:
            raise NotImplementedError(f"{MLA_REFERENCE_FLAG}: k_channels without softmax_scale")
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    DotProductAttention.__init__ = __init__


REFERENCES = {THD_REFERENCE_FLAG: install_thd_reference_attention, MLA_REFERENCE_FLAG: install_mla_reference_attention}
"""Launcher options (before the script path) that give a baseline run (no USP) a reference where Megatron's local
attention has none on CPU."""
