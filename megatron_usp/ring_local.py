"""Ring-local documents: a packed row's documents kept whole on one ring position where they fit.

The ``split`` document layout (``layout.py``) cuts every document over all ``u*r`` ranks, so even a 128-token
document travels the whole ring and becomes ``2r`` tiny pieces. The ``local`` layout gives each ring rank ``j`` (the
``u`` ranks of one Ulysses group; after the all-to-all each holds all of ``j``'s tokens for its heads) a set of whole
documents, and cuts only the documents that must be cut, per document over the ring as the split layout does:

* every ring rank holds exactly ``S / r`` tokens (CP rank ``(j, k)`` the ``k``-th ``S / (u*r)`` of ring rank ``j``'s
  positions, in position order), with no padding;
* a local document never leaves its ring rank: only the cut documents' K/V travel the ring
  (:class:`RingDocuments` ``cut_tokens``; ``ring.RingSchedule.travel``), and the local ones are computed in the
  own step, in one varlen call per kind with the own pieces of the cut ones.

The solver (:func:`ring_cut`; :func:`ring_documents` lays its pieces out) is deterministic and communication-free:
every rank runs it on the same offsets. Documents are taken longest first. The ``k`` longest are cut evenly over the ring (``k`` at least the number longer
than a ring rank or with more causal work than a ring rank's share); the others go longest first to the ring rank
with the least local work that has room in what the even shares leave; documents that fit nowhere (short ones, at
the end) are cut too and fill the remaining room in ring order, each over the fewest ring ranks. Cut documents are
laid out zigzag per document (ring rank ``j`` takes a front piece ``j`` and the mirrored back piece; ``contiguous``
layouts take one piece in ring order). The ``k`` kept is the cheapest by the modelled step-synchronous cost
(:func:`step_cost`: the slowest rank's own step, local documents included, plus the cut documents' ring steps, each
kernel piece counted with its fixed cost :data:`PIECE_PAIRS`), the fewest cut as soon as one is within ``TARGET`` of
the ideal. Cutting more documents balances the ring but makes more, smaller pieces: the fixed cost per piece is what
stops it (on Megatron's dynamic-CP mix at 2,048 tokens per rank, P = 4: 6.2 documents per row cut by pairs alone,
4.3 with the piece cost).
"""
from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass
from typing import Sequence

import torch

TARGET = 1.03  # accept the first cut set whose modelled slowest rank is within 3 % of the ideal
# What one kernel piece (a call, or a segment of a varlen call) costs beyond its pairs, in pairs: half a 128 x 128
# tile. GPU flash kernels compute whole 128-row tiles; the CPU flash kernel's fixed cost per call, forward + backward
# with its merge, is ~0.2 ms here (~13K pairs at ~68 pairs / us). Half a tile keeps the ring's pairs within 5 % of
# the ideal on Megatron's dynamic-CP mix at P = 4 while cutting the fewest documents that balance it.
PIECE_PAIRS = 64 * 128


def causal_work(length: int) -> int:
    """Score pairs of one causal document of ``length`` tokens."""
    return length * (length + 1) // 2


@dataclass(frozen=True)
class RingDocuments:
    """The ring-local layout of one row on ``ring_degree`` ring ranks.

    ``ranges[j]``: the ``(start, stop)`` position ranges ring rank ``j`` holds, sorted; ``owner[d]``: the ring rank
    holding document ``d`` whole, or -1 where it is cut; ``cut_tokens[j]``: how many of ``j``'s tokens belong to cut
    documents (what travels the ring); ``cut_shares``: ``(d, tokens of d on each ring rank)`` of every cut document,
    in document order."""

    ranges: tuple[tuple[tuple[int, int], ...], ...]
    owner: tuple[int, ...]
    cut_tokens: tuple[int, ...]
    cut_shares: tuple[tuple[int, tuple[int, ...]], ...] = ()

    @property
    def cut_documents(self) -> int:
        return sum(o < 0 for o in self.owner)


def _shares(lengths: Sequence[int], quotas: Sequence[int]) -> list[list[int]]:
    """Split documents of ``lengths`` over bins with integer ``quotas`` (sum = sum of lengths): ``shares[d][j]``,
    each document's shares proportional to the quotas, every bin's total exactly its quota."""
    total = sum(lengths)
    quota = torch.tensor(quotas, dtype=torch.int64)
    given = torch.zeros_like(quota)
    shares, seen = [], 0
    for length in lengths:
        seen += length
        want = (quota * seen).double() / total - given  # what each bin is owed so far (exactly Python's floats)
        room = quota - given
        share = torch.minimum(torch.round(want).clamp(min=0), room.double())
        excess = int(share.sum()) - length
        if excess:
            share = _settle(share, want, room, excess)
        given += share.long()
        shares.append(share.long().tolist())
    return shares


def _settle(share: torch.Tensor, want: torch.Tensor, room: torch.Tensor, excess: int) -> torch.Tensor:
    """Settle rounding one token at a time on the bin owed most (adding; ties: the lowest bin) or least (removing):
    the bins in the order of ``(share - want, bin)`` (adding; removing: ``want - share``), a bin that moved coming
    back one token further on while it can move again (a heap of those beside the sorted rest)."""
    adding = excess < 0
    key = share - want if adding else want - share
    movable = share < room if adding else share > 0
    bins = movable.nonzero().flatten()
    order = torch.sort(key[bins], stable=True).indices
    queue = list(zip(key[bins][order].tolist(), bins[order].tolist()))
    limit = (room - share.long() if adding else share.long()).tolist()  # tokens each bin can move
    moved: dict[int, int] = {}
    again: list[tuple[float, int]] = []
    at = 0
    for _ in range(abs(excess)):
        if again and (at == len(queue) or again[0] < queue[at]):
            k, j = heapq.heappop(again)
        else:
            (k, j), at = queue[at], at + 1
        moved[j] = moved.get(j, 0) + 1
        if moved[j] < limit[j]:
            heapq.heappush(again, (k + 1, j))
    counts = torch.tensor(list(moved.values()), dtype=share.dtype)
    return share.index_add(0, torch.tensor(list(moved)), counts if adding else -counts)


def _pour(lengths: Sequence[int], rooms: Sequence[int]) -> list[dict[int, int]]:
    """Documents of ``lengths`` laid one after another into ``rooms`` (free tokens per ring rank, in ring order):
    each document's ``{ring rank: tokens}``, ranks ascending. Each takes consecutive ring ranks, so a ring rank
    boundary cuts at most one of them: a short filler meets one or two ring ranks, not all of them (fewer pieces,
    each larger)."""
    left, j, shares = list(rooms), 0, []
    for length in lengths:
        share, need = {}, length
        while need:
            while left[j] == 0:
                j += 1
            take = min(need, left[j])
            share[j] = share.get(j, 0) + take
            left[j] -= take
            need -= take
        shares.append(share)
    return shares


def step_cost(local_work: Sequence[int], even_work: float, cut_lengths: Sequence[int],
              shares: Sequence[dict[int, int]], even_count: int) -> float:
    """Modelled time of the ring's causal attention, step-synchronous: the slowest rank's own step (its local
    documents and the own pieces of the cut ones) plus, for each of the ``r - 1`` ring steps, the slowest rank's
    pairs with the pieces that arrive. A rank holding ``s_j`` of a cut document of ``L`` tokens sees ``(s_j / L)^2``
    of its causal pairs at home and ``s_j s_i / L^2`` of them from rank ``i`` (zigzag halves keep both even);
    ``even_work``: the causal pairs of the ``even_count`` documents cut evenly (``1 / r^2`` of them in every step of
    every rank). Every piece adds :data:`PIECE_PAIRS` (``local_work`` holds its local documents' already)."""
    bins = len(local_work)
    even = even_work / bins / bins + even_count * PIECE_PAIRS
    own = list(local_work)
    ring: dict[int, dict[int, float]] = {}  # ring[s][j]: rank j's work with the pieces of rank j - s, where any
    for length, share in zip(cut_lengths, shares):  # a filler meets few ring ranks: only those are visited
        work = causal_work(length)
        held = [(j, s / length) for j, s in share.items() if s]
        for j, f in held:
            own[j] += f * f * work + PIECE_PAIRS
            for i, g in held:
                if i != j:
                    step = ring.setdefault((j - i) % bins, {})
                    step[j] = step.get(j, 0.0) + f * g * work + PIECE_PAIRS
    return max(own) + even + sum(max(ring[s].values()) for s in sorted(ring)) + (bins - 1) * even


def _even(total: int, bins: int) -> list[int]:
    """``total`` tokens as evenly as integers allow over ``bins``, the extra ones on the first bins."""
    base, extra = divmod(total, bins)
    return [base + (j < extra) for j in range(bins)]


def _plan(order: Sequence[int], lengths: Sequence[int], ring_degree: int, capacity: int, cut_count: int):
    """Cut the ``cut_count`` longest documents evenly over the ring, place the others longest first on the ring
    rank with the least local work that has room (what the even shares leave of its capacity); documents that fit
    nowhere are cut too and fill what remains in ring order (they are the short ones; :func:`_pour`). Returns
    (owner, local work, documents cut evenly, their tokens per ring rank, the filler documents, their shares)."""
    cut = list(order[:cut_count])
    even = _even(sum(lengths[d] for d in cut), ring_degree)
    room = [capacity - t for t in even]
    owner, work, tokens, fillers = {}, [0] * ring_degree, [0] * ring_degree, []
    heap = [(0, 0, j) for j in range(ring_degree)]  # (local work, local tokens, ring rank)
    rest = [d for d in order[cut_count:] if lengths[d]]
    owner.update((d, 0) for d in order[cut_count:] if not lengths[d])  # an empty document is whole anywhere
    shortest = lengths[rest[-1]] if rest else 0  # longest first: no later document is shorter
    for d in rest:
        length = lengths[d]
        full = []
        while heap and tokens[heap[0][2]] + length > room[heap[0][2]]:
            item = heapq.heappop(heap)
            if room[item[2]] - tokens[item[2]] >= shortest:  # a rank no document left can fit leaves the heap
                full.append(item)
        if heap:
            j = heapq.heappop(heap)[2]
            owner[d] = j
            work[j] += causal_work(length) + PIECE_PAIRS
            tokens[j] += length
            heapq.heappush(heap, (work[j], tokens[j], j))
        else:
            fillers.append(d)
        for item in full:
            heapq.heappush(heap, item)
    filler_shares = _pour([lengths[d] for d in fillers], [r - t for r, t in zip(room, tokens)]) if fillers else []
    return owner, work, cut, even, fillers, filler_shares


@functools.lru_cache(maxsize=256)  # the planner asks for every ring size of a few rows
def ring_documents(offsets: tuple[int, ...], ring_degree: int, zigzag: bool = True) -> RingDocuments:
    """The ring-local layout of the documents ``offsets`` (``[0, ..., S]``, ``S`` a multiple of ``ring_degree``)."""
    owner, cut_shares = ring_cut(offsets, ring_degree)
    return _layout(offsets, owner, cut_shares, ring_degree, zigzag)


@functools.lru_cache(maxsize=256)
def ring_cut(offsets: tuple[int, ...], ring_degree: int) -> tuple[tuple[int, ...], tuple[tuple[int, tuple[int, ...]], ...]]:
    """The solver's choice for ``offsets`` on ``ring_degree`` ring ranks, whatever the layout of the cut pieces:
    (``RingDocuments.owner``, ``RingDocuments.cut_shares``). Call :func:`clear_caches` after changing
    :data:`PIECE_PAIRS` or :data:`TARGET`."""
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    capacity = offsets[-1] // ring_degree
    order = sorted(range(len(lengths)), key=lambda d: (-lengths[d], d))
    work_of = [causal_work(length) for length in lengths]
    work_share = sum(work_of) / ring_degree
    # a document longer than a ring rank, or with more work than a ring rank's share, is cut whatever else happens
    must_cut = 0 if ring_degree == 1 else sum(lengths[d] > capacity or work_of[d] > work_share for d in order)
    ideal = work_share + PIECE_PAIRS * sum(length > 0 for length in lengths) / ring_degree

    def trial(cut_count: int):
        owner, work, cut, even, fillers, filler_shares = _plan(order, lengths, ring_degree, capacity, cut_count)
        cost = step_cost(work, sum(work_of[d] for d in cut), [lengths[d] for d in fillers], filler_shares,
                         even_count=len(cut))
        return cost, owner, cut, even, fillers, filler_shares

    # Cutting more documents balances better but makes more pieces: the cost falls, then rises. Counts past the
    # ones that must be cut are tried doubling (the fewest within TARGET of the ideal wins at once), then the
    # bracket around the cheapest is narrowed by ternary search.
    tried = {must_cut: trial(must_cut)}
    count, step = must_cut, 1
    while tried[count][0] > TARGET * ideal and count < len(order):
        count = min(len(order), count + step)
        tried[count] = trial(count)
        step *= 2
    if tried[count][0] > TARGET * ideal:
        counts = sorted(tried)
        at = min(range(len(counts)), key=lambda i: (tried[counts[i]][0], counts[i]))
        low, high = counts[max(0, at - 1)], counts[min(len(counts) - 1, at + 1)]
        while high - low > 2:  # discrete ternary search on the bracket around the cheapest
            left, right = low + (high - low) // 3, high - (high - low) // 3
            for c in (left, right):
                if c not in tried:
                    tried[c] = trial(c)
            low, high = (low, right) if tried[left][0] <= tried[right][0] else (left, high)
        for c in range(low, high + 1):
            if c not in tried:
                tried[c] = trial(c)
    best = min(tried.values(), key=lambda result: result[0])
    _, owner, cut, even, fillers, filler_shares = best
    shares = _shares([lengths[d] for d in cut], even) if cut else []
    cut_shares = dict(zip(cut, shares))
    for d, share in zip(fillers, filler_shares):
        cut_shares[d] = [share.get(j, 0) for j in range(ring_degree)]
    return (tuple(owner.get(d, -1) for d in range(len(lengths))),
            tuple((d, tuple(cut_shares[d])) for d in sorted(cut_shares)))


def clear_caches() -> None:
    """Forget every solved row (after changing :data:`PIECE_PAIRS` or :data:`TARGET`)."""
    ring_cut.cache_clear()
    ring_documents.cache_clear()


def _layout(offsets: tuple[int, ...], owner: tuple[int, ...], cut_shares: tuple[tuple[int, tuple[int, ...]], ...],
            ring_degree: int, zigzag: bool) -> RingDocuments:
    ranges: list[list[tuple[int, int]]] = [[] for _ in range(ring_degree)]
    for d, j in enumerate(owner):
        if j >= 0 and offsets[d + 1] > offsets[d]:
            ranges[j].append((offsets[d], offsets[d + 1]))
    cut_tokens = [0] * ring_degree
    for index, (d, share) in enumerate(cut_shares):
        start = offsets[d]
        for j in range(ring_degree):
            cut_tokens[j] += share[j]
        if not zigzag:
            for j in range(ring_degree):
                if share[j]:
                    ranges[j].append((start, start + share[j]))
                start += share[j]
            continue
        # zigzag per document: front pieces in ring order, then the mirrored back pieces; which half gets the odd
        # token alternates so that no ring rank collects every remainder
        front = [(s + (index + j) % 2) // 2 for j, s in enumerate(share)]
        for j in range(ring_degree):
            if front[j]:
                ranges[j].append((start, start + front[j]))
            start += front[j]
        for j in reversed(range(ring_degree)):
            back = share[j] - front[j]
            if back:
                ranges[j].append((start, start + back))
            start += back
    return RingDocuments(tuple(tuple(sorted(r)) for r in ranges), owner, tuple(cut_tokens), cut_shares)


def ring_rank_positions(documents: RingDocuments, ring_rank: int) -> torch.Tensor:
    """Sorted global positions ring rank ``ring_rank`` holds."""
    parts = [torch.arange(a, b) for a, b in documents.ranges[ring_rank]]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
