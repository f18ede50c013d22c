"""Batch + RoPE hook: tokens and rotary embeddings follow the USP layout of the chosen ring_impl.

Batches with documents (see :mod:`.documents`) use the engine's document layout: packed THD rows
(``PackedSeqParams(qkv_format="thd")``, global ``cu_seqlens``) always, sbhd batches with a causal document mask
(``--reset-attention-mask``) when all rows share their documents. RoPE follows the tokens: THD RoPE restarts
per document as megatron-core's own THD RoPE does on one rank, sbhd RoPE keeps row positions.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..groups import USPGroups
from ..sharding import positions, shard
from . import documents
from .documents import _as_int_list, check_cu_seqlens, layout_cu_seqlens
from .grid import get_usp_groups, get_usp_ring_impl, usp_is_initialized


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
    cu, padded = check_cu_seqlens(cu_seqlens, total, cu_seqlens_padded)
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
    cu, _ = check_cu_seqlens(cu_seqlens, total)
    starts = torch.tensor(cu, device=device)
    pos = torch.arange(total, device=device)
    return pos - starts[torch.searchsorted(starts, pos, right=True) - 1]


_PASS_THROUGH_PREFIXES = ("cu_seqlens", "max_seqlen")  # global packing metadata: never sharded


def _offsets_like(offsets: tuple, like) -> torch.Tensor:
    """``offsets`` as a tensor with the dtype, device and leading dims (``[n]`` or ``[1, n]``) of ``like``."""
    if not isinstance(like, torch.Tensor):
        return torch.tensor(offsets, dtype=torch.int32)
    return torch.tensor(offsets, dtype=like.dtype, device=like.device).view(*like.shape[:-1], len(offsets))


def _thd_batch(batch: dict, groups: USPGroups, ring_impl: str) -> dict:
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
    documents.set_current(None)
    if groups.sp_size > 1:
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and not key.startswith(_PASS_THROUGH_PREFIXES):
                result[key] = shard(value, groups, dim=1, ring_impl=ring_impl, cu_seqlens=layout)
    return result


def batch_documents(batch: dict, eod_token: Optional[int] = None) -> Optional[torch.Tensor]:
    """Document ids ``[b, s]`` of an sbhd batch: from its dense ``attention_mask`` (checked: causal document masks
    only) or, without one, from EOD tokens when ``eod_token`` is given; None when attention is plain causal."""
    mask, tokens = batch.get("attention_mask"), batch.get("tokens")
    batch_size = next((v.shape[0] for k, v in batch.items() if k != "attention_mask" and isinstance(v, torch.Tensor)),
                      None)
    if mask is not None:
        return documents.documents_from_dense_mask(mask, batch_size)
    if eod_token is not None:
        return documents.documents_from_eod(tokens, eod_token)
    return None


def get_batch_on_this_usp_rank(
    batch: dict, groups: Optional[USPGroups] = None, ring_impl: Optional[str] = None, *,
    eod_token: Optional[int] = None,
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

    ``position_ids`` are sharded like tokens. Defaults come from ``initialize_model_parallel``.
    """
    groups = groups or get_usp_groups()
    ring_impl = ring_impl or get_usp_ring_impl()
    if batch.get("cu_seqlens") is not None:
        return _thd_batch(batch, groups, ring_impl)
    ids = batch_documents(batch, eod_token)
    cu = None if ids is None else documents.shared_cu_seqlens(ids)
    documents.set_current(None if ids is None else documents.BatchDocuments(ids, cu))
    result = dict(batch)
    if "attention_mask" in batch or ids is not None:
        result["attention_mask"] = ids
    if groups.sp_size > 1:
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and key != "attention_mask" and not key.startswith(_PASS_THROUGH_PREFIXES):
                result[key] = shard(value, groups, dim=1, ring_impl=ring_impl, cu_seqlens=cu)
    return result


_FULL_POS_EMB = "_usp_full_pos_emb"  # attribute: the unsliced rotary table a sliced one came from


def usp_pos_emb_on_this_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group=None) -> torch.Tensor:
    """Drop-in for megatron's ``get_pos_emb_on_this_cp_rank``: the rotary rows of the positions held here in the
    row layout. The unsliced table rides along as an attribute (megatron-core caches this result per length):
    :func:`document_layout_rows` re-selects rows for a batch in the document layout."""
    groups, ring_impl = get_usp_groups(), get_usp_ring_impl()
    held = positions(pos_emb.shape[seq_dim], groups, ring_impl=ring_impl).to(pos_emb.device)
    sliced = pos_emb.index_select(seq_dim, held)
    if seq_dim == 0:
        setattr(sliced, _FULL_POS_EMB, pos_emb)
    return sliced


_last_rows_index: list = []  # [key, index]


def document_layout_rows(emb: torch.Tensor) -> torch.Tensor:
    """The sbhd rotary table ``emb [s_local, ...]`` for the current batch: unchanged in the row layout; for a batch
    the hook put in the document layout (:func:`.documents.current_layout`), the rows of the positions held here
    (row positions, as megatron-core's sbhd RoPE), taken from the unsliced table."""
    full = getattr(emb, _FULL_POS_EMB, None)
    if full is None or not usp_is_initialized():
        return emb
    cu = documents.current_layout(full.shape[0])
    if cu is None:
        return emb
    groups, ring_impl = get_usp_groups(), get_usp_ring_impl()
    key = (cu, full.shape[0], groups, ring_impl, full.device)
    if not (_last_rows_index and _last_rows_index[0] == key):
        _last_rows_index[:] = [key, positions(full.shape[0], groups, ring_impl=ring_impl, cu_seqlens=cu).to(full.device)]
    return full.index_select(0, _last_rows_index[1])


def _hook_rotary_forward(cls) -> None:
    """``cls.forward`` (megatron-core's rotary embeddings, lru_cached per length) followed by
    :func:`document_layout_rows`: the table GPTModel hands its layers (and activation recomputation keeps) is the
    one of the batch being run."""
    original = cls.__dict__.get("forward")
    if original is None or getattr(original, "usp_original", None) is not None:
        return

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if isinstance(out, tuple):  # YaRN: (emb, mscale)
            return (document_layout_rows(out[0]), *out[1:])
        return document_layout_rows(out)

    forward.usp_original = original
    for name in ("cache_clear", "cache_info"):  # YaRN calls self.forward.cache_clear()
        if hasattr(original, name):
            setattr(forward, name, getattr(original, name))
    cls.forward = forward


_last_rope_index: list = []  # [cu_seqlens, key, index]


@functools.lru_cache(maxsize=None)
def _megatron_thd_rope_maps_exactly() -> bool:
    """Whether this megatron-core's THD RoPE uses global positions when ``freqs`` covers exactly
    ``cu_seqlens[-1]`` tokens (newer releases) or restarts per document regardless (older ones): asked of
    megatron-core itself on a two-token probe (one-rank CP group), not read from a version string."""
    from megatron.core.models.common.embeddings import rope_utils

    class _OneRank:
        size = staticmethod(lambda: 1)
        rank = staticmethod(lambda: 0)

    tokens = torch.ones(2, 1, 2)
    freqs = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 1, 2)  # angle 0 at row 0, 1 at row 1
    out = rope_utils._apply_rotary_pos_emb_thd(tokens, torch.tensor([0, 1, 2]), freqs, cp_group=_OneRank())
    return not torch.allclose(out[1], out[0])  # the 2nd document's first token rotated by row 1: global


def usp_apply_rotary_pos_emb_thd(
    t: torch.Tensor, freqs: torch.Tensor, config, cu_seqlens: torch.Tensor, mscale: float = 1.0
) -> torch.Tensor:
    """RoPE for this rank's THD tokens ``t [t_local, heads, d]`` of a packed row of ``t_local * sp_size`` tokens
    sharded by the USP layout; ``freqs [max_seqlen, 1, 1, d]`` (unsliced), ``cu_seqlens`` global (padded offsets
    when given, as megatron-core passes them). Angles are those megatron-core's THD RoPE gives on one rank:
    positions restart at every document; when ``freqs`` covers exactly ``cu_seqlens[-1]`` tokens (its "exact
    mapping" mode) the global positions are used instead."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    groups, ring_impl = get_usp_groups(), get_usp_ring_impl()
    seq_len = t.shape[0] * groups.sp_size
    key = (getattr(cu_seqlens, "_version", None), seq_len, freqs.shape[0], groups, ring_impl, t.device)
    if _last_rope_index and _last_rope_index[0] is cu_seqlens and _last_rope_index[1] == key:
        index = _last_rope_index[2]  # q and k of every layer share one index per step
    else:
        layout = layout_cu_seqlens(cu_seqlens, seq_len)  # what the batch hook sharded with (a fixed point)
        held = positions(seq_len, groups, ring_impl=ring_impl, cu_seqlens=layout).to(t.device)
        cu = _as_int_list("cu_seqlens", cu_seqlens)
        if freqs.shape[0] == cu[-1] and _megatron_thd_rope_maps_exactly():
            index = held
        else:
            index = in_document_positions(cu, seq_len, device=t.device)[held]
        index = index.clamp(max=freqs.shape[0] - 1)  # only trailing padding can reach past max_seqlen
        _last_rope_index[:] = [cu_seqlens, key, index]
    return _apply_rotary_pos_emb_bshd(
        t.unsqueeze(1), freqs[index], rotary_interleaved=config.rotary_interleaved,
        multi_latent_attention=config.multi_latent_attention, mscale=mscale,
    ).squeeze(1)


# megatron-core modules that call get_pos_emb_on_this_cp_rank through a name of their own (imported by name)
_ROPE_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
)
# modules that call apply_rotary_pos_emb (THD RoPE with cu_seqlens) through a name of their own
_APPLY_ROPE_MODULES = (
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.multi_latent_attention",
)
# rotary embedding classes whose (cached) forward is followed by document_layout_rows
_ROTARY_CLASSES = (
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "MultimodalRotaryEmbedding"),
    ("megatron.core.models.common.embeddings.yarn_rotary_pos_embedding", "YarnRotaryEmbedding"),
)
_original_pos_emb_fns: dict = {}
_original_apply_fns: dict = {}


def _hook_apply_rotary_pos_emb(module) -> None:
    current = module.apply_rotary_pos_emb  # a module imported after rope_utils was hooked holds our hook
    original = _original_apply_fns.setdefault(module.__name__, getattr(current, "usp_original", current))

    def hooked_apply(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None, _original=original):
        if cu_seqlens is not None and usp_is_initialized():
            return usp_apply_rotary_pos_emb_thd(t, freqs, config, cu_seqlens, mscale)
        return _original(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)

    hooked_apply.usp_original = original
    module.apply_rotary_pos_emb = hooked_apply


def install_rope_hook() -> None:
    """Make megatron-core's rotary embeddings (RoPE, multimodal RoPE, YaRN) slice by the USP layout (every
    ring_impl; for zigzag this equals Megatron's own slicing, and it needs no pinned memory or CUDA; a batch in the
    document layout gets its own rows through the rotary classes' forward), and its THD
    RoPE (``apply_rotary_pos_emb`` with ``cu_seqlens``) follow the USP layout with per-document positions.
    Idempotent; both fall back to megatron-core's functions while USP is not initialized."""
    import importlib
    import sys

    for module_name in _APPLY_ROPE_MODULES:  # rope_utils first: modules imported later take the hooked name
        if module_name == _APPLY_ROPE_MODULES[0] or module_name in sys.modules:
            module = importlib.import_module(module_name)
            if hasattr(module, "apply_rotary_pos_emb"):
                _hook_apply_rotary_pos_emb(module)
    for module_name in _ROPE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if not hasattr(module, "get_pos_emb_on_this_cp_rank"):
            continue
        original = _original_pos_emb_fns.setdefault(module_name, module.get_pos_emb_on_this_cp_rank)

        def hooked(pos_emb, seq_dim, cp_group=None, _original=original):
            if usp_is_initialized():
                return usp_pos_emb_on_this_rank(pos_emb, seq_dim, cp_group)
            return _original(pos_emb, seq_dim, cp_group)

        module.get_pos_emb_on_this_cp_rank = hooked
    for module_name, class_name in _ROTARY_CLASSES:
        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            continue
        if cls is not None:
            _hook_rotary_forward(cls)
