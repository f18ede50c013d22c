"""RoPE hooks: megatron-core's rotary embeddings follow the USP layout of the chosen ring_impl.

sbhd RoPE keeps row positions: the rotary table is sliced by this rank's positions in the row layout
(:func:`usp_pos_emb_on_this_rank`) or, for a batch the batch hook put in the document layout, re-selected from the
unsliced table (:func:`document_layout_rows`). THD RoPE restarts per document, as megatron-core's own THD RoPE does
on one rank (:func:`usp_apply_rotary_pos_emb_thd`). :func:`install_rope_hook` (run by
:func:`.grid.initialize_model_parallel`) puts both into megatron-core; each falls back to megatron-core's own
function while USP is not initialized.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
from typing import Callable, Optional

import torch

from ..patching import wrap
from ..sharding import positions
from .batch_record import BatchRecord
from .documents import _as_int_list, in_document_positions, layout_cu_seqlens
from .state import (get_batch_records, get_usp_document_layout, get_usp_groups, get_usp_ring_impl,
                    usp_is_initialized, usp_state)

_FULL_POS_EMB = "_usp_full_pos_emb"  # attribute: the unsliced rotary table a sliced one came from


def usp_pos_emb_on_this_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group=None) -> torch.Tensor:
    """Drop-in for megatron's ``get_pos_emb_on_this_cp_rank``: the rotary rows of the positions held here in the
    row layout. The unsliced table rides along as an attribute (megatron-core caches this result per length):
    :func:`document_layout_rows` re-selects rows for a batch in the document layout. ``cp_group`` (the CP group
    megatron-core gives its rotary embedding) must be the grid's SP group: the layout is the grid's; or, with
    megatron-core's hybrid CP, a hybrid group the grid has a sub-grid for (its sample's layout is the sub-grid's)."""
    groups, ring_impl = get_usp_groups(), get_usp_ring_impl()
    if cp_group is not None and usp_state().hybrid:
        from .grid import usp_groups_of_cp_group  # the grid installs this hook: imported when first needed

        groups = usp_groups_of_cp_group(cp_group)  # a hybrid CP group's sub-grid (megatron-core's hybrid CP)
    if cp_group is not None and cp_group.size() != groups.sp_size:
        raise ValueError(f"the rotary embedding's CP group has {cp_group.size()} ranks, the USP grid's "
                         f"sequence-parallel group {groups.sp_size} (ulysses {groups.ulysses_degree} x ring "
                         f"{groups.ring_degree}): build the model after "
                         "megatron_usp.megatron.initialize_model_parallel, with its CP group")
    held = positions(pos_emb.shape[seq_dim], groups, ring_impl=ring_impl).to(pos_emb.device)
    sliced = pos_emb.index_select(seq_dim, held)
    if seq_dim == 0:
        setattr(sliced, _FULL_POS_EMB, pos_emb)
    return sliced


def document_layout_rows(emb: torch.Tensor) -> torch.Tensor:
    """The sbhd rotary table ``emb [s_local, ...]`` for the batch the model is running (the record of
    :meth:`.batch_record.BatchRecords.model_forward`): unchanged in the row layout; in the document layout the rows
    of the positions held here (row positions, as megatron-core's sbhd RoPE), taken from the unsliced table."""
    full = getattr(emb, _FULL_POS_EMB, None)
    if full is None or not usp_is_initialized():
        return emb
    record = get_batch_records().running
    if record is None or record.cu_seqlens is None or record.seq_len != full.shape[0]:
        return emb
    return full.index_select(0, record.held_positions(get_usp_groups(), get_usp_ring_impl(),
                                                      get_usp_document_layout(), full.device))


def _hook_rotary_forward(cls) -> None:
    """``cls.forward`` (megatron-core's rotary embeddings, lru_cached per length) followed by
    :func:`document_layout_rows`: the table GPTModel hands its layers (and activation recomputation keeps) is the
    one of the batch being run."""
    if "forward" not in cls.__dict__:
        return

    def hook(original):
        @functools.wraps(original)
        def forward(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if isinstance(out, tuple):  # YaRN: (emb, mscale)
                return (document_layout_rows(out[0]), *out[1:])
            return document_layout_rows(out)

        for name in ("cache_clear", "cache_info"):  # YaRN calls self.forward.cache_clear()
            if hasattr(original, name):
                setattr(forward, name, getattr(original, name))
        return forward

    wrap(cls, "forward", hook, owner=__name__)


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


def _thd_rope_index(record: BatchRecord, table_rows: int, groups, ring_impl: str,
                    device: torch.device) -> torch.Tensor:
    """Rows of the rotary table for this rank's THD tokens (see :func:`usp_apply_rotary_pos_emb_thd`)."""
    held = record.held_positions(groups, ring_impl, get_usp_document_layout(), device)
    if table_rows == record.rope_offsets[-1] and _megatron_thd_rope_maps_exactly():
        index = held
    else:
        index = in_document_positions(record.rope_offsets, record.seq_len, device=device)[held]
    return index.clamp(max=table_rows - 1)  # only trailing padding can reach past max_seqlen


def _thd_record(cu_seqlens: torch.Tensor, seq_len: int) -> BatchRecord:
    """The record of the THD batch whose offsets RoPE is handed: the batch hook's, else derived here once (THD
    metadata describes its layout: ``layout_cu_seqlens`` is what the hook shards with, a fixed point)."""
    records = get_batch_records()
    record = records.find(cu_seqlens, None)
    if record is None or record.seq_len != seq_len or record.rope_offsets is None:
        offsets = tuple(_as_int_list("cu_seqlens", cu_seqlens))
        record = records.add(BatchRecord(seq_len, layout_cu_seqlens(offsets, seq_len), rope_offsets=offsets),
                             cu_seqlens, None)
    return record


def usp_apply_rotary_pos_emb_thd(
    t: torch.Tensor, freqs: torch.Tensor, config, cu_seqlens: torch.Tensor, mscale: float = 1.0,
    mla_rotary_interleaved: Optional[bool] = None,
) -> torch.Tensor:
    """RoPE for this rank's THD tokens ``t [t_local, heads, d]`` of a packed row of ``t_local * sp_size`` tokens
    sharded by the USP layout; ``freqs [max_seqlen, 1, 1, d]`` (unsliced), ``cu_seqlens`` global (padded offsets
    when given, as megatron-core passes them). Angles are those megatron-core's THD RoPE gives on one rank:
    positions restart at every document; when ``freqs`` covers exactly ``cu_seqlens[-1]`` tokens (its "exact
    mapping" mode) the global positions are used instead. ``mla_rotary_interleaved`` (megatron-core 0.19's
    argument; None: ``config.multi_latent_attention``, what older releases read) interleaves as MLA does."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    interleaved = config.multi_latent_attention if mla_rotary_interleaved is None else mla_rotary_interleaved
    # the release's own name for it: mla_rotary_interleaved (0.19), multi_latent_attention before
    takes = inspect.signature(_apply_rotary_pos_emb_bshd).parameters
    name = "mla_rotary_interleaved" if "mla_rotary_interleaved" in takes else "multi_latent_attention"

    groups, ring_impl = get_usp_groups(), get_usp_ring_impl()
    record = _thd_record(cu_seqlens, t.shape[0] * groups.sp_size)
    table_rows = freqs.shape[0]
    index = record.derived(("thd-rope", table_rows, groups, ring_impl, t.device),  # q, k of every layer share it
                           lambda: _thd_rope_index(record, table_rows, groups, ring_impl, t.device))
    return _apply_rotary_pos_emb_bshd(
        t.unsqueeze(1), freqs[index], rotary_interleaved=config.rotary_interleaved, mscale=mscale,
        **{name: interleaved},
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


def _hook_apply_rotary_pos_emb(original: Callable) -> Callable:
    """megatron-core's ``apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, ...)`` with THD rows
    (``cu_seqlens`` given) placed by the USP layout, interleaved as MLA asks (0.19's ``mla_rotary_interleaved``);
    ``cp_group`` is the grid's; without ``cu_seqlens`` or USP every argument goes to the original untouched."""
    signature = inspect.signature(original)
    cu_index = list(signature.parameters).index("cu_seqlens")

    @functools.wraps(original)
    def apply_rotary_pos_emb(*args, **kwargs):
        # the common sbhd call (no cu_seqlens) goes straight through: binding the signature is for THD calls only
        thd = kwargs.get("cu_seqlens") is not None or (len(args) > cu_index and args[cu_index] is not None)
        if thd and usp_is_initialized():
            bound = signature.bind_partial(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            return usp_apply_rotary_pos_emb_thd(arguments["t"], arguments["freqs"], arguments["config"],
                                                arguments["cu_seqlens"], arguments.get("mscale", 1.0),
                                                arguments.get("mla_rotary_interleaved"))
        return original(*args, **kwargs)

    return apply_rotary_pos_emb


def _hook_pos_emb_on_this_cp_rank(original: Callable) -> Callable:
    """megatron-core's ``get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group)`` slicing by the USP layout while
    USP is initialized (:func:`usp_pos_emb_on_this_rank`, which checks ``cp_group`` against the grid), the original
    otherwise."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_pos_emb_on_this_cp_rank(*args, **kwargs):
        if not usp_is_initialized():
            return original(*args, **kwargs)
        arguments = signature.bind_partial(*args, **kwargs).arguments
        return usp_pos_emb_on_this_rank(arguments["pos_emb"], arguments["seq_dim"], arguments.get("cp_group"))

    return get_pos_emb_on_this_cp_rank


# model classes whose forward runs under the record of the batch it is handed (the rotary table is built inside)
_MODEL_CLASSES = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel"),
    ("megatron.core.models.mamba.mamba_model", "MambaModel"),
)


def _hook_model_forward(original: Callable) -> Callable:
    """A model's ``forward(input_ids, position_ids, attention_mask, ..., packed_seq_params=...)`` run under the
    record of the batch its ``attention_mask`` came from (:meth:`.batch_record.BatchRecords.model_forward`), so
    the rotary table it builds is that batch's. Tokens the batch hook sharded in the document layout with another
    mask (or none) raise ValueError before anything runs: attention would not follow their layout."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if not usp_is_initialized():
            return original(self, *args, **kwargs)
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        records = get_batch_records()
        mask, tokens = arguments.get("attention_mask"), arguments.get("input_ids")
        record = records.find(mask) if isinstance(mask, torch.Tensor) else None
        if arguments.get("packed_seq_params") is None and isinstance(tokens, torch.Tensor):
            sharded_with = records.find(tokens)
            if sharded_with is not None and sharded_with.cu_seqlens is not None and sharded_with is not record:
                raise ValueError(
                    "these tokens were sharded in the document layout, but the model is not handed their documents: "
                    "pass the attention_mask that get_batch_on_this_usp_rank returned with them")
        with records.model_forward(record):
            return original(self, *args, **kwargs)

    return forward


def install_rope_hook() -> None:
    """Make megatron-core's rotary embeddings (RoPE, multimodal RoPE, YaRN) slice by the USP layout (every
    ring_impl; for zigzag this equals Megatron's own slicing, and it needs no pinned memory or CUDA; a batch in the
    document layout gets its own rows through the rotary classes' forward), and its THD
    RoPE (``apply_rotary_pos_emb`` with ``cu_seqlens``) follow the USP layout with per-document positions; GPTModel
    and MambaModel run each forward under the record of the batch they are handed.
    Idempotent; both fall back to megatron-core's functions while USP is not initialized."""
    for module_name in _APPLY_ROPE_MODULES:  # rope_utils first: modules imported later take the hooked name
        if module_name == _APPLY_ROPE_MODULES[0] or module_name in sys.modules:
            module = importlib.import_module(module_name)
            if hasattr(module, "apply_rotary_pos_emb"):  # imported after rope_utils was hooked: it holds the hook
                wrap(module, "apply_rotary_pos_emb", _hook_apply_rotary_pos_emb, owner=__name__)
    for module_name in _ROPE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "get_pos_emb_on_this_cp_rank"):
            wrap(module, "get_pos_emb_on_this_cp_rank", _hook_pos_emb_on_this_cp_rank, owner=__name__)
    for module_name, class_name in _ROTARY_CLASSES:
        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            continue
        if cls is not None:
            _hook_rotary_forward(cls)
    for module_name, class_name in _MODEL_CLASSES:
        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            continue
        if cls is not None and "forward" in cls.__dict__:
            wrap(cls, "forward", _hook_model_forward, owner=__name__)
