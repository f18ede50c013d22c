"""Local attention kernels returning (out, lse) with a real backward, behind one registry."""
from __future__ import annotations

import torch

from .base import AttentionKernel, accumulation_dtype
from .math import MathKernel
from .registry import check_backend_name, kernel_names, register_kernel, resolve_kernel
from .torch_sdpa import TorchCPUKernel, TorchCUDAEfficientKernel, TorchCUDAFlashKernel


def _any_device(device, dtype, head_dim):
    return None


def _cpu_only(device, dtype, head_dim):
    return None if device.type == "cpu" else f"it runs on CPU tensors, got device {device}"


def _cuda_flash(device, dtype, head_dim):
    if device.type != "cuda":
        return f"it needs CUDA tensors, got device {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it needs float16/bfloat16, got {dtype}"
    if head_dim > 256 or head_dim % 8 != 0:
        return f"it needs head_dim <= 256 and a multiple of 8, got {head_dim}"
    return None


def _cuda_efficient(device, dtype, head_dim):
    if device.type != "cuda":
        return f"it needs CUDA tensors, got device {device}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"it needs float16/bfloat16/float32, got {dtype}"
    return None


register_kernel("math", MathKernel, _any_device, priority=0)
register_kernel("torch_cpu", TorchCPUKernel, _cpu_only, priority=10)
register_kernel("torch_efficient", TorchCUDAEfficientKernel, _cuda_efficient, priority=10)
register_kernel("torch_flash", TorchCUDAFlashKernel, _cuda_flash, priority=20)

__all__ = [
    "AttentionKernel",
    "MathKernel",
    "TorchCPUKernel",
    "TorchCUDAFlashKernel",
    "TorchCUDAEfficientKernel",
    "accumulation_dtype",
    "check_backend_name",
    "kernel_names",
    "register_kernel",
    "resolve_kernel",
]
