"""Hardware figures the planner's cost model runs on: the :class:`Hardware` dataclass (achieved attention, GEMM and
memory throughput, link bandwidth and latency, GPU memory), the ``PRESETS`` (a100, h100, h200 and this project's
2-core CPU machine, measured), and :func:`hardware_from_args`, a preset with a ``tools/measure_hardware.py`` file and
the command line's overrides applied."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Hardware:
    """What one GPU (or CPU rank) achieves: attention kernel TFLOPS, link bandwidth per GPU per direction."""

    name: str
    fwd_tflops: float
    bwd_tflops: float
    intra_node_gbps: float  # GB/s per GPU, NVLink (or shared memory)
    inter_node_gbps: float  # GB/s per GPU, InfiniBand / RoCE
    intra_latency_us: float
    inter_latency_us: float
    gpu_memory_gib: float
    kernel_overhead_us: float = 10.0  # per attention kernel call (launch, merge of partial results)
    half_efficiency_tokens: float = 512.0  # keys per block at which the kernel reaches half its TFLOPS
    gemm_tflops: float = 0.0  # achieved dense GEMM TFLOPS (the layer's projections and MLP); 0: 2 x fwd_tflops
    memory_gbps: float = 0.0  # achieved memory bandwidth: a layer's elementwise work (norms, RoPE, activation)
    optimizer_ns_per_param: float = 0.0  # Adam step per parameter; 0: OPTIMIZER_BYTES_PER_PARAM / memory_gbps
    layer_overhead_us: float = 0.0  # framework cost per layer forward + backward (module calls, small kernels)
    causal_fraction: float = 0.5  # a causal square block's time over the full block's (0.5: masked half skipped)
    comm_overlaps_compute: bool = True  # False: a transfer holds the rank's processor (gloo on a CPU core)


# Achieved (not peak) numbers: FA2-class kernels (torch SDPA flash), bf16, head_dim 128, long sequences;
# NCCL bus bandwidth per GPU per direction. Override any of them with the flags, or measure them with
# tools/measure_hardware.py and pass --hardware FILE.
# GEMM TFLOPS: ~2/3 of the dense bf16 peak (A100 312, H100 SXM 989, NVIDIA data sheets), what large
# Megatron GEMMs reach (Megatron-LM's published MFU of 40-50 % for whole 70B+ models includes everything else).
# Memory: ~80 % of the HBM data-sheet bandwidth (A100 80GB 2.0 TB/s, H100 SXM 3.35, H200 4.8). Layer overhead 0 on
# GPUs: kernel launches run ahead of the long kernels of long-sequence layers.
PRESETS: dict[str, Hardware] = {
    "a100": Hardware("a100", 190.0, 150.0, 230.0, 22.0, 8.0, 15.0, 79.2, gemm_tflops=210.0, memory_gbps=1600.0),
    "h100": Hardware("h100", 380.0, 300.0, 360.0, 45.0, 6.0, 12.0, 79.6, gemm_tflops=650.0, memory_gbps=2700.0),
    "h200": Hardware("h200", 400.0, 320.0, 360.0, 45.0, 6.0, 12.0, 139.8, gemm_tflops=650.0, memory_gbps=3800.0),
    # one rank per core of this project's 2-core CPU machine, both cores busy, 1 thread, gloo, fp32: the medians of
    # docs/bench/hardware_cpu.json (tools/measure_hardware.py --concurrent 2, run between tools/bench_job.py's
    # rounds), measured by themselves, not fitted to any whole-job run
    "cpu": Hardware("cpu", 0.0764, 0.0795, 1.92, 1.92, 31.0, 31.0, 64.0, kernel_overhead_us=143.0,
                    half_efficiency_tokens=187.0, gemm_tflops=0.100, memory_gbps=2.41, optimizer_ns_per_param=6.4,
                    layer_overhead_us=10700.0, causal_fraction=0.636, comm_overlaps_compute=False),
}


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    hardware = PRESETS["h100" if args.gpu == "custom" else args.gpu]
    overrides: dict[str, Any] = {"name": args.gpu}
    if args.hardware:
        measured = json.loads(Path(args.hardware).read_text())["hardware"]
        unknown = sorted(set(measured) - {f.name for f in fields(Hardware)})
        if unknown:
            raise SystemExit(f"--hardware {args.hardware}: unknown field(s) {unknown}")
        overrides.update(measured)
    if args.kernel_tflops is not None:
        overrides.update(fwd_tflops=args.kernel_tflops, bwd_tflops=args.kernel_tflops)
    for flag, name in (("fwd_tflops", "fwd_tflops"), ("bwd_tflops", "bwd_tflops"),
                       ("intra_node_gbps", "intra_node_gbps"), ("inter_node_gbps", "inter_node_gbps"),
                       ("kernel_overhead_us", "kernel_overhead_us"),
                       ("half_efficiency_tokens", "half_efficiency_tokens"), ("gpu_memory_gib", "gpu_memory_gib")):
        if getattr(args, flag) is not None:
            overrides[name] = getattr(args, flag)
    if args.latency_us is not None:
        overrides.update(intra_latency_us=args.latency_us, inter_latency_us=args.latency_us)
    if args.inter_latency_us is not None:
        overrides["inter_latency_us"] = args.inter_latency_us
    return replace(hardware, **overrides)
