"""Attention masks beyond causal, evaluated per block from global token positions (never an S x S tensor).

A mask restricts which keys a query sees, on top of ``causal``:

* ``window=(left, right)``: query at position ``i`` sees keys ``i - left .. i + right`` (``-1`` = unbounded, as in
  flash-attn; with ``causal=True`` the right side is 0 anyway).
* ``document_ids [batch, seq_len]`` (integers, the whole sequence): packed documents; a query sees only keys of its
  own document.
* ``mask_mod(batch_idx, head_idx, q_idx, kv_idx) -> bool tensor`` (as torch's flex_attention): called with
  broadcastable index tensors ``[b,1,1,1]``, ``[1,h,1,1]``, ``[1,1,nq,1]``, ``[1,1,1,nk]`` — global positions and
  global head indices — once per block.

For each block the executor asks :meth:`BlockMasker.visibility`: skip it (nothing visible — a sliding window skips
blocks by position ranges before building anything), compute it as scheduled (the mask removes nothing there), or
compute it with a block-sized boolean mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .kernels import AttentionKernel, MathKernel

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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

    def _window_range(self, q: torch.Tensor, kv: torch.Tensor) -> Optional[str]:
        """SKIP / AS_SCHEDULED from position ranges alone, None when the window cuts through the block."""
        left, right = self.mask.window
        q_min, q_max, kv_min, kv_max = int(q.min()), int(q.max()), int(kv.min()), int(kv.max())
        if (left >= 0 and kv_max < q_min - left) or (right >= 0 and kv_min > q_max + right):
            return SKIP
        if (left < 0 or kv_min >= q_max - left) and (right < 0 or kv_max <= q_min + right):
            return AS_SCHEDULED
        return None

    def visibility(self, q_rows: slice, kv_positions: torch.Tensor, causal: bool) -> Visibility:
        """For rows ``q_rows`` of this rank against keys at ``kv_positions``: SKIP, AS_SCHEDULED (compute the
        block as the schedule says, ``causal`` or full), or a bool mask ``[b|1, h|1, nq, nk]`` (True = visible)
        that already includes the causal part."""
        q = self.q_positions[q_rows]
        kv = kv_positions.to(self.device)
        extra = None
        if self.mask.window is not None:
            by_range = self._window_range(q, kv)
            if by_range == SKIP:
                return SKIP
            if by_range is None:
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
            batch_idx = torch.arange(self.batch, device=self.device).view(-1, 1, 1, 1)
            visible = self.mask.mask_mod(batch_idx, self.heads.view(1, -1, 1, 1), q.view(1, 1, -1, 1),
                                         kv.view(1, 1, 1, -1))
            visible = torch.as_tensor(visible, device=self.device).to(torch.bool)
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
