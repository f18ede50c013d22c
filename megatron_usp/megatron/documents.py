"""The documents of a Megatron batch: where they come from and which layout they imply.

Three sources, one result:

* THD metadata (``cu_seqlens`` [+ ``cu_seqlens_padded``]) of one packed row -> :func:`layout_cu_seqlens`: the
  offsets ``[0, ..., seq_len]`` that both shard the row (the engine's document layout) and mask attention.
* a dense causal document mask ``[b, 1, s, s]`` (Megatron-LM's ``--reset-attention-mask`` dataloader) ->
  :func:`documents_from_dense_mask`: document ids ``[b, s]``, checked once per batch.
* EOD tokens (``--reset-attention-mask --no-create-attention-mask-in-dataloader``) -> :func:`documents_from_eod`.

Document ids ``[b, s]`` whose rows are all equal (micro-batch 1, the long-context norm) are one row of contiguous
documents: :func:`shared_cu_seqlens` turns them into offsets and the batch uses the balanced document layout;
otherwise the ordinary row layout with ``document_ids``.

The batch hook derives a batch's documents once and leaves its record for RoPE and the attention
(:mod:`.batch_record`); nothing here keeps state.

Helpers of the batch hook and the attention: :func:`document_ids_from_cu_seqlens` (offsets -> ids),
:func:`in_document_positions` (THD RoPE positions) and :func:`batch_documents` (the ids of an sbhd batch).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


Offsets = tuple  # tuple[int, ...]: document offsets [0, ..., seq_len]


def _as_int_list(name: str, value) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dim() == 2 and value.shape[0] == 1:  # Megatron-LM data loaders keep a leading batch dim of 1
            value = value[0]
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D [num_documents + 1], got shape {tuple(value.shape)}")
        return [int(x) for x in value.tolist()]
    if isinstance(value, Sequence) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return list(value)
    raise TypeError(f"{name} must be a 1-D integer tensor [num_documents + 1], got {type(value).__name__}")


def check_packed_offsets(cu_seqlens, total: int, cu_seqlens_padded=None) -> tuple[list[int], list[int]]:
    """Validate Megatron's THD packing metadata: cumulative document lengths over ``total`` packed tokens (a
    ``[1, n]`` tensor from a data loader taken as ``[n]``), possibly ending before ``total``, with optional padded
    offsets; returns ``(cu_seqlens, starts)`` as lists, ``starts`` = the padded offsets (``cu_seqlens_padded``, or
    ``cu_seqlens`` when none are given). The engine's own offsets (``[0, ..., seq_len]``, no padding) are checked by
    :func:`megatron_usp.layout.check_cu_seqlens`."""
    cu = _as_int_list("cu_seqlens", cu_seqlens)
    padded = cu if cu_seqlens_padded is None else _as_int_list("cu_seqlens_padded", cu_seqlens_padded)
    for name, offsets in (("cu_seqlens", cu), ("cu_seqlens_padded", padded)):
        if len(offsets) < 2 or offsets[0] != 0:
            raise ValueError(f"{name} must start at 0 and hold num_documents + 1 >= 2 offsets, got {offsets}")
        if any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{name} must be non-decreasing (cumulative lengths), got {offsets}")
        if offsets[-1] > total:
            raise ValueError(f"{name} ends at {offsets[-1]} but the packed sequence holds only {total} tokens: "
                             "cu_seqlens must cover the global (unsharded) sequence, not this rank's shard")
    if len(padded) != len(cu):
        raise ValueError(f"cu_seqlens ({len(cu)} offsets) and cu_seqlens_padded ({len(padded)}) must describe the "
                         "same documents")
    for i in range(len(cu) - 1):
        if cu[i + 1] - cu[i] > padded[i + 1] - padded[i]:
            raise ValueError(f"document {i} has {cu[i + 1] - cu[i]} tokens but only {padded[i + 1] - padded[i]} "
                             "padded slots: cu_seqlens_padded must be >= cu_seqlens per document")
    return cu, padded


def layout_cu_seqlens(cu_seqlens, total: int, cu_seqlens_padded=None) -> Offsets:
    """Offsets ``[0, ..., total]`` of the documents of one packed THD row, as the layout and the attention see them.

    Document ``i`` starts at ``cu_seqlens_padded[i]`` (default ``cu_seqlens[i]``) with ``cu_seqlens[i+1] -
    cu_seqlens[i]`` real tokens; its remaining padded slots become a document of their own, and so do the tokens
    after the last offset, so padding never attends to real tokens. Empty documents are dropped. A fixed point:
    ``layout_cu_seqlens(L, total) == L``, so offsets handed on in place of the originals describe the same layout.
    """
    cu, starts = check_packed_offsets(cu_seqlens, total, cu_seqlens_padded)
    bounds = [0]
    for i in range(len(cu) - 1):
        for edge in (starts[i] + cu[i + 1] - cu[i], starts[i + 1]):
            if edge > bounds[-1]:
                bounds.append(edge)
    if total > bounds[-1]:
        bounds.append(total)
    return tuple(bounds)


def _start_flags_to_ids(starts: torch.Tensor) -> torch.Tensor:
    """``starts [b, s]`` (True where a new document begins; column 0 ignored) -> ids ``[b, s]`` counting from 0."""
    starts = starts.clone()
    starts[:, 0] = False
    return torch.cumsum(starts.long(), dim=1)


def documents_from_eod(tokens: torch.Tensor, eod_token: int) -> Optional[torch.Tensor]:
    """Document ids ``[b, s]`` from EOD tokens exactly as Megatron's ``--reset-attention-mask`` builds its mask (the
    token after an EOD starts a document); None when no row is split (plain causal)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("documents from EOD tokens need tokens [batch, seq_len] (the full, unsharded batch): on "
                         "pipeline stages without tokens keep the dataloader's attention mask")
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eod_token
    ids = _start_flags_to_ids(starts)
    return ids if bool(ids[:, -1].any()) else None


_CHECK_ELEMENTS = 1 << 24  # rows of the dense mask compared per step


def documents_from_dense_mask(mask: torch.Tensor, batch: Optional[int] = None) -> Optional[torch.Tensor]:
    """Document ids ``[b, s]`` of a dense causal document mask ``[b or 1, 1, s, s]`` (bool, True = masked, as
    Megatron builds it); None when it is plain causal. Row ``i`` starts a document where it cannot see ``i - 1``;
    every entry is then checked against the causal document mask of those ids (in row blocks: no second S x S
    tensor). Raises ValueError for any other mask: USPAttention could not honour it."""
    fix = ("USPAttention takes causal document masks (Megatron-LM's --reset-attention-mask) and plain causal masks; "
           "for padding or packed documents pass PackedSeqParams with cu_seqlens")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        raise ValueError(f"attention_mask must be [batch, 1, seq, seq], got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}: {fix}")
    if mask.dtype != torch.bool:
        raise ValueError(f"attention_mask must be bool (True = masked, as Megatron builds it), got {mask.dtype}: {fix}")
    rows, seq = mask.shape[0], mask.shape[2]
    batch = rows if batch is None else batch
    if rows not in (1, batch):
        raise ValueError(f"attention_mask has {rows} rows for a batch of {batch}")
    m = mask[:, 0]
    index = torch.arange(seq, device=mask.device)
    starts = torch.zeros(rows, seq, dtype=torch.bool, device=mask.device)
    starts[:, 1:] = m[:, index[1:], index[:-1]]
    ids = _start_flags_to_ids(starts)
    step = max(1, _CHECK_ELEMENTS // max(1, rows * seq))
    for first in range(0, seq, step):
        q = index[first:first + step]
        expected = (index[None, None, :] > q[None, :, None]) | (ids[:, None, :] != ids[:, first:first + step, None])
        if not torch.equal(m[:, first:first + step], expected):
            raise ValueError(f"attention_mask is not a causal document mask (rows {first}..{first + len(q) - 1} "
                             f"differ): {fix}")
    if not bool(ids[:, -1].any()):
        return None
    return ids.expand(batch, seq) if rows != batch else ids


def shared_cu_seqlens(document_ids: torch.Tensor) -> Optional[Offsets]:
    """Offsets ``[0, ..., s]`` when every row of ``document_ids [b, s]`` holds the same contiguous documents (ids
    non-decreasing along the row), else None (per-row documents: the ordinary layout with ``document_ids``)."""
    row = document_ids[0]
    if not bool((document_ids == row).all()) or not bool((row[1:] >= row[:-1]).all()):
        return None
    starts = (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()
    return (0, *starts, row.numel())


def document_ids_from_cu_seqlens(
    cu_seqlens, seq_len: int, batch: int = 1, cu_seqlens_padded=None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Document ids ``[batch, seq_len]`` of packed documents (for ``usp_attn(document_ids=...)``).

    ``cu_seqlens [n+1]`` are global cumulative lengths over the ``batch * seq_len`` tokens in row-major order
    (THD: ``batch = 1``). Document ``i`` starts at ``cu_seqlens_padded[i]`` (default ``cu_seqlens[i]``) and has
    ``cu_seqlens[i+1] - cu_seqlens[i]`` real tokens (id ``2i``); its padded slots and the tokens after the last
    offset are padding (id ``2i+1``), so padding never attends to a real document. With ``batch > 1`` no
    document may cross a row boundary.
    """
    total = batch * seq_len
    cu, padded = check_packed_offsets(cu_seqlens, total, cu_seqlens_padded)
    for row in range(1, batch):
        edge = row * seq_len
        for i in range(len(cu) - 1):
            if padded[i] < edge < padded[i] + cu[i + 1] - cu[i]:
                raise ValueError(f"document {i} (tokens {padded[i]}..{padded[i] + cu[i + 1] - cu[i] - 1}) crosses "
                                 f"the boundary of rows {row - 1} and {row} (seq_len {seq_len}): split it")
    starts = torch.tensor(padded, device=device)
    lengths = torch.tensor(cu, device=device).diff()
    pos = torch.arange(total, device=device)
    doc = (torch.searchsorted(starts, pos, right=True) - 1).clamp(max=len(cu) - 2)
    real = pos < starts[doc] + lengths[doc]
    return (2 * doc + (~real).long()).view(batch, seq_len)


def in_document_positions(cu_seqlens, total: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``[total]``: each token's position inside its (padded) document, ``pos - cu_seqlens[i]``; tokens after the
    last offset count from it. Megatron's THD RoPE uses these positions (given ``cu_seqlens_padded`` if any)."""
    cu, _ = check_packed_offsets(cu_seqlens, total)
    starts = torch.tensor(cu, device=device)
    pos = torch.arange(total, device=device)
    return pos - starts[torch.searchsorted(starts, pos, right=True) - 1]


def batch_documents(batch: dict, eod_token: Optional[int] = None) -> Optional[torch.Tensor]:
    """Document ids ``[b, s]`` of an sbhd batch: from its dense ``attention_mask`` (checked: causal document masks
    only) or, without one, from EOD tokens when ``eod_token`` is given; None when attention is plain causal."""
    mask, tokens = batch.get("attention_mask"), batch.get("tokens")
    batch_size = next((v.shape[0] for k, v in batch.items() if k != "attention_mask" and isinstance(v, torch.Tensor)),
                      None)
    if mask is not None:
        return documents_from_dense_mask(mask, batch_size)
    if eod_token is not None:
        return documents_from_eod(tokens, eod_token)
    return None
