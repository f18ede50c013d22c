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
