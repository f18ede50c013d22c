"""The attention-layer model: one transformer layer's forward + backward on the slowest rank of one SP group, for a
given (TP, ulysses u, ring r, ring_impl): the problem (:class:`ModelShape`, :class:`Cluster`,
:class:`ParallelConfig`), the kernel calls of each ring step or MQSP micro-chunk taken from the library's schedules,
the all-to-all, ring and TP traffic and where it runs (NVLink or IB), the feasibility rules, the activation memory,
and :func:`predict`, which puts them together into a :class:`Prediction`."""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping, Optional

from megatron_usp.cost import block_pairs
from megatron_usp.job_cost import GPTShape, JobConfig, attention_head_dim, layer_activation_bytes
from megatron_usp.layout import RING_IMPL_TABLE, check_seq_len, document_parts, ring_local
from megatron_usp.mqsp import MQSPPlan
from megatron_usp.plan import attention_plan
from megatron_usp.ring_local import ring_cut
from megatron_usp.ring import allgather_step_classes, build_schedules, pass_kv_step_classes
from megatron_usp.planner.hardware import Hardware
from megatron_usp.ulysses import check_head_counts, kv_replication

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
ACCUMULATION_BYTES = 4  # lse, dq and the travelling dK/dV are fp32
BACKWARD_FLOPS_FACTOR = 2.5  # flash-attention backward (with its recomputation) vs forward
A2A_CALLS = (("q,k,v", "qkv"), ("out", "q"))  # per direction: what each all-to-all carries (heads of q or q+2kv)
TP_COLLECTIVES_PER_LAYER = 8  # sequence-parallel TP: all-gather + reduce-scatter x (attention, MLP) x (fwd, bwd)
GIB = 1024**3


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
    # mixture of experts in every layer (0: dense MLP of ffn_hidden)
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden: int = 0
    moe_shared_ffn_hidden: int = 0  # shared experts' MLP width (0: none)
    moe_dense_layers: int = 0  # the first layers with a dense MLP of ffn_hidden
    # multi-latent attention (kv_lora_rank > 0): head_dim is its q/k head dim without the RoPE dims (job_cost.GPTShape)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # packed documents: each sampled row's offsets [0, ..., seq_len] (None: one dense sequence); left out of the
    # hash (equality still compares them): the search hashes shapes in every cache lookup
    documents: Optional[tuple[tuple[int, ...], ...]] = field(default=None, hash=False)

    @property
    def hidden_size(self) -> int:
        return self.hidden or self.heads * self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def attention_head_dim(self) -> int:
        """The head dim of the attention's q, k, v and output (MLA's padded to one width)."""
        return attention_head_dim(self.head_dim, self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim)


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
    document_layout: Optional[str] = None  # packed documents: "local" or "split" (layout.py); None without them

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def usp_flags(self) -> str:
        text = f"--ulysses-degree {self.ulysses} --ring-degree {self.ring} --usp-ring-impl {self.ring_impl}"
        text += "" if self.micro_q is None else f" --usp-micro-q {self.micro_q}"
        text += "" if self.document_layout in (None, "local") else f" --usp-document-layout {self.document_layout}"
        return text + ("" if self.ulysses_inner else " --usp-ring-inner")

    def flags(self) -> str:
        return f"--tensor-model-parallel-size {self.tp} {self.usp_flags()}"

    def label(self) -> str:
        order = "" if self.ulysses_inner else " ring-inner"
        micro = "" if self.micro_q is None else f"/{self.micro_q}"
        documents = "" if self.document_layout is None else f" {self.document_layout}"
        return f"TP={self.tp} u={self.ulysses} r={self.ring} {self.ring_impl}{micro}{documents}{order}"


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
    exact: bool = True  # False: every time a lower bound (predict(bound=True))
    coarse: bool = False  # a bound without the ring-local documents' layout: predict(bound=True) can raise it
    compute_worst_ms: float = 0.0  # compute + exposed ring of the worst packed row (documents; else the one row)
    notes: list[str] = field(default_factory=list)

    @property
    def exposed_comm_ms(self) -> float:
        return self.a2a_ms + self.ring_exposed_ms + self.tp_ms


BlockShape = tuple[int, int, bool]  # (query rows, K/V rows, causal square)


def kernel_efficiency(block: BlockShape, half_efficiency_tokens: float) -> float:
    """Fraction of the long-sequence TFLOPS a kernel reaches on a block with ``cols`` keys: L / (L + L0).
    (FA2 forward, A100, d=128: ~0.5 of its peak at 512 tokens, ~0.8 at 2K, ~0.95 at 8K: L0 ~ 450-500.)"""
    keys = block[1]
    return keys / (keys + half_efficiency_tokens)


def transport_of(ring_impl: str) -> str:
    """How ``ring_impl`` moves data (its row of ``layout.RING_IMPL_TABLE``): pass_kv, allgather or pass_q."""
    return RING_IMPL_TABLE[ring_impl].transport


StepWork = tuple[tuple[tuple[BlockShape, ...], int], ...]  # one step: (a rank's kernel calls, how many ranks)


def _shapes(blocks) -> tuple[BlockShape, ...]:
    return tuple((b.q_stop - b.q_start, b.kv_stop - b.kv_start, b.causal) for b in blocks)


@functools.lru_cache(maxsize=4096)
def schedule_blocks(ring_impl: str, seq_len: int, ulysses: int, ring: int, causal: bool) -> tuple[StepWork, ...]:
    """Per ring step, the distinct kernel-call lists of the ring ranks and how many ranks run each, from the
    library's ring schedules (``megatron_usp.ring``: the same blocks the executor runs; O(r) per grid).
    All-gather is one step: its steps are buffers, not synchronised ring steps."""
    if transport_of(ring_impl) == "allgather" and ring > 1:
        return (tuple((_shapes(blocks), count) for blocks, count in allgather_step_classes(seq_len, ring, causal)),)
    impl = ring_impl if transport_of(ring_impl) == "pass_kv" else "zigzag"  # r = 1: the local block of any impl
    return tuple(tuple((_shapes(blocks), count) for blocks, count in step)
                 for step in pass_kv_step_classes(impl, seq_len, ring, causal))


@functools.lru_cache(maxsize=1024)
def mqsp_chunk_blocks(seq_len: int, ulysses: int, ring: int, causal: bool, micro_q: Optional[int]) -> tuple[StepWork, ...]:
    """Per MQSP micro-chunk, the distinct kernel-call lists of the ring ranks (gathered queries x own K/V) and how
    many ranks run each, from the library's plan; the chunk's collectives make the ranks wait for each other,
    like ring steps."""
    return _mqsp_steps(seq_len, ulysses, ring, causal, micro_q, None,
                       MQSPPlan(seq_len, ulysses, ring, 0, causal, micro_q))


def _mqsp_steps(seq_len: int, ulysses: int, ring: int, causal: bool, micro_q: Optional[int],
                cu_seqlens: Optional[tuple[int, ...]], first: MQSPPlan) -> tuple[StepWork, ...]:
    """Per micro-chunk, the distinct kernel-call lists of every ring rank's MQSP plan, built on ring rank 0's
    plan ``first`` (its positions and gathered queries are every rank's)."""
    plans = [first] + [MQSPPlan(seq_len, ulysses, ring, rank, causal, micro_q, cu_seqlens, shared=first)
                       for rank in range(1, ring)]
    return tuple(_step_work(_shapes(plan.blocks[chunk]) for plan in plans) for chunk in range(len(first.chunks)))


def _step_work(rank_blocks) -> StepWork:
    counts: dict = {}
    for blocks in rank_blocks:
        counts[blocks] = counts.get(blocks, 0) + 1
    return tuple(counts.items())


def attention_blocks(config: "ParallelConfig", seq_len: int, causal: bool) -> tuple[StepWork, ...]:
    """Kernel calls per synchronised step (ring steps with pass K/V, MQSP micro-chunks with pass Q), as distinct
    per-rank lists with the number of ranks running each."""
    if transport_of(config.ring_impl) == "pass_q":
        return mqsp_chunk_blocks(seq_len, config.ulysses, config.ring, causal, config.micro_q)
    return schedule_blocks(config.ring_impl, seq_len, config.ulysses, config.ring, causal)


def document_twin(ring_impl: str) -> str:
    """The first ring impl whose plans with documents equal ``ring_impl``'s: the same transport and the same
    per-document layout (documents are cut per document, contiguous or mirrored; stripe's and zigzag's mirrored
    layouts are one)."""
    impl = RING_IMPL_TABLE[ring_impl]
    key = (impl.transport, impl.layout == "contiguous")
    return next(name for name, other in RING_IMPL_TABLE.items()
                if (other.transport, other.layout == "contiguous") == key)


def document_steps(ring_impl: str, seq_len: int, ulysses: int, ring: int, causal: bool, micro_q: Optional[int],
                   cu_seqlens: tuple[int, ...], document_layout: str) -> tuple[tuple[StepWork, ...], float]:
    """One packed row (``cu_seqlens``): per synchronised step the distinct kernel-call lists of the ring ranks and
    how many ranks run each, from the plans of its document layout (the pieces the executor computes), and the
    largest fraction of a ring rank's K/V rows that travel (ring-local documents stay home; 1 otherwise). Impls
    with the same document plans share one computation (:func:`document_twin`)."""
    return _document_steps(document_twin(ring_impl), seq_len, ulysses, ring, causal, micro_q, cu_seqlens,
                           document_layout)


@functools.lru_cache(maxsize=1024)
def _document_steps(ring_impl: str, seq_len: int, ulysses: int, ring: int, causal: bool, micro_q: Optional[int],
                    cu_seqlens: tuple[int, ...], document_layout: str) -> tuple[tuple[StepWork, ...], float]:
    if transport_of(ring_impl) == "pass_q":
        first = attention_plan(seq_len, ulysses, ring, 0, ring_impl, causal, micro_q, cu_seqlens, document_layout)
        return _mqsp_steps(seq_len, ulysses, ring, causal, micro_q, cu_seqlens, first.mqsp), 1.0
    # every rank's schedule, built together (the positions and their shared runs found once)
    schedules = build_schedules(ring_impl, seq_len, ulysses, ring, causal, cu_seqlens, document_layout)
    if schedules[0].transport == "allgather":
        return (_step_work(tuple(b for step in s.steps for b in _shapes(step.blocks)) for s in schedules),), 1.0
    steps = tuple(_step_work(_shapes(s.steps[index].blocks) for s in schedules) for index in range(ring))
    travel = schedules[0].travel
    return steps, 1.0 if travel is None else max(len(rows) for rows in travel) / (seq_len // ring)


def attention_rows(config: "ParallelConfig", shape: "ModelShape") -> list[tuple[tuple[StepWork, ...], float]]:
    """``(steps, travelling fraction)`` per packed row of ``shape.documents`` (one dense row without them)."""
    if shape.documents is None:
        return [(attention_blocks(config, shape.seq_len, shape.causal), 1.0)]
    return [document_steps(config.ring_impl, shape.seq_len, config.ulysses, config.ring, shape.causal, config.micro_q,
                           cu, config.document_layout or "split") for cu in shape.documents]


def load_imbalance(ring_impl: str, seq_len: int, ulysses: int, ring: int, causal: bool,
                   micro_q: Optional[int] = None) -> float:
    """Critical-path work / mean work per ring rank, ranks stepping together (the slowest rank sets each step)."""
    steps = attention_blocks(ParallelConfig(1, ulysses, ring, ring_impl, micro_q=micro_q), seq_len, causal)
    critical = sum(max(sum(block_pairs(*b) for b in blocks) for blocks, _ in step) for step in steps)
    mean = sum(count * sum(block_pairs(*b) for b in blocks) for step in steps for blocks, count in step) / ring
    return critical / mean


def step_compute_ms(steps: tuple[StepWork, ...], flops_per_pair: float, tflops: float, hardware: "Hardware") -> list[float]:
    """Per step, the slowest rank's kernel time: pairs x FLOPs / (TFLOPS x efficiency) + per-call overhead."""
    @functools.lru_cache(maxsize=None)
    def rank_ms(blocks: tuple[BlockShape, ...]) -> float:
        return sum(
            (b[0] * b[1] * hardware.causal_fraction if b[2] else block_pairs(*b)) * flops_per_pair
            / (tflops * 1e12 * kernel_efficiency(b, hardware.half_efficiency_tokens)) * 1e3
            + hardware.kernel_overhead_us / 1e3
            for b in blocks
        )
    return [max(rank_ms(blocks) for blocks, _ in step) for step in steps]


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
    return {name: fraction * tokens * heads[kind] * shape.attention_head_dim * shape.dtype_bytes
            for name, kind in A2A_CALLS}


def ring_kv_block_bytes(shape: ModelShape, tp: int, ulysses: int, ring: int, element_bytes: int) -> float:
    """One ring rank's K/V (or dK/dV) after the all-to-all: s/r tokens x (kv heads / u) x d, K and V."""
    kv_heads = kv_heads_per_tp_rank_after_replication(shape, tp, ulysses) / ulysses
    return 2.0 * shape.micro_batch * (shape.seq_len / ring) * kv_heads * shape.attention_head_dim * element_bytes


def mqsp_query_bytes(shape: ModelShape, config: ParallelConfig) -> float:
    """One rank's query rows of one MQSP micro-chunk (heads / (TP u) after the all-to-all)."""
    rows = mqsp_rows(shape.seq_len, config)
    return (shape.micro_batch * rows * shape.heads / (config.tp * config.ulysses) * shape.attention_head_dim
            * shape.dtype_bytes)


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
    fp32_rows = q / (shape.dtype_bytes * shape.attention_head_dim) * ACCUMULATION_BYTES  # lse: one fp32 per row and head
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
    """(number of ulysses peers in its own node, ... in other nodes, of the rank with the most peers in other
    nodes; ring crosses nodes). Depends on the GPUs per node, TP, u, r and the order only: cached."""
    return _placement(cluster.gpus_per_node, config.tp, config.ulysses, config.ring, config.ulysses_inner)


@functools.lru_cache(maxsize=1 << 12)
def _placement(gpus_per_node: int, tp: int, ulysses: int, ring: int, ulysses_inner: bool) -> tuple[int, int, bool]:
    cluster, config = Cluster(gpus_per_node, 1), ParallelConfig(tp, ulysses, ring, "zigzag", ulysses_inner=ulysses_inner)
    node = lambda rank: rank // cluster.gpus_per_node  # noqa: E731
    worst_inter = 0
    for ring_rank in range(config.ring):  # a rank's peers in other nodes: u minus those of its own node
        members = Counter(node(_rank_of(cluster, config, i, ring_rank)) for i in range(config.ulysses))
        worst_inter = max(worst_inter, config.ulysses - min(members.values()))
    worst_intra = config.ulysses - 1 - worst_inter
    ring_crosses = any(
        node(_rank_of(cluster, config, i, j)) != node(_rank_of(cluster, config, i, (j + 1) % config.ring))
        for i in range(config.ulysses)
        for j in range(config.ring)
    )
    return worst_intra, worst_inter, ring_crosses


def _transfer_ms(nbytes: float, gbps: float, latency_us: float) -> float:
    return 0.0 if nbytes <= 0 else latency_us / 1e3 + nbytes / (gbps * 1e9) * 1e3


@functools.lru_cache(maxsize=1 << 14)
def feasibility_reason(shape: ModelShape, cluster: Cluster, config: ParallelConfig) -> str:
    """Why ``config`` cannot run (empty string when it can), by the library's and Megatron's rules; cached."""
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
    if config.document_layout is not None and shape.documents is None:
        return f"document layout {config.document_layout!r} needs packed documents (ModelShape.documents)"
    return ""


@functools.lru_cache(maxsize=1 << 10)
def gpt_shape(shape: ModelShape, micro_batch: Optional[int] = None) -> GPTShape:
    """The job_cost view of ``shape``; without --ffn-hidden: a GPT MLP of 4 x hidden (GELU), no vocabulary."""
    return GPTShape(num_layers=shape.num_layers or 1, hidden=shape.hidden_size, heads=shape.heads,
                    kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                    ffn_hidden=shape.ffn_hidden or 4 * shape.hidden_size, vocab=shape.vocab, seq_len=shape.seq_len,
                    micro_batch=micro_batch or shape.micro_batch, dtype_bytes=shape.dtype_bytes,
                    gated_mlp=bool(shape.ffn_hidden) and shape.gated_mlp, rmsnorm=shape.rmsnorm,
                    num_experts=shape.num_experts, moe_topk=shape.moe_topk, moe_ffn_hidden=shape.moe_ffn_hidden,
                    moe_shared_ffn_hidden=shape.moe_shared_ffn_hidden, moe_dense_layers=shape.moe_dense_layers,
                    q_lora_rank=shape.q_lora_rank, kv_lora_rank=shape.kv_lora_rank,
                    qk_rope_head_dim=shape.qk_rope_head_dim, v_head_dim=shape.v_head_dim)


@functools.lru_cache(maxsize=1 << 14)
def attention_transient_bytes(shape: ModelShape, config: ParallelConfig) -> float:
    """The largest buffers one attention call holds while it runs (not saved for backward); cached."""
    dt = shape.dtype_bytes
    q_bytes = shape.micro_batch * shape.seq_len / config.ring * shape.heads / (config.tp * config.ulysses) \
        * shape.attention_head_dim * dt
    kv_block = ring_kv_block_bytes(shape, config.tp, config.ulysses, config.ring, dt)
    dkv_block = ring_kv_block_bytes(shape, config.tp, config.ulysses, config.ring, ACCUMULATION_BYTES)
    dq_accumulator = q_bytes / dt * ACCUMULATION_BYTES
    if transport_of(config.ring_impl) == "allgather" and config.ring > 1:
        return config.ring * (kv_block + dkv_block) + dq_accumulator  # gathered K/V and its fp32 gradient
    if transport_of(config.ring_impl) == "pass_q":
        # backward of one chunk: gathered q, dout, out (r x the rank's rows) + their fp32 dq part, lse; local
        # fp32 dK/dV accumulators; the fp32 dq of the rank's rows
        gathered = config.ring * mqsp_query_bytes(shape, config)
        return 3 * gathered + gathered / dt * ACCUMULATION_BYTES * (1 + 1 / shape.attention_head_dim) + dkv_block + dq_accumulator
    return 2 * kv_block + 3 * dkv_block + dq_accumulator  # current + incoming K/V; dK/dV in flight


def memory_gib(shape: ModelShape, config: ParallelConfig) -> float:
    """Activations one GPU holds without recompute or PP (megatron_usp.job_cost, sequence parallel with TP):
    saved per layer x layers, plus one attention call's transient buffers."""
    job = JobConfig(tp=config.tp, ulysses=config.ulysses, ring=config.ring, sequence_parallel=config.tp > 1)
    per_layer = sum(layer_activation_bytes(gpt_shape(shape), job).values())
    return ((shape.num_layers or 1) * per_layer + attention_transient_bytes(shape, config)) / GIB


def _compute_bound_ms(shape: ModelShape, config: ParallelConfig, flops_per_pair: float, tflops: float,
                      hardware: Hardware, synchronised_steps: int, coarse: bool = False) -> float:
    """A lower bound of :func:`step_compute_ms`'s sum, in O(documents): a step lasts at least as long as its mean
    rank, so the sum is at least every document's visible pairs' cost spread evenly over the ring ranks (the
    dense sequence: one document; with documents the mean over the rows, as the exact prediction takes it), each
    document's pieces at most as long as the document and the longest block the transport makes (a ring rank's
    K/V rows; all-gather: the sequence), so at most that kernel efficiency; plus one call per synchronised step
    (with documents: one per document, spread over the ranks; a ring-local step may have nothing to compute).
    A causal square of side m holds m(m+1)/2 pairs and costs m^2 x causal_fraction = (2 pairs - m) x fraction; a
    document's squares lie on its diagonal (sides adding up to at most its length; stripe: r x it, each step's
    squares hold each row once) with sides of at most a ring rank's rows, so they hold at most (side + 1) / 2 x
    those sides pairs: whatever the squares, a document's cost is at least ``visible + min(0, 2 fraction - 1) x
    those pairs - fraction x the sides``, and never below ``min(1, fraction) x visible``.

    Documents cut over every rank (the split layout, pass K/V): a ring rank holds 2u of a document's 2ur chunks
    (u of ur, contiguous), so its pieces have at most that many keys; and where every chunk holds a row, each
    rank's rows of the document meet every other rank's (contiguous: every earlier rank's) in at least one piece
    besides its own square — pieces of different documents never join, so those are calls of their own.
    Ring-local documents: a whole document is one call on its ring rank; a cut one's pieces have at most its
    largest share of keys, each rank holding rows of it makes a square of it, and every two ranks holding two
    rows or more of it (front and back piece) meet in a piece (contiguous pieces: every rank meets the earlier
    ones). ``coarse``: ring-local documents without their layout (no solver run): each document at most as long as
    a ring rank's rows and one call, whether it is whole or cut (below the layout's bound)."""
    pairs, calls = _bound_terms(shape.documents, shape.seq_len, shape.causal, config.ulysses, config.ring,
                                config.ring_impl, config.document_layout, hardware.causal_fraction,
                                hardware.half_efficiency_tokens, synchronised_steps, coarse)
    return pairs * flops_per_pair / (tflops * 1e12) * 1e3 + calls * hardware.kernel_overhead_us / 1e3


@functools.lru_cache(maxsize=4096)  # the same for every TP, micro-batch, direction and job of a grid
def _bound_terms(documents: Optional[tuple[tuple[int, ...], ...]], seq: int, causal: bool, ulysses: int, ring: int,
                 ring_impl: str, document_layout: Optional[str], fraction: float, half_efficiency_tokens: float,
                 synchronised_steps: int, coarse: bool) -> tuple[float, float]:
    """:func:`_compute_bound_ms`'s (score pairs over kernel efficiency, kernel calls) per ring rank."""
    rows = seq // ring
    keys = seq if transport_of(ring_impl) == "allgather" else rows
    stripe = RING_IMPL_TABLE[ring_impl].layout == "stripe"
    lengths = [[seq]] if documents is None else [[b - a for a, b in zip(cu, cu[1:])] for cu in documents]
    passed_documents = documents is not None and transport_of(ring_impl) == "pass_kv" and ring > 1
    local = passed_documents and ring_local(ring_impl, document_layout or "split")
    split = passed_documents and not local
    contiguous = RING_IMPL_TABLE[ring_impl].layout == "contiguous"
    parts = document_parts(ring_impl, ulysses * ring)
    held_chunks = parts // ring  # a ring rank's chunks of each document

    @functools.lru_cache(maxsize=None)
    def document_pairs(length: int, longest: int) -> float:
        if causal:
            visible = length * (length + 1) / 2
            sides = length * (ring if stripe else 1)
            square_pairs = min(visible, (min(length, rows) + 1) / 2 * sides)
            cost = max(visible + min(0.0, 2 * fraction - 1) * square_pairs - fraction * sides,
                       min(1.0, fraction) * visible)
        else:
            cost = length * length
        return cost / kernel_efficiency((rows, longest, causal), half_efficiency_tokens)

    if local and coarse:
        work = sum(document_pairs(n, min(keys, n)) for row in lengths for n in row)
        calls = sum(n > 0 for row in lengths for n in row)
        return work / len(lengths) / ring, calls / len(lengths) / ring
    if local:
        work, calls = 0.0, 0.0
        for cu in documents:
            cut = _cut_documents(cu, ring)
            for d, (a, b) in enumerate(zip(cu, cu[1:])):
                if d not in cut:
                    work, calls = work + document_pairs(b - a, min(keys, b - a)), calls + (b > a)
                    continue
                holding, largest, holding_two = cut[d]
                work += document_pairs(b - a, min(keys, b - a, largest))
                meeting = holding if contiguous else holding_two
                calls += holding + meeting * (meeting - 1) / (2 if contiguous else 1)
        return work / len(lengths) / ring, calls / len(lengths) / ring
    work = sum(document_pairs(n, min(keys, n, held_chunks * -(-n // parts)) if split else min(keys, n))
               for row in lengths for n in row) / len(lengths) / ring
    if documents is None:
        calls = synchronised_steps
    elif split:  # per ring rank, summed over the steps
        others = (ring - 1) / (2 if contiguous else 1)
        # (a short document's rows are on one rank at least: 1 / r of a square per rank)
        calls = sum(sum(1 + others if n >= parts else 1 / ring for n in row if n)
                    for row in lengths) / len(lengths)
    else:
        calls = max(1.0, sum(len(row) for row in lengths) / len(lengths) / ring)
    return work, calls


@functools.lru_cache(maxsize=256)
def _cut_documents(offsets: tuple[int, ...], ring: int) -> Mapping[int, tuple[int, int, int]]:
    """The ring-local solver's cut documents of a row: ``{document: (ring ranks holding rows of it, the most rows
    one holds, ranks holding two rows or more)}``; cached, read-only."""
    summary = {}
    for d, share in ring_cut(offsets, ring)[1]:
        held = [tokens for tokens in share if tokens]
        summary[d] = (len(held), max(held), sum(tokens >= 2 for tokens in held))
    return MappingProxyType(summary)


def _ring_ms(prediction: Prediction, shape: ModelShape, config: ParallelConfig, hardware: Hardware,
             fwd_steps: list[float], bwd_steps: list[float], chunks: int, travel: float, ring_crosses: bool,
             bound: bool) -> None:
    """The ring's transfers and the part of them compute does not hide, into ``prediction`` (``travel``: the
    largest fraction of a ring rank's K/V rows that travel: 1, or less with ring-local documents)."""
    u, r, tp = config.ulysses, config.ring, config.tp
    gbps = hardware.inter_node_gbps if ring_crosses else hardware.intra_node_gbps
    latency = hardware.inter_latency_us if ring_crosses else hardware.intra_latency_us
    prediction.ring_link = "IB" if ring_crosses else "NVLink"
    kv_block = travel * ring_kv_block_bytes(shape, tp, u, r, shape.dtype_bytes)
    dkv_block = travel * ring_kv_block_bytes(shape, tp, u, r, ACCUMULATION_BYTES)
    prediction.ring_step_bytes = kv_block
    if transport_of(config.ring_impl) == "pass_q":  # pass Q: per chunk, collectives the chunk's kernels wait for
        comm = mqsp_chunk_comm_ms(shape, config, gbps, latency)
        prediction.ring_comm_ms = prediction.ring_exposed_ms = chunks * comm
        prediction.ring_step_bytes = mqsp_query_bytes(shape, config)
        prediction.ring_step_comm_ms = comm
        prediction.ring_step_compute_ms = sum(fwd_steps) / chunks
    elif transport_of(config.ring_impl) == "allgather":
        gather = (r - 1) * _transfer_ms(kv_block, gbps, latency)
        scatter = (r - 1) * _transfer_ms(dkv_block, gbps, latency)
        prediction.ring_comm_ms = prediction.ring_exposed_ms = 2 * gather + scatter  # gathered again in bwd
        prediction.ring_step_comm_ms = gather
        prediction.ring_step_compute_ms = fwd_steps[0]
    else:
        kv_ms = _transfer_ms(kv_block, gbps, latency)
        both = max if hardware.comm_overlaps_compute else (lambda c, comm: c + comm)
        # K/V for the next step and dK/dV of the previous share the link in the backward
        bwd_comms = [_transfer_ms((kv_block if s < r - 1 else 0.0) + (dkv_block if s > 0 else 0.0), gbps, latency)
                     for s in range(r)]
        last_dkv_home = _transfer_ms(dkv_block, gbps, latency)
        prediction.ring_comm_ms = (r - 1) * kv_ms + sum(bwd_comms) + last_dkv_home
        if bound:  # overlapped: at least the last dK/dV hop home; else every transfer (compute-independent)
            prediction.ring_exposed_ms = last_dkv_home if hardware.comm_overlaps_compute else prediction.ring_comm_ms
        else:
            fwd_ms = sum(both(c, kv_ms) for c in fwd_steps[:-1]) + fwd_steps[-1]
            bwd_ms = sum(both(c, comm) for c, comm in zip(bwd_steps, bwd_comms)) + last_dkv_home
            prediction.ring_exposed_ms = fwd_ms + bwd_ms - sum(fwd_steps) - sum(bwd_steps)
        prediction.ring_step_comm_ms = kv_ms
        prediction.ring_step_compute_ms = sum(fwd_steps) / r


def predict(
    shape: ModelShape,
    cluster: Cluster,
    hardware: Hardware,
    config: ParallelConfig,
    *,
    other_memory_gib: Optional[float] = None,
    check: bool = True,
    bound: bool = False,
    coarse: bool = False,
) -> Prediction:
    """Predicted ms per layer (fwd + bwd) of ``config``; ``check=False`` skips the feasibility rules. ``bound``:
    a lower bound of every time instead, in O(1) (no schedule built; memory exact): what a search uses to skip
    grids that cannot win (``Prediction.exact`` False). With ``shape.documents`` the attention's compute and ring
    come from each packed row's plan (the pieces of its document layout): their mean over the rows, the worst
    row in ``compute_worst_ms``. ``coarse`` (with ``bound``): ring-local documents bounded without running their
    layout's solver (O(documents) whatever the ring size; ``Prediction.coarse`` where that differs), below the
    ``bound`` one: a search refines such bounds only for grids that could still win."""
    if coarse and not bound:
        raise ValueError("coarse=True is a kind of bound: pass bound=True with it")
    local_documents = shape.documents is not None and ring_local(config.ring_impl, config.document_layout or "split")
    prediction = Prediction(config, exact=not bound, coarse=bound and coarse and local_documents and config.ring > 1)
    if check:
        reason = feasibility_reason(shape, cluster, config)
        if reason:
            return replace(prediction, feasible=False, reason=reason)
    u, r, tp = config.ulysses, config.ring, config.tp
    intra_peers, inter_peers, ring_crosses = placement(cluster, config)

    # attention compute, from the schedules (per packed row with documents), and the ring
    heads_per_rank = shape.heads / (tp * u)
    flops_per_pair = 4.0 * shape.micro_batch * heads_per_rank * shape.attention_head_dim
    if bound:
        transport = transport_of(config.ring_impl) if r > 1 else "pass_kv"
        chunks = {"pass_kv": r, "allgather": 1,  # pass Q: its micro-chunks
                  "pass_q": -(-(shape.seq_len // r) // mqsp_rows(shape.seq_len, config))}[transport]
        # ring-local documents: the travelling fraction is only known from the plans; 0 bounds it
        travel = 0.0 if local_documents else 1.0
        rows = [([_compute_bound_ms(shape, config, flops_per_pair, hardware.fwd_tflops, hardware, chunks,
                                    prediction.coarse)],
                 [_compute_bound_ms(shape, config, flops_per_pair * BACKWARD_FLOPS_FACTOR, hardware.bwd_tflops,
                                    hardware, chunks, prediction.coarse)], chunks, travel)]
    else:
        rows = []
        for steps, travel in attention_rows(config, shape):
            rows.append((step_compute_ms(steps, flops_per_pair, hardware.fwd_tflops, hardware),
                         step_compute_ms(steps, flops_per_pair * BACKWARD_FLOPS_FACTOR, hardware.bwd_tflops, hardware),
                         len(steps), travel))
        if shape.documents is None:
            prediction.imbalance = load_imbalance(config.ring_impl, shape.seq_len, u, r, shape.causal, config.micro_q)
    per_row = []
    for fwd_steps, bwd_steps, chunks, travel in rows:
        row = Prediction(config)
        row.compute_ms = sum(fwd_steps) + sum(bwd_steps)
        if r > 1:
            _ring_ms(row, shape, config, hardware, fwd_steps, bwd_steps, chunks, travel, ring_crosses, bound)
        per_row.append(row)
    for name in ("compute_ms", "ring_comm_ms", "ring_exposed_ms", "ring_step_bytes", "ring_step_compute_ms",
                 "ring_step_comm_ms"):
        setattr(prediction, name, sum(getattr(row, name) for row in per_row) / len(per_row))
    prediction.compute_worst_ms = max(row.compute_ms + row.ring_exposed_ms for row in per_row)
    prediction.ring_link = per_row[0].ring_link

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
