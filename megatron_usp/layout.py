"""Which global token positions each rank holds: the single source of truth for the sequence layout.

A rank of the sequence-parallel (SP) block is addressed by ``(ulysses_rank, ring_rank)``. Its layout index
(the "CP rank" in Megatron's words) is ``ring_rank * ulysses_degree + ulysses_rank``; that is the rank
Megatron's ``get_batch_on_this_cp_rank`` would see with ulysses inner.

After the Ulysses all-to-all, a ring rank holds the union of its ulysses ranks' positions; sorted, they form
the ring-level layout the ring schedules expect:

* ``basic``: ring rank ``j`` holds the contiguous chunk ``j`` of ``r`` chunks.
* ``zigzag`` / ``allgather`` / ``mqsp``: ring rank ``j`` holds chunks ``j`` and ``2r-1-j`` of ``2r`` chunks.
* ``stripe``: ring rank ``j`` holds the tokens ``t = j (mod r)``.

Packed documents (``cu_seqlens``: offsets ``[0, ..., seq_len]`` of the documents of a row) split *every document*
instead of the row, so that a rank's causal work no longer depends on where documents fall:

* ``zigzag`` / ``allgather`` / ``mqsp`` / ``stripe``: each document is cut into ``2P`` near-equal chunks
  (``P = u*r``) and CP rank ``i`` takes chunks ``i`` and ``2P-1-i`` of every document (Megatron's zigzag, per
  document). ``stripe`` uses it too: its token interleave would make every run of a document one token long.
* ``basic``: each document is cut into ``P`` chunks and CP rank ``i`` takes chunk ``i``.

Which chunks get the ``+1`` of a length the parts do not divide rotates from document to document, so every rank
holds exactly ``seq_len / P`` tokens with no padding; documents shorter than the number of parts leave chunks
empty. A rank's tokens are in position order. That is the ``split`` document layout.

The ``local`` document layout (the default, for the pass-K/V impls ``basic``, ``zigzag`` and ``stripe``) keeps a
document whole on one ring rank where it fits and cuts only the others over the ring (:mod:`.ring_local`); ring
rank ``j``'s positions are split into ``u`` contiguous slices, CP rank ``(j, k)`` holding slice ``k``. ``allgather``
and ``mqsp`` read every ring rank's rows in their halves or chunks, so they keep the split layout.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .ring_local import RingDocuments, ring_documents, ring_rank_positions

CuSeqlens = Union[torch.Tensor, Sequence[int]]


@dataclass(frozen=True)
class RingImpl:
    """One row of the ring_impl table: how a ring_impl lays tokens out and moves them.

    ``layout``: ``contiguous`` (P chunks of the row, CP rank i holds chunk i), ``zigzag`` (2P chunks, CP rank i holds
    chunks i and 2P-1-i) or ``stripe`` (ring rank j holds the tokens t = j mod r). ``transport``: ``pass_kv`` (K/V
    travel the ring, :mod:`.ring`), ``allgather`` (K/V halves all-gathered once, :mod:`.ring`) or ``pass_q`` (queries
    travel, K/V stay, :mod:`.mqsp`). With packed documents every layout but ``contiguous`` cuts each document as
    zigzag does the row. Which blocks a pass-K/V step computes follows from the layout (``ring.BLOCK_RULES``)."""

    name: str
    layout: str
    transport: str

    @property
    def ring_local_documents(self) -> bool:
        """Whether the ``local`` document layout applies: pass-K/V schedules read any positions."""
        return self.transport == "pass_kv"

    @property
    def chunks_per_rank(self) -> int:
        """Chunks of the row (or of each document) a CP rank holds: 2 for zigzag, else 1."""
        return 2 if self.layout == "zigzag" else 1

    def granularity(self, sp_size: int) -> int:
        """What the row length must be a multiple of on ``sp_size`` ranks."""
        return self.chunks_per_rank * sp_size

    def document_parts(self, sp_size: int) -> int:
        """Chunks every document is cut into with ``cu_seqlens``."""
        return sp_size if self.layout == "contiguous" else 2 * sp_size


RING_IMPL_TABLE = {impl.name: impl for impl in (
    RingImpl("basic", "contiguous", "pass_kv"),
    RingImpl("zigzag", "zigzag", "pass_kv"),
    RingImpl("stripe", "stripe", "pass_kv"),
    RingImpl("allgather", "zigzag", "allgather"),
    RingImpl("mqsp", "zigzag", "pass_q"),
)}
RING_IMPLS = tuple(RING_IMPL_TABLE)
RING_SCHEDULE_IMPLS = tuple(name for name, impl in RING_IMPL_TABLE.items() if impl.transport != "pass_q")
ZIGZAG_LAYOUT_IMPLS = tuple(name for name, impl in RING_IMPL_TABLE.items() if impl.layout == "zigzag")


DOCUMENT_LAYOUTS = ("local", "split")


def check_document_layout(document_layout: str) -> str:
    if document_layout not in DOCUMENT_LAYOUTS:
        raise ValueError(f"document_layout {document_layout!r} is unknown: choose 'local' (documents whole on one "
                         "ring rank where they fit) or 'split' (every document cut over all ranks)")
    return document_layout


def ring_local(ring_impl: str, document_layout: str) -> bool:
    """Whether documents of ``ring_impl`` use the ring-local layout under ``document_layout``."""
    return check_document_layout(document_layout) == "local" and check_ring_impl(ring_impl).ring_local_documents


def check_ring_impl(ring_impl: str) -> RingImpl:
    """The table row of ``ring_impl`` (ValueError naming the choices for an unknown name)."""
    if not isinstance(ring_impl, str) or ring_impl not in RING_IMPL_TABLE:
        raise ValueError(f"unknown ring_impl {ring_impl!r}: choose one of {', '.join(RING_IMPLS)}")
    return RING_IMPL_TABLE[ring_impl]


def layout_granularity(ulysses_degree: int, ring_degree: int, ring_impl: str) -> int:
    """The number the full sequence length must be divisible by for ``ring_impl`` on a u x r grid."""
    return check_ring_impl(ring_impl).granularity(ulysses_degree * ring_degree)


def check_seq_len(seq_len: int, ulysses_degree: int, ring_degree: int, ring_impl: str) -> None:
    granularity = layout_granularity(ulysses_degree, ring_degree, ring_impl)
    if seq_len <= 0 or seq_len % granularity != 0:
        chunks = "2 x ulysses_degree x ring_degree" if granularity > ulysses_degree * ring_degree \
            else "ulysses_degree x ring_degree"
        lower = (seq_len // granularity) * granularity
        raise ValueError(
            f"sequence length {seq_len} cannot be split for ring_impl={ring_impl!r} with ulysses_degree="
            f"{ulysses_degree}, ring_degree={ring_degree}: it must be a multiple of {chunks} = {granularity} "
            f"(pad or truncate to {lower or granularity} or {lower + granularity})"
        )


def check_cu_seqlens(cu_seqlens: CuSeqlens, seq_len: int) -> tuple[int, ...]:
    """Validate document offsets ``[0, ..., seq_len]`` of one packed row; returns them as a tuple of ints. Takes a
    1-D integer tensor or array (torch, NumPy) or a sequence of integers (Python or NumPy); bools are refused."""
    dtype = getattr(cu_seqlens, "dtype", None)
    if dtype is not None:  # a torch tensor or a NumPy array
        is_integer = (not (dtype.is_floating_point or dtype.is_complex) and dtype != torch.bool
                      if isinstance(dtype, torch.dtype) else getattr(dtype, "kind", "") in ("i", "u"))
        if not is_integer or len(getattr(cu_seqlens, "shape", ())) != 1:
            raise TypeError(f"cu_seqlens must be a 1-D integer tensor or array [num_documents + 1], got {dtype} of "
                            f"shape {tuple(getattr(cu_seqlens, 'shape', ()))}")
        offsets = tuple(int(x) for x in cu_seqlens.tolist())
    elif isinstance(cu_seqlens, Sequence) and not isinstance(cu_seqlens, (str, bytes)) and all(
            _is_integer(x) for x in cu_seqlens):
        offsets = tuple(int(x) for x in cu_seqlens)
    else:
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor or array, or a sequence of ints, got "
                        f"{type(cu_seqlens).__name__}")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != seq_len:
        raise ValueError(f"cu_seqlens must hold the document offsets of the whole row, [0, ..., seq_len={seq_len}], "
                         f"got {_short(offsets)}: count trailing padding as one more document")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing (cumulative document lengths), got {_short(offsets)}")
    return offsets


def _is_integer(value) -> bool:
    """A Python or NumPy integer (not a bool, which is an int to Python)."""
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b":
        return False
    return isinstance(value, numbers.Integral)


def _short(offsets: Sequence[int]) -> str:
    return str(list(offsets)) if len(offsets) <= 12 else f"[{', '.join(map(str, offsets[:5]))}, ..., {offsets[-1]}]"


def document_parts(ring_impl: str, sp_size: int) -> int:
    """How many chunks each document is cut into with ``cu_seqlens``."""
    return check_ring_impl(ring_impl).document_parts(sp_size)


def document_chunk_bounds(offsets: Sequence[int], parts: int) -> torch.Tensor:
    """``[documents, parts + 1]`` start offsets of the ``parts`` near-equal chunks of every document (the last
    column is the document's end). The ``+1`` of a remainder goes to the chunks that continue a round-robin over
    all documents, so every chunk index gets the same number of tokens in total when ``parts`` divides it."""
    cu = torch.tensor(offsets, dtype=torch.long)
    lengths = cu.diff()
    base, remainder = lengths // parts, lengths % parts
    first_extra = (torch.cumsum(remainder, 0) - remainder) % parts
    extra = (torch.arange(parts)[None, :] - first_extra[:, None]) % parts < remainder[:, None]
    sizes = base[:, None] + extra.long()
    return torch.cat([cu[:-1, None], cu[:-1, None] + sizes.cumsum(1)], dim=1)


def concat_ranges(starts: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(start, stop)`` for each pair, without a Python loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    shift = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths, output_size=total)
    return torch.arange(total) + shift


def _document_positions(offsets: tuple[int, ...], sp_size: int, cp_rank: int, ring_impl: str) -> torch.Tensor:
    parts = document_parts(ring_impl, sp_size)
    bounds = document_chunk_bounds(offsets, parts)
    chunks = [cp_rank] if parts == sp_size else [cp_rank, parts - 1 - cp_rank]  # in position order
    starts = torch.stack([bounds[:, c] for c in chunks], dim=1).reshape(-1)
    stops = torch.stack([bounds[:, c + 1] for c in chunks], dim=1).reshape(-1)
    return concat_ranges(starts, stops)


def ring_documents_of(offsets: tuple[int, ...], ring_degree: int, ring_impl: str) -> RingDocuments:
    """The ring-local layout of ``offsets`` for ``ring_impl`` (cut documents zigzag, or contiguous for ``basic``)."""
    return ring_documents(offsets, ring_degree, RING_IMPL_TABLE[ring_impl].layout != "contiguous")


def global_positions(
    seq_len: int, ulysses_degree: int, ring_degree: int, ulysses_rank: int, ring_rank: int, ring_impl: str,
    *, cu_seqlens: Optional[CuSeqlens] = None, document_layout: str = "local",
) -> torch.Tensor:
    """LongTensor ``[seq_len // (u*r)]``: the global positions held by ``(ulysses_rank, ring_rank)``, in local order.
    With ``cu_seqlens`` (document offsets of the row) the documents follow ``document_layout`` (see above)."""
    check_seq_len(seq_len, ulysses_degree, ring_degree, ring_impl)
    check_document_layout(document_layout)  # refused even where no documents would read it
    if not (0 <= ulysses_rank < ulysses_degree and 0 <= ring_rank < ring_degree):
        raise ValueError(
            f"rank (ulysses {ulysses_rank}, ring {ring_rank}) is outside the {ulysses_degree} x {ring_degree} grid"
        )
    sp_size = ulysses_degree * ring_degree
    cp_rank = ring_rank * ulysses_degree + ulysses_rank
    if cu_seqlens is not None:
        offsets = check_cu_seqlens(cu_seqlens, seq_len)
        if ring_local(ring_impl, document_layout):
            held = ring_rank_positions(ring_documents_of(offsets, ring_degree, ring_impl), ring_rank)
            chunk = seq_len // sp_size
            return held[ulysses_rank * chunk:(ulysses_rank + 1) * chunk]
        return _document_positions(offsets, sp_size, cp_rank, ring_impl)
    layout = RING_IMPL_TABLE[ring_impl].layout
    if layout == "contiguous":
        chunk = seq_len // sp_size
        return torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    if layout == "zigzag":
        chunk = seq_len // (2 * sp_size)
        mirror = 2 * sp_size - 1 - cp_rank
        return torch.cat(
            [torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk), torch.arange(mirror * chunk, (mirror + 1) * chunk)]
        )
    # stripe: ulysses rank i of ring rank j holds t = j + r*i (mod u*r), so ring rank j gathers t = j (mod r).
    return torch.arange(ring_rank + ring_degree * ulysses_rank, seq_len, sp_size)


def _held_by_ring_rank(seq_len, ulysses_degree, ring_degree, ring_rank, ring_impl, cu_seqlens,
                       document_layout) -> torch.Tensor:
    return torch.cat([
        global_positions(seq_len, ulysses_degree, ring_degree, ulysses_rank, ring_rank, ring_impl,
                         cu_seqlens=cu_seqlens, document_layout=document_layout)
        for ulysses_rank in range(ulysses_degree)
    ])


def ring_positions(seq_len: int, ulysses_degree: int, ring_degree: int, ring_rank: int, ring_impl: str,
                   *, cu_seqlens: Optional[CuSeqlens] = None, document_layout: str = "local") -> torch.Tensor:
    """Sorted global positions a ring rank holds after the Ulysses all-to-all (the ring-level layout)."""
    return torch.sort(_held_by_ring_rank(seq_len, ulysses_degree, ring_degree, ring_rank, ring_impl, cu_seqlens,
                                         document_layout)).values


def gathered_order(seq_len: int, ulysses_degree: int, ring_degree: int, ring_rank: int, ring_impl: str,
                   *, cu_seqlens: Optional[CuSeqlens] = None, document_layout: str = "local") -> torch.Tensor:
    """Permutation that sorts the tokens gathered by the Ulysses all-to-all (ulysses-rank order) by position.

    ``gathered[:, order]`` is in ring-level layout; ``torch.argsort(order)`` undoes it.
    """
    return torch.argsort(_held_by_ring_rank(seq_len, ulysses_degree, ring_degree, ring_rank, ring_impl, cu_seqlens,
                                            document_layout))
