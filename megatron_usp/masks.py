"""Attention masks beyond causal, evaluated per block from global token positions (never an S x S tensor).

A mask restricts which keys a query sees, on top of ``causal``:

* ``window=(left, right)``: query at position ``i`` sees keys ``i - left .. i + right`` (``-1`` = unbounded, as in
  flash-attn; with ``causal=True`` the right side is 0 anyway).
* ``document_ids [batch, seq_len]`` (integers, the whole sequence): packed documents; a query sees only keys of its
  own document.
* ``mask_mod(batch_idx, head_idx, q_idx, kv_idx) -> bool tensor`` (as torch's flex_attention): called with
  broadcastable index tensors ``[b,1,1,1]``, ``[1,h,1,1]``, ``[1,1,nq,1]``, ``[1,1,1,nk]`` — global positions and
  global head indices — once per block or tile; a result that does not broadcast to ``[b|1, h|1, nq, nk]`` is a
  ``ValueError`` (``TypeError`` when it is not a tensor) naming ``mask_mod`` and both shapes.

For each block the executor asks :meth:`BlockMasker.visibility`: skip it (nothing visible — a sliding window and
documents skip blocks by position / id ranges before building anything), compute it as scheduled (the mask removes
nothing there), or compute it with a boolean mask of the block. Blocks larger than the mask budget are first cut
into tiles (:meth:`BlockMasker.tile_elements`, ``blocks.tile_block``), each classified on its own, so no mask
tensor — the bool mask, the kernel's additive bias, ``mask_mod``'s result — exceeds :data:`MASK_TILE_ELEMENTS`
elements, whatever the sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .kernels import AttentionKernel, MathKernel

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Most elements of any mask tensor built for one (sub-)block: 2^22 = 4 Mi, i.e. 4 MiB of bool mask plus its
#: additive bias in q's dtype (8 MiB bf16, 16 MiB fp32). Blocks a mask cuts are tiled to stay within it.
MASK_TILE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class AttentionMask:
    """The masks of one attention call (any combination; all None = plain causal / full attention)."""

    window: Optional[tuple[int, int]] = None
    document_ids: Optional[torch.Tensor] = None
    mask_mod: Optional[MaskMod] = None

    @property
    def active(self) -> bool:
        return self.window is not None or self.document_ids is not None or self.mask_mod is not None


def check_mask(mask: AttentionMask, batch: int, seq_len: int) -> None:
    """``ValueError`` / ``TypeError`` for a malformed mask (local checks, before any collective)."""
    if mask.window is not None:
        window = mask.window
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
            raise TypeError(f"window must be a pair of ints (left, right), -1 = unbounded; got {window!r}")
        if any(w < -1 for w in window):
            raise ValueError(f"window sides must be >= -1 (-1 = unbounded), got {tuple(window)}")
    ids = mask.document_ids
    if ids is not None:
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise TypeError("document_ids must be an integer tensor [batch, seq_len] (one id per token of the whole "
                            f"sequence), got {type(ids).__name__ if not isinstance(ids, torch.Tensor) else ids.dtype}")
        if tuple(ids.shape) != (batch, seq_len):
            raise ValueError(f"document_ids must cover the whole sequence: shape [batch, seq_len] = [{batch}, "
                             f"{seq_len}], got {tuple(ids.shape)}")
    if mask.mask_mod is not None and not callable(mask.mask_mod):
        raise TypeError(f"mask_mod must be callable (batch_idx, head_idx, q_idx, kv_idx) -> bool tensor, got "
                        f"{type(mask.mask_mod).__name__}")


AS_SCHEDULED = "as_scheduled"
SKIP = "skip"
Visibility = Union[str, torch.Tensor]


class BlockMasker:
    """Visibility of blocks for one rank: ``q_positions [n]`` of its rows, its global head indices ``heads``."""

    def __init__(self, mask: AttentionMask, q_positions: torch.Tensor, heads: torch.Tensor, batch: int,
                 device: torch.device):
        self.mask, self.device, self.batch = mask, device, batch
        self.q_positions = q_positions.to(device)
        self.heads = heads.to(device)
        self.document_ids = None if mask.document_ids is None else mask.document_ids.to(device)

    def tile_elements(self) -> int:
        """Most (q row, key) pairs of a tile such that none of its mask tensors exceeds :data:`MASK_TILE_ELEMENTS`
        elements: documents give ``[b, 1, nq, nk]`` masks, ``mask_mod`` may give ``[b, h, nq, nk]``."""
        per_pair = 1
        if self.document_ids is not None or self.mask.mask_mod is not None:
            per_pair *= self.batch
        if self.mask.mask_mod is not None:
            per_pair *= len(self.heads)
        return max(1, MASK_TILE_ELEMENTS // per_pair)

    def _window_range(self, q: torch.Tensor, kv: torch.Tensor) -> Optional[str]:
        """SKIP / AS_SCHEDULED from position ranges alone, None when the window cuts through the block."""
        left, right = self.mask.window
        q_min, q_max, kv_min, kv_max = int(q.min()), int(q.max()), int(kv.min()), int(kv.max())
        if (left >= 0 and kv_max < q_min - left) or (right >= 0 and kv_min > q_max + right):
            return SKIP
        if (left < 0 or kv_min >= q_max - left) and (right < 0 or kv_max <= q_min + right):
            return AS_SCHEDULED
        return None

    def _document_range(self, q: torch.Tensor, kv: torch.Tensor) -> Optional[str]:
        """SKIP when, in every row of the batch, the q and kv id ranges are disjoint; AS_SCHEDULED when every q and
        kv of each row share one id; None otherwise (cost ``b x (nq + nk)``, not ``nq x nk``)."""
        q_ids, kv_ids = self.document_ids[:, q], self.document_ids[:, kv]
        q_min, q_max, kv_min, kv_max = q_ids.amin(1), q_ids.amax(1), kv_ids.amin(1), kv_ids.amax(1)
        if bool(((q_max < kv_min) | (kv_max < q_min)).all()):
            return SKIP
        if bool(((q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min)).all()):
            return AS_SCHEDULED
        return None

    def by_range(self, q_rows: slice, kv_positions: torch.Tensor) -> Optional[str]:
        """SKIP / AS_SCHEDULED for rows ``q_rows`` against keys at ``kv_positions`` decided from position and
        document-id ranges alone (nothing block-sized is built), None when only a mask can tell."""
        if len(kv_positions) == 0 or q_rows.stop <= q_rows.start:
            return SKIP
        q, kv = self.q_positions[q_rows], kv_positions.to(self.device)
        verdicts = []
        if self.mask.window is not None:
            verdicts.append(self._window_range(q, kv))
        if self.document_ids is not None:
            verdicts.append(self._document_range(q, kv))
        if SKIP in verdicts:
            return SKIP
        if self.mask.mask_mod is None and all(v == AS_SCHEDULED for v in verdicts):
            return AS_SCHEDULED
        return None

    def _mask_mod(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``mask_mod`` on this block's index tensors; a clear error when its result cannot be the block's mask."""
        batch, heads, nq, nk = self.batch, len(self.heads), len(q), len(kv)
        batch_idx = torch.arange(batch, device=self.device).view(-1, 1, 1, 1)
        visible = self.mask.mask_mod(batch_idx, self.heads.view(1, -1, 1, 1), q.view(1, 1, -1, 1),
                                     kv.view(1, 1, 1, -1))
        target = (f"[b|1, h|1, nq, nk] = [{batch}|1, {heads}|1, {nq}, {nk}] (it was called with index tensors "
                  f"batch_idx [{batch}, 1, 1, 1], head_idx [1, {heads}, 1, 1], q_idx [1, 1, {nq}, 1], "
                  f"kv_idx [1, 1, 1, {nk}])")
        if isinstance(visible, bool):
            visible = torch.tensor(visible)
        if not isinstance(visible, torch.Tensor):
            raise TypeError(f"mask_mod must return a bool tensor that broadcasts to {target}; it returned "
                            f"{type(visible).__name__}")
        shape = tuple(visible.shape)
        if len(shape) > 4 or any(got not in (1, want) for got, want in zip(reversed(shape), (nk, nq, heads, batch))):
            raise ValueError(f"mask_mod returned a tensor of shape {shape}, which does not broadcast to {target}")
        return visible.reshape((1,) * (4 - len(shape)) + shape).to(device=self.device, dtype=torch.bool)

    def visibility(self, q_rows: slice, kv_positions: torch.Tensor, causal: bool) -> Visibility:
        """For rows ``q_rows`` of this rank against keys at ``kv_positions``: SKIP, AS_SCHEDULED (compute the
        block as the schedule says, ``causal`` or full), or a bool mask ``[b|1, h|1, nq, nk]`` (True = visible)
        that already includes the causal part. Its size is the block's: callers tile large blocks first
        (see :meth:`tile_elements`)."""
        by_range = self.by_range(q_rows, kv_positions)
        if by_range is not None:
            return by_range
        q = self.q_positions[q_rows]
        kv = kv_positions.to(self.device)
        extra = None
        if self.mask.window is not None and self._window_range(q, kv) is None:
            left, right = self.mask.window
            distance = q[:, None] - kv[None, :]
            visible = torch.ones_like(distance, dtype=torch.bool)
            if left >= 0:
                visible &= distance <= left
            if right >= 0:
                visible &= -distance <= right
            extra = visible[None, None]
        if self.document_ids is not None:
            same = self.document_ids[:, q][:, :, None] == self.document_ids[:, kv][:, None, :]
            extra = same[:, None] if extra is None else extra & same[:, None]
        if self.mask.mask_mod is not None:
            visible = self._mask_mod(q, kv)
            extra = visible if extra is None else extra & visible
        if extra is None or bool(extra.all()):
            return AS_SCHEDULED
        if causal:
            extra = extra & torch.ones(len(q), len(kv), dtype=torch.bool, device=self.device).tril()
        if not bool(extra.any()):
            return SKIP
        return extra


_MASKED_FALLBACK = MathKernel()


def plan_block(block, kv_positions: Optional[torch.Tensor], masker: Optional[BlockMasker],
               kernel: AttentionKernel) -> Optional[tuple[AttentionKernel, bool, dict]]:
    """How to compute ``block`` (a ring or MQSP ``Block``; ``kv_positions`` index by its kv rows): (kernel, causal,
    extra kernel kwargs), or None when the mask hides all of it. Masked blocks go to the math kernel when
    ``kernel`` takes no mask."""
    if masker is None:
        return kernel, block.causal, {}
    visibility = masker.visibility(block.q, kv_positions[block.kv], block.causal)
    if isinstance(visibility, str):
        return None if visibility == SKIP else (kernel, block.causal, {})
    masked_kernel = kernel if getattr(kernel, "supports_mask", False) else _MASKED_FALLBACK
    return masked_kernel, False, {"mask": visibility}
