"""Batch hook: this rank's tokens of a batch in the USP layout of the chosen ring_impl.

Batches with documents (see :mod:`.documents`) use the engine's document layout: packed THD rows
(``PackedSeqParams(qkv_format="thd")``, global ``cu_seqlens``) always, sbhd batches with a causal document mask
(``--reset-attention-mask``) when all rows share their documents. The hook leaves the batch's record
(:mod:`.batch_record`) under the tensors it returns; RoPE (:mod:`.rope`) and ``USPAttention`` look it up.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..groups import USPGroups
from ..sharding import shard
from . import documents
from .batch_record import BatchRecord
from .documents import _as_int_list, batch_documents, layout_cu_seqlens
from .state import (get_batch_records, get_usp_document_layout, get_usp_groups, get_usp_ring_impl,
                    usp_is_initialized)

_PASS_THROUGH_PREFIXES = ("cu_seqlens", "max_seqlen")  # global packing metadata: never sharded


def _offsets_like(offsets: tuple, like) -> torch.Tensor:
    """``offsets`` as a tensor with the dtype, device and leading dims (``[n]`` or ``[1, n]``) of ``like``."""
    if not isinstance(like, torch.Tensor):
        return torch.tensor(offsets, dtype=torch.int32)
    return torch.tensor(offsets, dtype=like.dtype, device=like.device).view(*like.shape[:-1], len(offsets))


def _thd_batch(batch: dict, groups: USPGroups, ring_impl: str, document_layout: str) -> tuple[dict, BatchRecord]:
    """A packed THD row ``[1, S]``: sharded with the document layout of :func:`documents.layout_cu_seqlens`;
    ``cu_seqlens`` is replaced by those offsets (padding folded in as documents) and ``cu_seqlens_padded`` by
    None, so that any ``PackedSeqParams`` built from the result describes the layout the tokens are in."""
    tokens = next((batch[k] for k in ("tokens", "labels", "position_ids") if isinstance(batch.get(k), torch.Tensor)),
                  None)
    if tokens is None or tokens.dim() < 2 or tokens.shape[0] != 1:
        raise ValueError(f"a THD batch (cu_seqlens) is one packed row [1, S], got "
                         f"{None if tokens is None else tuple(tokens.shape)}: flatten the micro-batch into one row "
                         "(megatron-core's flatten_batch_for_packed_sequences)")
    if isinstance(batch.get("attention_mask"), torch.Tensor):
        raise ValueError("a THD batch takes its documents from cu_seqlens: drop the attention_mask "
                         "(--no-create-attention-mask-in-dataloader)")
    cu, padded = batch["cu_seqlens"], batch.get("cu_seqlens_padded")
    layout = layout_cu_seqlens(cu, tokens.shape[1], padded)
    result = dict(batch)
    if padded is not None or _as_int_list("cu_seqlens", cu) != list(layout):
        result["cu_seqlens"] = _offsets_like(layout, cu)
    if "cu_seqlens_padded" in batch:
        result["cu_seqlens_padded"] = None
    if groups.sp_size > 1:
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and not key.startswith(_PASS_THROUGH_PREFIXES):
                result[key] = shard(value, groups, dim=1, ring_impl=ring_impl, cu_seqlens=layout,
                                    document_layout=document_layout)
    return result, BatchRecord(tokens.shape[1], layout, rope_offsets=layout)


def get_batch_on_this_usp_rank(
    batch: dict, groups: Optional[USPGroups] = None, ring_impl: Optional[str] = None, *,
    eod_token: Optional[int] = None, document_layout: Optional[str] = None,
) -> dict:
    """Like Megatron's ``get_batch_on_this_cp_rank``: ``[batch, seq, ...]`` tensors -> this rank's tokens.

    * Packed THD rows (``cu_seqlens`` [+ ``cu_seqlens_padded``], ``tokens [1, S]``): the document layout; the
      returned ``cu_seqlens`` are the layout's offsets (padding as documents) and ``cu_seqlens_padded`` None —
      build ``PackedSeqParams`` from them. ``max_seqlen*`` pass through.
    * Documents in an sbhd batch: a dense ``attention_mask [b, 1, s, s]`` (Megatron-LM's dataloader) is read once
      here — plain causal is dropped, a causal document mask (``--reset-attention-mask``) becomes documents, any
      other mask raises ValueError; without a mask, ``eod_token`` takes the documents from EOD tokens as
      ``--reset-attention-mask`` does. Rows with the same documents (micro-batch 1) use the balanced document
      layout, otherwise the row layout. The returned ``attention_mask`` is None or the document ids ``[b, s]``
      (global, unsharded): hand it to the model, ``USPAttention`` reads it.

    ``position_ids`` are sharded like tokens. Documents follow ``document_layout`` (``local``: whole on one ring
    rank where they fit, ``split``: cut over every rank); with the grid up it must be the grid's (its attention and
    RoPE follow that one). Defaults come from ``initialize_model_parallel``.
    """
    groups = groups or get_usp_groups()
    ring_impl = ring_impl or get_usp_ring_impl()
    if usp_is_initialized() and document_layout is not None and document_layout != get_usp_document_layout():
        raise ValueError(f"document_layout={document_layout!r}, but the grid's attention and RoPE follow "
                         f"{get_usp_document_layout()!r}: set it once, in initialize_model_parallel(document_layout=...) "
                         "(--usp-document-layout)")
    document_layout = document_layout or (get_usp_document_layout() if usp_is_initialized() else "local")
    if batch.get("cu_seqlens") is not None:
        result, record = _thd_batch(batch, groups, ring_impl, document_layout)
        keys = [(result["cu_seqlens"], None)]
    else:
        ids = batch_documents(batch, eod_token)
        cu = None if ids is None else documents.shared_cu_seqlens(ids)
        result = dict(batch)
        if "attention_mask" in batch or ids is not None:
            result["attention_mask"] = ids
        if groups.sp_size > 1:
            for key, value in batch.items():
                if isinstance(value, torch.Tensor) and key != "attention_mask" and not key.startswith(
                        _PASS_THROUGH_PREFIXES):
                    result[key] = shard(value, groups, dim=1, ring_impl=ring_impl, cu_seqlens=cu,
                                        document_layout=document_layout)
        seq_len = next((v.shape[1] for k, v in batch.items() if k != "attention_mask" and isinstance(v, torch.Tensor)
                        and v.dim() >= 2), None)
        record = BatchRecord(ids.shape[1] if ids is not None else seq_len or 0, cu)
        keys = [] if ids is None else [(ids,)]
    if isinstance(result.get("tokens"), torch.Tensor):
        keys.append((result["tokens"],))  # the model-forward hook checks the mask it is given against the tokens
    if usp_is_initialized():  # else no USPAttention or RoPE hook can run: nothing to record for
        records = get_batch_records()
        for key in keys:
            if all(isinstance(tensor, torch.Tensor) or tensor is None for tensor in key):
                records.add(record, *key)
    return result
