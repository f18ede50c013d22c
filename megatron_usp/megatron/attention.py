"""USPAttention: a megatron-core ``core_attention`` module that runs ``usp_attn`` over the CP group.

Masks: ``config.window_size`` (sliding window, ``(left, right)``, ``-1`` = unbounded; with causal masking the
right side is 0, as Transformer Engine does; ``window_attn_skip_freq`` picks the layers), packed documents via
``PackedSeqParams`` (``qkv_format="thd"``: global ``cu_seqlens`` -> the document layout, see
:func:`.documents.layout_cu_seqlens`; ``"sbhd"``: per-row valid lengths, the rest is padding, as TE reads
``cu_seqlens`` for sbhd), and documents of sbhd batches as ``attention_mask`` = document ids ``[b, s]`` (what
:func:`.batch.get_batch_on_this_usp_rank` makes of ``--reset-attention-mask`` batches). Any other
``attention_mask`` is a ValueError, raised before any collective: it is never ignored.

Groups: the CP group megatron-core hands the layer (``pg_collection`` / ``model_comm_pgs``) split by the USP grid,
see :func:`.grid.usp_groups_for`; the grid's own groups when none is handed. Settings (``ring_impl``, backend,
``micro_q``, ``--usp-check``) come from the grid, which validated them once.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
try:
    from megatron.core.transformer.utils import is_layer_window_attention
except ImportError:  # megatron-core < 0.15: the same rule (there, window_attn_skip_freq is absent, i.e. None)

    def is_layer_window_attention(window_size, window_attn_skip_freq, layer_number) -> bool:
        if not window_size:
            return False
        if window_attn_skip_freq is None:
            return True
        if isinstance(window_attn_skip_freq, int):
            return layer_number % window_attn_skip_freq != 0
        return bool(window_attn_skip_freq[layer_number - 1])

from ..check import verify_usp_attn
from ..usp import attend
from . import documents
from .documents import check_packed_offsets, document_ids_from_cu_seqlens, layout_cu_seqlens
from .batch_record import BatchRecord
from ..groups import USPGroups
from .grid import usp_groups_for, usp_groups_of_cp_group
from .state import get_batch_records, usp_state

_CAUSAL = {AttnMaskType.causal: True, AttnMaskType.no_mask: False}
# TE turns causal / no_mask into these for packed (thd) input; the padding lives in cu_seqlens then
_PACKED_CAUSAL = {AttnMaskType.padding_causal: True, AttnMaskType.padding: False}
PACKED_FORMATS = ("thd", "sbhd")


def _is_causal(attn_mask_type, packed: bool = False) -> bool:
    if attn_mask_type in _CAUSAL:
        return _CAUSAL[attn_mask_type]
    if packed and attn_mask_type in _PACKED_CAUSAL:
        return _PACKED_CAUSAL[attn_mask_type]
    raise ValueError(
        f"USPAttention supports attn_mask_type causal or no_mask, got {attn_mask_type}; for padding or packed "
        "documents pass packed_seq_params (cu_seqlens), arbitrary attention masks are not supported"
    )


def _layer_window(config, layer_number: int) -> Optional[tuple[int, int]]:
    """``config.window_size`` for this layer (None where ``window_attn_skip_freq`` makes it a full layer)."""
    window = getattr(config, "window_size", None)
    if not is_layer_window_attention(window, getattr(config, "window_attn_skip_freq", None), layer_number):
        return None
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ValueError(f"window_size must be (left, right) with ints >= -1 (-1 = unbounded), got {window!r}: "
                         "e.g. --window-size 4096,0")
    return int(window[0]), int(window[1])


def _effective_window(window: Optional[tuple[int, int]], causal: bool) -> Optional[tuple[int, int]]:
    """The window as TE applies it: causal keeps only the left side; an unbounded window is no window."""
    if window is None:
        return None
    if causal:
        return None if window[0] == -1 else (window[0], 0)
    return None if window == (-1, -1) else window


def _self_attention_offsets(packed_seq_params) -> tuple:
    """``(cu_seqlens_q, cu_seqlens_q_padded)`` after checking they equal the kv ones (self-attention)."""
    cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
    padded_q, padded_kv = packed_seq_params.cu_seqlens_q_padded, packed_seq_params.cu_seqlens_kv_padded
    if cu_q is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is None: give the global cumulative document lengths")
    for name, a, b in (("cu_seqlens", cu_q, cu_kv), ("cu_seqlens_padded", padded_q, padded_kv)):
        if b is not None and (a is None or not torch.equal(torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu())):
            raise ValueError(f"USPAttention is self-attention: {name}_q and {name}_kv must be equal")
    return cu_q, padded_q


def thd_cu_seqlens(packed_seq_params, query: torch.Tensor, sp_size: int) -> tuple:
    """The document-layout offsets ``[0, ..., S]`` of a THD row (``query [t_local, heads, d]``, ``S = t_local *
    sp_size``) from ``packed_seq_params``: :func:`.documents.layout_cu_seqlens`, the function the batch hook
    sharded with. Megatron's THD RoPE sees only the padded offsets, so with ``sp_size > 1`` they must imply the
    same layout: padded slots inside documents are folded in by the batch hook, else ValueError."""
    if query.dim() != 3:
        raise ValueError(f"thd query must be [tokens, heads, head_dim], got shape {tuple(query.shape)}")
    cu_q, padded_q = _self_attention_offsets(packed_seq_params)
    total = query.shape[0] * sp_size
    layout = layout_cu_seqlens(cu_q, total, padded_q)
    if sp_size > 1 and padded_q is not None and layout_cu_seqlens(padded_q, total) != layout:
        raise ValueError(
            "cu_seqlens_q_padded has padded slots inside documents, which megatron-core's RoPE cannot see: build "
            "PackedSeqParams from the cu_seqlens that get_batch_on_this_usp_rank returns (padding folded in as "
            "documents, cu_seqlens_padded None)"
        )
    return layout


def packed_document_ids(packed_seq_params, query: torch.Tensor, sp_size: int) -> Optional[torch.Tensor]:
    """Document ids ``[batch, seq_len]`` of the global sequence for ``usp_attn``, from ``packed_seq_params``.

    ``thd``: ``query [t_local, heads, d]``, one packed row of ``t_local * sp_size`` tokens; documents from
    ``cu_seqlens_q`` (+ ``cu_seqlens_q_padded``), see :func:`document_ids_from_cu_seqlens`. ``sbhd``:
    ``query [s_local, b, heads, d]``, ``cu_seqlens_q [b+1]`` = cumulative valid lengths of the rows; a row's
    tokens past its length are padding. Returns None when nothing is masked. Raises ValueError (local checks).
    """
    if packed_seq_params is None:
        return None
    qkv_format = getattr(packed_seq_params, "qkv_format", None)
    if qkv_format not in PACKED_FORMATS:
        raise ValueError(f"USPAttention supports packed_seq_params with qkv_format 'thd' (packed documents) or "
                         f"'sbhd' (per-row padding), got {qkv_format!r}")
    cu_q, padded_q = _self_attention_offsets(packed_seq_params)
    if qkv_format == "thd":
        if query.dim() != 3:
            raise ValueError(f"thd query must be [tokens, heads, head_dim], got shape {tuple(query.shape)}")
        return document_ids_from_cu_seqlens(cu_q, query.shape[0] * sp_size, 1, padded_q, device=query.device)
    if query.dim() != 4:
        raise ValueError(f"sbhd query must be [seq, batch, heads, head_dim], got shape {tuple(query.shape)}")
    seq_len, batch = query.shape[0] * sp_size, query.shape[1]
    cu, _ = check_packed_offsets(cu_q, batch * seq_len)
    if len(cu) != batch + 1:
        raise ValueError(f"sbhd cu_seqlens_q must hold batch + 1 = {batch + 1} offsets (valid length of each row), "
                         f"got {len(cu)}: for packed documents use qkv_format='thd'")
    lengths = torch.tensor(cu, device=query.device).diff()
    if int(lengths.max()) > seq_len:
        raise ValueError(f"sbhd cu_seqlens_q gives a row length {int(lengths.max())} > seq_len {seq_len}")
    if bool((lengths == seq_len).all()):
        return None
    return (torch.arange(seq_len, device=query.device)[None, :] >= lengths[:, None]).long()


class USPAttention(MegatronModule):
    """Core attention over sbhd tensors ``[s_local, b, heads_per_tp, d]`` (or thd ``[t_local, heads_per_tp, d]``
    with ``packed_seq_params``) whose sequence is sharded over the ulysses x ring grid; returns
    ``[s_local, b, heads_per_tp * d]`` (thd: ``[t_local, heads_per_tp * d]``) like megatron-core's core attention."""

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
        self.attn_mask_type = attn_mask_type
        self.causal = _is_causal(attn_mask_type, packed=True)
        self.window = _layer_window(config, layer_number)
        head_dim = k_channels if k_channels is not None else config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        state = usp_state()
        handed = pg_collection if pg_collection is not None else model_comm_pgs
        self.groups = usp_groups_for(handed)  # ValueError unless the handed CP group is the grid's
        # the CP group megatron-core handed this layer (None: parallel_state's), for --usp-check's size check
        self.cp_group = getattr(handed, "cp", None)
        self.config = state.config  # ring_impl, backend, micro_q, --usp-check: validated once, by the grid
        self._configs = {}  # the grid's settings at the degrees of each hybrid CP sub-grid this layer ran on
        self.ring_impl = self.config.ring_impl
        # The agreement check (usp_attn's cross-rank comparison of inputs, one small all-gather) runs on this
        # layer's first call only: every rank of the SP group makes that call, so the choice is the same on every
        # rank, and a host sync per layer per step would cost GPU time. Later calls differ only in their batch.
        self._agreement_checked = False
        # --usp-check: verify_usp_attn on this layer's first call and every N-th; decided by a call counter, the same
        # on every rank of the SP group (never by data), since the check is a collective
        self.check_every = state.config.check_every
        self._calls = 0
        tp_group = getattr(handed, "tp", None)
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group(
            check_initialized=False)
        self._init_softmax_offset(config)
        # QK-clip / max-logit logging read each head's largest logit here, as from TE's core attention
        self.report_max_logit = bool(getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit",
                                                                                   False))
        self.current_max_attn_logits = None

    def _init_softmax_offset(self, config) -> None:
        """Attention sinks as megatron-core's ``DotProductAttention`` holds them (same attribute and parameter name,
        so checkpoints interchange): ``softmax_type`` "vanilla" none, "off-by-one" zeros, "learnable" a parameter
        ``softmax_offset [heads per TP rank]`` drawn with ``config.init_method``."""
        softmax_type = getattr(config, "softmax_type", "vanilla")
        heads = config.num_attention_heads // (1 if self.tp_group is None else dist.get_world_size(self.tp_group))
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        if softmax_type == "vanilla":
            self.softmax_offset = None
        elif softmax_type == "off-by-one":
            self.softmax_offset = torch.zeros(heads, device=device, dtype=config.params_dtype)
        elif softmax_type == "learnable":
            self.softmax_offset = torch.nn.Parameter(torch.empty(heads, device=device, dtype=config.params_dtype))
            if config.perform_initialization:
                with torch.no_grad():
                    config.init_method(self.softmax_offset)
        else:
            raise ValueError(f"USPAttention: unknown softmax_type {softmax_type!r} (vanilla, off-by-one, learnable)")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The learnable ``softmax_offset`` sharded over TP as megatron-core's core attention saves it."""
        if getattr(self.config, "softmax_type", "vanilla") != "learnable":
            return {}
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return DotProductAttention.sharded_state_dict(self, prefix, sharded_offsets, metadata)

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
        packed = packed_seq_params is not None
        causal = _is_causal(self.attn_mask_type if attn_mask_type is None else attn_mask_type, packed)
        groups, config = self._grid_of(packed_seq_params)
        document_ids, cu_seqlens = _cached_documents(packed_seq_params, attention_mask, query, groups.sp_size)
        thd = packed and packed_seq_params.qkv_format == "thd"
        q, k, v = (x.unsqueeze(0) if thd else x.transpose(0, 1) for x in (query, key, value))
        out = attend(
            q, k, v,
            groups,
            config,
            causal=causal,
            softmax_scale=self.softmax_scale,
            window=_effective_window(self.window, causal),
            document_ids=document_ids,
            cu_seqlens=cu_seqlens,
            softmax_offset=self.softmax_offset,
            return_max_logit=self.report_max_logit,
            check_agreement=None if not self._agreement_checked else False,
        )
        self._agreement_checked = True
        if self.report_max_logit:
            out, max_logit = out
            self.current_max_attn_logits = (max_logit if self.current_max_attn_logits is None
                                            else torch.maximum(self.current_max_attn_logits, max_logit))
        if self._check_due():
            cp_size = (groups.sp_size if groups is not self.groups  # a hybrid CP sample: its own group's size
                       else parallel_state.get_context_parallel_world_size() if self.cp_group is None
                       else dist.get_world_size(self.cp_group))
            verify_usp_attn(q, k, v, out, groups, ring_impl=self.ring_impl, causal=causal,
                            softmax_scale=self.softmax_scale, cu_seqlens=cu_seqlens,
                            document_layout=self.config.document_layout, document_ids=document_ids,
                            window=_effective_window(self.window, causal), softmax_offset=self.softmax_offset,
                            seed=self._calls - 1, expected_sp_size=cp_size,
                            name=f"layer {self.layer_number}")
        if thd:
            return out[0].reshape(query.shape[0], -1)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)

    def _grid_of(self, packed_seq_params) -> tuple:
        """``(groups, config)`` of this call: the layer's, or for a sample megatron-core's hybrid CP hands its own CP
        group (``packed_seq_params.cp_group``, ``local_cp_size``) that group's sub-grid, with the grid's settings
        at its degrees."""
        cp_group = getattr(packed_seq_params, "cp_group", None)
        local_cp_size = getattr(packed_seq_params, "local_cp_size", None)
        if cp_group is None and local_cp_size is None:
            return self.groups, self.config
        if cp_group is None and local_cp_size != 1:
            raise ValueError(f"packed_seq_params.local_cp_size={local_cp_size} without its cp_group: build "
                             "PackedSeqParams as megatron-core's get_batch_on_this_hybrid_cp_rank does")
        groups = usp_groups_of_cp_group(cp_group) if cp_group is not None else USPGroups.single()
        degrees = (groups.ulysses_degree, groups.ring_degree)
        if degrees not in self._configs:
            self._configs[degrees] = dataclasses.replace(self.config, ulysses_degree=degrees[0],
                                                         ring_degree=degrees[1])
        return groups, self._configs[degrees]

    def _check_due(self) -> bool:
        self._calls += 1
        if self.check_every is None:
            return False
        return self._calls == 1 or (self.check_every > 0 and (self._calls - 1) % self.check_every == 0)


_STALE = ("the documents handed to USPAttention (attention_mask) are not those of the batch the RoPE hook and the "
          "token sharding followed: pass every batch through get_batch_on_this_usp_rank (megatron-core) or the "
          "patched pretrain_gpt.py, and hand the model the attention_mask it returns")


def _mask_documents(attention_mask: torch.Tensor, query: torch.Tensor, sp_size: int):
    """``(document_ids, cu_seqlens)`` of an ``attention_mask`` that holds document ids ``[b, s]`` (sbhd): the record
    the batch hook left for them (with ``sp_size`` 1, where nothing was sharded, derived here)."""
    fix = ("pass the batch through get_batch_on_this_usp_rank (megatron-core) or the patched pretrain_gpt.py, which "
           "turn plain causal and causal document masks (--reset-attention-mask) into what USPAttention takes")
    if attention_mask.is_floating_point() or attention_mask.dtype == torch.bool or attention_mask.dim() != 2:
        raise ValueError(f"USPAttention cannot honour an attention_mask of shape {tuple(attention_mask.shape)} "
                         f"({attention_mask.dtype}) per layer: {fix}")
    if query.dim() != 4:
        raise ValueError("attention_mask with document ids needs sbhd input; thd takes documents from packed_seq_params")
    expected = (query.shape[1], query.shape[0] * sp_size)
    if tuple(attention_mask.shape) != expected:
        raise ValueError(f"attention_mask (document ids) must be [batch, seq_len] = {list(expected)} of the whole "
                         f"sequence, got {tuple(attention_mask.shape)}: {fix}")
    records = get_batch_records()
    record = records.find(attention_mask)
    if record is None and sp_size == 1:
        record = records.add(BatchRecord(expected[1], documents.shared_cu_seqlens(attention_mask), model_ran=True),
                             attention_mask)
    # the document layout needs the rotary table built for this batch: a hooked model forward ran with it
    if record is None or record.seq_len != expected[1] or (record.cu_seqlens is not None and not record.model_ran):
        raise ValueError(_STALE)
    return (attention_mask if record.cu_seqlens is None else None), record.cu_seqlens


def _packed_documents(packed_seq_params, query: torch.Tensor, sp_size: int) -> tuple:
    """``(document_ids, cu_seqlens)`` of ``packed_seq_params``: THD offsets describe their layout (the batch hook's
    record, else derived once and recorded); sbhd offsets give per-row padding ids, also derived once."""
    records = get_batch_records()
    keys = (packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_q_padded)
    recordable = all(key is None or isinstance(key, torch.Tensor) for key in keys)
    record = records.find(*keys) if recordable else None
    total, thd = query.shape[0] * sp_size, packed_seq_params.qkv_format == "thd"
    if query.dim() != (3 if thd else 4):
        raise ValueError(f"{packed_seq_params.qkv_format} query must be "
                         f"{'[tokens, heads, head_dim]' if thd else '[seq, batch, heads, head_dim]'}, got shape "
                         f"{tuple(query.shape)}")
    if record is None or record.seq_len != total or (record.cu_seqlens is None) == thd:
        record = BatchRecord(total, thd_cu_seqlens(packed_seq_params, query, sp_size) if thd else None)
        if recordable:
            records.add(record, *keys)
    if thd:
        return None, record.cu_seqlens
    return record.derived(("padding", tuple(query.shape)),
                          lambda: packed_document_ids(packed_seq_params, query, sp_size)), None


def _cached_documents(packed_seq_params, attention_mask, query: torch.Tensor, sp_size: int) -> tuple:
    """``(document_ids, cu_seqlens)`` for ``usp_attn`` from ``packed_seq_params`` or ``attention_mask`` (at most one),
    looked up in the batch records (every layer of a step shares one). Local checks only: a ValueError is raised
    on every rank before any collective."""
    if packed_seq_params is not None:
        if not all(hasattr(packed_seq_params, n) for n in ("qkv_format", "cu_seqlens_q", "cu_seqlens_q_padded")):
            raise TypeError(f"packed_seq_params must be megatron.core's PackedSeqParams (qkv_format, cu_seqlens_q, "
                            f"...), got {type(packed_seq_params).__name__}")
        if attention_mask is not None:
            raise ValueError("USPAttention takes documents from packed_seq_params or from attention_mask, not both: "
                             "pass attention_mask=None with packed_seq_params")
        if packed_seq_params.qkv_format not in PACKED_FORMATS:
            raise ValueError(f"USPAttention supports packed_seq_params with qkv_format 'thd' (packed documents) or "
                             f"'sbhd' (per-row padding), got {packed_seq_params.qkv_format!r}")
        return _packed_documents(packed_seq_params, query, sp_size)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
        return _mask_documents(attention_mask, query, sp_size)
    return None, None
