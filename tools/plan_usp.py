#!/usr/bin/env python
"""Plan Unified Sequence Parallelism: which (TP, ulysses u, ring r, ring_impl) to use, from a cost model.

The model, per transformer layer, forward + backward, on the slowest rank of one SP group:

* attention compute: FLOPs of the pairs (query, key) each rank computes, taken from the ring schedules themselves
  (``megatron_usp.plan.attention_plan``), so the causal load imbalance of each impl is exact;
  forward 4·b·pairs·heads·d, backward 2.5x that; divided by the achieved kernel TFLOPS.
* Ulysses all-to-all: 2 calls forward (q,k,v packed; out) and 2 backward (dout; dq,dk,dv packed); each rank
  sends (u-1)/u of its tensors, over NVLink to peers in its node and over IB to the others. Not overlapped.
* ring (pass K/V): step s posts the next K/V block before computing, so a step takes max(compute, transfer);
  the backward moves K/V and the fp32 dK/dV together, and the last dK/dV hop home is exposed.
  ring (allgather): all-gather K/V forward and again backward, reduce-scatter fp32 dK/dV; nothing overlapped.
  mqsp (pass Q): per micro-chunk, its blocks from the plan's ``MQSPPlan`` and its collectives (gather q; two all-reduces and
  a reduce-scatter forward; gather q, dout, out, lse and reduce-scatter dq backward), not overlapped.
  A machine whose transfers take the rank's own processor (``comm_overlaps_compute=False``) overlaps nothing.
* Megatron TP with sequence parallelism: 4 all-gathers / reduce-scatters forward and 4 backward per layer.
* memory: per-layer saved activations (``megatron_usp.job_cost``, checked against the bytes megatron-core saves)
  x layers + the largest transient buffers of one attention call.

Whole-job planning (``--ffn-hidden``, ``--vocab``, ``--num-layers``): the grid also searches PP (and virtual
stages), DP, activation recompute (none / selective / full), the distributed optimizer and the micro-batch size.
Memory per GPU = parameters + fp32 gradients + Adam states (sharded over DP x CP with the distributed optimizer) +
activations of the (chunk-)micro-batches the 1F1B or interleaved schedule keeps in flight + transients (attention
buffers, one recomputed chunk), from ``megatron_usp.job_cost``; seconds per iteration = (micro-batches + (PP - 1)
/ V) x the slowest stage's micro-batch (layers x (attention as above + GEMMs at the GEMM TFLOPS + memory-bound work
+ the framework's cost per layer + the recompute's extra forward) + the output layer + pipeline sends) + the DP x CP
gradient reduction + the optimizer step. ``tools/measure_hardware.py`` measures these figures on a machine. It prints the winner's Megatron-LM and trainer command lines, and when
nothing fits, the least-memory job's arithmetic and the smallest change (more nodes, shorter sequence) that fits.

The feasibility rules are the library's own (``check_head_counts``, ``check_seq_len``), imported, not copied.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_usp.cost import block_pairs  # noqa: E402
from megatron_usp.flags import (  # noqa: E402
    auto_or, comma_list, none_or, nonnegative_float, one_of, positive_float, positive_int)
from megatron_usp.job_cost import (  # noqa: E402
    GPTShape, JobConfig, JobMemory, check_job, chunk_layers, job_memory, layer_activation_bytes,
    layer_parameter_count, recompute_working_bytes, stage_layers, state_bytes,
)
from megatron_usp.layout import RING_IMPLS, check_seq_len  # noqa: E402
from megatron_usp.plan import attention_plan  # noqa: E402
from megatron_usp.ulysses import check_head_counts, kv_replication  # noqa: E402

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
ACCUMULATION_BYTES = 4  # lse, dq and the travelling dK/dV are fp32
BACKWARD_FLOPS_FACTOR = 2.5  # flash-attention backward (with its recomputation) vs forward
A2A_CALLS = (("q,k,v", "qkv"), ("out", "q"))  # per direction: what each all-to-all carries (heads of q or q+2kv)
TP_COLLECTIVES_PER_LAYER = 8  # sequence-parallel TP: all-gather + reduce-scatter x (attention, MLP) x (fwd, bwd)
IMPL_PREFERENCE = ("zigzag", "stripe", "allgather", "mqsp", "basic")  # tie-break between equal predictions
GIB = 1024**3


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
OPTIMIZER_BYTES_PER_PARAM = 32  # fused Adam: read grad, master, 2 moments; write master, 2 moments, the parameter
ELEMENTWISE_PASSES = 3  # a saved activation is written in the forward, read and its gradient written in the backward


@dataclass(frozen=True)
class ModelShape:
    """The attention problem of one layer."""

    heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    hidden: int = 0  # 0: heads * head_dim
    num_layers: Optional[int] = None
    micro_batch: int = 1
    dtype: str = "bf16"
    causal: bool = True
    # the rest of the GPT, for whole-job planning (0: attention-only planning, as before)
    ffn_hidden: int = 0
    vocab: int = 0
    gated_mlp: bool = True  # SwiGLU
    rmsnorm: bool = True

    @property
    def hidden_size(self) -> int:
        return self.hidden or self.heads * self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class ParallelConfig:
    tp: int
    ulysses: int
    ring: int
    ring_impl: str
    dp: int = 1
    ulysses_inner: bool = True
    micro_q: Optional[int] = None  # mqsp: query rows per micro-chunk (None: all of a rank's rows at once)

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def usp_flags(self) -> str:
        text = f"--ulysses-degree {self.ulysses} --ring-degree {self.ring} --usp-ring-impl {self.ring_impl}"
        text += "" if self.micro_q is None else f" --usp-micro-q {self.micro_q}"
        return text + ("" if self.ulysses_inner else " --usp-ring-inner")

    def flags(self) -> str:
        return f"--tensor-model-parallel-size {self.tp} {self.usp_flags()}"

    def label(self) -> str:
        order = "" if self.ulysses_inner else " ring-inner"
        micro = "" if self.micro_q is None else f"/{self.micro_q}"
        return f"TP={self.tp} u={self.ulysses} r={self.ring} {self.ring_impl}{micro}{order}"


@dataclass
class Prediction:
    """Predicted cost of one config; times in ms per layer (fwd + bwd), memory in GiB per GPU."""

    config: ParallelConfig
    feasible: bool = True
    reason: str = ""
    total_ms: float = 0.0
    compute_ms: float = 0.0
    a2a_ms: float = 0.0
    ring_comm_ms: float = 0.0  # time the ring's transfers take
    ring_exposed_ms: float = 0.0  # the part of it not hidden behind compute
    tp_ms: float = 0.0
    memory_gib: float = 0.0
    imbalance: float = 1.0  # critical-path causal work / mean work
    a2a_link: str = "-"
    ring_link: str = "-"
    kv_replication: int = 1
    a2a_bytes: float = 0.0  # one direction, one rank, all calls
    ring_step_bytes: float = 0.0  # K/V block per step (pass K/V) or per rank (allgather)
    ring_step_compute_ms: float = 0.0  # mean forward compute per ring step
    ring_step_comm_ms: float = 0.0  # forward K/V transfer per step
    notes: list[str] = field(default_factory=list)

    @property
    def exposed_comm_ms(self) -> float:
        return self.a2a_ms + self.ring_exposed_ms + self.tp_ms


# ---------------------------------------------------------------------------------------------------- the model


BlockShape = tuple[int, int, bool]  # (query rows, K/V rows, causal square)


def kernel_efficiency(block: BlockShape, half_efficiency_tokens: float) -> float:
    """Fraction of the long-sequence TFLOPS a kernel reaches on a block with ``cols`` keys: L / (L + L0).
    (FA2 forward, A100, d=128: ~0.5 of its peak at 512 tokens, ~0.8 at 2K, ~0.95 at 8K: L0 ~ 450-500.)"""
    keys = block[1]
    return keys / (keys + half_efficiency_tokens)


@functools.lru_cache(maxsize=4096)
def schedule_blocks(ring_impl: str, seq_len: int, ulysses: int, ring: int, causal: bool) -> tuple[tuple[tuple[BlockShape, ...], ...], ...]:
    """``blocks[step][ring_rank]``: the kernel calls of each rank at each step, from the library's ring schedules."""
    schedules = [attention_plan(seq_len, ulysses, ring, rank, ring_impl, causal, None, None).schedule
                 for rank in range(ring)]
    if schedules[0].transport == "allgather":  # its steps are buffers, not synchronised ring steps: one step
        return (tuple(tuple((b.q_stop - b.q_start, b.kv_stop - b.kv_start, b.causal)
                            for step in sched.steps for b in step.blocks) for sched in schedules),)
    return tuple(
        tuple(
            tuple((b.q_stop - b.q_start, b.kv_stop - b.kv_start, b.causal) for b in sched.steps[step].blocks)
            for sched in schedules
        )
        for step in range(len(schedules[0].steps))
    )


@functools.lru_cache(maxsize=1024)
def mqsp_chunk_blocks(seq_len: int, ulysses: int, ring: int, causal: bool,
                      micro_q: Optional[int]) -> tuple[tuple[tuple[BlockShape, ...], ...], ...]:
    """``blocks[chunk][ring_rank]``: MQSP's kernel calls per micro-chunk (gathered queries x own K/V), from the
    library's plan; the chunk's collectives make the ranks wait for each other, like ring steps."""
    plans = [attention_plan(seq_len, ulysses, ring, rank, "mqsp", causal, micro_q, None).mqsp for rank in range(ring)]
    return tuple(
        tuple(tuple((b.q_stop - b.q_start, b.kv_stop - b.kv_start, b.causal) for b in plan.blocks[chunk])
              for plan in plans)
        for chunk in range(len(plans[0].chunks))
    )


def attention_blocks(config: "ParallelConfig", seq_len: int, causal: bool):
    """Kernel calls per synchronised step and ring rank: ring steps (pass K/V) or MQSP micro-chunks (pass Q)."""
    if config.ring_impl == "mqsp":
        return mqsp_chunk_blocks(seq_len, config.ulysses, config.ring, causal, config.micro_q)
    return schedule_blocks(config.ring_impl, seq_len, config.ulysses, config.ring, causal)


def load_imbalance(ring_impl: str, seq_len: int, ulysses: int, ring: int, causal: bool,
                   micro_q: Optional[int] = None) -> float:
    """Critical-path work / mean work per ring rank, ranks stepping together (the slowest rank sets each step)."""
    steps = attention_blocks(ParallelConfig(1, ulysses, ring, ring_impl, micro_q=micro_q), seq_len, causal)
    work = [[sum(block_pairs(*b) for b in rank_blocks) for rank_blocks in step] for step in steps]
    critical = sum(max(step) for step in work)
    mean = sum(sum(step) for step in work) / ring
    return critical / mean


def step_compute_ms(
    steps: tuple[tuple[tuple[BlockShape, ...], ...], ...], flops_per_pair: float, tflops: float, hardware: "Hardware"
) -> list[float]:
    """Per step, the slowest rank's kernel time: pairs x FLOPs / (TFLOPS x efficiency) + per-call overhead."""
    def rank_ms(blocks: tuple[BlockShape, ...]) -> float:
        return sum(
            (b[0] * b[1] * hardware.causal_fraction if b[2] else block_pairs(*b)) * flops_per_pair
            / (tflops * 1e12 * kernel_efficiency(b, hardware.half_efficiency_tokens)) * 1e3
            + hardware.kernel_overhead_us / 1e3
            for b in blocks
        )
    return [max(rank_ms(blocks) for blocks in step) for step in steps]


def kv_heads_per_tp_rank_after_replication(shape: ModelShape, tp: int, ulysses: int) -> int:
    kv_per_tp = shape.kv_heads // tp
    return kv_per_tp * kv_replication(kv_per_tp, ulysses)


def ulysses_a2a_bytes(shape: ModelShape, tp: int, ulysses: int, ring: int) -> dict[str, float]:
    """Bytes one rank sends in each forward all-to-all (the backward sends the same): (u-1)/u of its tensors."""
    if ulysses == 1:
        return {name: 0.0 for name, _ in A2A_CALLS}
    tokens = shape.micro_batch * shape.seq_len / (ulysses * ring)
    q_heads = shape.heads / tp
    kv_heads = kv_heads_per_tp_rank_after_replication(shape, tp, ulysses)
    heads = {"qkv": q_heads + 2 * kv_heads, "q": q_heads}
    fraction = (ulysses - 1) / ulysses
    return {name: fraction * tokens * heads[kind] * shape.head_dim * shape.dtype_bytes for name, kind in A2A_CALLS}


def ring_kv_block_bytes(shape: ModelShape, tp: int, ulysses: int, ring: int, element_bytes: int) -> float:
    """One ring rank's K/V (or dK/dV) after the all-to-all: s/r tokens x (kv heads / u) x d, K and V."""
    kv_heads = kv_heads_per_tp_rank_after_replication(shape, tp, ulysses) / ulysses
    return 2.0 * shape.micro_batch * (shape.seq_len / ring) * kv_heads * shape.head_dim * element_bytes


def mqsp_query_bytes(shape: ModelShape, config: ParallelConfig) -> float:
    """One rank's query rows of one MQSP micro-chunk (heads / (TP u) after the all-to-all)."""
    rows = mqsp_rows(shape.seq_len, config)
    return shape.micro_batch * rows * shape.heads / (config.tp * config.ulysses) * shape.head_dim * shape.dtype_bytes


def mqsp_rows(seq_len: int, config: ParallelConfig) -> int:
    local = seq_len // config.ring
    return min(config.micro_q or local, local)


def mqsp_chunk_comm_ms(shape: ModelShape, config: ParallelConfig, gbps: float, latency_us: float) -> float:
    """Collectives of one MQSP micro-chunk, forward + backward, ring of r ranks, per-rank piece P: all-gather and
    reduce-scatter (r-1)(latency + P/bw), all-reduce twice that. Forward: gather q, all-reduce the row max and
    the sum of exp (fp32 lse rows), reduce-scatter the fp32 weighted output; backward: gather q, dout, out, gather
    lse, reduce-scatter the fp32 dq (mqsp.py)."""
    r = config.ring
    q = mqsp_query_bytes(shape, config)
    fp32_rows = q / (shape.dtype_bytes * shape.head_dim) * ACCUMULATION_BYTES  # lse: one fp32 per row and head
    fp32_q = q / shape.dtype_bytes * ACCUMULATION_BYTES

    def piece(nbytes: float) -> float:  # all-gather / reduce-scatter of a per-rank piece
        return (r - 1) * (latency_us / 1e3 + nbytes / (gbps * 1e9) * 1e3)

    forward = piece(q) + 2 * 2 * piece(fp32_rows) + piece(fp32_q)
    backward = piece(3 * q) + piece(fp32_rows) + piece(fp32_q)
    return forward + backward


def _rank_of(cluster: Cluster, config: ParallelConfig, ulysses_rank: int, ring_rank: int, tp_rank: int = 0) -> int:
    """Global rank (TP innermost, then the SP group in its order, DP outermost; DP replica 0)."""
    if config.ulysses_inner:
        sp_rank = ring_rank * config.ulysses + ulysses_rank
    else:
        sp_rank = ulysses_rank * config.ring + ring_rank
    return sp_rank * config.tp + tp_rank


def placement(cluster: Cluster, config: ParallelConfig) -> tuple[int, int, bool]:
    """(largest number of a rank's ulysses peers in its own node, ... in other nodes, ring crosses nodes)."""
    node = lambda rank: rank // cluster.gpus_per_node  # noqa: E731
    worst_intra, worst_inter = 0, 0
    for ring_rank in range(config.ring):
        members = [node(_rank_of(cluster, config, i, ring_rank)) for i in range(config.ulysses)]
        for mine in members:
            inter = sum(1 for other in members if other != mine)
            if inter >= worst_inter:
                worst_inter, worst_intra = inter, config.ulysses - 1 - inter
    ring_crosses = any(
        node(_rank_of(cluster, config, i, j)) != node(_rank_of(cluster, config, i, (j + 1) % config.ring))
        for i in range(config.ulysses)
        for j in range(config.ring)
    )
    return worst_intra, worst_inter, ring_crosses


def _transfer_ms(nbytes: float, gbps: float, latency_us: float) -> float:
    return 0.0 if nbytes <= 0 else latency_us / 1e3 + nbytes / (gbps * 1e9) * 1e3


def feasibility_reason(shape: ModelShape, cluster: Cluster, config: ParallelConfig) -> str:
    """Why ``config`` cannot run (empty string when it can), by the library's and Megatron's rules."""
    if cluster.gpus_per_node % config.tp != 0:
        return f"TP {config.tp} must divide the {cluster.gpus_per_node} GPUs per node"
    if config.tp * config.sp * config.dp != cluster.world:
        return f"TP {config.tp} x u {config.ulysses} x r {config.ring} x DP {config.dp} != {cluster.world} GPUs"
    if shape.heads % config.tp != 0:
        return f"heads ({shape.heads}) not divisible by TP {config.tp}"
    if shape.kv_heads % config.tp != 0:
        return f"kv heads ({shape.kv_heads}) not divisible by TP {config.tp}"
    try:
        check_head_counts(shape.heads // config.tp, shape.kv_heads // config.tp, config.ulysses)
    except ValueError as error:
        return f"per TP rank: {error}"
    try:
        check_seq_len(shape.seq_len, config.ulysses, config.ring, config.ring_impl)
    except ValueError as error:
        return str(error)
    if config.micro_q is not None and config.ring_impl != "mqsp":
        return f"micro_q {config.micro_q} needs ring_impl mqsp"
    return ""


def gpt_shape(shape: ModelShape, micro_batch: Optional[int] = None) -> GPTShape:
    """The job_cost view of ``shape``; without --ffn-hidden: a GPT MLP of 4 x hidden (GELU), no vocabulary."""
    return GPTShape(num_layers=shape.num_layers or 1, hidden=shape.hidden_size, heads=shape.heads,
                    kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                    ffn_hidden=shape.ffn_hidden or 4 * shape.hidden_size, vocab=shape.vocab, seq_len=shape.seq_len,
                    micro_batch=micro_batch or shape.micro_batch, dtype_bytes=shape.dtype_bytes,
                    gated_mlp=bool(shape.ffn_hidden) and shape.gated_mlp, rmsnorm=shape.rmsnorm)


def attention_transient_bytes(shape: ModelShape, config: ParallelConfig) -> float:
    """The largest buffers one attention call holds while it runs (not saved for backward)."""
    dt = shape.dtype_bytes
    q_bytes = shape.micro_batch * shape.seq_len / config.ring * shape.heads / (config.tp * config.ulysses) \
        * shape.head_dim * dt
    kv_block = ring_kv_block_bytes(shape, config.tp, config.ulysses, config.ring, dt)
    dkv_block = ring_kv_block_bytes(shape, config.tp, config.ulysses, config.ring, ACCUMULATION_BYTES)
    dq_accumulator = q_bytes / dt * ACCUMULATION_BYTES
    if config.ring_impl == "allgather" and config.ring > 1:
        return config.ring * (kv_block + dkv_block) + dq_accumulator  # gathered K/V and its fp32 gradient
    if config.ring_impl == "mqsp" and config.ring > 1:
        # backward of one chunk: gathered q, dout, out (r x the rank's rows) + their fp32 dq part, lse; local
        # fp32 dK/dV accumulators; the fp32 dq of the rank's rows
        gathered = config.ring * mqsp_query_bytes(shape, config)
        return 3 * gathered + gathered / dt * ACCUMULATION_BYTES * (1 + 1 / shape.head_dim) + dkv_block + dq_accumulator
    return 2 * kv_block + 3 * dkv_block + dq_accumulator  # current + incoming K/V; dK/dV in flight


def memory_gib(shape: ModelShape, config: ParallelConfig) -> float:
    """Activations one GPU holds without recompute or PP (megatron_usp.job_cost, sequence parallel with TP):
    saved per layer x layers, plus one attention call's transient buffers."""
    job = JobConfig(tp=config.tp, ulysses=config.ulysses, ring=config.ring, sequence_parallel=config.tp > 1)
    per_layer = sum(layer_activation_bytes(gpt_shape(shape), job).values())
    return ((shape.num_layers or 1) * per_layer + attention_transient_bytes(shape, config)) / GIB


def predict(
    shape: ModelShape,
    cluster: Cluster,
    hardware: Hardware,
    config: ParallelConfig,
    *,
    other_memory_gib: Optional[float] = None,
    check: bool = True,
) -> Prediction:
    """Predicted ms per layer (fwd + bwd) of ``config``; ``check=False`` skips the feasibility rules."""
    prediction = Prediction(config)
    if check:
        reason = feasibility_reason(shape, cluster, config)
        if reason:
            return replace(prediction, feasible=False, reason=reason)
    u, r, tp = config.ulysses, config.ring, config.tp
    intra_peers, inter_peers, ring_crosses = placement(cluster, config)

    # attention compute, from the schedules
    steps = attention_blocks(config, shape.seq_len, shape.causal)
    heads_per_rank = shape.heads / (tp * u)
    flops_per_pair = 4.0 * shape.micro_batch * heads_per_rank * shape.head_dim
    fwd_steps = step_compute_ms(steps, flops_per_pair, hardware.fwd_tflops, hardware)
    bwd_steps = step_compute_ms(steps, flops_per_pair * BACKWARD_FLOPS_FACTOR, hardware.bwd_tflops, hardware)
    prediction.compute_ms = sum(fwd_steps) + sum(bwd_steps)
    prediction.imbalance = load_imbalance(config.ring_impl, shape.seq_len, u, r, shape.causal, config.micro_q)

    # Ulysses all-to-all
    prediction.kv_replication = kv_replication(shape.kv_heads // tp, u)
    if u > 1:
        per_call = ulysses_a2a_bytes(shape, tp, u, r)
        latency = hardware.inter_latency_us if inter_peers else hardware.intra_latency_us
        a2a_fwd = 0.0
        for nbytes in per_call.values():
            intra_bytes = nbytes * intra_peers / (u - 1)
            inter_bytes = nbytes * inter_peers / (u - 1)
            a2a_fwd += latency / 1e3 + max(intra_bytes / hardware.intra_node_gbps, inter_bytes / hardware.inter_node_gbps) / 1e6
        prediction.a2a_ms = 2 * a2a_fwd
        prediction.a2a_bytes = sum(per_call.values())
        prediction.a2a_link = "IB" if inter_peers else "NVLink"

    # ring
    if r > 1:
        gbps = hardware.inter_node_gbps if ring_crosses else hardware.intra_node_gbps
        latency = hardware.inter_latency_us if ring_crosses else hardware.intra_latency_us
        prediction.ring_link = "IB" if ring_crosses else "NVLink"
        kv_block = ring_kv_block_bytes(shape, tp, u, r, shape.dtype_bytes)
        dkv_block = ring_kv_block_bytes(shape, tp, u, r, ACCUMULATION_BYTES)
        prediction.ring_step_bytes = kv_block
        if config.ring_impl == "mqsp":  # pass Q: per chunk, collectives the chunk's kernels wait for
            comm = mqsp_chunk_comm_ms(shape, config, gbps, latency)
            prediction.ring_comm_ms = prediction.ring_exposed_ms = len(steps) * comm
            prediction.ring_step_bytes = mqsp_query_bytes(shape, config)
            prediction.ring_step_comm_ms = comm
            prediction.ring_step_compute_ms = sum(fwd_steps) / len(steps)
        elif config.ring_impl == "allgather":
            gather = (r - 1) * _transfer_ms(kv_block, gbps, latency)
            scatter = (r - 1) * _transfer_ms(dkv_block, gbps, latency)
            prediction.ring_comm_ms = prediction.ring_exposed_ms = 2 * gather + scatter  # gathered again in bwd
            prediction.ring_step_comm_ms = gather
            prediction.ring_step_compute_ms = fwd_steps[0]
        else:
            kv_ms = _transfer_ms(kv_block, gbps, latency)
            both = max if hardware.comm_overlaps_compute else (lambda c, comm: c + comm)
            fwd_ms = sum(both(c, kv_ms) for c in fwd_steps[:-1]) + fwd_steps[-1]
            bwd_ms, bwd_comm = 0.0, 0.0
            for s, c in enumerate(bwd_steps):  # K/V for the next step and dK/dV of the previous share the link
                moving = (kv_block if s < r - 1 else 0.0) + (dkv_block if s > 0 else 0.0)
                comm = _transfer_ms(moving, gbps, latency)
                bwd_ms += both(c, comm)
                bwd_comm += comm
            last_dkv_home = _transfer_ms(dkv_block, gbps, latency)
            bwd_ms += last_dkv_home
            prediction.ring_comm_ms = (r - 1) * kv_ms + bwd_comm + last_dkv_home
            prediction.ring_exposed_ms = fwd_ms + bwd_ms - prediction.compute_ms
            prediction.ring_step_comm_ms = kv_ms
            prediction.ring_step_compute_ms = sum(fwd_steps) / r

    # Megatron TP collectives of the layer (sequence parallel), inside the node
    if tp > 1:
        gathered = shape.micro_batch * shape.seq_len / config.sp * shape.hidden_size * shape.dtype_bytes
        one = (tp - 1) * hardware.intra_latency_us / 1e3 + (tp - 1) / tp * gathered / (hardware.intra_node_gbps * 1e6)
        prediction.tp_ms = TP_COLLECTIVES_PER_LAYER * one

    prediction.total_ms = prediction.compute_ms + prediction.exposed_comm_ms
    prediction.memory_gib = memory_gib(shape, config)
    budget = hardware.gpu_memory_gib - (hardware.gpu_memory_gib / 2 if other_memory_gib is None else other_memory_gib)
    if check and prediction.memory_gib > budget:
        prediction.feasible = False
        layers = f"{shape.num_layers} layers" if shape.num_layers else "1 layer"
        prediction.reason = (f"memory: activations of {layers} need {prediction.memory_gib:.1f} GiB > "
                             f"{budget:.1f} GiB left for them")
    if prediction.kv_replication > 1:
        prediction.notes.append(f"kv heads x{prediction.kv_replication} (replicated)")
    if prediction.a2a_link == "IB":
        prediction.notes.append("a2a crosses nodes")
    if shape.causal and prediction.imbalance > 1.01:
        prediction.notes.append(f"causal imbalance {prediction.imbalance:.2f}x")
    return prediction


# ---------------------------------------------------------------------------------------------------- search


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def impl_variants(ring_impls: Sequence[str], ring: int, micro_qs: Sequence[Optional[int]]) -> list[tuple[str, Optional[int]]]:
    """(ring_impl, micro_q) pairs to try; with r == 1 every impl runs the same local attention: the preferred one."""
    if ring == 1:
        return [(sorted(ring_impls, key=lambda i: IMPL_PREFERENCE.index(i) if i in IMPL_PREFERENCE else 99)[0], None)]
    return [(impl, micro_q) for impl in ring_impls for micro_q in (micro_qs if impl == "mqsp" else (None,))]


def enumerate_configs(
    cluster: Cluster, tp_choices: Sequence[int], ring_impls: Sequence[str], dp: int, orders: Sequence[bool],
    micro_qs: Sequence[Optional[int]] = (None,),
) -> list[ParallelConfig]:
    configs = []
    for tp in tp_choices:
        if cluster.world % (tp * dp) != 0:
            continue
        sp = cluster.world // (tp * dp)
        for u in _divisors(sp):
            for impl, micro_q in impl_variants(ring_impls, sp // u, micro_qs):
                for inner in orders:
                    if not inner and (u == 1 or sp // u == 1):
                        continue  # the order only matters with both degrees > 1
                    configs.append(ParallelConfig(tp, u, sp // u, impl, dp, inner, micro_q))
    return configs


def plan(
    shape: ModelShape,
    cluster: Cluster,
    hardware: Hardware,
    *,
    tp_choices: Sequence[int],
    ring_impls: Sequence[str] = RING_IMPLS,
    dp: int = 1,
    orders: Sequence[bool] = (True,),
    other_memory_gib: Optional[float] = None,
    micro_qs: Sequence[Optional[int]] = (None,),
) -> tuple[list[Prediction], list[Prediction]]:
    """(feasible predictions ranked fastest first, infeasible ones with their reasons)."""
    feasible, infeasible = [], []
    for config in enumerate_configs(cluster, tp_choices, ring_impls, dp, orders, micro_qs):
        prediction = predict(shape, cluster, hardware, config, other_memory_gib=other_memory_gib)
        (feasible if prediction.feasible else infeasible).append(prediction)
    # r == 1: every impl runs the same local attention; keep one of them
    seen: dict[tuple, Prediction] = {}
    ranked = []
    for p in sorted(feasible, key=lambda p: (round(p.total_ms, 9), IMPL_PREFERENCE.index(p.config.ring_impl))):
        key = (p.config.tp, p.config.ulysses, p.config.ring, p.config.ulysses_inner)
        if p.config.ring == 1 and key in seen:
            continue
        seen[key] = p
        ranked.append(p)
    return ranked, infeasible


# ---------------------------------------------------------------------------------------------------- whole job

RECOMPUTE_CHOICES = ("none", "selective", "full")
DEFAULT_RESERVE_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation, workspace


@dataclass(frozen=True)
class JobChoice:
    """What a whole Megatron job adds to the attention grid: PP, DP, recompute, optimizer, batch."""

    pp: int = 1
    dp: int = 1
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    distributed_optimizer: bool = True
    micro_batch: int = 1
    global_batch: int = 1
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    first_stage_layers: Optional[int] = None  # uneven stages: --decoder-first-pipeline-num-layers
    last_stage_layers: Optional[int] = None  # --decoder-last-pipeline-num-layers

    @property
    def micro_batches(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def label(self) -> str:
        rc = self.recompute if self.recompute != "full" else \
            f"full {self.recompute_method}/{self.recompute_num_layers}"
        vpp = f"x{self.virtual_stages}v" if self.virtual_stages > 1 else ""
        if self.first_stage_layers is not None:
            vpp += f"[{self.first_stage_layers}..{self.last_stage_layers}]"
        return (f"PP={self.pp}{vpp} DP={self.dp} mbs={self.micro_batch}x{self.micro_batches} rc={rc} "
                f"distopt={'on' if self.distributed_optimizer else 'off'}")


@dataclass
class JobPrediction:
    attention: Prediction  # per layer, one micro-batch
    job: JobChoice
    feasible: bool = True
    reason: str = ""
    memory: Optional[JobMemory] = None
    transient_gib: float = 0.0  # attention buffers + the recompute working set
    memory_gib: float = 0.0
    budget_gib: float = 0.0
    layer_ms: float = 0.0  # one layer, one micro-batch, fwd + bwd (+ recompute)
    gemm_ms: float = 0.0
    recompute_ms: float = 0.0
    elementwise_ms: float = 0.0
    overhead_ms: float = 0.0  # the framework's fixed cost per layer
    optimizer_ms: float = 0.0  # per iteration
    p2p_ms: float = 0.0  # pipeline sends and receives of one stage, one micro-batch
    stage_ms: float = 0.0  # the slowest stage, one micro-batch
    bubble_ms: float = 0.0
    grad_sync_ms: float = 0.0
    iteration_s: float = 0.0

    @property
    def config(self) -> ParallelConfig:
        return self.attention.config

    def label(self) -> str:
        return f"{self.attention.config.label()} {self.job.label()}"


def job_config(config: ParallelConfig, choice: JobChoice) -> JobConfig:
    return JobConfig(tp=config.tp, pp=choice.pp, ulysses=config.ulysses, ring=config.ring, dp=choice.dp,
                     recompute=choice.recompute, recompute_method=choice.recompute_method,
                     recompute_num_layers=choice.recompute_num_layers,
                     distributed_optimizer=choice.distributed_optimizer, micro_batches=choice.micro_batches,
                     sequence_parallel=config.tp > 1, virtual_stages=choice.virtual_stages,
                     first_stage_layers=choice.first_stage_layers, last_stage_layers=choice.last_stage_layers)


def predict_job(shape: ModelShape, cluster: Cluster, hardware: Hardware, config: ParallelConfig, choice: JobChoice,
                reserve_gib: float = DEFAULT_RESERVE_GIB) -> JobPrediction:
    """Memory per GPU (states + in-flight activations + transients) and seconds per iteration of a whole job:
    (micro-batches + (PP - 1) / V) x the slowest stage's micro-batch (the 1F1B bubble, V virtual stages shrink it)
    + the DP x CP gradient reduction."""
    mb_shape = replace(shape, micro_batch=choice.micro_batch)
    gpt, job = gpt_shape(mb_shape), job_config(config, choice)
    # the attention grid sees PP as more replicas: TP and the SP group are placed the same way
    grid = replace(config, dp=choice.dp * choice.pp)
    reason = check_job(gpt, job) or feasibility_reason(mb_shape, cluster, grid)
    if not reason and choice.global_batch % (choice.dp * choice.micro_batch):
        reason = f"global batch {choice.global_batch} not divisible by DP {choice.dp} x micro-batch {choice.micro_batch}"
    attention = predict(mb_shape, cluster, hardware, grid, check=False)
    result = JobPrediction(attention, choice, budget_gib=hardware.gpu_memory_gib - reserve_gib)
    if reason:
        result.feasible, result.reason = False, reason
        return result
    memory = job_memory(gpt, job)
    result.memory = memory
    result.transient_gib = (attention_transient_bytes(mb_shape, config) + recompute_working_bytes(gpt, job)) / GIB
    result.memory_gib = memory.total / GIB + result.transient_gib

    # time: attention (modelled above) + the layer's GEMMs + the recompute's extra forward
    tokens = choice.micro_batch * shape.seq_len / config.sp
    layer_params = layer_parameter_count(gpt, job, norms=False)
    gemm_tflops = hardware.gemm_tflops or 2 * hardware.fwd_tflops
    gemm_fwd = 2.0 * tokens * layer_params / (gemm_tflops * 1e12) * 1e3
    result.gemm_ms = 3 * gemm_fwd
    attn_fwd = attention.compute_ms / (1 + BACKWARD_FLOPS_FACTOR * hardware.fwd_tflops / hardware.bwd_tflops)
    attn_fwd_all = attn_fwd + attention.a2a_ms / 2 + attention.ring_exposed_ms / 3
    layers = stage_layers(gpt, job)
    # memory-bound elementwise work (norms, RoPE, activation, residuals) and the framework's cost per layer
    if hardware.memory_gbps:
        saved = sum(layer_activation_bytes(gpt, replace(job, recompute="none")).values())
        result.elementwise_ms = ELEMENTWISE_PASSES * saved / (hardware.memory_gbps * 1e9) * 1e3
    result.overhead_ms = hardware.layer_overhead_us / 1e3
    if choice.recompute == "full":  # a recomputed forward: a third of the GEMMs, elementwise work and overhead
        chunk = chunk_layers(gpt, job)
        recomputed = chunk if choice.recompute_method == "uniform" else min(choice.recompute_num_layers, chunk)
        result.recompute_ms = recomputed / chunk * (attn_fwd_all + gemm_fwd + attention.tp_ms / 2
                                                    + (result.elementwise_ms + result.overhead_ms) / 3)
    elif choice.recompute == "selective":
        result.recompute_ms = attn_fwd_all
    result.layer_ms = (attention.total_ms + result.gemm_ms + result.recompute_ms + result.elementwise_ms
                       + result.overhead_ms)
    head_ms = 3 * 2.0 * tokens * gpt.vocab * gpt.hidden / config.tp / (gemm_tflops * 1e12) * 1e3
    if hardware.memory_gbps:  # the fp32 logits: softmax forward, its gradient backward
        head_ms += ELEMENTWISE_PASSES * tokens * gpt.vocab / config.tp * FP32_BYTES / (hardware.memory_gbps * 1e9) * 1e3
    if choice.pp > 1:  # each model chunk sends its output forward and receives its gradient back (p2p, not hidden)
        per_send = tokens * gpt.hidden * gpt.dtype_bytes / (config.tp if job.sequence_parallel else 1)
        crosses = cluster.world // choice.pp >= cluster.gpus_per_node  # PP is megatron-core's outermost group
        result.p2p_ms = 2 * choice.virtual_stages * _transfer_ms(
            per_send, hardware.inter_node_gbps if crosses else hardware.intra_node_gbps,
            hardware.inter_latency_us if crosses else hardware.intra_latency_us)
    result.stage_ms = layers * result.layer_ms + head_ms + result.p2p_ms
    m = choice.micro_batches
    result.bubble_ms = (choice.pp - 1) / choice.virtual_stages * result.stage_ms
    # gradient reduction over DP x CP (fp32 buckets; reduce-scatter + bf16 all-gather with the distributed
    # optimizer, all-reduce without), not overlapped with the backward here
    group = choice.dp * config.sp
    if group > 1:
        stage_params = memory.params / gpt.dtype_bytes
        crosses = config.tp * group > cluster.gpus_per_node
        gbps = hardware.inter_node_gbps if crosses else hardware.intra_node_gbps
        fraction = (group - 1) / group
        moved = stage_params * fraction * (FP32_BYTES + gpt.dtype_bytes if choice.distributed_optimizer
                                           else 2 * FP32_BYTES)
        result.grad_sync_ms = moved / (gbps * 1e9) * 1e3
    # the optimizer step over this rank's parameters (its DP x CP shard with the distributed optimizer)
    per_param = hardware.optimizer_ns_per_param or (
        OPTIMIZER_BYTES_PER_PARAM / hardware.memory_gbps if hardware.memory_gbps else 0.0)
    shards = choice.dp * config.sp if choice.distributed_optimizer else 1
    result.optimizer_ms = memory.params / gpt.dtype_bytes / shards * per_param / 1e6
    result.iteration_s = (m * result.stage_ms + result.bubble_ms + result.grad_sync_ms + result.optimizer_ms) / 1e3
    if result.memory_gib > result.budget_gib:
        result.feasible = False
        result.reason = f"memory: {memory_breakdown(result)}"
    return result


FP32_BYTES = 4


def memory_breakdown(p: JobPrediction) -> str:
    m = p.memory
    return (f"params {m.params / GIB:.1f} + grads {m.grads / GIB:.1f} + optimizer {m.optimizer / GIB:.1f} + "
            f"activations {m.activations / GIB:.1f} ({m.in_flight} micro-batch(es) in flight on stage {m.stage}) + "
            f"transient {p.transient_gib:.1f} = {p.memory_gib:.1f} GiB "
            f"{'<=' if p.memory_gib <= p.budget_gib else '>'} {p.budget_gib:.1f} GiB")


def uneven_split(layers: int, pp: int) -> Optional[tuple[int, int]]:
    """``(first, last)`` stage layers for a PP that does not divide the layers (Megatron-LM's
    --decoder-first/last-pipeline-num-layers): the middle stages take ceil(layers / PP) each, as many as fit, and
    the end stages split the rest, the last (which also holds the output layer and loss) the smaller part. None
    when PP > layers."""
    if pp < 2 or pp > layers:
        return None
    for middle in range(-(-layers // pp), 0, -1):
        rest = layers - middle * (pp - 2)
        if rest >= 2:
            return rest - rest // 2, rest // 2
    return None


def pipeline_splits(layers: int, world_over_tp_sp: int,
                    pp_choices: Optional[Sequence[int]]) -> list[tuple[int, Optional[tuple[int, int]]]]:
    """``(PP, uneven (first, last) or None)`` for each PP of ``pp_choices`` (None: every divisor of the GPUs left
    for PP x DP, up to the layers) that divides those GPUs: an even split where PP divides the layers, else
    :func:`uneven_split`."""
    splits = []
    for pp in pp_choices or [p for p in _divisors(world_over_tp_sp) if p <= layers]:
        if world_over_tp_sp % pp:
            continue
        uneven = None if layers % pp == 0 else uneven_split(layers, pp)
        if layers % pp == 0 or uneven is not None:
            splits.append((pp, uneven))
    return splits


def job_choices(shape: ModelShape, world_over_tp_sp: int, *, pp_choices: Optional[Sequence[int]],
                recomputes: Sequence[str], distributed_optimizers: Sequence[bool], micro_batches: Sequence[int],
                global_batch: int, virtual_stages: Optional[Sequence[int]] = (1,)) -> list[JobChoice]:
    """``pp_choices``: None = every PP the GPUs allow (uneven stages where it does not divide the layers);
    ``virtual_stages``: model chunks per pipeline rank to try (None: every divisor of the layers per stage; uneven
    stages are planned without them)."""
    choices = []
    layers = shape.num_layers or 1
    for pp, uneven in pipeline_splits(layers, world_over_tp_sp, pp_choices):
        dp = world_over_tp_sp // pp
        first, last = uneven or (None, None)
        for vpp in (virtual_stages or _divisors(layers // pp)) if pp > 1 and uneven is None else (1,):
            if layers % (pp * vpp) and uneven is None:
                continue
            if uneven:  # the fullest stage (recompute blocks are sized from it)
                chunk = max(first, last, (layers - first - last) // (pp - 2) if pp > 2 else 0)
            else:
                chunk = layers // (pp * vpp)
            for mbs in micro_batches:
                if global_batch % (dp * mbs):
                    continue
                for recompute in recomputes:
                    # full: uniform chunks of 1 layer (least memory); block over half a model chunk (less recompute)
                    variants = [("uniform", 1)] if recompute != "full" else [("uniform", 1), ("block", chunk // 2)]
                    for method, count in variants:
                        if count < 1:
                            continue
                        for distopt in distributed_optimizers:
                            choices.append(JobChoice(pp, dp, recompute, method, count, distopt, mbs, global_batch,
                                                     vpp, first, last))
    return choices


def plan_job(
    shape: ModelShape,
    cluster: Cluster,
    hardware: Hardware,
    *,
    tp_choices: Sequence[int],
    ring_impls: Sequence[str] = RING_IMPLS,
    orders: Sequence[bool] = (True,),
    pp_choices: Optional[Sequence[int]] = None,
    recomputes: Sequence[str] = RECOMPUTE_CHOICES,
    distributed_optimizers: Sequence[bool] = (True, False),
    micro_batches: Sequence[int] = (1,),
    global_batch: int = 0,
    reserve_gib: float = DEFAULT_RESERVE_GIB,
    virtual_stages: Optional[Sequence[int]] = (1,),
    micro_qs: Sequence[Optional[int]] = (None,),
) -> tuple[list[JobPrediction], list[JobPrediction]]:
    """(feasible jobs ranked by seconds per iteration, infeasible ones); the global batch defaults to the world."""
    global_batch = global_batch or cluster.world
    feasible, infeasible = [], []
    for tp in tp_choices:
        if cluster.world % tp or cluster.gpus_per_node % tp:
            continue
        for sp in _divisors(cluster.world // tp):
            rest = cluster.world // (tp * sp)
            choices = job_choices(shape, rest, pp_choices=pp_choices, recomputes=recomputes,
                                  distributed_optimizers=distributed_optimizers, micro_batches=micro_batches,
                                  global_batch=global_batch, virtual_stages=virtual_stages)
            for u in _divisors(sp):
                for impl, micro_q in impl_variants(ring_impls, sp // u, micro_qs):
                    for inner in orders:
                        if not inner and (u == 1 or sp // u == 1):
                            continue
                        config = ParallelConfig(tp, u, sp // u, impl, 1, inner, micro_q)
                        for choice in choices:
                            p = predict_job(shape, cluster, hardware, config, choice, reserve_gib)
                            (feasible if p.feasible else infeasible).append(p)
    feasible.sort(key=lambda p: (round(p.iteration_s, 9), p.memory_gib, IMPL_PREFERENCE.index(p.config.ring_impl)
                                 if p.config.ring_impl in IMPL_PREFERENCE else len(IMPL_PREFERENCE)))
    return feasible, infeasible


def states_floor(shape: ModelShape, cluster: Cluster) -> Optional[tuple[float, int, int]]:
    """``(GiB, TP, PP)``: the least parameters + fp32 gradients a rank of the fullest pipeline stage holds over every
    TP (inside a node) and PP (dividing the GPUs per TP group; uneven stages where it does not divide the layers)
    of ``cluster``. No DP, CP, recompute or
    optimizer sharding reduces them, so a job whose floor exceeds the budget cannot fit however it is searched.
    None when no TP x PP fits the cluster."""
    gpt, best = gpt_shape(shape), None
    for tp in _divisors(cluster.gpus_per_node):
        if cluster.world % tp:
            continue
        for pp, uneven in pipeline_splits(gpt.num_layers, cluster.world // tp, None):
            first, last = uneven or (None, None)
            job = JobConfig(tp=tp, pp=pp, first_stage_layers=first, last_stage_layers=last)
            states = max(sum(state_bytes(gpt, job, stage)[part] for part in ("params", "grads"))
                         for stage in (0, pp // 2, pp - 1))  # the embedding / output stages, and a middle one
            if best is None or states < best[0]:
                best = (states, tp, pp)
    return None if best is None else (best[0] / GIB, best[1], best[2])


def _floor_reason(shape: ModelShape, cluster: Cluster, budget_gib: float) -> Optional[str]:
    """Why no search on ``cluster`` (any restriction lifted) can fit, or None when the floor fits."""
    floor = states_floor(shape, cluster)
    if floor is not None and floor[0] <= budget_gib:
        return None
    if floor is None:
        return f"no TP x PP divides {cluster.world} GPUs and {shape.num_layers} layers"
    gib, tp, pp = floor
    return (f"parameters + fp32 gradients alone need {gib:.1f} GiB per GPU at best (TP {tp}, PP {pp} of the "
            f"{cluster.world // tp} GPUs per TP group) > {budget_gib:.1f} GiB on {cluster.world} GPUs")


def smallest_change(shape: ModelShape, cluster: Cluster, hardware: Hardware, infeasible: Sequence[JobPrediction],
                    **search) -> list[str]:
    """When nothing fits: the least-memory job and its arithmetic, then the smallest change that makes one fit:
    lifting the user's restrictions (recompute, then PP, the distributed optimizer, TP), more nodes (x2, x4, x8)
    or a shorter sequence (halved, down to 1/8); else 'cannot fit'. Searches that cannot succeed are skipped:
    where the parameters and gradients alone exceed the budget (:func:`states_floor`), neither lifting a
    restriction, a shorter sequence nor that many more nodes help, so the answer comes as fast as a feasible one."""
    lines = []
    sized = [p for p in infeasible if p.memory is not None]
    if sized:
        least = min(sized, key=lambda p: p.memory_gib)
        lines.append(f"least memory: {least.label()}: {memory_breakdown(least)}")
    else:
        lines.append("no grid passes the divisibility rules; first reason: " + (infeasible[0].reason if infeasible else "-"))
    budget = hardware.gpu_memory_gib - search.get("reserve_gib", DEFAULT_RESERVE_GIB)
    here = _floor_reason(shape, cluster, budget)
    if here is not None:
        largest = Cluster(cluster.gpus_per_node, cluster.nodes * 8)
        beyond = _floor_reason(shape, largest, budget)
        if beyond is not None:
            return lines + [f"cannot fit: {here}; with 8x the nodes: {beyond}"]
    # lift the user's restrictions one after another: recompute, then PP, the distributed optimizer, TP
    relaxed, lifted = dict(search), []
    for name, key, value in () if here is not None else (("--recompute auto", "recomputes", RECOMPUTE_CHOICES), ("--pp auto", "pp_choices", None),
                             ("--distributed-optimizer auto", "distributed_optimizers", (True, False)),
                             ("--tp auto", "tp_choices", _divisors(cluster.gpus_per_node))):
        if key in relaxed and relaxed[key] != value and tuple(relaxed[key] or ()) != tuple(value or ()):
            relaxed[key] = value
            lifted.append(name)
            ranked, _ = plan_job(shape, cluster, hardware, **relaxed)
            if ranked:
                return lines + [f"fits with {' '.join(lifted)}: {ranked[0].label()}, {ranked[0].memory_gib:.1f} GiB, "
                                f"{ranked[0].iteration_s:.2f} s/iteration"]
    search = relaxed
    for factor in (2, 4, 8):
        bigger = Cluster(cluster.gpus_per_node, cluster.nodes * factor)
        if _floor_reason(shape, bigger, budget) is not None:
            continue
        ranked, _ = plan_job(shape, bigger, hardware, **search)
        if ranked:
            lines.append(f"fits with {bigger.nodes} nodes ({bigger.world} GPUs): {ranked[0].label()}, "
                         f"{ranked[0].memory_gib:.1f} GiB, {ranked[0].iteration_s:.2f} s/iteration")
            break
    for factor in (2, 4, 8) if here is None else ():  # a shorter sequence leaves the parameters as they are
        shorter = replace(shape, seq_len=shape.seq_len // factor)
        ranked, _ = plan_job(shorter, cluster, hardware, **search)
        if ranked:
            lines.append(f"fits at seq {shorter.seq_len} on {cluster.nodes} nodes: {ranked[0].label()}, "
                         f"{ranked[0].memory_gib:.1f} GiB")
            break
    if len(lines) == 1:
        lines.append("cannot fit: no grid, recompute, PP or optimizer setting, up to 8x the nodes or 1/8 of the "
                     "sequence, brings memory under the budget")
    elif lifted:
        lines.insert(1, f"with {' '.join(lifted)}:")
    return lines


def _model_flags(shape: ModelShape) -> list[str]:
    return [f"--num-layers {shape.num_layers} --hidden-size {shape.hidden_size} --ffn-hidden-size {shape.ffn_hidden}",
            f"--num-attention-heads {shape.heads}",
            f"--group-query-attention --num-query-groups {shape.kv_heads}" if shape.kv_heads != shape.heads else ""]


def _job_flags(shape: ModelShape, p: JobPrediction, trainer: bool) -> list[str]:
    c, j = p.config, p.job
    if j.recompute == "none":
        recompute = ""
    elif j.recompute == "selective":
        recompute = "--recompute-granularity selective"
    else:
        recompute = (f"--recompute-granularity full --recompute-method {j.recompute_method} "
                     f"--recompute-num-layers {j.recompute_num_layers}")
    chunk_layers = (shape.num_layers or 1) // (j.pp * j.virtual_stages)
    uneven = "" if j.first_stage_layers is None else (f"--decoder-first-pipeline-num-layers {j.first_stage_layers} "
                                                      f"--decoder-last-pipeline-num-layers {j.last_stage_layers}")
    return [f"--tensor-model-parallel-size {c.tp}" + (" --sequence-parallel" if c.tp > 1 else ""),
            f"--pipeline-model-parallel-size {j.pp}", uneven,
            "" if j.virtual_stages == 1 else f"--num-layers-per-virtual-pipeline-stage {chunk_layers}",
            c.usp_flags(),
            recompute,
            "--use-distributed-optimizer" if j.distributed_optimizer else
            ("--no-use-distributed-optimizer" if trainer else ""),
            f"--micro-batch-size {j.micro_batch} --global-batch-size {j.global_batch}"]


def megatron_lm_command(shape: ModelShape, cluster: Cluster, p: JobPrediction) -> str:
    parts = [f"torchrun --nproc-per-node {cluster.gpus_per_node} --nnodes {cluster.nodes} pretrain_gpt.py",
             *_model_flags(shape),
             f"--kv-channels {shape.head_dim} --seq-length {shape.seq_len} --max-position-embeddings {shape.seq_len}",
             "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear",
             ("--swiglu" if shape.gated_mlp else "") + (" --normalization RMSNorm" if shape.rmsnorm else ""),
             "--bf16" if shape.dtype == "bf16" else ("--fp16" if shape.dtype == "fp16" else ""),
             *_job_flags(shape, p, trainer=False)]
    return " ".join(part.strip() for part in parts if part.strip())


def trainer_command(shape: ModelShape, cluster: Cluster, p: JobPrediction) -> str:
    """The trainer (``python -m megatron_usp.train``) with the same model and grid (it takes Megatron-LM's flags)."""
    parts = [f"torchrun --nproc-per-node {cluster.gpus_per_node} --nnodes {cluster.nodes} -m megatron_usp.train",
             *_model_flags(shape), f"--seq-length {shape.seq_len} --vocab-size {shape.vocab}",
             "--untie-embeddings-and-output-weights --disable-bias-linear",
             ("--swiglu" if shape.gated_mlp else "") + (" --normalization RMSNorm" if shape.rmsnorm else ""),
             "--bf16" if shape.dtype == "bf16" else "", *_job_flags(shape, p, trainer=True)]
    return " ".join(part for part in parts if part)


def format_job_table(ranked: Sequence[JobPrediction], top: Optional[int] = None) -> str:
    header = f"{'#':>3}  {'grid':<72} {'s/iter':>8} {'layer ms':>9} {'bubble':>7} {'grad':>6} {'GiB':>6}"
    lines = [header, "-" * len(header)]
    for i, p in enumerate(ranked[:top] if top else ranked, 1):
        lines.append(f"{i:>3}  {p.label():<72} {p.iteration_s:>8.2f} {p.layer_ms:>9.1f} "
                     f"{p.bubble_ms / 1e3:>6.1f}s {p.grad_sync_ms / 1e3:>5.1f}s {p.memory_gib:>6.1f}")
    return "\n".join(lines)


def explain_job(ranked: Sequence[JobPrediction], shape: ModelShape) -> list[str]:
    if not ranked:
        return []
    best = ranked[0]
    a = best.attention
    lines = [f"winner: {best.label()}",
             f"memory per GPU (stage {best.memory.stage}): {memory_breakdown(best)}",
             f"one layer, one micro-batch: attention {a.total_ms:.1f} ms (compute {a.compute_ms:.1f}, exposed comm "
             f"{a.exposed_comm_ms:.1f}) + GEMMs {best.gemm_ms:.1f} ms + elementwise {best.elementwise_ms:.1f} ms "
             f"+ overhead {best.overhead_ms:.1f} ms + recompute {best.recompute_ms:.1f} ms",
             f"iteration: ({best.job.micro_batches} micro-batches + (PP {best.job.pp} - 1)"
             + (f" / {best.job.virtual_stages} virtual stages" if best.job.virtual_stages > 1 else "") + ") x stage "
             f"{best.stage_ms / 1e3:.2f} s + gradient reduction {best.grad_sync_ms / 1e3:.2f} s + optimizer "
             f"{best.optimizer_ms / 1e3:.2f} s = {best.iteration_s:.2f} s"]
    cheaper = [p for p in ranked if p.job.recompute != best.job.recompute]
    if best.job.recompute != "none" and not any(p.job.recompute == "none" for p in ranked):
        lines.append(f"recompute {best.job.recompute}: no job without recompute fits")
    elif cheaper:
        lines.append(f"best with recompute {cheaper[0].job.recompute}: {cheaper[0].iteration_s:.2f} s/iteration, "
                     f"{cheaper[0].memory_gib:.1f} GiB")
    return lines


# ---------------------------------------------------------------------------------------------------- reports


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def format_table(predictions: Sequence[Prediction], top: Optional[int] = None) -> str:
    header = (f"{'#':>3} {'TP':>3} {'u':>3} {'r':>3} {'impl':<10} {'ms/layer':>9} {'compute':>8} {'a2a':>7} "
              f"{'ring':>7} {'ring exp':>8} {'tp':>6} {'exposed':>8} {'mem GiB':>8}  note")
    lines = [header, "-" * len(header)]
    for index, p in enumerate(predictions[:top] if top else predictions, 1):
        c = p.config
        impl = c.ring_impl + (f"/{c.micro_q}" if c.micro_q else "") + ("*" if not c.ulysses_inner else "")
        links = []
        if c.ulysses > 1:
            links.append(f"a2a {p.a2a_link}")
        if c.ring > 1:
            links.append(f"ring {p.ring_link}")
        note = ", ".join(links + p.notes)
        lines.append(
            f"{index:>3} {c.tp:>3} {c.ulysses:>3} {c.ring:>3} {impl:<10} {p.total_ms:>9.2f} {p.compute_ms:>8.2f} "
            f"{p.a2a_ms:>7.2f} {p.ring_comm_ms:>7.2f} {p.ring_exposed_ms:>8.2f} {p.tp_ms:>6.2f} "
            f"{p.exposed_comm_ms:>8.2f} {p.memory_gib:>8.2f}  {note}"
        )
    return "\n".join(lines)


def _dominant_difference(worse: Prediction, best: Prediction) -> str:
    terms = {
        "compute" + (f" (causal imbalance {worse.imbalance:.2f}x)" if worse.imbalance > 1.01 else ""):
            worse.compute_ms - best.compute_ms,
        f"all-to-all over {worse.a2a_link}": worse.a2a_ms - best.a2a_ms,
        f"exposed ring traffic over {worse.ring_link}": worse.ring_exposed_ms - best.ring_exposed_ms,
        "TP collectives": worse.tp_ms - best.tp_ms,
    }
    name, delta = max(terms.items(), key=lambda item: item[1])
    return f"mostly {name} (+{delta:.2f} ms)"


def explain(ranked: Sequence[Prediction], shape: ModelShape, cluster: Cluster) -> list[str]:
    """A few sentences on why the first config wins."""
    if not ranked:
        return ["no feasible configuration: see the reasons below"]
    best = ranked[0]
    c = best.config
    lines = [f"best: {c.label()} -> {best.total_ms:.2f} ms per layer (fwd+bwd): compute {best.compute_ms:.2f} ms, "
             f"exposed communication {best.exposed_comm_ms:.2f} ms"]
    if c.ulysses > 1:
        where = "stays inside a node (NVLink)" if best.a2a_link == "NVLink" else "crosses nodes (IB)"
        lines.append(f"ulysses all-to-all over {c.ulysses} ranks {where}: 4 calls moving {_mb(best.a2a_bytes)} per "
                     f"direction per rank, {best.a2a_ms:.2f} ms, not overlapped")
    if c.ring > 1:
        where = "spans nodes (IB)" if best.ring_link == "IB" else "stays inside a node (NVLink)"
        if c.ring_impl == "allgather":
            lines.append(f"ring of {c.ring} {where}: all-gather of {_mb(best.ring_step_bytes)} K/V per rank (twice) + "
                         f"fp32 dK/dV reduce-scatter, {best.ring_comm_ms:.2f} ms, not overlapped")
        else:
            hidden = "hidden behind" if best.ring_step_comm_ms <= best.ring_step_compute_ms else "NOT hidden by"
            lines.append(f"ring of {c.ring} {where}: each step moves {_mb(best.ring_step_bytes)} of K/V in "
                         f"{best.ring_step_comm_ms:.3f} ms, {hidden} {best.ring_step_compute_ms:.3f} ms of forward "
                         f"compute per step (exposed in total: {best.ring_exposed_ms:.2f} ms)")
    if shape.causal and c.ring > 1:
        basic = load_imbalance("basic", shape.seq_len, c.ulysses, c.ring, True)
        lines.append(f"{c.ring_impl}: causal work max/mean per ring rank {best.imbalance:.2f}"
                     + (f" (basic: {basic:.2f}, its last ring rank does the most)" if c.ring_impl != "basic" else ""))
    if best.kv_replication > 1:
        lines.append(f"kv heads are replicated {best.kv_replication}x for the all-to-all (kv heads per TP rank < u)")
    alternatives = {}
    for p in ranked[1:]:
        key = (p.config.tp, p.config.ulysses, p.config.ring)
        if key != (c.tp, c.ulysses, c.ring) and key not in alternatives:
            alternatives[key] = p
    runner_up = ranked[1] if len(ranked) > 1 else None
    if runner_up and runner_up.total_ms - best.total_ms < 0.02 * best.total_ms:
        lines.append(f"{runner_up.config.label()} is within {100 * (runner_up.total_ms / best.total_ms - 1):.1f}%: "
                     "inside the model's error, either will do (zigzag is Megatron's own CP layout)")
    for p in list(alternatives.values())[:3]:
        lines.append(f"vs {p.config.label()}: +{p.total_ms - best.total_ms:.2f} ms, {_dominant_difference(p, best)}")
    return lines


def format_infeasible(infeasible: Sequence[Prediction], limit: int = 20) -> list[str]:
    """One line per (TP, u, r, reason), impls merged."""
    grouped: dict[tuple, list[str]] = {}
    for p in infeasible:
        key = (p.config.tp, p.config.ulysses, p.config.ring, p.config.ulysses_inner, p.reason)
        impl = p.config.ring_impl + (f"/{p.config.micro_q}" if p.config.micro_q else "")
        if impl not in grouped.setdefault(key, []):
            grouped[key].append(impl)
    lines = []
    for (tp, u, r, inner, reason), impls in grouped.items():
        order = "" if inner else " ring-inner"
        lines.append(f"TP={tp} u={u} r={r}{order} [{','.join(impls)}]: {reason}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


# ---------------------------------------------------------------------------------------------------- compare


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the (tie-averaged) ranks; nan with < 2 points or no variance."""
    if len(x) != len(y) or len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either list handled); nan with < 2 points or no variance."""
    n = len(x)
    if len(y) != n or n < 2:
        return float("nan")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else float("nan")


def load_bench_records(path: str, mode: Optional[str] = None) -> list[dict]:
    """The records of one mode: "multi-rank" (tools/bench_attention.py) or "job" (tools/bench_job.py); by
    default the file's own mode, "job" if every record is a whole-job record."""
    with open(path) as handle:
        data = json.load(handle)
    records = data.get("records", data) if isinstance(data, dict) else data
    if mode is None:
        mode = "job" if records and all(rec.get("mode") == "job" for rec in records) else "multi-rank"
    return [rec for rec in records if rec.get("mode", "multi-rank") == mode]


def _dtype_name(name: str) -> str:
    return str(name).replace("bfloat16", "bf16").replace("float16", "fp16").replace("float32", "fp32") \
        .replace("float64", "fp64")


def _ranked(rows: list[dict]) -> dict:
    """Rank correlation of the rows' measured_ms vs predicted_ms (rows gain their ranks)."""
    measured = [row["measured_ms"] for row in rows]
    predicted = [row["predicted_ms"] for row in rows]
    for row, m_rank, p_rank in zip(rows, _average_ranks(measured), _average_ranks(predicted)):
        row["measured_rank"], row["predicted_rank"] = m_rank, p_rank
    ratios = sorted(m / p for m, p in zip(measured, predicted) if p > 0)
    return {
        "rows": rows,
        "spearman": spearman(measured, predicted),
        "kendall": kendall_tau(measured, predicted),
        "median_measured_over_predicted": ratios[len(ratios) // 2] if ratios else float("nan"),
        **resolved_pairs(rows),
    }


def resolved_pairs(rows: list[dict]) -> dict:
    """Pairs the measurement itself can order: records that ran several rounds (``rounds_ms``) spread over
    [min, max]; a pair is resolved when its measured medians differ by more than half the sum of the two spreads.
    Returns how many such pairs the prediction orders the same way (empty without rounds)."""
    spreads = []
    for row in rows:
        rounds = row["record"].get("rounds_ms") or []
        if len(rounds) < 2:
            return {}
        spreads.append(max(rounds) - min(rounds))
    resolved = concordant = 0
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            gap = rows[i]["measured_ms"] - rows[j]["measured_ms"]
            if abs(gap) > (spreads[i] + spreads[j]) / 2:
                resolved += 1
                concordant += gap * (rows[i]["predicted_ms"] - rows[j]["predicted_ms"]) > 0
    noise = sorted(spread / row["measured_ms"] for spread, row in zip(spreads, rows))
    return {"resolved_pairs": resolved, "concordant_resolved_pairs": concordant, "pairs": len(rows) * (len(rows) - 1) // 2,
            "median_round_spread": noise[len(noise) // 2]}


def job_from_record(rec: dict, gpus_per_node: Optional[int] = None) -> tuple[ModelShape, Cluster, ParallelConfig,
                                                                           JobChoice]:
    """The whole job a tools/bench_job.py record ran: model shape, cluster, grid and job choice."""
    world = int(rec["world_size"])
    tp, pp = int(rec["tp"]), int(rec["pp"])
    u, r = int(rec["ulysses_degree"]), int(rec["ring_degree"])
    heads = int(rec["heads"])
    shape = ModelShape(heads=heads, kv_heads=int(rec.get("kv_heads", heads)),
                       head_dim=int(rec.get("head_dim", int(rec["hidden"]) // heads)), seq_len=int(rec["seq_len"]),
                       hidden=int(rec["hidden"]), num_layers=int(rec["num_layers"]), dtype=_dtype_name(rec["dtype"]),
                       causal=bool(rec.get("causal", True)), ffn_hidden=int(rec["ffn_hidden"]), vocab=int(rec["vocab"]),
                       gated_mlp=bool(rec.get("swiglu", False)), rmsnorm=bool(rec.get("rmsnorm", False)))
    per_node = gpus_per_node or world
    cluster = Cluster(per_node, max(1, math.ceil(world / per_node)))
    micro_q = rec.get("micro_q")
    config = ParallelConfig(tp, u, r, str(rec["ring_impl"]), 1, bool(rec.get("ulysses_inner", True)),
                            int(micro_q) if micro_q else None)
    choice = JobChoice(pp=pp, dp=world // (tp * pp * u * r), recompute=str(rec.get("recompute", "none")),
                       recompute_method=str(rec.get("recompute_method", "uniform")),
                       recompute_num_layers=int(rec.get("recompute_num_layers", 1)),
                       distributed_optimizer=bool(rec.get("distributed_optimizer", True)),
                       micro_batch=int(rec.get("micro_batch", 1)), global_batch=int(rec["global_batch"]),
                       virtual_stages=int(rec.get("virtual_stages", 1)))
    return shape, cluster, config, choice


def compare_job(records: Sequence[dict], hardware: Hardware, *, gpus_per_node: Optional[int] = None) -> dict:
    """Whole-job ranking check: predict_job's time per iteration of each tools/bench_job.py record (the given
    configuration evaluated, not searched) vs its measured ``time_ms`` per iteration."""
    rows = []
    for rec in records:
        shape, cluster, config, choice = job_from_record(rec, gpus_per_node)
        p = predict_job(shape, cluster, hardware, config, choice, reserve_gib=0.0)
        rows.append({"record": rec, "config": config, "label": p.label(), "measured_ms": float(rec["time_ms"]),
                     "predicted_ms": p.iteration_s * 1e3, "memory_gib": p.memory_gib,
                     "feasible": p.feasible, "reason": p.reason})
    return _ranked(rows)


def compare(
    records: Sequence[dict], hardware: Hardware, *, gpus_per_node: Optional[int] = None, micro_batch: int = 1
) -> dict:
    """Predict each benchmark record's config; rank correlation of predicted vs measured ``time_ms``."""
    rows = []
    for rec in records:
        world = int(rec["world_size"])
        u, r = int(rec["ulysses_degree"]), int(rec["ring_degree"])
        shape = ModelShape(
            heads=int(rec["heads"]), kv_heads=int(rec["kv_heads"]), head_dim=int(rec["head_dim"]),
            seq_len=int(rec["seq_len"]), micro_batch=int(rec.get("batch", rec.get("micro_batch", micro_batch))),
            dtype=str(rec.get("dtype", "bf16")).replace("bfloat16", "bf16").replace("float16", "fp16")
            .replace("float32", "fp32").replace("float64", "fp64"),
            causal=bool(rec["causal"]),
        )
        per_node = gpus_per_node or world
        cluster = Cluster(per_node, max(1, math.ceil(world / per_node)))
        config = ParallelConfig(1, u, r, str(rec["ring_impl"]), dp=max(1, world // (u * r)),
                                ulysses_inner=bool(rec.get("ulysses_inner", True)))
        prediction = predict(shape, cluster, hardware, config, check=False)
        rows.append({"record": rec, "config": config, "measured_ms": float(rec["time_ms"]),
                     "predicted_ms": prediction.total_ms})
    return _ranked(rows)


def format_compare(result: dict) -> str:
    lines = [f"{'meas.#':>6} {'pred.#':>6} {'measured ms':>12} {'predicted ms':>13}  config / problem"]
    for row in sorted(result["rows"], key=lambda row: row["measured_ms"]):
        rec = row["record"]
        if "label" in row:  # a whole-job record
            lines.append(f"{row['measured_rank']:>6g} {row['predicted_rank']:>6g} {row['measured_ms']:>12.1f} "
                         f"{row['predicted_ms']:>13.1f}  {row['label']}")
            continue
        lines.append(
            f"{row['measured_rank']:>6g} {row['predicted_rank']:>6g} {row['measured_ms']:>12.3f} "
            f"{row['predicted_ms']:>13.3f}  u={rec['ulysses_degree']} r={rec['ring_degree']} {rec['ring_impl']} "
            f"{'causal' if rec['causal'] else 'full'} s={rec['seq_len']} h={rec['heads']}/{rec['kv_heads']} "
            f"d={rec['head_dim']} {rec.get('dtype', '')} world={rec['world_size']}"
        )
    lines.append(f"rank correlation, measured vs predicted: Spearman rho = {result['spearman']:.3f}, "
                 f"Kendall tau = {result['kendall']:.3f} over {len(result['rows'])} records; "
                 f"median measured/predicted time = {result['median_measured_over_predicted']:.3g}")
    if "resolved_pairs" in result:
        lines.append(f"pairs the measurement orders (medians apart by more than their rounds' spread): "
                     f"{result['resolved_pairs']} of {result['pairs']}; the prediction orders "
                     f"{result['concordant_resolved_pairs']} of them the same way; median spread of one "
                     f"configuration's rounds = {result['median_round_spread']:.0%} of its time")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--heads", type=positive_int, help="attention heads")
    model.add_argument("--kv-heads", type=positive_int, help="K/V heads (query groups); default = heads")
    model.add_argument("--head-dim", type=positive_int, default=128)
    model.add_argument("--hidden", type=positive_int, default=None, help="hidden size (default: heads x head_dim)")
    model.add_argument("--num-layers", type=positive_int, default=None, help="layers, for the memory check (default: 1)")
    model.add_argument("--seq-len", type=positive_int, help="tokens per sequence")
    model.add_argument("--micro-batch", type=positive_int, default=1)
    model.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    model.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    job = parser.add_argument_group("whole job (given --ffn-hidden and --vocab: plan PP, recompute, optimizer, batch)")
    job.add_argument("--ffn-hidden", type=positive_int, default=None, help="MLP hidden size; turns on whole-job planning")
    job.add_argument("--vocab", type=positive_int, default=None, help="vocabulary size (untied input and output embeddings)")
    job.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=True, help="gated MLP (SwiGLU)")
    job.add_argument("--rmsnorm", action=argparse.BooleanOptionalAction, default=True, help="RMSNorm (else LayerNorm)")
    job.add_argument("--pp", type=auto_or(positive_int), default="auto", help="pipeline stages: 'auto' (every divisor of the layers) or a number")
    job.add_argument("--virtual-stages", type=auto_or(positive_int), default=1,
                     help="model chunks per pipeline rank (interleaved 1F1B): a number, or 'auto' (every divisor of "
                          "the layers per stage)")
    job.add_argument("--recompute", choices=("auto",) + RECOMPUTE_CHOICES, default="auto")
    job.add_argument("--distributed-optimizer", choices=("auto", "on", "off"), default="auto")
    job.add_argument("--micro-batch-sizes", type=comma_list(positive_int), default=[1], help="comma-separated micro-batch sizes to consider")
    job.add_argument("--global-batch-size", type=positive_int, default=None, help="sequences per iteration (default: GPUs)")
    job.add_argument("--reserve-gib", type=nonnegative_float, default=DEFAULT_RESERVE_GIB,
                     help="memory per GPU kept for the CUDA context, NCCL, fragmentation")
    grid = parser.add_argument_group("cluster and grid")
    grid.add_argument("--gpus-per-node", type=positive_int, default=None,
                      help="default 8 (planning) or each record's world size (--compare)")
    grid.add_argument("--nodes", type=positive_int, default=1)
    grid.add_argument("--tp", type=auto_or(positive_int), default=None,
                      help="tensor-parallel size, or 'auto' (every divisor of GPUs per node); default 1, or auto "
                           "when planning a whole job")
    grid.add_argument("--dp", type=positive_int, default=1, help="data-parallel replicas beside each TP x SP block")
    grid.add_argument("--order", choices=("ulysses-inner", "ring-inner", "both"), default="ulysses-inner",
                      help="which group gets adjacent ranks")
    grid.add_argument("--ring-impls", type=comma_list(one_of(RING_IMPLS)), default=list(RING_IMPLS),
                      help="comma-separated ring impls to consider")
    grid.add_argument("--micro-q", type=comma_list(none_or(positive_int)), default=[None, 8192],
                      help="mqsp: comma-separated query rows per micro-chunk to consider ('none': all rows at once)")
    hw = parser.add_argument_group("hardware (a preset, any field overridable)")
    hw.add_argument("--gpu", choices=sorted(PRESETS) + ["custom"], default="h100",
                    help="custom: start from h100 and override with the flags below")
    hw.add_argument("--hardware", metavar="FILE",
                    help="a tools/measure_hardware.py JSON: its measured fields replace the preset's")
    hw.add_argument("--kernel-tflops", type=positive_float, help="achieved attention TFLOPS, forward and backward")
    hw.add_argument("--fwd-tflops", type=positive_float, help="achieved forward attention TFLOPS")
    hw.add_argument("--bwd-tflops", type=positive_float, help="achieved backward attention TFLOPS")
    hw.add_argument("--intra-node-gbps", type=positive_float, help="NVLink GB/s per GPU per direction")
    hw.add_argument("--inter-node-gbps", type=positive_float, help="IB GB/s per GPU per direction")
    hw.add_argument("--latency-us", type=nonnegative_float, help="per-message latency, intra and inter node")
    hw.add_argument("--inter-latency-us", type=nonnegative_float, help="per-message latency across nodes")
    hw.add_argument("--kernel-overhead-us", type=nonnegative_float, help="fixed cost per attention kernel call")
    hw.add_argument("--half-efficiency-tokens", type=nonnegative_float,
                    help="keys per kernel call at which attention reaches half its TFLOPS (small blocks are slow)")
    hw.add_argument("--gpu-memory-gib", type=positive_float)
    hw.add_argument("--other-memory-gib", type=nonnegative_float, default=None,
                    help="attention-only planning (no --ffn-hidden): memory taken by weights, gradients, optimizer, "
                         "workspace (default: half of the GPU); whole-job planning computes them (--reserve-gib)")
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=positive_int, default=10)
    out.add_argument("--json", metavar="PATH", help="write every prediction (and infeasible reasons) as JSON")
    out.add_argument("--compare", metavar="BENCH_JSON",
                     help="rank-correlate predictions with tools/bench_attention.py records (per layer) or "
                          "tools/bench_job.py records (whole job, per iteration) instead of planning")
    return parser


def check_plan_args(parser: argparse.ArgumentParser, args: argparse.Namespace, hardware: Hardware) -> None:
    """Flag pairs that must fit together (parser.error names both: exit 2, no traceback)."""
    gpus_per_node, memory = args.gpus_per_node or 8, hardware.gpu_memory_gib
    if args.kv_heads is not None and args.heads % args.kv_heads:
        parser.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads} (each K/V head serves a group of "
                     "heads)")
    if isinstance(args.tp, int) and gpus_per_node % args.tp:
        parser.error(f"--tp {args.tp} must divide --gpus-per-node {gpus_per_node} (tensor parallelism stays inside "
                     "a node)")
    if isinstance(args.pp, int) and args.num_layers is not None and args.pp > args.num_layers:
        parser.error(f"--pp {args.pp} exceeds --num-layers {args.num_layers} (every stage needs a layer)")
    for flag, value in (("--reserve-gib", args.reserve_gib), ("--other-memory-gib", args.other_memory_gib)):
        if value is not None and value >= memory:
            parser.error(f"{flag} {value:g} leaves nothing of the {memory:g} GiB per GPU (--gpu {args.gpu} / "
                         "--gpu-memory-gib)")


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


def _jsonable(prediction: Prediction) -> dict:
    data = asdict(prediction)
    data["flags"] = prediction.config.flags()
    data["exposed_comm_ms"] = prediction.exposed_comm_ms
    return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        hardware = hardware_from_args(args)
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"--hardware {args.hardware}: cannot read it ({type(error).__name__}: {error})")
    if args.compare:
        try:
            records = load_bench_records(args.compare)
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--compare {args.compare}: cannot read it ({type(error).__name__}: {error})")
        if records and records[0].get("mode") == "job":
            result = compare_job(records, hardware, gpus_per_node=args.gpus_per_node)
        else:
            result = compare(records, hardware, gpus_per_node=args.gpus_per_node, micro_batch=args.micro_batch)
        print(format_compare(result))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({k: v for k, v in result.items() if k != "rows"} | {"rows": [
                    {**{k: v for k, v in row.items() if k != "config"}, "flags": row["config"].flags()}
                    for row in result["rows"]]}, handle, indent=2)
        return 0
    if args.heads is None or args.seq_len is None:
        parser.error("--heads and --seq-len are required (or --compare BENCH_JSON)")
    check_plan_args(parser, args, hardware)
    shape = ModelShape(heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                       seq_len=args.seq_len, hidden=args.hidden or 0, num_layers=args.num_layers,
                       micro_batch=args.micro_batch, dtype=args.dtype, causal=args.causal,
                       ffn_hidden=args.ffn_hidden or 0, vocab=args.vocab or 0, gated_mlp=args.swiglu,
                       rmsnorm=args.rmsnorm)
    cluster = Cluster(args.gpus_per_node or 8, args.nodes)
    tp = args.tp or ("auto" if args.ffn_hidden else 1)
    tp_choices = _divisors(cluster.gpus_per_node) if tp == "auto" else [tp]
    impls, micro_qs = list(dict.fromkeys(args.ring_impls)), list(dict.fromkeys(args.micro_q))
    virtual_stages = None if args.virtual_stages == "auto" else [args.virtual_stages]
    orders = {"ulysses-inner": (True,), "ring-inner": (False,), "both": (True, False)}[args.order]
    if args.ffn_hidden:
        return main_job(args, shape, cluster, hardware, tp_choices, impls, orders, micro_qs, virtual_stages)
    ranked, infeasible = plan(shape, cluster, hardware, tp_choices=tp_choices, ring_impls=impls, dp=args.dp,
                              orders=orders, other_memory_gib=args.other_memory_gib, micro_qs=micro_qs)
    kv = f"{shape.kv_heads} kv heads" if shape.kv_heads != shape.heads else "MHA"
    print(f"{shape.heads} heads ({kv}), head_dim {shape.head_dim}, seq {shape.seq_len}, micro-batch "
          f"{shape.micro_batch}, {shape.dtype}, {'causal' if shape.causal else 'non-causal'}; {cluster.nodes} node(s) x "
          f"{cluster.gpus_per_node} {hardware.name} (attention {hardware.fwd_tflops:g}/{hardware.bwd_tflops:g} TFLOPS "
          f"fwd/bwd, {hardware.intra_node_gbps:g} GB/s in node, {hardware.inter_node_gbps:g} GB/s across)")
    print("ms per layer = attention fwd+bwd on the slowest rank + exposed all-to-all + exposed ring + TP collectives"
          + ("" if shape.num_layers else "; memory for 1 layer (pass --num-layers)"))
    print()
    print(format_table(ranked, args.top))
    print()
    for line in explain(ranked, shape, cluster):
        print("  " + line)
    if ranked:
        print()
        print("use: " + ranked[0].config.flags())
    if infeasible:
        print()
        print("infeasible:")
        for line in format_infeasible(infeasible):
            print("  " + line)
        if not ranked and any(p.reason.startswith("memory:") for p in infeasible):
            print("  (attention-only planning: no recompute, no PP, half the GPU for the rest; pass --ffn-hidden, "
                  "--vocab and --num-layers to plan the whole job)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"ranked": [_jsonable(p) for p in ranked],
                       "infeasible": [{"config": asdict(p.config), "reason": p.reason} for p in infeasible]},
                      handle, indent=2)
    return 0 if ranked else 1


def main_job(args: argparse.Namespace, shape: ModelShape, cluster: Cluster, hardware: Hardware,
             tp_choices: Sequence[int], impls: Sequence[str], orders: Sequence[bool],
             micro_qs: Sequence[Optional[int]] = (None,), virtual_stages: Optional[Sequence[int]] = (1,)) -> int:
    if not shape.num_layers or not shape.vocab:
        raise SystemExit("whole-job planning needs --num-layers and --vocab with --ffn-hidden")
    search = dict(tp_choices=tp_choices, ring_impls=impls, orders=orders,
                  pp_choices=None if args.pp == "auto" else [args.pp],
                  recomputes=RECOMPUTE_CHOICES if args.recompute == "auto" else (args.recompute,),
                  distributed_optimizers={"auto": (True, False), "on": (True,), "off": (False,)}[args.distributed_optimizer],
                  micro_batches=list(dict.fromkeys(args.micro_batch_sizes)),
                  global_batch=args.global_batch_size or 0, reserve_gib=args.reserve_gib, micro_qs=micro_qs,
                  virtual_stages=virtual_stages)
    ranked, infeasible = plan_job(shape, cluster, hardware, **search)
    kv = f"{shape.kv_heads} kv heads" if shape.kv_heads != shape.heads else "MHA"
    print(f"GPT {shape.num_layers} layers, hidden {shape.hidden_size}, {shape.heads} heads ({kv}) x {shape.head_dim}, "
          f"ffn {shape.ffn_hidden}{' SwiGLU' if shape.gated_mlp else ''}, vocab {shape.vocab}, seq {shape.seq_len}, "
          f"{shape.dtype}; {cluster.nodes} node(s) x {cluster.gpus_per_node} {hardware.name} "
          f"({hardware.gpu_memory_gib:g} GiB, {args.reserve_gib:g} reserved)")
    print("s/iter = (micro-batches + (PP - 1) / virtual stages) x slowest stage + DP x CP gradient reduction; memory = params + fp32 "
          "grads + Adam states + in-flight activations + transients (megatron_usp.job_cost)")
    print()
    print(format_job_table(ranked, args.top))
    print()
    if ranked:
        for line in explain_job(ranked, shape):
            print("  " + line)
        print()
        print("Megatron-LM: " + megatron_lm_command(shape, cluster, ranked[0]))
        print("trainer:     " + trainer_command(shape, cluster, ranked[0]))
    else:
        print("no feasible configuration:")
        for line in smallest_change(shape, cluster, hardware, infeasible, **search):
            print("  " + line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"ranked": [{"label": p.label(), "iteration_s": p.iteration_s, "memory_gib": p.memory_gib,
                                   "megatron_lm": megatron_lm_command(shape, cluster, p)} for p in ranked],
                       "infeasible": len(infeasible)}, handle, indent=2)
    return 0 if ranked else 1


if __name__ == "__main__":
    sys.exit(main())
