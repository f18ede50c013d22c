"""Batch + RoPE hook: tokens and rotary embeddings follow the USP layout of the chosen ring_impl.

Packed sequences (THD, ``PackedSeqParams(qkv_format="thd")``): the packed row of ``S`` tokens is sharded like
any sequence (position-based, so a document may straddle ranks); ``cu_seqlens`` stay global. Attention stays
inside a document through :func:`document_ids_from_cu_seqlens`, and RoPE restarts per document exactly as
megatron-core's own THD RoPE does on one rank (the hook below replaces its CP slicing, which assumes TE's
per-document zigzag layout).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from ..groups import USPGroups
from ..sharding import positions, shard
from .grid import get_usp_groups, get_usp_ring_impl, usp_is_initialized


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


def check_cu_seqlens(cu_seqlens, total: int, cu_seqlens_padded=None) -> tuple[list[int], list[int]]:
    """Validate cumulative document lengths over ``total`` packed tokens; returns ``(cu_seqlens, starts)`` as
    lists, ``starts`` = the padded offsets (``cu_seqlens_padded``, or ``cu_seqlens`` when none are given)."""
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


def get_batch_on_this_usp_rank(
    batch: dict, groups: Optional[USPGroups] = None, ring_impl: Optional[str] = None
) -> dict:
    """Like Megatron's ``get_batch_on_this_cp_rank``: ``[batch, seq, ...]`` tensors -> this rank's tokens.

    ``attention_mask`` (``[b, 1, s, s]``) keeps this rank's query rows (dim 2), as in Megatron. ``position_ids``
    are sharded like tokens (packed data keeps its per-document positions). Packed batches (THD, ``tokens [1, S]``):
    ``cu_seqlens*`` / ``max_seqlen*`` entries and a ``packed_seq_params`` object pass through unchanged (global
    offsets, as ``USPAttention`` and the RoPE hook expect). Defaults come from ``initialize_model_parallel``.
    """
    groups = groups or get_usp_groups()
    ring_impl = ring_impl or get_usp_ring_impl()
    tokens = batch.get("tokens")
    if batch.get("cu_seqlens") is not None and isinstance(tokens, torch.Tensor):
        check_cu_seqlens(batch["cu_seqlens"], tokens.numel(), batch.get("cu_seqlens_padded"))
    if groups.sp_size == 1:
        return batch
    result = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or key.startswith(_PASS_THROUGH_PREFIXES):
            result[key] = value
        else:
            result[key] = shard(value, groups, dim=2 if key == "attention_mask" else 1, ring_impl=ring_impl)
    return result


def usp_pos_emb_on_this_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group=None) -> torch.Tensor:
    """Drop-in for megatron's ``get_pos_emb_on_this_cp_rank``: the rotary rows of the positions held here."""
    groups, ring_impl = get_usp_groups(), get_usp_ring_impl()
    held = positions(pos_emb.shape[seq_dim], groups, ring_impl=ring_impl).to(pos_emb.device)
    return pos_emb.index_select(seq_dim, held)


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
        held = positions(seq_len, groups, ring_impl=ring_impl).to(t.device)
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
    ring_impl; for zigzag this equals Megatron's own slicing, and it needs no pinned memory or CUDA), and its THD
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
