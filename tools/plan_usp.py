#!/usr/bin/env python
"""Plan Unified Sequence Parallelism: which (TP, ulysses u, ring r, ring_impl) to use, from a cost model.

The model, per transformer layer, forward + backward, on the slowest rank of one SP group:

* attention compute: FLOPs of the pairs (query, key) each rank computes, taken from the ring schedules themselves
  (``megatron_usp.ring.build_schedule``), so the causal load imbalance of each impl is exact;
  forward 4·b·pairs·heads·d, backward 2.5x that; divided by the achieved kernel TFLOPS.
* Ulysses all-to-all: 2 calls forward (q,k,v packed; out) and 2 backward (dout; dq,dk,dv packed); each rank
  sends (u-1)/u of its tensors, over NVLink to peers in its node and over IB to the others. Not overlapped.
* ring (pass K/V): step s posts the next K/V block before computing, so a step takes max(compute, transfer);
  the backward moves K/V and the fp32 dK/dV together, and the last dK/dV hop home is exposed.
  ring (allgather): all-gather K/V forward and again backward, reduce-scatter fp32 dK/dV; nothing overlapped.
* Megatron TP with sequence parallelism: 4 all-gathers / reduce-scatters forward and 4 backward per layer.
* memory: per-layer saved activations (attention's q, k, v, out, lse exactly; the rest of the layer roughly,
  Korthikanti et al. 2022) x layers + the largest transient buffers of one attention call.

The feasibility rules are the library's own (``check_head_counts``, ``check_seq_len``), imported, not copied.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_usp.cost import attention_flops, block_pairs  # noqa: E402
from megatron_usp.layout import RING_SCHEDULE_IMPLS, check_seq_len  # noqa: E402
from megatron_usp.ring import build_schedule  # noqa: E402
from megatron_usp.ulysses import check_head_counts, kv_replication  # noqa: E402

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
ACCUMULATION_BYTES = 4  # lse, dq and the travelling dK/dV are fp32
BACKWARD_FLOPS_FACTOR = 2.5  # flash-attention backward (with its recomputation) vs forward
A2A_CALLS = (("q,k,v", "qkv"), ("out", "q"))  # per direction: what each all-to-all carries (heads of q or q+2kv)
TP_COLLECTIVES_PER_LAYER = 8  # sequence-parallel TP: all-gather + reduce-scatter x (attention, MLP) x (fwd, bwd)
# Korthikanti et al. 2022: a layer saves ~34·s·b·h bytes (bf16, selective recompute); q, k, v, out are ~8 of them
# (counted exactly here), so the rest of the layer is ~26 bytes per token per hidden unit.
OTHER_ACTIVATION_BYTES_PER_HIDDEN = 26
IMPL_PREFERENCE = ("zigzag", "stripe", "allgather", "basic")  # tie-break between equal predictions
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


# Achieved (not peak) numbers: FA2-class kernels (torch SDPA flash), bf16, head_dim 128, long sequences;
# NCCL bus bandwidth per GPU per direction. Override any of them with the flags.
PRESETS: dict[str, Hardware] = {
    "a100": Hardware("a100", 190.0, 150.0, 230.0, 22.0, 8.0, 15.0, 79.2),
    "h100": Hardware("h100", 380.0, 300.0, 360.0, 45.0, 6.0, 12.0, 79.6),
    "h200": Hardware("h200", 400.0, 320.0, 360.0, 45.0, 6.0, 12.0, 139.8),
    # gloo ranks on one CPU host: memcpy-through-sockets bandwidth, a few GFLOPS per rank for the torch kernel
    "cpu": Hardware("cpu", 0.02, 0.01, 2.0, 2.0, 100.0, 100.0, 64.0, kernel_overhead_us=200.0,
                   half_efficiency_tokens=64.0),
}


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

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def flags(self) -> str:
        text = (f"--tensor-model-parallel-size {self.tp} --ulysses-degree {self.ulysses} "
                f"--ring-degree {self.ring} --usp-ring-impl {self.ring_impl}")
        return text + ("" if self.ulysses_inner else " --usp-ring-inner")

    def label(self) -> str:
        order = "" if self.ulysses_inner else " ring-inner"
        return f"TP={self.tp} u={self.ulysses} r={self.ring} {self.ring_impl}{order}"


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
    schedules = [build_schedule(ring_impl, seq_len, ulysses, ring, rank, causal) for rank in range(ring)]
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


def load_imbalance(ring_impl: str, seq_len: int, ulysses: int, ring: int, causal: bool) -> float:
    """Critical-path work / mean work per ring rank, ranks stepping together (the slowest rank sets each step)."""
    steps = schedule_blocks(ring_impl, seq_len, ulysses, ring, causal)
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
            block_pairs(*b) * flops_per_pair / (tflops * 1e12 * kernel_efficiency(b, hardware.half_efficiency_tokens))
            * 1e3 + hardware.kernel_overhead_us / 1e3
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
    return ""


def memory_gib(shape: ModelShape, config: ParallelConfig) -> float:
    """Activations one GPU holds: saved per layer x layers, plus one attention call's transient buffers."""
    b, dt, d = shape.micro_batch, shape.dtype_bytes, shape.head_dim
    tokens_after_a2a = b * shape.seq_len / config.ring
    q_heads = shape.heads / (config.tp * config.ulysses)
    kv_heads = kv_heads_per_tp_rank_after_replication(shape, config.tp, config.ulysses) / config.ulysses
    q_bytes = tokens_after_a2a * q_heads * d * dt
    kv_block = ring_kv_block_bytes(shape, config.tp, config.ulysses, config.ring, dt)
    dkv_block = ring_kv_block_bytes(shape, config.tp, config.ulysses, config.ring, ACCUMULATION_BYTES)
    lse = tokens_after_a2a * q_heads * ACCUMULATION_BYTES
    attention_saved = 2 * q_bytes + kv_block + lse  # q, out, k+v, lse
    tokens_per_rank = b * shape.seq_len / config.sp
    other_saved = OTHER_ACTIVATION_BYTES_PER_HIDDEN * tokens_per_rank * shape.hidden_size / config.tp * dt / 2
    dq_accumulator = q_bytes / dt * ACCUMULATION_BYTES
    if config.ring_impl == "allgather" and config.ring > 1:
        transient = config.ring * (kv_block + dkv_block) + dq_accumulator  # gathered K/V and its fp32 gradient
    else:
        transient = 2 * kv_block + 3 * dkv_block + dq_accumulator  # current + incoming K/V; dK/dV in flight
    layers = shape.num_layers or 1
    return (layers * (attention_saved + other_saved) + transient) / GIB


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
    steps = schedule_blocks(config.ring_impl, shape.seq_len, u, r, shape.causal)
    heads_per_rank = shape.heads / (tp * u)
    flops_per_pair = 4.0 * shape.micro_batch * heads_per_rank * shape.head_dim
    fwd_steps = step_compute_ms(steps, flops_per_pair, hardware.fwd_tflops, hardware)
    bwd_steps = step_compute_ms(steps, flops_per_pair * BACKWARD_FLOPS_FACTOR, hardware.bwd_tflops, hardware)
    prediction.compute_ms = sum(fwd_steps) + sum(bwd_steps)
    prediction.imbalance = load_imbalance(config.ring_impl, shape.seq_len, u, r, shape.causal)

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
        if config.ring_impl == "allgather":
            gather = (r - 1) * _transfer_ms(kv_block, gbps, latency)
            scatter = (r - 1) * _transfer_ms(dkv_block, gbps, latency)
            prediction.ring_comm_ms = prediction.ring_exposed_ms = 2 * gather + scatter  # gathered again in bwd
            prediction.ring_step_comm_ms = gather
            prediction.ring_step_compute_ms = fwd_steps[0]
        else:
            kv_ms = _transfer_ms(kv_block, gbps, latency)
            fwd_ms = sum(max(c, kv_ms) for c in fwd_steps[:-1]) + fwd_steps[-1]
            bwd_ms, bwd_comm = 0.0, 0.0
            for s, c in enumerate(bwd_steps):  # K/V for the next step and dK/dV of the previous share the link
                moving = (kv_block if s < r - 1 else 0.0) + (dkv_block if s > 0 else 0.0)
                comm = _transfer_ms(moving, gbps, latency)
                bwd_ms += max(c, comm)
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


def enumerate_configs(
    cluster: Cluster, tp_choices: Sequence[int], ring_impls: Sequence[str], dp: int, orders: Sequence[bool]
) -> list[ParallelConfig]:
    configs = []
    for tp in tp_choices:
        if cluster.world % (tp * dp) != 0:
            continue
        sp = cluster.world // (tp * dp)
        for u in _divisors(sp):
            for impl in ring_impls:
                for inner in orders:
                    if not inner and (u == 1 or sp // u == 1):
                        continue  # the order only matters with both degrees > 1
                    configs.append(ParallelConfig(tp, u, sp // u, impl, dp, inner))
    return configs


def plan(
    shape: ModelShape,
    cluster: Cluster,
    hardware: Hardware,
    *,
    tp_choices: Sequence[int],
    ring_impls: Sequence[str] = RING_SCHEDULE_IMPLS,
    dp: int = 1,
    orders: Sequence[bool] = (True,),
    other_memory_gib: Optional[float] = None,
) -> tuple[list[Prediction], list[Prediction]]:
    """(feasible predictions ranked fastest first, infeasible ones with their reasons)."""
    feasible, infeasible = [], []
    for config in enumerate_configs(cluster, tp_choices, ring_impls, dp, orders):
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


# ---------------------------------------------------------------------------------------------------- reports


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def format_table(predictions: Sequence[Prediction], top: Optional[int] = None) -> str:
    header = (f"{'#':>3} {'TP':>3} {'u':>3} {'r':>3} {'impl':<10} {'ms/layer':>9} {'compute':>8} {'a2a':>7} "
              f"{'ring':>7} {'ring exp':>8} {'tp':>6} {'exposed':>8} {'mem GiB':>8}  note")
    lines = [header, "-" * len(header)]
    for index, p in enumerate(predictions[:top] if top else predictions, 1):
        c = p.config
        impl = c.ring_impl + ("*" if not c.ulysses_inner else "")
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
        grouped.setdefault(key, []).append(p.config.ring_impl)
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


def load_bench_records(path: str) -> list[dict]:
    with open(path) as handle:
        data = json.load(handle)
    records = data.get("records", data) if isinstance(data, dict) else data
    return [rec for rec in records if rec.get("mode", "multi-rank") == "multi-rank"]


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
    }


def format_compare(result: dict) -> str:
    lines = [f"{'meas.#':>6} {'pred.#':>6} {'measured ms':>12} {'predicted ms':>13}  config / problem"]
    for row in sorted(result["rows"], key=lambda row: row["measured_ms"]):
        rec = row["record"]
        lines.append(
            f"{row['measured_rank']:>6g} {row['predicted_rank']:>6g} {row['measured_ms']:>12.3f} "
            f"{row['predicted_ms']:>13.3f}  u={rec['ulysses_degree']} r={rec['ring_degree']} {rec['ring_impl']} "
            f"{'causal' if rec['causal'] else 'full'} s={rec['seq_len']} h={rec['heads']}/{rec['kv_heads']} "
            f"d={rec['head_dim']} {rec.get('dtype', '')} world={rec['world_size']}"
        )
    lines.append(f"rank correlation, measured vs predicted: Spearman rho = {result['spearman']:.3f}, "
                 f"Kendall tau = {result['kendall']:.3f} over {len(result['rows'])} records; "
                 f"median measured/predicted time = {result['median_measured_over_predicted']:.3g}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--heads", type=int, help="attention heads")
    model.add_argument("--kv-heads", type=int, help="K/V heads (query groups); default = heads")
    model.add_argument("--head-dim", type=int, default=128)
    model.add_argument("--hidden", type=int, default=0, help="hidden size; 0 = heads x head_dim")
    model.add_argument("--num-layers", type=int, default=None, help="layers, for the memory check (default: 1)")
    model.add_argument("--seq-len", type=int, help="tokens per sequence")
    model.add_argument("--micro-batch", type=int, default=1)
    model.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    model.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    grid = parser.add_argument_group("cluster and grid")
    grid.add_argument("--gpus-per-node", type=int, default=None,
                      help="default 8 (planning) or each record's world size (--compare)")
    grid.add_argument("--nodes", type=int, default=1)
    grid.add_argument("--tp", default="1", help="tensor-parallel size, or 'auto' (every divisor of GPUs per node)")
    grid.add_argument("--dp", type=int, default=1, help="data-parallel replicas beside each TP x SP block")
    grid.add_argument("--order", choices=("ulysses-inner", "ring-inner", "both"), default="ulysses-inner",
                      help="which group gets adjacent ranks")
    grid.add_argument("--ring-impls", default=",".join(RING_SCHEDULE_IMPLS), help="comma-separated ring impls to consider")
    hw = parser.add_argument_group("hardware (a preset, any field overridable)")
    hw.add_argument("--gpu", choices=sorted(PRESETS) + ["custom"], default="h100",
                    help="custom: start from h100 and override with the flags below")
    hw.add_argument("--kernel-tflops", type=float, help="achieved attention TFLOPS, forward and backward")
    hw.add_argument("--fwd-tflops", type=float, help="achieved forward attention TFLOPS")
    hw.add_argument("--bwd-tflops", type=float, help="achieved backward attention TFLOPS")
    hw.add_argument("--intra-node-gbps", type=float, help="NVLink GB/s per GPU per direction")
    hw.add_argument("--inter-node-gbps", type=float, help="IB GB/s per GPU per direction")
    hw.add_argument("--latency-us", type=float, help="per-message latency, intra and inter node")
    hw.add_argument("--inter-latency-us", type=float, help="per-message latency across nodes")
    hw.add_argument("--kernel-overhead-us", type=float, help="fixed cost per attention kernel call")
    hw.add_argument("--half-efficiency-tokens", type=float,
                    help="keys per kernel call at which attention reaches half its TFLOPS (small blocks are slow)")
    hw.add_argument("--gpu-memory-gib", type=float)
    hw.add_argument("--other-memory-gib", type=float, default=None,
                    help="memory taken by weights, gradients, optimizer, workspace (default: half of the GPU)")
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=int, default=10)
    out.add_argument("--json", metavar="PATH", help="write every prediction (and infeasible reasons) as JSON")
    out.add_argument("--compare", metavar="BENCH_JSON",
                     help="rank-correlate predictions with tools/bench_attention.py records instead of planning")
    return parser


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    hardware = PRESETS["h100" if args.gpu == "custom" else args.gpu]
    overrides: dict[str, Any] = {"name": args.gpu}
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
    hardware = hardware_from_args(args)
    if args.compare:
        result = compare(load_bench_records(args.compare), hardware,
                         gpus_per_node=args.gpus_per_node,
                         micro_batch=args.micro_batch)
        print(format_compare(result))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({k: v for k, v in result.items() if k != "rows"} | {"rows": [
                    {**{k: v for k, v in row.items() if k != "config"}, "flags": row["config"].flags()}
                    for row in result["rows"]]}, handle, indent=2)
        return 0
    if args.heads is None or args.seq_len is None:
        parser.error("--heads and --seq-len are required (or --compare BENCH_JSON)")
    shape = ModelShape(heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                       seq_len=args.seq_len, hidden=args.hidden, num_layers=args.num_layers,
                       micro_batch=args.micro_batch, dtype=args.dtype, causal=args.causal)
    cluster = Cluster(args.gpus_per_node or 8, args.nodes)
    tp_choices = _divisors(cluster.gpus_per_node) if args.tp == "auto" else [int(args.tp)]
    impls = [impl.strip() for impl in args.ring_impls.split(",") if impl.strip()]
    unknown = [impl for impl in impls if impl not in RING_SCHEDULE_IMPLS]
    if unknown:
        parser.error(f"unknown ring impl(s) {unknown}: choose among {', '.join(RING_SCHEDULE_IMPLS)}")
    orders = {"ulysses-inner": (True,), "ring-inner": (False,), "both": (True, False)}[args.order]
    ranked, infeasible = plan(shape, cluster, hardware, tp_choices=tp_choices, ring_impls=impls, dp=args.dp,
                              orders=orders, other_memory_gib=args.other_memory_gib)
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
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"ranked": [_jsonable(p) for p in ranked],
                       "infeasible": [{"config": asdict(p.config), "reason": p.reason} for p in infeasible]},
                      handle, indent=2)
    return 0 if ranked else 1


if __name__ == "__main__":
    sys.exit(main())
