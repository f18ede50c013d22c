"""Local attention kernels returning (out, lse) with a real backward, behind one registry."""
from __future__ import annotations

import torch

from .base import AttentionKernel, accumulation_dtype
from .math import MathKernel
from .registry import check_backend_name, kernel_names, register_kernel, resolve_kernel
from . import _adapt
from .flash import FlashAttn2Kernel, FlashAttn3Kernel, flash_attn2_unavailable, flash_attn3_unavailable
from .te import TEFusedKernel, te_unavailable
from .torch_sdpa import TorchCPUKernel, TorchCUDAEfficientKernel, TorchCUDAFlashKernel, TorchCUDNNKernel

# The "auto" policy, in one place: the highest-priority kernel whose availability check passes for
# (device, dtype, head_dim) wins. Order = expected speed of fwd+bwd on Hopper for bf16/fp16:
# flash-attn 3 (sm90 only) > flash-attn 2 >= torch's cuDNN op > TE fused attention (cuDNN too, but more
# host-side work per call) > torch's flash (FA2 in aten) > torch's mem-efficient (also the only fp32 CUDA
# kernel) ; on CPU torch_cpu > math. The "torch" family picks among the torch_* entries by the same numbers.
AUTO_PRIORITY: dict[str, int] = {
    "flash_attn3": 100,
    "flash_attn2": 80,
    "torch_cudnn": 70,
    "te": 60,
    "torch_flash": 20,
    "torch_efficient": 10,
    "torch_cpu": 10,
    "math": 0,
}


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


def _cuda_cudnn(device, dtype, head_dim):
    reason = _adapt.cuda_half_reason(device, dtype, head_dim, max_head_dim=128, min_capability=(8, 0))
    if reason is not None:
        return reason
    version = _adapt.cudnn_version()
    if version is None:
        return "torch has no cuDNN"
    if version < 90000:
        return f"it needs cuDNN >= 9.0 for fused attention, torch uses {version}"
    return None


for _name, _factory, _reason in (
    ("math", MathKernel, _any_device),
    ("torch_cpu", TorchCPUKernel, _cpu_only),
    ("torch_efficient", TorchCUDAEfficientKernel, _cuda_efficient),
    ("torch_flash", TorchCUDAFlashKernel, _cuda_flash),
    ("torch_cudnn", TorchCUDNNKernel, _cuda_cudnn),
    ("flash_attn2", FlashAttn2Kernel, flash_attn2_unavailable),
    ("flash_attn3", FlashAttn3Kernel, flash_attn3_unavailable),
    ("te", TEFusedKernel, te_unavailable),
):
    register_kernel(_name, _factory, _reason, priority=AUTO_PRIORITY[_name])

__all__ = [
    "AUTO_PRIORITY",
    "AttentionKernel",
    "FlashAttn2Kernel",
    "FlashAttn3Kernel",
    "TEFusedKernel",
    "TorchCUDNNKernel",
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
