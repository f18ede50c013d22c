"""Kernel registry: backends register a factory and an availability check; ``"auto"`` picks the best one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .base import AttentionKernel

# (device, dtype, head_dim) -> None when usable, else the reason it is not
Availability = Callable[[torch.device, torch.dtype, int], Optional[str]]


@dataclass(frozen=True)
class KernelEntry:
    name: str
    factory: Callable[[], AttentionKernel]
    unavailable_reason: Availability
    priority: int  # higher wins under "auto"


_KERNELS: dict[str, KernelEntry] = {}


def register_kernel(
    name: str, factory: Callable[[], AttentionKernel], unavailable_reason: Availability, priority: int = 0
) -> None:
    """Add a backend. The built-in ones and their ``auto`` priorities are in ``kernels/__init__.py``."""
    _KERNELS[name] = KernelEntry(name, factory, unavailable_reason, priority)


# Family names pick the best member available: "torch" = torch_cpu on CPU, torch_cudnn/torch_flash/torch_efficient
# on CUDA.
_FAMILIES = ("auto", "torch")


def kernel_names() -> list[str]:
    return list(_FAMILIES) + sorted(_KERNELS)


def check_backend_name(backend: str) -> None:
    if not isinstance(backend, str) or (backend not in _FAMILIES and backend not in _KERNELS):
        raise ValueError(f"unknown attention backend {backend!r}: choose one of {', '.join(kernel_names())}")


def resolve_kernel(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionKernel:
    """The kernel for ``backend`` on this device/dtype; ``ValueError`` naming the reason if it can't run."""
    check_backend_name(backend)
    if backend not in _FAMILIES:
        entry = _KERNELS[backend]
        reason = entry.unavailable_reason(device, dtype, head_dim)
        if reason is not None:
            raise ValueError(f"attention backend {backend!r} cannot run here: {reason}; use backend='auto'")
        return entry.factory()
    members = [e for e in _KERNELS.values() if backend == "auto" or e.name.startswith(backend + "_")]
    usable = [e for e in members if e.unavailable_reason(device, dtype, head_dim) is None]
    if not usable:
        raise ValueError(f"no {backend!r} attention backend supports device={device}, dtype={dtype}, head_dim={head_dim}")
    return max(usable, key=lambda e: e.priority).factory()
