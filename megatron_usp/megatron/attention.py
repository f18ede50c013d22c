"""USPAttention: a megatron-core ``core_attention`` module that runs ``usp_attn`` over the CP group.

Masks: ``config.window_size`` (sliding window, ``(left, right)``, ``-1`` = unbounded; with causal masking the
right side is 0, as Transformer Engine does; ``window_attn_skip_freq`` picks the layers), packed documents via
``PackedSeqParams`` (``qkv_format="thd"``: global ``cu_seqlens`` -> document ids; ``"sbhd"``: per-row valid
lengths, the rest is padding, as TE reads ``cu_seqlens`` for sbhd).
"""
from __future__ import annotations

from typing import Optional

import torch
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

from ..usp import usp_attn
from .batch import check_cu_seqlens, document_ids_from_cu_seqlens
from .grid import get_usp_attn_backend, get_usp_groups, get_usp_micro_q, get_usp_ring_impl

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
    cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
    padded_q, padded_kv = packed_seq_params.cu_seqlens_q_padded, packed_seq_params.cu_seqlens_kv_padded
    if cu_q is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is None: give the global cumulative document lengths")
    for name, a, b in (("cu_seqlens", cu_q, cu_kv), ("cu_seqlens_padded", padded_q, padded_kv)):
        if b is not None and (a is None or not torch.equal(torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu())):
            raise ValueError(f"USPAttention is self-attention: {name}_q and {name}_kv must be equal")
    if qkv_format == "thd":
        if query.dim() != 3:
            raise ValueError(f"thd query must be [tokens, heads, head_dim], got shape {tuple(query.shape)}")
        return document_ids_from_cu_seqlens(cu_q, query.shape[0] * sp_size, 1, padded_q, device=query.device)
    if query.dim() != 4:
        raise ValueError(f"sbhd query must be [seq, batch, heads, head_dim], got shape {tuple(query.shape)}")
    seq_len, batch = query.shape[0] * sp_size, query.shape[1]
    cu, _ = check_cu_seqlens(cu_q, batch * seq_len)
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
        self.groups = get_usp_groups()
        self.ring_impl = get_usp_ring_impl()
        self.backend = get_usp_attn_backend()
        self.micro_q = get_usp_micro_q()

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
        document_ids = _cached_document_ids(packed_seq_params, query, self.groups.sp_size)
        thd = packed and packed_seq_params.qkv_format == "thd"
        q, k, v = (x.unsqueeze(0) if thd else x.transpose(0, 1) for x in (query, key, value))
        out = usp_attn(
            q, k, v,
            self.groups,
            causal=causal,
            ring_impl=self.ring_impl,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
            window=_effective_window(self.window, causal),
            document_ids=document_ids,
            micro_q=self.micro_q,
        )
        if thd:
            return out[0].reshape(query.shape[0], -1)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)


_last_ids: list = []  # [(packed_seq_params, versions, shape, sp_size, ids)]: every layer of a step shares one


def _cached_document_ids(packed_seq_params, query: torch.Tensor, sp_size: int) -> Optional[torch.Tensor]:
    if packed_seq_params is None:
        return None
    if not all(hasattr(packed_seq_params, name) for name in ("qkv_format", "cu_seqlens_q", "cu_seqlens_q_padded")):
        raise TypeError(f"packed_seq_params must be megatron.core's PackedSeqParams (qkv_format, cu_seqlens_q, ...), "
                        f"got {type(packed_seq_params).__name__}")
    tensors = (packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_q_padded)
    versions = tuple(getattr(t, "_version", None) for t in tensors)
    key = (versions, tuple(query.shape), sp_size, query.device)
    if _last_ids and _last_ids[0][0] is packed_seq_params and _last_ids[0][1] == key:
        return _last_ids[0][2]
    ids = packed_document_ids(packed_seq_params, query, sp_size)
    _last_ids[:] = [(packed_seq_params, key, ids)]
    return ids
