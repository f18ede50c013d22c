"""The one record of a batch on the Megatron side: made by the batch hook, looked up by RoPE and USPAttention.

The batch hook (:mod:`.batch`) alone derives a batch's documents; it leaves a :class:`BatchRecord` (length, the
document offsets it sharded with or None for the row layout) in the grid's :class:`BatchRecords`, keyed by the
tensors it returns: the document ids it hands on as ``attention_mask`` (sbhd), the ``cu_seqlens`` (THD) and the
sharded tokens. Consumers find the record by the tensor megatron-core hands them:

* ``USPAttention`` by its ``attention_mask`` (a miss: documents the hook never made, raised before any collective)
  or by ``packed_seq_params.cu_seqlens_q`` (THD metadata describes itself: a miss derives the record once);
* the model-forward hook (:func:`model_forward`, around ``GPTModel.forward``) by the ``attention_mask`` the model
  runs with, so that the sbhd rotary table of that forward is built for that very batch (the rotary embedding
  sees only a length); THD RoPE by the ``cu_seqlens`` it is handed.

Activation recomputation hands on detached copies: a lookup matches views of the same data (:func:`same_tensor`).
Records are held weakly through their keys: a record lives as long as its batch's tensors (autograd graphs keep
them for recomputation). Derived index tensors are cached on the record, built as plain tensors (caching.py).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from ..caching import plain_tensors
from ..groups import USPGroups
from ..sharding import positions
from .documents import Offsets


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` are views of the same data (identity survives ``detach``, e.g. recomputation)."""
    return (a.shape == b.shape and a.device == b.device and a.data_ptr() == b.data_ptr()
            and a.stride() == b.stride())


@dataclass(eq=False)
class BatchRecord:
    """One batch of ``seq_len`` tokens: ``cu_seqlens`` the document offsets its tokens are sharded with (the
    document layout), None for the row layout. ``rope_offsets``: the THD offsets RoPE is handed (megatron-core's
    per-document positions restart there; the hook's offsets are the layout's). ``model_ran``: a hooked model
    forward ran with it, so its sbhd rotary table was built for it."""

    seq_len: int
    cu_seqlens: Optional[Offsets]
    rope_offsets: Optional[Offsets] = None
    model_ran: bool = False
    _derived: dict = field(default_factory=dict, repr=False)

    def derived(self, key: tuple, build):
        """``build()`` once per ``key`` (an index tensor for this record's batch), as a plain tensor."""
        if key not in self._derived:
            with plain_tensors():
                self._derived[key] = build()
        return self._derived[key]

    def held_positions(self, groups: USPGroups, ring_impl: str, document_layout: str,
                       device: torch.device) -> torch.Tensor:
        """``[seq_len / sp_size]`` row positions of the tokens this rank holds in the record's layout."""
        return self.derived(("held", groups, ring_impl, document_layout, device), lambda: positions(
            self.seq_len, groups, ring_impl=ring_impl, cu_seqlens=self.cu_seqlens,
            document_layout=document_layout).to(device))


class BatchRecords:
    """The records of the batches still alive, keyed weakly by the tensors the batch hook returned; the record of
    the model forward in progress (:meth:`model_forward`)."""

    def __init__(self) -> None:
        self._entries: list = []  # (weak references to the key tensors, their versions, record)
        self.running: Optional[BatchRecord] = None

    def add(self, record: BatchRecord, *keys: Optional[torch.Tensor]) -> BatchRecord:
        """Register ``record`` under the tensor tuple ``keys`` (None entries match None)."""
        self._entries = [entry for entry in self._entries if all(ref is None or ref() is not None
                                                                 for ref in entry[0])]
        refs = tuple(None if key is None else weakref.ref(key) for key in keys)
        self._entries.append((refs, tuple(getattr(key, "_version", None) for key in keys), record))
        return record

    def find(self, *keys: Optional[torch.Tensor]) -> Optional[BatchRecord]:
        """The record registered under ``keys`` (or views of the same data, not modified since), else None."""
        versions = tuple(getattr(key, "_version", None) for key in keys)
        for refs, kept_versions, record in reversed(self._entries):
            if len(refs) != len(keys):
                continue
            held = tuple(None if ref is None else ref() for ref in refs)
            if kept_versions == versions and all(
                    a is b or (a is not None and b is not None and same_tensor(a, b)) for a, b in zip(held, keys)):
                return record  # detach() shares the version counter: a modified key is a miss
        return None

    @contextlib.contextmanager
    def model_forward(self, record: Optional[BatchRecord]) -> Iterator[None]:
        """While a model runs the batch of ``record``: the rotary embedding builds its table for it."""
        previous, self.running = self.running, record
        if record is not None:
            record.model_ran = True
        try:
            yield
        finally:
            self.running = previous
