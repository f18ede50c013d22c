"""Batch + RoPE hook: tokens and rotary embeddings follow the USP layout of the chosen ring_impl."""
from __future__ import annotations

from typing import Optional

import torch

from ..groups import USPGroups
from ..sharding import positions, shard
from .grid import get_usp_groups, get_usp_ring_impl, usp_is_initialized


def get_batch_on_this_usp_rank(
    batch: dict, groups: Optional[USPGroups] = None, ring_impl: Optional[str] = None
) -> dict:
    """Like Megatron's ``get_batch_on_this_cp_rank``: ``[batch, seq, ...]`` tensors -> this rank's tokens.

    ``attention_mask`` (``[b, 1, s, s]``) keeps this rank's query rows (dim 2), as in Megatron. ``position_ids``
    become the global positions held here. Defaults come from ``initialize_model_parallel``.
    """
    groups = groups or get_usp_groups()
    ring_impl = ring_impl or get_usp_ring_impl()
    if groups.sp_size == 1:
        return batch
    result = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):  # None and non-tensor entries pass through
            result[key] = value
        else:
            result[key] = shard(value, groups, dim=2 if key == "attention_mask" else 1, ring_impl=ring_impl)
    return result


def usp_pos_emb_on_this_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group=None) -> torch.Tensor:
    """Drop-in for megatron's ``get_pos_emb_on_this_cp_rank``: the rotary rows of the positions held here."""
    groups, ring_impl = get_usp_groups(), get_usp_ring_impl()
    held = positions(pos_emb.shape[seq_dim], groups, ring_impl=ring_impl).to(pos_emb.device)
    return pos_emb.index_select(seq_dim, held)


# megatron-core modules that call get_pos_emb_on_this_cp_rank through a name of their own (imported by name)
_ROPE_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
)
_original_pos_emb_fns: dict = {}


def install_rope_hook() -> None:
    """Make megatron-core's rotary embeddings (RoPE, multimodal RoPE, YaRN) slice by the USP layout (every
    ring_impl; for zigzag this equals Megatron's own slicing, and it needs no pinned memory or CUDA). Idempotent."""
    import importlib

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
