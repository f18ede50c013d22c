"""Which global token positions each rank holds: the single source of truth for the sequence layout.

A rank of the sequence-parallel (SP) block is addressed by ``(ulysses_rank, ring_rank)``. Its layout index
(the "CP rank" in Megatron's words) is ``ring_rank * ulysses_degree + ulysses_rank``; that is the rank
Megatron's ``get_batch_on_this_cp_rank`` would see with ulysses inner.

After the Ulysses all-to-all, a ring rank holds the union of its ulysses ranks' positions; sorted, they form
the ring-level layout the ring schedules expect:

* ``basic``: ring rank ``j`` holds the contiguous chunk ``j`` of ``r`` chunks.
* ``zigzag`` / ``allgather`` / ``mqsp``: ring rank ``j`` holds chunks ``j`` and ``2r-1-j`` of ``2r`` chunks.
* ``stripe``: ring rank ``j`` holds the tokens ``t = j (mod r)``.
"""
from __future__ import annotations

import torch

RING_IMPLS = ("basic", "zigzag", "stripe", "allgather", "mqsp")
RING_SCHEDULE_IMPLS = ("basic", "zigzag", "stripe", "allgather")  # pass K/V (ring.py); mqsp passes Q (mqsp.py)
ZIGZAG_LAYOUT_IMPLS = ("zigzag", "allgather", "mqsp")


def check_ring_impl(ring_impl: str) -> None:
    if not isinstance(ring_impl, str) or ring_impl not in RING_IMPLS:
        raise ValueError(f"unknown ring_impl {ring_impl!r}: choose one of {', '.join(RING_IMPLS)}")


def layout_granularity(ulysses_degree: int, ring_degree: int, ring_impl: str) -> int:
    """The number the full sequence length must be divisible by for ``ring_impl`` on a u x r grid."""
    check_ring_impl(ring_impl)
    sp_size = ulysses_degree * ring_degree
    return 2 * sp_size if ring_impl in ZIGZAG_LAYOUT_IMPLS else sp_size


def check_seq_len(seq_len: int, ulysses_degree: int, ring_degree: int, ring_impl: str) -> None:
    granularity = layout_granularity(ulysses_degree, ring_degree, ring_impl)
    if seq_len <= 0 or seq_len % granularity != 0:
        chunks = "2 x ulysses_degree x ring_degree" if ring_impl in ZIGZAG_LAYOUT_IMPLS else "ulysses_degree x ring_degree"
        lower = (seq_len // granularity) * granularity
        raise ValueError(
            f"sequence length {seq_len} cannot be split for ring_impl={ring_impl!r} with ulysses_degree="
            f"{ulysses_degree}, ring_degree={ring_degree}: it must be a multiple of {chunks} = {granularity} "
            f"(pad or truncate to {lower or granularity} or {lower + granularity})"
        )


def global_positions(
    seq_len: int, ulysses_degree: int, ring_degree: int, ulysses_rank: int, ring_rank: int, ring_impl: str
) -> torch.Tensor:
    """LongTensor ``[seq_len // (u*r)]``: the global positions held by ``(ulysses_rank, ring_rank)``, in local order."""
    check_seq_len(seq_len, ulysses_degree, ring_degree, ring_impl)
    if not (0 <= ulysses_rank < ulysses_degree and 0 <= ring_rank < ring_degree):
        raise ValueError(
            f"rank (ulysses {ulysses_rank}, ring {ring_rank}) is outside the {ulysses_degree} x {ring_degree} grid"
        )
    sp_size = ulysses_degree * ring_degree
    cp_rank = ring_rank * ulysses_degree + ulysses_rank
    if ring_impl == "basic":
        chunk = seq_len // sp_size
        return torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    if ring_impl in ZIGZAG_LAYOUT_IMPLS:
        chunk = seq_len // (2 * sp_size)
        mirror = 2 * sp_size - 1 - cp_rank
        return torch.cat(
            [torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk), torch.arange(mirror * chunk, (mirror + 1) * chunk)]
        )
    # stripe: ulysses rank i of ring rank j holds t = j + r*i (mod u*r), so ring rank j gathers t = j (mod r).
    return torch.arange(ring_rank + ring_degree * ulysses_rank, seq_len, sp_size)


def ring_positions(seq_len: int, ulysses_degree: int, ring_degree: int, ring_rank: int, ring_impl: str) -> torch.Tensor:
    """Sorted global positions a ring rank holds after the Ulysses all-to-all (the ring-level layout)."""
    held = [
        global_positions(seq_len, ulysses_degree, ring_degree, ulysses_rank, ring_rank, ring_impl)
        for ulysses_rank in range(ulysses_degree)
    ]
    return torch.sort(torch.cat(held)).values


def gathered_order(seq_len: int, ulysses_degree: int, ring_degree: int, ring_rank: int, ring_impl: str) -> torch.Tensor:
    """Permutation that sorts the tokens gathered by the Ulysses all-to-all (ulysses-rank order) by position.

    ``gathered[:, order]`` is in ring-level layout; ``torch.argsort(order)`` undoes it.
    """
    held = torch.cat(
        [
            global_positions(seq_len, ulysses_degree, ring_degree, ulysses_rank, ring_rank, ring_impl)
            for ulysses_rank in range(ulysses_degree)
        ]
    )
    return torch.argsort(held)
