"""Blocks of attention work and the one place they are computed (forward and backward).

A :class:`Block` is rows of q against rows of K/V, fully visible or an aligned causal square. Ring and MQSP
schedules are lists of blocks; :func:`position_blocks` derives them from the global positions of the rows
(contiguous position runs, split at document boundaries when ``cu_seqlens`` is given), so any layout works.

:func:`forward_blocks` / :func:`backward_blocks` run a list of blocks: blocks a mask cuts go one by one to a
kernel that takes a mask (cut into tiles first when larger than the mask budget, so no mask tensor grows
with the sequence); the others are grouped by kind (full / causal) and each group is ONE call: a dense call
on slices when the group is one block, else a varlen call over the blocks packed side by side
(:mod:`megatron_usp.kernels.varlen`), never one call per document.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from math import isqrt
from typing import Optional, Sequence

import torch

from .caching import cached_plain_property, plain_tensors
from .kernels import AttentionKernel
from .kernels.base import expand_kv_heads
from .kernels.varlen import Segments, varlen_backward, varlen_forward
from .layout import concat_ranges
from .masks import AS_SCHEDULED, BlockMasker, plan_block
from .merge import first_partial, merge_partial, merge_rows


@dataclass(frozen=True)
class Block:
    """q rows ``[q_start, q_stop)`` against K/V rows ``[kv_start, kv_stop)`` of the step's K/V."""

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    causal: bool

    @property
    def q(self) -> slice:
        return slice(self.q_start, self.q_stop)

    @property
    def kv(self) -> slice:
        return slice(self.kv_start, self.kv_stop)


def position_runs(positions: torch.Tensor, cu_seqlens: Optional[Sequence[int]] = None) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive positions inside one document: ``(first row, first position, length, document)``."""
    positions = positions.cpu()
    if len(positions) == 0:
        return []
    if cu_seqlens is None:
        document = torch.zeros_like(positions)
    else:
        document = torch.searchsorted(torch.tensor(cu_seqlens), positions, right=True) - 1
    breaks = (positions[1:] != positions[:-1] + 1) | (document[1:] != document[:-1])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(breaks).flatten() + 1])
    lengths = torch.diff(starts, append=torch.tensor([len(positions)]))
    return list(zip(starts.tolist(), positions[starts].tolist(), lengths.tolist(), document[starts].tolist()))


def position_blocks(q_positions: torch.Tensor, kv_positions: torch.Tensor, causal: bool,
                    cu_seqlens: Optional[Sequence[int]] = None,
                    q_runs: Optional[list[tuple[int, int, int, int]]] = None,
                    kv_position_runs: Optional[list[tuple[int, int, int, int]]] = None) -> list[Block]:
    """Blocks covering exactly the visible (q, kv) pairs — same document (when ``cu_seqlens`` is given) and, if
    ``causal``, key position <= query position — each fully visible or an aligned causal square. ``q_runs`` /
    ``kv_position_runs``: ``position_runs`` of the q / kv positions when the caller has them."""
    if cu_seqlens is None and not causal:
        return [Block(0, len(q_positions), 0, len(kv_positions), False)]
    kv_runs: dict[int, list[tuple[int, int, int]]] = {}
    if kv_position_runs is None:
        kv_position_runs = position_runs(kv_positions, cu_seqlens)
    for kv_row, kv_pos, kv_len, document in kv_position_runs:
        kv_runs.setdefault(document, []).append((kv_row, kv_pos, kv_len))
    blocks = []
    for q_row, q_pos, q_len, document in q_runs if q_runs is not None else position_runs(q_positions, cu_seqlens):
        for kv_row, kv_pos, kv_len in kv_runs.get(document, ()):
            if not causal:
                blocks.append(Block(q_row, q_row + q_len, kv_row, kv_row + kv_len, False))
                continue
            # keys before the q run: visible to all of it
            before = min(kv_pos + kv_len, q_pos) - kv_pos
            if before > 0:
                blocks.append(Block(q_row, q_row + q_len, kv_row, kv_row + before, False))
            start, stop = max(kv_pos, q_pos), min(kv_pos + kv_len, q_pos + q_len)
            if start < stop:  # keys inside the q run: a causal square, then fully visible to the later q rows
                q_off, kv_off = q_row + start - q_pos, kv_row + start - kv_pos
                blocks.append(Block(q_off, q_off + stop - start, kv_off, kv_off + stop - start, True))
                if stop < q_pos + q_len:
                    blocks.append(Block(q_off + stop - start, q_row + q_len, kv_off, kv_off + stop - start, False))
    # Without documents the blocks are few already; joining them there changes bf16 rounding of the tested schedules.
    return blocks if cu_seqlens is None else _coalesce(blocks)


def own_blocks(positions: torch.Tensor, causal: bool, cu_seqlens: Sequence[int]) -> list[Block]:
    """The blocks of rows against themselves (a ring rank's own step) with documents: the rows are sorted by
    position, so each document's rows are consecutive and ONE square, causal in row order exactly when causal in
    position order, however many runs of positions it holds (a zigzag document's two halves: one call, not three)."""
    positions = positions.cpu()
    if len(positions) == 0:
        return []
    document = torch.searchsorted(torch.tensor(cu_seqlens), positions, right=True) - 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(document[1:] != document[:-1]).flatten() + 1])
    stops = torch.cat([starts[1:], torch.tensor([len(positions)])])
    return [Block(a, b, a, b, causal) for a, b in zip(starts.tolist(), stops.tolist())]


def _coalesce(blocks: list[Block]) -> list[Block]:
    """Join fully visible blocks that share their kv rows and have adjacent q rows (then: share q rows, adjacent kv
    rows): the two runs a rank holds of one document are adjacent rows, so a step's pieces of a document against
    one run of keys become one call, the shape of the zigzag blocks without documents."""
    full = [b for b in blocks if not b.causal]
    if len(full) < 2:  # nothing to join
        return full + [b for b in blocks if b.causal]
    for key, adjacent, join in (
        (lambda b: (b.kv_start, b.kv_stop, b.q_start), lambda a, b: a.kv == b.kv and a.q_stop == b.q_start,
         lambda a, b: Block(a.q_start, b.q_stop, a.kv_start, a.kv_stop, False)),
        (lambda b: (b.q_start, b.q_stop, b.kv_start), lambda a, b: a.q == b.q and a.kv_stop == b.kv_start,
         lambda a, b: Block(a.q_start, a.q_stop, a.kv_start, b.kv_stop, False)),
    ):
        merged: list[Block] = []
        for block in sorted(full, key=key):
            if merged and adjacent(merged[-1], block):
                merged[-1] = join(merged[-1], block)
            else:
                merged.append(block)
        full = merged
    return sorted(full, key=lambda b: (b.q_start, b.kv_start)) + [b for b in blocks if b.causal]


def _rows(slices: Sequence[slice]) -> torch.Tensor:
    return concat_ranges(torch.tensor([s.start for s in slices]), torch.tensor([s.stop for s in slices]))


@dataclass(frozen=True, eq=False)
class VarlenGroup:
    """Blocks of one kind packed side by side: packed row ``i`` is q row ``q_index[i]`` (K/V: ``kv_index``)."""

    blocks: tuple[Block, ...]
    causal: bool
    _device_indices: dict = field(default_factory=dict, repr=False)

    @cached_plain_property
    def segments(self) -> Segments:
        q_lengths = [b.q_stop - b.q_start for b in self.blocks]
        kv_lengths = [b.kv_stop - b.kv_start for b in self.blocks]
        return Segments(tuple(accumulate(q_lengths, initial=0)), tuple(accumulate(kv_lengths, initial=0)))

    @cached_plain_property
    def q_index(self) -> torch.Tensor:
        return _rows([b.q for b in self.blocks])

    @cached_plain_property
    def kv_index(self) -> torch.Tensor:
        return _rows([b.kv for b in self.blocks])

    @cached_plain_property
    def q_rows_unique(self) -> bool:
        return len(torch.unique(self.q_index)) == len(self.q_index)

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_indices:
            with plain_tensors():
                self._device_indices[device] = (self.q_index.to(device), self.kv_index.to(device))
        return self._device_indices[device]


Work = tuple  # ("dense", block, kernel, causal, kwargs) or ("varlen", VarlenGroup)


def group_blocks(blocks: Sequence[Block]) -> tuple[Work, ...]:
    """Unmasked blocks by kind: one dense call for a kind with one block, one varlen call for a kind with more."""
    work = []
    for causal in (False, True):
        kind = tuple(b for b in blocks if b.causal == causal and b.q_stop > b.q_start and b.kv_stop > b.kv_start)
        if len(kind) == 1:
            work.append(("dense", kind[0], None, causal, {}))
        elif kind:
            work.append(("varlen", VarlenGroup(kind, causal)))
    return tuple(work)


def tile_block(block: Block, max_pairs: int) -> list[Block]:
    """``block`` cut into tiles of at most ``max_pairs`` (q row, key) pairs (the block itself when it fits). A
    causal block (an aligned square) is cut at the same offsets on both axes: its diagonal tiles are aligned causal
    squares, the tiles below them are fully visible and those above, invisible, are left out."""
    rows, cols = block.q_stop - block.q_start, block.kv_stop - block.kv_start
    if rows * cols <= max_pairs:
        return [block]
    if block.causal:
        assert rows == cols, f"causal blocks are aligned squares, got {block}"
        side = max(1, isqrt(max_pairs))
        return [Block(block.q_start + i, block.q_start + min(i + side, rows), block.kv_start + j,
                      block.kv_start + min(j + side, cols), i == j)
                for i in range(0, rows, side) for j in range(0, i + 1, side)]
    tile_cols = min(cols, max(1, max_pairs // min(rows, max(1, isqrt(max_pairs)))))
    tile_rows = min(rows, max(1, max_pairs // tile_cols))
    return [Block(block.q_start + i, block.q_start + min(i + tile_rows, rows), block.kv_start + j,
                  block.kv_start + min(j + tile_cols, cols), False)
            for i in range(0, rows, tile_rows) for j in range(0, cols, tile_cols)]


def plan_work(blocks: Sequence[Block], grouped: Optional[tuple[Work, ...]], kv_positions: Optional[torch.Tensor],
              masker: Optional[BlockMasker], kernel: AttentionKernel) -> list[Work]:
    """The calls for ``blocks`` under ``masker``: ``grouped`` (cached :func:`group_blocks`) when nothing is
    masked; else blocks the mask cuts go one by one with their mask and the rest are grouped. A block the mask
    may cut that is larger than the mask budget (:meth:`BlockMasker.tile_elements`) is first cut into tiles
    (:func:`tile_block`), each skipped, computed as scheduled or computed with its own tile-sized mask; a block's
    tiles computed as scheduled are joined again (:func:`_coalesce`) so they cost few calls. A kernel without a
    native varlen entry point gets one dense call per block on views instead of a group: packing the rows for it
    would only add copies (measured on CPU: the copies cost as much as the monolithic run's whole overhead)."""
    if masker is None:
        work = list(grouped if grouped is not None else group_blocks(blocks))
    else:
        plain, masked = [], []
        max_pairs = masker.tile_elements()
        for block in blocks:
            by_range = masker.by_range(block.q, kv_positions[block.kv])
            if by_range is not None:  # decided for the whole block without building anything
                if by_range == AS_SCHEDULED:
                    plain.append(block)
                continue
            tiles = tile_block(block, max_pairs)
            plain_tiles = []
            for tile in tiles:
                planned = plan_block(tile, kv_positions, masker, kernel)
                if planned is None:
                    continue
                if planned[2]:
                    masked.append(("dense", tile, *planned))
                else:
                    plain_tiles.append(tile)
            plain += plain_tiles if len(tiles) == 1 else _coalesce(plain_tiles)
        work = list(group_blocks(plain)) + masked
    if getattr(kernel, "varlen_forward", None) is not None:
        return work
    per_block = []
    for item in work:
        if item[0] == "dense":
            per_block.append(item)
        else:
            per_block += [("dense", block, None, item[1].causal, {}) for block in item[1].blocks]
    return per_block


MAX_LOGIT_TILE_ROWS = 256  # query rows per score tile of block_max_logit: bounds its memory


def block_max_logit(q: torch.Tensor, k: torch.Tensor, softmax_scale: float, causal: bool,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Largest scaled logit per head ``[h]`` (fp32; -inf where nothing is visible) of one block: ``q [b, n, h, d]``
    against ``k [b, m, kv_h, d]``, ``causal`` (square blocks) and ``mask [b|1, h|1, n, m]`` (True = visible) as the
    kernels take them. Recomputes the block's scores in tiles of :data:`MAX_LOGIT_TILE_ROWS` rows: kernels do not
    report their row maxima."""
    k = expand_kv_heads(k, q.shape[2]).float()
    best = torch.full((q.shape[2],), float("-inf"), dtype=torch.float32, device=q.device)
    for start in range(0, q.shape[1], MAX_LOGIT_TILE_ROWS):
        stop = min(start + MAX_LOGIT_TILE_ROWS, q.shape[1])
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, start:stop].float(), k) * softmax_scale
        visible = torch.ones(scores.shape[2:], dtype=torch.bool, device=q.device)
        if causal:
            visible = torch.arange(start, stop, device=q.device)[:, None] >= torch.arange(k.shape[1], device=q.device)
        if mask is not None:
            visible = visible & mask[:, :, start:stop]
        scores = scores.masked_fill(~visible, float("-inf"))
        best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
    return best


def _work_max_logit(q: torch.Tensor, k: torch.Tensor, item: Work, softmax_scale: float) -> torch.Tensor:
    if item[0] == "dense":
        _, block, _, causal, kwargs = item
        return block_max_logit(q[:, block.q], k[:, block.kv], softmax_scale, causal, kwargs.get("mask"))
    group = item[1]
    return torch.stack([block_max_logit(q[:, block.q], k[:, block.kv], softmax_scale, group.causal)
                        for block in group.blocks]).amax(0)


class TouchedRows:
    """The q rows some partial result has reached (disjoint ``[start, stop)`` ranges): a block whose rows none has
    reached writes its result instead of merging it (:func:`.merge.first_partial`)."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []

    def first(self, rows: slice) -> bool:
        """Whether no partial has reached ``rows``; records that one now has."""
        start, stop = rows.start, rows.stop
        fresh = all(stop <= a or b <= start for a, b in self._ranges)
        self._ranges.append((start, stop))
        return fresh


def forward_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, work: Sequence[Work], kernel: AttentionKernel,
                   softmax_scale: float, out: torch.Tensor, lse: torch.Tensor,
                   max_logit: Optional[torch.Tensor] = None, touched: Optional[TouchedRows] = None) -> None:
    """Compute ``work`` over ``q [b, n, h, d]`` and ``k, v [b, m, kv_h, d]``, merging into ``out``/``lse`` in place
    (``out`` 0 and ``lse`` -inf where no partial has been; ``touched``, kept over the calls of one forward, lets a
    row's first partial be written, not merged); with ``max_logit [h]`` (fp32) also raise it to each head's largest
    visible scaled logit of these blocks."""
    for item in work:
        if max_logit is not None:
            torch.maximum(max_logit, _work_max_logit(q, k, item, softmax_scale), out=max_logit)
        if item[0] == "dense":
            _, block, block_kernel, causal, kwargs = item
            block_out, block_lse = (block_kernel or kernel).forward(
                q[:, block.q], k[:, block.kv], v[:, block.kv], causal=causal, softmax_scale=softmax_scale, **kwargs
            )
            if touched is not None and touched.first(block.q):
                out[:, block.q], lse[:, :, block.q] = first_partial(block_out, block_lse, out.dtype)
            else:
                out[:, block.q], lse[:, :, block.q] = merge_partial(out[:, block.q], lse[:, :, block.q], block_out,
                                                                    block_lse)
            continue
        group = item[1]
        q_index, kv_index = group.indices(q.device)
        part_out, part_lse = varlen_forward(kernel, q.index_select(1, q_index), k.index_select(1, kv_index),
                                            v.index_select(1, kv_index), group.segments, causal=group.causal,
                                            softmax_scale=softmax_scale)
        if touched is not None:
            touched.first(slice(0, out.shape[1]))  # a group's rows are not tracked: later partials merge
        if group.q_rows_unique:
            merged_out, merged_lse = merge_partial(out.index_select(1, q_index), lse.index_select(2, q_index),
                                                   part_out, part_lse)
            out.index_copy_(1, q_index, merged_out)
            lse.index_copy_(2, q_index, merged_lse)
        else:
            merge_rows(out, lse, part_out, part_lse, q_index)


def backward_blocks(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, work: Sequence[Work], kernel: AttentionKernel, softmax_scale: float,
                    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Gradients of :func:`forward_blocks` given the rows' FINAL ``out``/``lse``, accumulated into dq/dk/dv."""
    for item in work:
        if item[0] == "dense":
            _, block, block_kernel, causal, kwargs = item
            block_dq, block_dk, block_dv = (block_kernel or kernel).backward(
                dout[:, block.q], q[:, block.q], k[:, block.kv], v[:, block.kv], out[:, block.q],
                lse[:, :, block.q], causal=causal, softmax_scale=softmax_scale, **kwargs,
            )
            dq[:, block.q] += block_dq
            dk[:, block.kv] += block_dk
            dv[:, block.kv] += block_dv
            continue
        group = item[1]
        q_index, kv_index = group.indices(q.device)
        grads = varlen_backward(
            kernel, dout.index_select(1, q_index), q.index_select(1, q_index), k.index_select(1, kv_index),
            v.index_select(1, kv_index), out.index_select(1, q_index), lse.index_select(2, q_index),
            group.segments, causal=group.causal, softmax_scale=softmax_scale,
        )
        dq.index_add_(1, q_index, grads[0].to(dq.dtype))
        dk.index_add_(1, kv_index, grads[1].to(dk.dtype))
        dv.index_add_(1, kv_index, grads[2].to(dv.dtype))
