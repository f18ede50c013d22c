"""The whole-job model, on ``megatron_usp.job_cost``: what a Megatron job adds to the attention grid
(:class:`JobChoice`: PP and virtual stages, DP, recompute, the distributed optimizer, the batch), its memory per GPU
and seconds per iteration (:func:`predict_job`), the job search (:func:`job_choices`, :func:`pipeline_splits` with
:func:`uneven_split`, :func:`plan_job`), and when nothing fits, the floor no search can go under
(:func:`states_floor`) and the smallest change that fits (:func:`smallest_change`)."""
from __future__ import annotations

import contextlib
import functools
import gc
import heapq
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional, Sequence

from megatron_usp.job_cost import (
    GPTShape, JobConfig, JobMemory, check_job, chunk_layers, job_memory, layer_activation_bytes, memory_stages,
    layer_active_parameter_count, recompute_working_bytes, stage_expert_count, stage_layers, state_bytes,
)
from megatron_usp.layout import RING_IMPLS
from megatron_usp.planner.hardware import Hardware
from megatron_usp.planner.layer import (
    BACKWARD_FLOPS_FACTOR, GIB, Cluster, ModelShape, ParallelConfig, Prediction, _transfer_ms,
    attention_transient_bytes, feasibility_reason, gpt_shape, predict,
)
from megatron_usp.planner.search import IMPL_PREFERENCE, _divisors, document_layouts, impl_variants

RECOMPUTE_CHOICES = ("none", "selective", "full")
DEFAULT_KEEP = 10  # jobs predicted exactly, fastest first (plan_job's branch and bound)
DEFAULT_RESERVE_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation, workspace
OPTIMIZER_BYTES_PER_PARAM = 32  # fused Adam: read grad, master, 2 moments; write master, 2 moments, the parameter
ELEMENTWISE_PASSES = 3  # a saved activation is written in the forward, read and its gradient written in the backward
FP32_BYTES = 4


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
    ep: int = 1  # expert parallelism (MoE): --expert-model-parallel-size

    @property
    def micro_batches(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def label(self) -> str:
        rc = self.recompute if self.recompute != "full" else \
            f"full {self.recompute_method}/{self.recompute_num_layers}"
        vpp = f"x{self.virtual_stages}v" if self.virtual_stages > 1 else ""
        if self.first_stage_layers is not None:
            vpp += f"[{self.first_stage_layers}..{self.last_stage_layers}]"
        ep = f" EP={self.ep}" if self.ep > 1 else ""
        return (f"PP={self.pp}{vpp} DP={self.dp}{ep} mbs={self.micro_batch}x{self.micro_batches} rc={rc} "
                f"distopt={'on' if self.distributed_optimizer else 'off'}")


@dataclass
class JobPrediction:
    attention: Prediction  # per layer, one micro-batch
    job: JobChoice
    feasible: bool = True
    refusal: str = ""  # why it cannot run, other than memory (see ``reason``)
    memory: Optional[JobMemory] = None
    transient_gib: float = 0.0  # attention buffers + the recompute working set
    memory_gib: float = 0.0
    budget_gib: float = 0.0
    layer_ms: float = 0.0  # one layer, one micro-batch, fwd + bwd (+ recompute)
    gemm_ms: float = 0.0
    recompute_ms: float = 0.0
    elementwise_ms: float = 0.0
    overhead_ms: float = 0.0  # the framework's fixed cost per layer
    moe_comm_ms: float = 0.0  # the MoE dispatcher's all-to-alls over EP (and its TP gather), fwd + bwd, per layer
    expert_params_gib: float = 0.0  # of the parameters: the experts this rank holds
    optimizer_ms: float = 0.0  # per iteration
    p2p_ms: float = 0.0  # pipeline sends and receives of one stage, one micro-batch
    stage_ms: float = 0.0  # the slowest stage, one micro-batch
    bubble_ms: float = 0.0
    grad_sync_ms: float = 0.0
    iteration_s: float = 0.0

    @property
    def config(self) -> ParallelConfig:
        return self.attention.config

    @property
    def reason(self) -> str:
        """Why the job cannot run ("" where it can); over the memory budget: "memory: " and the breakdown (written
        when asked: a search meets far more of those than it shows)."""
        if self.refusal or self.memory is None or self.memory_gib <= self.budget_gib:
            return self.refusal
        return f"memory: {memory_breakdown(self)}"

    @property
    def exact(self) -> bool:
        """False: the times are lower bounds (plan_job predicted this job only well enough to rank it out)."""
        return self.attention.exact

    def label(self) -> str:
        return f"{self.attention.config.label()} {self.job.label()}"


def job_config(config: ParallelConfig, choice: JobChoice) -> JobConfig:
    return JobConfig(tp=config.tp, pp=choice.pp, ulysses=config.ulysses, ring=config.ring, dp=choice.dp,
                     recompute=choice.recompute, recompute_method=choice.recompute_method,
                     recompute_num_layers=choice.recompute_num_layers,
                     distributed_optimizer=choice.distributed_optimizer, micro_batches=choice.micro_batches,
                     sequence_parallel=config.tp > 1, virtual_stages=choice.virtual_stages,
                     first_stage_layers=choice.first_stage_layers, last_stage_layers=choice.last_stage_layers,
                     ep=choice.ep)


def _attention_grid(config: ParallelConfig, choice: JobChoice) -> ParallelConfig:
    # the attention grid sees PP as more replicas: TP and the SP group are placed the same way
    return _with_replicas(config, choice.dp * choice.pp)


@functools.lru_cache(maxsize=1 << 14)
def _with_replicas(config: ParallelConfig, dp: int) -> ParallelConfig:
    return replace(config, dp=dp)


def attention_prediction(shape: ModelShape, cluster: Cluster, hardware: Hardware, config: ParallelConfig,
                         choice: JobChoice, bound: bool = False, coarse: bool = False) -> Prediction:
    """One layer's attention for ``choice``'s micro-batch (the same for every choice of PP, DP, recompute and
    optimizer: :func:`plan_job` computes it once per grid and micro-batch size)."""
    return predict(replace(shape, micro_batch=choice.micro_batch), cluster, hardware, _attention_grid(config, choice),
                   check=False, bound=bound, coarse=coarse)


class JobGrid(NamedTuple):
    """What :func:`predict_job` needs of a grid and a micro-batch size, the same for every job choice with them
    (:func:`job_grid`)."""

    gpt: GPTShape  # with the micro-batch size
    reason: str  # why the attention grid cannot run ("" when it can)
    transient_bytes: float  # one attention call's buffers


def job_grid(shape: ModelShape, cluster: Cluster, config: ParallelConfig, choice: JobChoice) -> JobGrid:
    """:class:`JobGrid` of ``config`` with ``choice``'s micro-batch size and replicas (DP x PP)."""
    mb_shape = shape if shape.micro_batch == choice.micro_batch else replace(shape, micro_batch=choice.micro_batch)
    return JobGrid(gpt_shape(mb_shape), feasibility_reason(mb_shape, cluster, _attention_grid(config, choice)),
                   attention_transient_bytes(mb_shape, config))


def predict_job(shape: ModelShape, cluster: Cluster, hardware: Hardware, config: ParallelConfig, choice: JobChoice,
                reserve_gib: float = DEFAULT_RESERVE_GIB, attention: Optional[Prediction] = None,
                time_unfit: bool = True, job: Optional[JobConfig] = None,
                grid: Optional[JobGrid] = None) -> JobPrediction:
    """Memory per GPU (states + in-flight activations + transients) and seconds per iteration of a whole job:
    (micro-batches + (PP - 1) / V) x the slowest stage's micro-batch (the 1F1B bubble, V virtual stages shrink it)
    + the DP x CP gradient reduction. ``attention``: the layer's :func:`attention_prediction` when the caller
    has it (it depends on the grid and the micro-batch size only); ``time_unfit`` False: a job over the memory
    budget gets its memory only (what a search needs of it); ``job``: :func:`job_config` of ``config`` and
    ``choice``, ``grid``: :func:`job_grid` of them, when the caller has them."""
    grid = grid or job_grid(shape, cluster, config, choice)
    base = job_base(shape, cluster, hardware, config, choice, reserve_gib, job, grid.gpt)
    if attention is None:
        attention = attention_prediction(shape, cluster, hardware, config, choice)
    return job_with_attention(base, grid, attention, time_unfit)


class JobBase(NamedTuple):
    """A job's prediction but its attention: the same for every impl, order and document layout of its grid
    (:func:`job_base`; :func:`job_with_attention` completes it). Times per layer and micro-batch unless named."""

    choice: JobChoice
    figures: "_JobFigures"
    batch_reason: str  # the global batch does not split over DP x micro-batch ("" when it does)
    budget_gib: float
    attention_time_per_forward: float  # an attention's compute time over its forward's
    gemm_fwd_ms: float = 0.0
    elementwise_ms: float = 0.0
    overhead_ms: float = 0.0
    moe_comm_ms: float = 0.0
    head_ms: float = 0.0  # per stage: the output layer and loss
    p2p_ms: float = 0.0
    grad_sync_ms: float = 0.0  # per iteration
    optimizer_ms: float = 0.0  # per iteration


def job_base(shape: ModelShape, cluster: Cluster, hardware: Hardware, config: ParallelConfig, choice: JobChoice,
             reserve_gib: float = DEFAULT_RESERVE_GIB, job: Optional[JobConfig] = None,
             gpt: Optional[GPTShape] = None) -> JobBase:
    """:class:`JobBase` of ``choice`` on ``config``'s grid (``job``, ``gpt``: its :func:`job_config` and the
    micro-batch's :func:`gpt_shape` when the caller has them)."""
    gpt = gpt or gpt_shape(replace(shape, micro_batch=choice.micro_batch))
    job = job or job_config(config, choice)
    figures = _job_figures(gpt, job)
    batch_reason = _batch_reason(choice)
    budget_gib = hardware.gpu_memory_gib - reserve_gib
    attention_time_per_forward = 1 + BACKWARD_FLOPS_FACTOR * hardware.fwd_tflops / hardware.bwd_tflops
    if figures.reason:
        return JobBase(choice, figures, batch_reason, budget_gib, attention_time_per_forward)
    return JobBase(choice, figures, batch_reason, budget_gib, attention_time_per_forward,
                   elementwise_ms=_elementwise_ms(hardware, figures.layer_saved),
                   overhead_ms=hardware.layer_overhead_us / 1e3,
                   **_grid_free_times(gpt, cluster, hardware, config.tp, config.sp, job.expert_dp, choice,
                                      figures.memory.stage))


def _elementwise_ms(hardware: Hardware, layer_saved: float) -> float:
    """Memory-bound elementwise work of a layer (norms, RoPE, activation, residuals): what it saves, written and
    read."""
    return ELEMENTWISE_PASSES * layer_saved / (hardware.memory_gbps * 1e9) * 1e3 if hardware.memory_gbps else 0.0


def _batch_reason(choice: JobChoice) -> str:
    """Why the global batch does not split over DP x micro-batch ("" when it does)."""
    if choice.global_batch % (choice.dp * choice.micro_batch) == 0:
        return ""
    return f"global batch {choice.global_batch} not divisible by DP {choice.dp} x micro-batch {choice.micro_batch}"


def _grid_free_times(gpt: GPTShape, cluster: Cluster, hardware: Hardware, tp: int, sp: int, expert_dp: int,
                     choice: JobChoice, stage: int) -> dict[str, float]:
    """The times of a job that do not depend on how its SP group splits into u and r (nor on the attention): the
    layer's GEMMs and MoE dispatch, the output layer, PP sends (:func:`_layer_free_times`), the gradient reduction
    and optimizer step of ``stage``, the one that needs the most memory (:func:`_state_times`)."""
    return {**_layer_free_times(gpt, cluster, hardware, tp, sp, choice),
            **_state_times(gpt, cluster, hardware, tp, sp, expert_dp, choice, stage)}


@functools.lru_cache(maxsize=1 << 16)
def _layer_free_times(gpt: GPTShape, cluster: Cluster, hardware: Hardware, tp: int, sp: int,
                      choice: JobChoice) -> dict[str, float]:
    # cached: the search asks for them under every u
    tokens = choice.micro_batch * gpt.seq_len / sp
    gemm_tflops = hardware.gemm_tflops or 2 * hardware.fwd_tflops
    job = JobConfig(tp=tp, ep=choice.ep)
    gemm_fwd_ms = 2.0 * tokens * layer_active_parameter_count(gpt, job) / (gemm_tflops * 1e12) * 1e3
    moe_comm_ms = moe_dispatch_ms(gpt, cluster, hardware, tp, sp, choice) if gpt.moe else 0.0
    head_ms = 3 * 2.0 * tokens * gpt.vocab * gpt.hidden / tp / (gemm_tflops * 1e12) * 1e3
    if hardware.memory_gbps:  # the fp32 logits: softmax forward, its gradient backward
        head_ms += ELEMENTWISE_PASSES * tokens * gpt.vocab / tp * FP32_BYTES / (hardware.memory_gbps * 1e9) * 1e3
    p2p_ms = 0.0
    if choice.pp > 1:  # each model chunk sends its output forward and receives its gradient back (p2p, not hidden)
        per_send = tokens * gpt.hidden * gpt.dtype_bytes / tp  # sequence parallel with TP > 1
        crosses = cluster.world // choice.pp >= cluster.gpus_per_node  # PP is megatron-core's outermost group
        p2p_ms = 2 * choice.virtual_stages * _transfer_ms(
            per_send, hardware.inter_node_gbps if crosses else hardware.intra_node_gbps,
            hardware.inter_latency_us if crosses else hardware.intra_latency_us)
    return dict(gemm_fwd_ms=gemm_fwd_ms, moe_comm_ms=moe_comm_ms, head_ms=head_ms, p2p_ms=p2p_ms)


@functools.lru_cache(maxsize=1 << 16)
def _state_times(gpt: GPTShape, cluster: Cluster, hardware: Hardware, tp: int, sp: int, expert_dp: int,
                 choice: JobChoice, stage: int) -> dict[str, float]:
    """The gradient reduction over DP x CP (fp32 buckets; reduce-scatter + bf16 all-gather with the distributed
    optimizer, all-reduce without), not overlapped with the backward here (MoE: the experts' gradients over the
    expert-data-parallel group, DP x CP / EP), and the optimizer step over this rank's parameters of ``stage`` (its
    shard with the distributed optimizer)."""
    job = JobConfig(tp=tp, pp=choice.pp, virtual_stages=choice.virtual_stages, ep=choice.ep, dp=choice.dp * sp,
                    first_stage_layers=choice.first_stage_layers, last_stage_layers=choice.last_stage_layers,
                    distributed_optimizer=choice.distributed_optimizer)
    stage_params = state_bytes(gpt, job, stage)["params"] / gpt.dtype_bytes
    expert_params = stage_expert_count(gpt, job, stage)
    per_byte = FP32_BYTES + gpt.dtype_bytes if choice.distributed_optimizer else 2 * FP32_BYTES
    # both groups span the TP x DP x CP ranks of a stage (the expert group strided by TP x EP)
    crosses = tp * choice.dp * sp > cluster.gpus_per_node
    gbps = hardware.inter_node_gbps if crosses else hardware.intra_node_gbps
    grad_sync_ms = 0.0
    for params, group in ((stage_params - expert_params, choice.dp * sp), (expert_params, expert_dp)):
        if group > 1 and params > 0:
            grad_sync_ms += params * (group - 1) / group * per_byte / (gbps * 1e9) * 1e3
    per_param = hardware.optimizer_ns_per_param or (
        OPTIMIZER_BYTES_PER_PARAM / hardware.memory_gbps if hardware.memory_gbps else 0.0)
    sharded = ((stage_params - expert_params) / (choice.dp * sp) + expert_params / expert_dp
               if choice.distributed_optimizer else stage_params)
    return dict(grad_sync_ms=grad_sync_ms, optimizer_ms=sharded * per_param / 1e6)


def job_with_attention(base: JobBase, grid: JobGrid, attention: Prediction, time_unfit: bool = True) -> JobPrediction:
    """The job of ``base`` with one grid's ``attention`` (its :func:`attention_prediction`; ``grid``: its
    :func:`job_grid`): memory with the attention's buffers, time with its compute and communication."""
    choice, figures = base.choice, base.figures
    reason = figures.reason or grid.reason or base.batch_reason
    if reason:
        return JobPrediction(attention, choice, feasible=False, refusal=reason, budget_gib=base.budget_gib)
    # one constructor call with every figure (cheaper than setting them one by one)
    memory = figures.memory
    transient_gib = (grid.transient_bytes + figures.recompute_working) / GIB
    memory_gib = memory.total / GIB + transient_gib
    expert_params_gib = figures.expert_params * grid.gpt.dtype_bytes / GIB
    feasible = not memory_gib > base.budget_gib  # when not: its reason is the memory breakdown
    if not feasible and not time_unfit:
        return JobPrediction(attention, choice, feasible=False, memory=memory, transient_gib=transient_gib,
                             memory_gib=memory_gib, budget_gib=base.budget_gib, expert_params_gib=expert_params_gib)

    gemm_ms, recompute_ms, layer_ms, stage_ms, bubble_ms, iteration_s = _job_times(base, attention)
    return JobPrediction(attention, choice, feasible=feasible, memory=memory, transient_gib=transient_gib,
                         memory_gib=memory_gib, budget_gib=base.budget_gib, layer_ms=layer_ms, gemm_ms=gemm_ms,
                         recompute_ms=recompute_ms, elementwise_ms=base.elementwise_ms, overhead_ms=base.overhead_ms,
                         moe_comm_ms=base.moe_comm_ms, expert_params_gib=expert_params_gib,
                         optimizer_ms=base.optimizer_ms, p2p_ms=base.p2p_ms, stage_ms=stage_ms, bubble_ms=bubble_ms,
                         grad_sync_ms=base.grad_sync_ms, iteration_s=iteration_s)


def _job_times(base: JobBase, attention: Prediction) -> tuple[float, ...]:
    """(GEMMs, recompute, layer, stage, bubble ms; seconds per iteration) of ``base``'s job with ``attention``: the
    attention + the layer's GEMMs + the recompute's extra forward, per layer, and ``base``'s other times. The
    search's bounds take the same arithmetic with a smaller gradient reduction and optimizer step (IEEE additions
    are monotone: a bound stays below the time it bounds)."""
    choice, layers, chunk_layers = base.choice, base.figures.layers, base.figures.chunk_layers
    gemm_ms = 3 * base.gemm_fwd_ms
    attn_fwd_all = (attention.compute_ms / base.attention_time_per_forward + attention.a2a_ms / 2
                    + attention.ring_exposed_ms / 3)
    recompute_ms = 0.0
    if choice.recompute == "full":  # a recomputed forward: a third of the GEMMs, elementwise work and overhead
        recomputed = chunk_layers if choice.recompute_method == "uniform" else min(choice.recompute_num_layers,
                                                                                   chunk_layers)
        recompute_ms = recomputed / chunk_layers * (attn_fwd_all + base.gemm_fwd_ms + attention.tp_ms / 2
                                                    + base.moe_comm_ms / 2
                                                    + (base.elementwise_ms + base.overhead_ms) / 3)
    elif choice.recompute == "selective":
        recompute_ms = attn_fwd_all
    layer_ms = (attention.total_ms + gemm_ms + recompute_ms + base.elementwise_ms + base.overhead_ms
                + base.moe_comm_ms)
    stage_ms = layers * layer_ms + base.head_ms + base.p2p_ms
    bubble_ms = (choice.pp - 1) / choice.virtual_stages * stage_ms
    iteration_s = (choice.micro_batches * stage_ms + bubble_ms + base.grad_sync_ms + base.optimizer_ms) / 1e3
    return gemm_ms, recompute_ms, layer_ms, stage_ms, bubble_ms, iteration_s


class _JobFigures(NamedTuple):
    reason: str
    memory: Optional[JobMemory] = None
    recompute_working: float = 0.0
    layer_saved: float = 0.0  # bytes one layer saves without recompute (its elementwise traffic)
    layers: int = 0  # of the fullest stage
    chunk_layers: int = 0
    expert_params: float = 0.0  # routed experts' parameters on the stage that needs the most memory


@functools.lru_cache(maxsize=1 << 16)
def _job_figures(gpt, job: JobConfig) -> _JobFigures:
    """What :func:`predict_job` needs of a job that does not depend on the attention (the same for every ring impl,
    order and document layout of a grid): computed once per job."""
    reason = check_job(gpt, job)
    if reason:
        return _JobFigures(reason)
    memory = job_memory(gpt, job)
    return _JobFigures("", memory, recompute_working_bytes(gpt, job),
                       sum(layer_activation_bytes(gpt, job, recompute="none").values()), stage_layers(gpt, job),
                       chunk_layers(gpt, job), stage_expert_count(gpt, job, memory.stage))


def states_gib(gpt: GPTShape, job: JobConfig) -> float:
    """GiB of parameters, fp32 gradients and optimizer states on the pipeline stage holding the most (not
    depending on how CP splits into u and r, on recompute or on micro-batches): a job over the budget with these
    alone cannot fit."""
    return max(sum(state_bytes(gpt, job, stage).values()) for stage in memory_stages(job)) / GIB


def moe_dispatch_ms(gpt, cluster: Cluster, hardware: Hardware, tp: int, sp: int, choice: JobChoice) -> float:
    """The alltoall dispatcher of one MoE layer, forward + backward, not overlapped: dispatch and combine each way
    (4 all-to-alls over EP of the rank's routed token copies, top-k x its CP shard's tokens x hidden, (EP - 1) /
    EP of them leave the rank) and, with TP, the gather and scatter of those copies over TP inside the node
    (4 more). megatron-core places EP outside expert TP (= TP): the EP group spans TP x EP consecutive ranks.
    ``sp``: the SP group's size (u x r)."""
    copies = choice.micro_batch * gpt.seq_len / sp * gpt.moe_topk
    nbytes = copies * gpt.hidden * gpt.dtype_bytes
    total = 0.0
    if choice.ep > 1:
        crosses = tp * choice.ep > cluster.gpus_per_node
        total += 4 * _transfer_ms(nbytes * (choice.ep - 1) / choice.ep,
                                  hardware.inter_node_gbps if crosses else hardware.intra_node_gbps,
                                  hardware.inter_latency_us if crosses else hardware.intra_latency_us)
    if tp > 1:
        total += 4 * _transfer_ms(nbytes * (tp - 1) / tp, hardware.intra_node_gbps,
                                  hardware.intra_latency_us)
    return total


def expert_parallel_sizes(shape: ModelShape, dp_cp: int) -> tuple[int, ...]:
    """EP sizes megatron-core takes for ``dp_cp`` = DP x CP ranks (expert TP = TP): divisors of both the experts
    and DP x CP; (1,) for a dense model."""
    return _expert_parallel_sizes(shape.num_experts, dp_cp)


@functools.lru_cache(maxsize=None)
def _expert_parallel_sizes(num_experts: int, dp_cp: int) -> tuple[int, ...]:
    return tuple(ep for ep in _divisors(dp_cp) if num_experts % ep == 0) if num_experts else (1,)


def memory_breakdown(p: JobPrediction) -> str:
    m = p.memory
    experts = f" (experts {p.expert_params_gib:.1f})" if p.expert_params_gib else ""
    return (f"params {m.params / GIB:.1f}{experts} + grads {m.grads / GIB:.1f} + optimizer {m.optimizer / GIB:.1f} + "
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


@contextlib.contextmanager
def _without_gc():
    # a search allocates ~10^5 predictions and keys that form no reference cycles: the collector's passes over
    # them cost ~15 % of a 16,384-GPU search and free nothing
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_without_gc()
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
    keep: Optional[int] = DEFAULT_KEEP,
    ep_choices: Optional[Sequence[int]] = None,
) -> tuple[Sequence[JobPrediction], Sequence[JobPrediction]]:
    """(feasible jobs ranked by seconds per iteration, infeasible ones); the global batch defaults to the world;
    ``ep_choices``: expert-parallel sizes of a MoE model (None: every one megatron-core takes).

    Branch and bound: every job first gets a lower bound of its time from its grid's O(1) lower bound of the
    attention (``predict(bound=True)``; ring-local documents first without their layout, ``coarse``) and the least
    gradient reduction over the stages its memory may peak on, without its memory. Jobs are then taken in the
    order of their bounds -- one without memory gets it (over the budget: infeasible) and goes back in its place, a
    coarse bound is refined and put back, a bound is predicted exactly -- until ``keep`` exact ones are faster than
    the next bound: the first ``keep`` of the ranking are those of the exhaustive search (``keep=None``), the rest
    follow with lower bounds only (``exact`` False). That rest (a :class:`JobRanking`) and the infeasible jobs (a
    :class:`JobRefusals`) are built when first asked for: the memory of a 16,384-GPU search's ~10^5 jobs is computed
    for a few hundred unless the whole ranking is read."""
    global_batch = global_batch or cluster.world
    budget = hardware.gpu_memory_gib - reserve_gib
    nodes: list[tuple] = []  # (time bound, index, _Node): jobs whose memory is not known yet
    refused: list[tuple[int, JobPrediction]] = []  # (index, prediction)
    index = 0  # every job and refused grid in the order of the search (ties rank by it)
    attention_time_per_forward = 1 + BACKWARD_FLOPS_FACTOR * hardware.fwd_tflops / hardware.bwd_tflops
    for tp in tp_choices:
        if cluster.world % tp or cluster.gpus_per_node % tp:
            continue
        for sp in _divisors(cluster.world // tp):
            rest = cluster.world // (tp * sp)
            choices = job_choices(shape, rest, pp_choices=pp_choices, recomputes=recomputes,
                                  distributed_optimizers=distributed_optimizers, micro_batches=micro_batches,
                                  global_batch=global_batch, virtual_stages=virtual_stages)
            jobs = [replace(choice, ep=ep) if ep != choice.ep else choice for choice in choices
                    for ep in ep_choices or expert_parallel_sizes(shape, choice.dp * sp)]
            # parameters, gradients and optimizer states alone over the budget: no u, r or impl fits the job (it is
            # listed with the first grid that can run, not with every one)
            gpt = gpt_shape(shape)
            too_large = [not check_job(gpt, job) and states_gib(gpt, job) > budget
                         for job in (job_config(ParallelConfig(tp, 1, sp, "zigzag"), choice) for choice in jobs)]
            free: dict[int, dict[str, float]] = {}  # per job: the least grid-free times over its stages
            listed = False  # the jobs too large for any grid
            for u in _divisors(sp):
                # the jobs' megatron-core view and all but their attention are the same for every impl, order and
                # layout of this grid
                job_configs = [job_config(ParallelConfig(tp, u, sp // u, "zigzag"), choice) for choice in jobs]
                reasons: dict[int, tuple[str, str]] = {}  # per job: why megatron-core refuses it; its batch
                bases: dict[int, JobBase] = {}  # per job: its times but the attention (a bound's, memory unknown)
                for impl, micro_q in impl_variants(ring_impls, sp // u, micro_qs):
                    for inner, layout in ((inner, layout) for inner in orders
                                          for layout in document_layouts(shape, impl, sp // u)):
                        if not inner and (u == 1 or sp // u == 1):
                            continue
                        config = ParallelConfig(tp, u, sp // u, impl, 1, inner, micro_q, layout)
                        reason = feasibility_reason(shape, cluster, replace(config, dp=rest))
                        if reason:  # the grid itself cannot run: one entry for all its choices
                            refused.append((index, JobPrediction(
                                Prediction(config), choices[0] if choices else JobChoice(), feasible=False,
                                refusal=reason)))
                            index += 1
                            continue
                        attention: dict[int, tuple[Prediction, JobGrid]] = {}  # per micro-batch size
                        for job_index, (choice, job, large) in enumerate(zip(jobs, job_configs, too_large)):
                            if large and listed:
                                continue
                            if choice.micro_batch not in attention:
                                attention[choice.micro_batch] = (attention_prediction(
                                    shape, cluster, hardware, config, choice, bound=keep is not None,
                                    coarse=keep is not None), job_grid(shape, cluster, config, choice))
                            layer, grid = attention[choice.micro_batch]
                            if job_index not in reasons:
                                reasons[job_index] = (check_job(grid.gpt, job), _batch_reason(choice))
                            reason = reasons[job_index][0] or grid.reason or reasons[job_index][1]
                            if reason:
                                refused.append((index, JobPrediction(layer, choice, feasible=False, refusal=reason,
                                                                     budget_gib=budget)))
                            else:
                                if job_index not in bases:
                                    if job_index not in free:
                                        free[job_index] = _least_grid_free_times(
                                            grid.gpt, cluster, hardware, tp, sp, job, choice)
                                    bases[job_index] = _bound_base(grid.gpt, hardware, job, choice, budget,
                                                                   attention_time_per_forward, free[job_index])
                                base = bases[job_index]
                                bound = _job_times(base, layer)[-1]
                                nodes.append((bound, index, _Node(config, choice, job, grid, layer)))
                            index += 1
                        listed = True
    search = _JobSearch(shape, cluster, hardware, reserve_gib, nodes, refused)
    if keep is None:
        search.exhaust()
        return sorted(search.tail, key=_rank_key), search.infeasible()
    return search.run(keep)


class _Node(NamedTuple):
    """A job of the search whose memory is not known yet (plan_job's lower bound of its time ranks it)."""

    config: ParallelConfig
    choice: JobChoice
    job: JobConfig
    grid: JobGrid
    attention: Prediction  # the grid's (bound of its) attention


def _least_grid_free_times(gpt: GPTShape, cluster: Cluster, hardware: Hardware, tp: int, sp: int, job: JobConfig,
                           choice: JobChoice) -> dict[str, float]:
    """:func:`_grid_free_times` with the least gradient reduction and optimizer step over the stages that may need
    the most memory (which one does is known only with the memory): a bound's."""
    times = [_state_times(gpt, cluster, hardware, tp, sp, job.expert_dp, choice, stage)
             for stage in memory_stages(job)]
    return {**_layer_free_times(gpt, cluster, hardware, tp, sp, choice),
            "grad_sync_ms": min(t["grad_sync_ms"] for t in times), "optimizer_ms": min(t["optimizer_ms"] for t in times)}


def _bound_base(gpt: GPTShape, hardware: Hardware, job: JobConfig, choice: JobChoice, budget_gib: float,
                attention_time_per_forward: float, free: dict[str, float]) -> JobBase:
    """A :class:`JobBase` of ``job`` for a bound of its time: every time :func:`job_base` gives it (the same
    arithmetic), with ``free``'s least gradient reduction and optimizer step; its figures hold the layer counts,
    not the memory."""
    layer_saved = sum(layer_activation_bytes(gpt, job, recompute="none").values())
    figures = _JobFigures("", layers=stage_layers(gpt, job), chunk_layers=chunk_layers(gpt, job))
    return JobBase(choice, figures, "", budget_gib, attention_time_per_forward,
                   elementwise_ms=_elementwise_ms(hardware, layer_saved), overhead_ms=hardware.layer_overhead_us / 1e3,
                   **free)


class _JobSearch:
    """plan_job's branch and bound over its jobs' lower bounds, taken fastest first: a job whose memory is not known
    gets it (over the budget: infeasible), a coarse attention bound is refined (its grid's layout solved), a bound
    is predicted exactly. :meth:`run` stops once ``keep`` exact times are below every bound left; the rest of the
    ranking is built only when asked for (:class:`JobRanking`), in the same order."""

    def __init__(self, shape: ModelShape, cluster: Cluster, hardware: Hardware, reserve_gib: float,
                 nodes: list[tuple], refused: list[tuple[int, JobPrediction]]):
        self.shape, self.cluster, self.hardware, self.reserve_gib = shape, cluster, hardware, reserve_gib
        self.queue = nodes  # (bound, index, _Node or JobPrediction)
        heapq.heapify(self.queue)
        self.refused = refused  # (index, prediction): cannot run, or over the memory budget
        self.tail: list[JobPrediction] = []  # after the exact ones: lower bounds, in rank order
        self._attention: dict[tuple, Prediction] = {}
        self._infeasible: Optional[list[JobPrediction]] = None

    def _with_memory(self, index: int, node: _Node) -> Optional[JobPrediction]:
        """``node`` with its memory (and its bound's attention); None when over the budget (then refused)."""
        base = job_base(self.shape, self.cluster, self.hardware, node.config, node.choice, self.reserve_gib, node.job,
                        node.grid.gpt)
        p = job_with_attention(base, node.grid, node.attention, time_unfit=False)
        if p.feasible:
            return p
        self.refused.append((index, p))
        return None

    def _pop(self) -> Optional[tuple[int, JobPrediction]]:
        """The next prediction with its memory, by bound (jobs without memory get it and go back in their place)."""
        while self.queue:
            bound, index, item = heapq.heappop(self.queue)
            if isinstance(item, _Node):
                p = self._with_memory(index, item)
                if p is not None:
                    heapq.heappush(self.queue, (p.iteration_s, index, p))
                continue
            return index, item
        return None

    def run(self, keep: int) -> tuple["JobRanking", "JobRefusals"]:
        exact: list[JobPrediction] = []
        fastest: list[float] = []  # the exact times so far, as a max-heap of the fastest ``keep`` (negated)
        while self.queue and not (len(fastest) >= keep and self.queue[0][0] > -fastest[0]):
            popped = self._pop()
            if popped is None:
                break
            index, p = popped
            if len(fastest) >= keep and p.iteration_s > -fastest[0]:  # its memory raised its bound past the last
                heapq.heappush(self.queue, (p.iteration_s, index, p))
                break
            refine = p.attention.coarse
            key = (p.config, p.job.micro_batch, refine)
            if key not in self._attention:
                self._attention[key] = attention_prediction(self.shape, self.cluster, self.hardware, p.config, p.job,
                                                            bound=refine)
            p = predict_job(self.shape, self.cluster, self.hardware, p.config, p.job, self.reserve_gib,
                            self._attention[key])
            if refine:
                heapq.heappush(self.queue, (p.iteration_s, index, p))
                continue
            exact.append(p)
            heapq.heappush(fastest, -p.iteration_s)
            if len(fastest) > keep:
                heapq.heappop(fastest)
        return JobRanking(sorted(exact, key=_rank_key), self), JobRefusals(self)

    def next_tail(self) -> bool:
        """Rank one more job of the tail (False when none is left)."""
        popped = self._pop()
        if popped is not None:
            self.tail.append(popped[1])
        return popped is not None

    def first(self, wanted: Callable[[JobChoice], bool]) -> Optional[JobPrediction]:
        """The first job with a ``wanted`` choice that the ranking's tail would reach, ranked or not yet; the memory
        is computed only for wanted jobs (those ranked before it), the others stay where they are."""
        found = next((p for p in self.tail if wanted(p.job)), None)
        if found is not None:
            return found
        chosen, rest = [], []
        for entry in self.queue:
            item = entry[2]
            (chosen if wanted(item.choice if isinstance(item, _Node) else item.job) else rest).append(entry)
        if not chosen:
            return None
        heapq.heapify(chosen)
        self.queue = chosen
        popped = self._pop()  # the wanted jobs' own branch and bound
        if popped is not None:
            heapq.heappush(self.queue, (popped[1].iteration_s, *popped))
        self.queue += rest
        heapq.heapify(self.queue)
        return None if popped is None else popped[1]

    def exhaust(self) -> None:
        while self.next_tail():
            pass

    def infeasible(self) -> list[JobPrediction]:
        """Every job that cannot run or is over the budget, in the order of the search."""
        if self._infeasible is None:
            self.exhaust()
            self._infeasible = [p for _, p in sorted(self.refused, key=lambda entry: entry[0])]
        return self._infeasible


class JobRanking(Sequence):
    """:func:`plan_job`'s feasible jobs by seconds per iteration: the first ``keep`` exact, then the others with
    lower bounds. Those are ranked only as far as asked for (an index, a slice, an iteration); ``len`` ranks all."""

    def __init__(self, exact: list[JobPrediction], search: _JobSearch):
        self._exact, self._search = exact, search

    def _count(self, wanted: Optional[int] = None) -> int:
        """How many are ranked once at least ``wanted`` (None: all) are, or all there are."""
        exact, tail = self._exact, self._search.tail
        while (wanted is None or len(exact) + len(tail) < wanted) and self._search.next_tail():
            pass
        return len(exact) + len(tail)

    def _at(self, position: int) -> JobPrediction:
        exact = self._exact
        return exact[position] if position < len(exact) else self._search.tail[position - len(exact)]

    def __len__(self) -> int:
        return self._count()

    def __getitem__(self, item):
        if isinstance(item, slice):
            if item.step in (None, 1) and (item.start or 0) >= 0 and item.stop is not None and item.stop >= 0:
                return [self._at(i) for i in range(item.start or 0, min(item.stop, self._count(item.stop)))]
            return [self._at(i) for i in range(*item.indices(self._count()))]
        position = item if item >= 0 else item + self._count()
        if not 0 <= position < self._count(position + 1):
            raise IndexError(item)
        return self._at(position)

    def __iter__(self):
        position = 0
        while position < self._count(position + 1):
            yield self._at(position)
            position += 1

    def __bool__(self) -> bool:
        return self._count(1) > 0

    def first(self, wanted: Callable[[JobChoice], bool]) -> Optional[JobPrediction]:
        """The first job of the ranking with a ``wanted`` choice, or None (without ranking the others)."""
        return next((p for p in self._exact if wanted(p.job)), None) or self._search.first(wanted)


class JobRefusals(Sequence):
    """:func:`plan_job`'s jobs that cannot run or do not fit, in the order of the search; complete only once the
    whole ranking is (asking for them ranks it all)."""

    def __init__(self, search: _JobSearch):
        self._search = search

    def __len__(self) -> int:
        return len(self._search.infeasible())

    def __getitem__(self, item):
        return self._search.infeasible()[item]


def _rank_key(p: JobPrediction) -> tuple:
    return (round(p.iteration_s, 9), p.memory_gib, IMPL_PREFERENCE.index(p.config.ring_impl)
            if p.config.ring_impl in IMPL_PREFERENCE else len(IMPL_PREFERENCE))


def states_floor(shape: ModelShape, cluster: Cluster) -> Optional[tuple[float, int, int]]:
    """``(GiB, TP, PP)``: the least parameters + fp32 gradients a rank of the fullest pipeline stage holds over every
    TP (inside a node) and PP (dividing the GPUs per TP group; uneven stages where it does not divide the layers)
    of ``cluster`` (MoE: experts over the largest EP). No DP, CP, recompute or
    optimizer sharding reduces them, so a job whose floor exceeds the budget cannot fit however it is searched.
    None when no TP x PP fits the cluster."""
    gpt, best = gpt_shape(shape), None
    for tp in _divisors(cluster.gpus_per_node):
        if cluster.world % tp:
            continue
        for pp, uneven in pipeline_splits(gpt.num_layers, cluster.world // tp, None):
            first, last = uneven or (None, None)
            rest = cluster.world // (tp * pp)  # DP x CP: the largest EP any search could take
            job = JobConfig(tp=tp, pp=pp, first_stage_layers=first, last_stage_layers=last, dp=rest,
                            ep=max(expert_parallel_sizes(shape, rest)))
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
