"""The USP registry beside megatron-core's ``parallel_state``: this rank's :class:`USPGroups` and the USP settings.

Written only by :func:`.grid.initialize_model_parallel` (after it validated every setting) and
:func:`.grid.destroy_model_parallel`; read by the batch hook (:mod:`.batch`), the RoPE hooks (:mod:`.rope`) and
``USPAttention``, which megatron-core calls with signatures of its own and so cannot be handed the grid; it holds
the grid's batch records (:mod:`.batch_record`), which the batch hook writes and RoPE and the attention read. A module
of its own so that the grid (which installs the RoPE hooks) and the hooks (which read the grid) do not import each
other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import USPConfig
from ..groups import USPGroups
from .batch_record import BatchRecords


@dataclass(frozen=True)
class USPState:
    groups: USPGroups
    config: USPConfig
    records: BatchRecords = field(default_factory=BatchRecords)  # the batches of this grid (batch_record.py)
    # megatron-core's hybrid (dynamic) CP: this rank's sub-grid of every hybrid DP x CP group it is in, by ranks
    hybrid: dict = field(default_factory=dict)


_STATE: Optional[USPState] = None


def set_state(state: Optional[USPState]) -> None:
    """Set (or, with None, clear) the registry; the caller has validated ``state``."""
    global _STATE
    _STATE = state


def usp_is_initialized() -> bool:
    return _STATE is not None


def usp_state() -> USPState:
    if _STATE is None:
        raise RuntimeError(
            "USP is not initialized: call megatron_usp.megatron.initialize_model_parallel(..., ulysses_degree=..., "
            "ring_degree=...) instead of parallel_state.initialize_model_parallel"
        )
    return _STATE


def get_usp_groups() -> USPGroups:
    return usp_state().groups


def get_usp_ring_impl() -> str:
    return usp_state().config.ring_impl


def get_usp_document_layout() -> str:
    return usp_state().config.document_layout


def get_usp_attn_backend() -> str:
    return usp_state().config.backend


def get_batch_records() -> BatchRecords:
    return usp_state().records


def get_usp_micro_q() -> Optional[int]:
    return usp_state().config.micro_q


def get_usp_check() -> Optional[int]:
    """``--usp-check``: None (off, also before :func:`.grid.initialize_model_parallel`: an opt-in check), 0 (each
    layer's first call) or N (and every N-th call)."""
    return None if _STATE is None else _STATE.config.check_every
