"""Helpers for adapters over external kernels whose private APIs change between releases.

We never compare version strings: we read the callable's parameter names (Python signature or the torch op
schema) and fill them by name, and we look for the lse in the returned tuple by its shape.
The environment probes (``cuda_capability``, ``cudnn_version``) are module functions so that tests can
replace them without faking CUDA for the whole process.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from types import ModuleType
from typing import Any, Callable, Optional

import torch

from ..caching import built_plain, plain_lru_cache
from .base import accumulation_dtype

# Failed imports are remembered: availability is asked on every attention call, and a failed import scans
# the file system each time. A module put into sys.modules (tests) bypasses this cache.
_IMPORT_FAILURES: dict[str, str] = {}


def optional_import(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    """``(module, None)`` or ``(None, reason)``: why ``name`` cannot be imported, in words."""
    if name not in sys.modules and name in _IMPORT_FAILURES:
        return None, _IMPORT_FAILURES[name]
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as exc:
        top = name.split(".")[0]
        missing = exc.name is None or exc.name == top or name.startswith(exc.name + ".") or exc.name == name
        reason = f"package {top} is not installed" if missing else f"import {name} failed: {exc}"
    except Exception as exc:  # a broken CUDA extension raises ImportError/OSError with the linker's message
        reason = f"import {name} failed: {type(exc).__name__}: {exc}"
    if name not in sys.modules:
        _IMPORT_FAILURES[name] = reason
    return None, reason


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device (tests replace this function)."""
    return torch.cuda.get_device_capability(device)


def cudnn_version() -> Optional[int]:
    """cuDNN version as torch reports it (e.g. 90100), ``None`` without cuDNN (tests replace this function)."""
    if not torch.backends.cudnn.is_available():
        return None
    return torch.backends.cudnn.version()


def cuda_half_reason(
    device: torch.device, dtype: torch.dtype, head_dim: int, *, max_head_dim: int, min_capability: tuple[int, int]
) -> Optional[str]:
    """The checks every fp16/bf16 CUDA kernel here shares: device, dtype, head_dim (multiple of 8), GPU arch."""
    if device.type != "cuda":
        return f"it needs CUDA tensors, got device {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it needs float16/bfloat16, got {dtype}"
    if head_dim > max_head_dim or head_dim % 8 != 0:
        return f"it needs head_dim <= {max_head_dim} and a multiple of 8, got {head_dim}"
    capability = cuda_capability(device)
    if tuple(capability) < min_capability:
        need, got = ".".join(map(str, min_capability)), ".".join(map(str, capability))
        return f"it needs compute capability >= {need}, got {got}"
    return None


def parameters(fn: Callable) -> list[tuple[str, bool]]:
    """``[(name, has_default)]`` of a Python function, a ``torch.library.custom_op`` object or a torch op."""
    op = getattr(fn, "_opoverload", None)  # torch.library.custom_op wraps the function: its signature is (*a, **k)
    if op is None and hasattr(fn, "default") and hasattr(fn.default, "_schema"):
        op = fn.default  # torch.ops.<ns>.<name> packet
    schema = getattr(op if op is not None else fn, "_schema", None)
    if schema is not None:
        return [(arg.name, arg.has_default_value()) for arg in schema.arguments]
    sig = inspect.signature(fn)
    return [
        (p.name, p.default is not inspect.Parameter.empty)
        for p in sig.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def call_by_name(fn: Callable, values: dict[str, Any], *, absent: frozenset[str], what: str) -> Any:
    """Call ``fn`` with keywords: the names in ``values`` that ``fn`` has, ``None`` for required names listed in
    ``absent`` (optional inputs we do not use: varlen, paged kv, rotary, fp8 scales), defaults for the rest.
    A required name we do not know means an API we have not seen: fail loudly rather than guess."""
    kwargs: dict[str, Any] = {}
    for name, has_default in parameters(fn):
        if name in values:
            kwargs[name] = values[name]
        elif name in absent:
            kwargs[name] = None
        elif not has_default:
            raise TypeError(f"{what} has a required parameter {name!r} this adapter does not know; unsupported release")
    return fn(**kwargs)


def lse_bhs(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Kernel lse for bshd ``q`` -> ``[b, h, s_q]`` in fp32 (fp64 for fp64 ``q``): drops a trailing singleton
    (cuDNN / TE ``[b, h, s, 1]``) and row padding."""
    batch, seq_q, heads = q.shape[:3]
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse.squeeze(-1)
    if lse.shape[:2] != (batch, heads) or lse.shape[2] < seq_q:
        raise RuntimeError(f"unexpected lse shape {tuple(lse.shape)} for batch={batch}, heads={heads}, seq_q={seq_q}")
    return lse[..., :seq_q].to(accumulation_dtype(q.dtype))


def first_lse(result: tuple) -> torch.Tensor:
    """The lse in a kernel's returned tuple: its only 3-d tensor (out, q/k/v, out_padded are 4-d; rng state and
    empty placeholders are 1-d). Its position moved between releases (index 5 in 8-tuples, 1 in 4-tuples)."""
    for item in result:
        if isinstance(item, torch.Tensor) and item.dim() == 3:
            return item
    raise RuntimeError(f"no lse ([b, h, s] tensor) among the {len(result)} results of the kernel")


# ---- varlen (packed segments) helpers shared by the native varlen entry points ----


class _DenseOnly:
    """A kernel's dense entry points without its varlen ones: ``kernels.varlen`` then calls them once per segment
    (what a native adapter falls back to when the installed release has no usable varlen entry point)."""

    def __init__(self, kernel) -> None:
        self._kernel = kernel
        self.name = kernel.name

    def forward(self, q, k, v, *, causal, softmax_scale):
        return self._kernel.forward(q, k, v, causal=causal, softmax_scale=softmax_scale)

    def backward(self, dout, q, k, v, out, lse, *, causal, softmax_scale):
        return self._kernel.backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale)


def dense_only(kernel) -> _DenseOnly:
    return _DenseOnly(kernel)


class VarlenPlan:
    """What every native varlen call of one (segments, batch, device) needs, built once: the int32 offsets of the
    segments of all batch rows flattened into tokens, the maxima, and which rows the kernels leave undefined
    (query rows of segments without keys, key rows of segments without queries)."""

    def __init__(self, segments, batch: int, device: torch.device) -> None:
        lens_q = [b - a for a, b in zip(segments.cu_q, segments.cu_q[1:])]
        lens_k = [b - a for a, b in zip(segments.cu_k, segments.cu_k[1:])]
        self.batch = batch
        self.rows_q, self.rows_k = segments.cu_q[-1], segments.cu_k[-1]  # per batch row
        self.total_q, self.total_k = batch * self.rows_q, batch * self.rows_k
        self.num_segments = batch * len(lens_q)  # what the kernels see as their batch
        self.max_q, self.max_k = max(lens_q, default=0), max(lens_k, default=0)
        self.cu_q, self.cu_k = segments.batched(batch, device)
        self.device = device
        # nothing to compute: every segment lacks queries or keys (also no rows at all)
        self.trivial = not any(lq > 0 and lk > 0 for lq, lk in zip(lens_q, lens_k))
        self.q_without_keys = self._rows([lq > 0 and lk == 0 for lq, lk in zip(lens_q, lens_k)], lens_q)
        self.k_without_queries = self._rows([lk > 0 and lq == 0 for lq, lk in zip(lens_q, lens_k)], lens_k)
        self._lens_q = lens_q
        self._padded_index: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _rows(self, flags: list[bool], lens: list[int]) -> Optional[torch.Tensor]:
        """Bool mask over the flattened rows of the flagged segments, or None when no segment is flagged."""
        if not any(flags):
            return None
        mask = torch.repeat_interleave(torch.tensor(flags), torch.tensor(lens, dtype=torch.long))
        return mask.repeat(self.batch).to(self.device)

    def padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(segment, position)`` of every flattened query row: indexes lse stored per segment, padded to the
        longest (``[num_segments, h, >= max_q]``) as the mem-efficient kernel and TE's older cuDNN path keep it."""
        if self._padded_index is None:  # from the python offsets: no device-to-host copy
            self._padded_index = self._build_padded_index()
        return self._padded_index

    @built_plain
    def _build_padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        lens = torch.tensor(self._lens_q * self.batch, dtype=torch.long)
        segment = torch.repeat_interleave(torch.arange(len(lens)), lens)
        starts = torch.cumsum(lens, 0) - lens
        position = torch.arange(self.total_q) - starts[segment]
        return segment.to(self.device), position.to(self.device)


@plain_lru_cache(64)
def varlen_plan(segments, batch: int, device: torch.device) -> VarlenPlan:
    return VarlenPlan(segments, batch, device)


def flat(x: torch.Tensor) -> torch.Tensor:
    """``[b, s, h, d] -> [b * s, h, d]`` contiguous (the token-major layout of native varlen kernels)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def lse_from_padded(lse: torch.Tensor, plan: VarlenPlan) -> torch.Tensor:
    """``[num_segments, h, >= max_q]`` (per segment, padded) -> ``[h, total_q]``."""
    segment, position = plan.padded_index()
    return lse[segment, :, position].t()


def lse_to_padded(lse_rows: torch.Tensor, plan: VarlenPlan, width: int) -> torch.Tensor:
    """``[h, total_q]`` -> ``[num_segments, h, width]`` (padding 0: never read for rows that exist)."""
    segment, position = plan.padded_index()
    padded = lse_rows.new_zeros(plan.num_segments, lse_rows.shape[0], width)
    padded[segment, :, position] = lse_rows.t()
    return padded.contiguous()


def lse_to_rows(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Our ``[b, h, s_q]`` -> the varlen kernels' ``[h, b * s_q]``, contiguous, fp32 (fp64 for fp64 ``q``)."""
    lse = lse.to(accumulation_dtype(q.dtype))
    return lse.transpose(0, 1).reshape(lse.shape[1], -1).contiguous()


def varlen_lse(result: tuple, heads: int, total_q: int) -> torch.Tensor:
    """The lse in a varlen kernel's returned tuple: the fp32 ``[h, total_q]`` tensor (its position moved between
    releases; out and q are ``[total_q, h, d]``, rng states 1-d, split-kv accumulators 3-d)."""
    for item in result:
        if isinstance(item, torch.Tensor) and item.dim() == 2 and tuple(item.shape) == (heads, total_q):
            return item
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in result]
    raise RuntimeError(f"no varlen lse of shape ({heads}, {total_q}) among the kernel's results {shapes}")


def empty_varlen_forward(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of a call in which no segment has both queries and keys: out 0, lse -inf."""
    b, s_q, h = q.shape[:3]
    out = torch.zeros(b, s_q, h, v.shape[3], dtype=q.dtype, device=q.device)
    return out, torch.full((b, h, s_q), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)


def empty_varlen_backward(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def varlen_forward_result(out: torch.Tensor, lse_rows: torch.Tensor, plan: VarlenPlan, q: torch.Tensor,
                          v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel ``out [total_q, h, d_v]`` and ``lse [h, total_q]`` -> ours (``[b, s_q, h, d_v]``, ``[b, h, s_q]``
    fp32). Rows of segments without keys become out 0, lse -inf whatever the kernel wrote there (flash-attn 2
    writes lse +inf, others leave NaN or garbage)."""
    b, s_q, h = q.shape[:3]
    lse_rows = lse_rows.to(accumulation_dtype(q.dtype))
    if plan.q_without_keys is not None:  # in place: both are fresh outputs of the kernel (or copies of them)
        out.masked_fill_(plan.q_without_keys[:, None, None], 0)
        lse_rows.masked_fill_(plan.q_without_keys[None, :], float("-inf"))
    lse = lse_rows.reshape(h, b, s_q).transpose(0, 1).contiguous()
    return out.reshape(b, s_q, h, v.shape[3]), lse


def varlen_backward_result(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, plan: VarlenPlan, q, k, v):
    """Flat kernel gradients -> bshd, with exact zeros for query rows without keys and key rows without queries
    (rows a kernel may skip without writing)."""
    if plan.q_without_keys is not None:  # in place: fresh outputs of the kernel
        dq.masked_fill_(plan.q_without_keys[:, None, None], 0)
    if plan.k_without_queries is not None:
        dk.masked_fill_(plan.k_without_queries[:, None, None], 0)
        dv.masked_fill_(plan.k_without_queries[:, None, None], 0)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
