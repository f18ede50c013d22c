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


TENSOR_BINS = 256  # from this many bins on, a document's shares are computed as tensors (Python lists below)


def _shares(lengths: Sequence[int], quotas: Sequence[int]) -> list[list[int]]:
    """Split documents of ``lengths`` over bins with integer ``quotas`` (sum = sum of lengths): ``shares[d][j]``,
    each document's shares proportional to the quotas, every bin's total exactly its quota: what each bin is owed
    so far, rounded, then the rounding settled one token at a time on the bin owed most (adding; ties: the lowest
    bin) or least (removing) (:func:`_settle`)."""
    total = sum(lengths)
    if len(quotas) >= TENSOR_BINS:  # the same arithmetic on every bin at once (identical floats)
        quota = torch.tensor(quotas, dtype=torch.int64)
        given = torch.zeros_like(quota)
        shares, seen = [], 0
        for length in lengths:
            seen += length
            want = (quota * seen).double() / total - given
            room = quota - given
            share = torch.minimum(torch.round(want).clamp(min=0), room.double()).long()
            excess = int(share.sum()) - length
            if excess:
                adding = excess < 0
                movable = (share < room if adding else share > 0).nonzero().flatten()
                key = (share - want if adding else want - share)[movable]
                order = torch.sort(key, stable=True).indices  # ties: the lowest bin
                limit = (room - share if adding else share)[movable][order]
                moves = _settle(list(zip(key[order].tolist(), movable[order].tolist())), limit.tolist(), -excess,
                                share.tolist(), want.tolist())
                share.index_add_(0, torch.tensor(list(moves), dtype=torch.int64),
                                 torch.tensor(list(moves.values()), dtype=torch.int64))
            given += share
            shares.append(share.tolist())
        return shares
    given = [0] * len(quotas)
    shares, seen = [], 0
    for length in lengths:
        seen += length
        want = [quota * seen / total - g for quota, g in zip(quotas, given)]
        room = [quota - g for quota, g in zip(quotas, given)]
        share = [min(max(0, round(x)), r) for x, r in zip(want, room)]
        excess = sum(share) - length
        if excess:
            adding = excess < 0
            queue = sorted((share[j] - want[j], j) if adding else (want[j] - share[j], j)
                           for j in range(len(quotas)) if (share[j] < room[j] if adding else share[j] > 0))
            limit = [room[j] - share[j] if adding else share[j] for _, j in queue]
            for j, moved in _settle(queue, limit, -excess, share, want).items():
                share[j] += moved
        given = [g + s for g, s in zip(given, share)]
        shares.append(share)
    return shares


def _settle(queue: list[tuple[float, int]], limit: list[int], tokens: int, share: Sequence[int],
            want: Sequence[float]) -> dict[int, int]:
    """``{bin: tokens moved}`` for ``tokens`` (> 0: adding, < 0: removing) moved one at a time on the first bin of
    ``queue`` (``(key, bin)`` sorted: ``share - want`` adding, ``want - share`` removing; ``limit[i]``: how many
    ``queue[i]`` can move); a bin that moved comes back with its new key while it can move again (a heap of those
    beside the sorted rest)."""
    adding = tokens > 0
    moved: dict[int, int] = {}
    again: list[tuple[float, int, int]] = []
    at = 0
    for _ in range(abs(tokens)):
        if again and (at == len(queue) or again[0][:2] < queue[at]):
            _, j, room = heapq.heappop(again)
        else:
            (_, j), room, at = queue[at], limit[at], at + 1
        moved[j] = moved.get(j, 0) + 1
        if moved[j] < room:
            key = share[j] + moved[j] - want[j] if adding else want[j] - (share[j] - moved[j])
            heapq.heappush(again, (key, j, room))
    return {j: count if adding else -count for j, count in moved.items()}


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
    every rank). Every piece adds :data:`PIECE_PAIRS` (``local_work`` holds its local documents' already).
    ``cut_lengths``, ``shares``: the filler documents and their ``{ring rank: tokens}`` as :func:`_pour` lays them."""
    bins = len(local_work)
    even = even_work / bins / bins + even_count * PIECE_PAIRS
    own = list(local_work)
    # slowest[s]: the most work a rank has with the pieces of the rank s before it, in the steps where any arrive.
    # Fillers take consecutive ring ranks one after another (_pour), so two of them share at most one rank: a rank
    # meets rank j - s in at most one of them, and its work in step s is that one pair's.
    slowest: dict[int, float] = {}
    for length, share in zip(cut_lengths, shares):  # a filler meets few ring ranks: only those are visited
        work = causal_work(length)
        held = [(j, s / length) for j, s in share.items() if s]
        for j, f in held:
            own[j] += f * f * work + PIECE_PAIRS
            for i, g in held:
                if i != j:
                    step, pair = (j - i) % bins, f * g * work + PIECE_PAIRS
                    if pair > slowest.get(step, 0.0):
                        slowest[step] = pair
    return max(own) + even + sum(slowest[step] for step in sorted(slowest)) + (bins - 1) * even


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
