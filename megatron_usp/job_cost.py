"""Memory of a whole Megatron job, per GPU: parameters, gradients, optimizer states and the activations a
megatron-core ``GPTModel`` (local layer spec, USP core attention, no dropout) holds for backward.

The one place these formulas live: the planner (``megatron_usp.planner``) imports them,
``tests/planner/test_job_memory.py`` checks them against the bytes megatron-core really saves
(``torch.autograd.graph.saved_tensors_hooks``) and against the state sizes of its own optimizer.

Activations of one layer for one micro-batch on one rank, ``T = s·b / (u·r)`` tokens, TP ``t``, element bytes ``e``
(``h`` hidden, ``n``/``g`` query/kv heads, ``d`` head dim, ``F`` ffn hidden; ``/t`` where megatron-core shards):

* norms: input and output of both (4·T·h·e; /t with sequence parallelism) + fp32 statistics (2 per LayerNorm
  token, 1 per RMSNorm token);
* RoPE: cos and sin for q and for k (4·T·d·e);
* attention, u = 1: the QKV projection's output (v stays a view of it) T·(n+2g)·d·e/t, q and k after RoPE,
  the output (the projection's input, same storage), fp32 lse T·n/t·4. u > 1: q, k, v, out in the ring-level
  layout after the all-to-all (s/r tokens x heads/u, kv heads replicated up to u), lse, and the output after the
  inverse all-to-all (the projection's input). Selective recompute keeps only the checkpoint's inputs (q and k
  after RoPE, the QKV output v is a view of) and its output. Multi-latent attention (``kv_lora_rank`` > 0):
  the compressed query / kv as norm and up-projection inputs, RoPE tables of its RoPE dims, q, k, v and the
  output padded to one width (:func:`attention_head_dim`) and the output at the value width;
* MLP: fc1's output (2F with a gated unit) and the activation's output F, both /t (unfused GLU: 2F more;
  unfused torch RMSNorm: its normalized input, h, more). A MoE layer (every layer, ``num_experts`` > 0) instead:
  the router's and dispatcher's bookkeeping and, per routed token copy (top-k), its dispatched input and its
  expert's fc1 / activation outputs (:func:`moe_activation_bytes`), plus its shared experts' MLP; experts split over
  EP, their optimizer state over the expert-data-parallel group DP x CP / EP; the first ``moe_dense_layers`` keep a
  dense MLP.

Full recompute keeps, per checkpointed chunk, its input T·h·e (and the rotary table once); ``block`` recomputes the
first ``recompute_num_layers`` layers of a stage, ``uniform`` checkpoints chunks of that many layers. The last stage
also holds the final norm's input and output and the loss's fp32 softmax T·V/t·4. With PP and 1F1B the first
stage keeps ``min(PP, micro-batches)`` micro-batches in flight (stage ``i`` keeps ``min(PP - i, m)``). With ``V``
virtual stages (interleaved 1F1B) a rank holds ``V`` model chunks of ``layers / (PP·V)`` layers each and keeps
megatron-core's warm-up count + 1 chunk-micro-batches in flight: ``2(PP - i - 1) + (V - 1)·PP + 1`` on stage ``i``
(``get_pp_rank_microbatches``, micro-batch groups of PP), at most ``m·V``.

Parameters per rank in ``e`` bytes, fp32 main gradients (DDP ``grad_reduce_in_fp32``), Adam: fp32 master weights
(only when the parameters are not fp32) and two fp32 moments; with the distributed optimizer master weights and
moments are sharded over DP x CP (megatron-core's data-parallel-with-context-parallel group), as in
``megatron.core.optimizer.distrib_optimizer``; the gradient buffer stays whole.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from .ulysses import kv_replication

FP32 = 4
RECOMPUTE_MODES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def attention_head_dim(head_dim: int, kv_lora_rank: int = 0, qk_rope_head_dim: int = 0, v_head_dim: int = 0) -> int:
    """The head dim USP attention runs with: with multi-latent attention (``kv_lora_rank`` > 0) its q/k heads
    (``head_dim`` + the RoPE dims) and v heads padded to one width (``usp_attn``), else ``head_dim``."""
    return max(head_dim + qk_rope_head_dim, v_head_dim) if kv_lora_rank > 0 else head_dim


@dataclass(frozen=True)
class GPTShape:
    """A megatron-core GPTModel with the local layer spec."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab: int
    seq_len: int
    micro_batch: int = 1
    dtype_bytes: int = 2
    gated_mlp: bool = True  # SwiGLU: fc1 is 2 x ffn wide
    rmsnorm: bool = True
    bias: bool = False  # add_bias_linear
    untied_embeddings: bool = True
    # fused kernels (GPU: Transformer Engine / apex norms, megatron's bias_swiglu fusion) save less than the torch
    # fallbacks megatron-core uses on CPU: torch RMSNorm also keeps its normalized input (h), and the unfused GLU
    # keeps silu's output and ``x_linear + offset`` (2 x ffn more)
    fused_kernels: bool = True
    # mixture of experts in every layer (megatron-core's MoE layer, alltoall dispatcher, expert TP = TP): 0 = dense
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden: int = 0
    moe_shared_ffn_hidden: int = 0  # the shared experts' MLP beside the routed ones (0: none)
    moe_dense_layers: int = 0  # the first layers keep a dense MLP of ffn_hidden (DeepSeek's first_k_dense_replace)
    # multi-latent attention (megatron-core's MLASelfAttention) when kv_lora_rank > 0: head_dim is then MLA's
    # qk_head_dim (the part without RoPE), kv_heads = heads; q_lora_rank 0: queries projected without compression
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attention_head_dim(self) -> int:
        return attention_head_dim(self.head_dim, self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim)

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.mla else self.head_dim

    @property
    def rope_head_dim(self) -> int:
        """The dims of a q/k head RoPE rotates (MLA: its RoPE part only)."""
        return self.qk_rope_head_dim if self.mla else self.head_dim


@dataclass(frozen=True)
class JobConfig:
    tp: int = 1
    pp: int = 1
    ulysses: int = 1
    ring: int = 1
    dp: int = 1
    recompute: str = "none"  # none | selective (core attention) | full
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    distributed_optimizer: bool = True
    micro_batches: int = 1  # per iteration, per DP replica
    sequence_parallel: bool = False
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    # uneven pipeline stages (Megatron-LM's --decoder-first/last-pipeline-num-layers): the end stages' layers, the
    # others split the rest evenly (None: an even split)
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    ep: int = 1  # expert parallelism (MoE): the experts of a layer split over EP ranks of the DP x CP ranks

    @property
    def cp(self) -> int:
        return self.ulysses * self.ring

    @property
    def expert_dp(self) -> int:
        """megatron-core's expert-data-parallel size (expert TP = TP): the DP x CP ranks over EP."""
        return self.dp * self.cp // self.ep


@dataclass(frozen=True)
class JobMemory:
    """Bytes per GPU on the stage that needs the most."""

    stage: int
    params: float
    grads: float
    optimizer: float
    activations: float  # all micro-batches in flight
    in_flight: int  # (chunk-)micro-batches whose activations the stage holds at its peak
    per_micro_batch: Mapping[str, float] = field(default_factory=dict)  # activation parts of one micro-batch

    @functools.cached_property  # a search compares many of them
    def states(self) -> float:
        return self.params + self.grads + self.optimizer

    @functools.cached_property
    def total(self) -> float:
        return self.states + self.activations


def _kv_heads_after_a2a(shape: GPTShape, cfg: JobConfig) -> float:
    per_tp = shape.kv_heads // cfg.tp
    return per_tp * kv_replication(per_tp, cfg.ulysses) / cfg.ulysses


def moe_activation_bytes(shape: GPTShape, cfg: JobConfig) -> float:
    """Bytes one MoE layer saves (router, dispatcher, experts), one micro-batch, one rank. The alltoall dispatcher
    gathers the CP rank's tokens over TP, and over EP each rank's experts receive as many token copies as it sends
    (top-k of its tokens; exact summed over the EP group, balanced routing per rank): the dispatched tokens (the
    experts' fc1 input, k·T·h), fc1's output (2F with a gated unit) and the activation's work (F x 2 fused, 4
    with megatron-core's unfused GLU and the routing probabilities it applies there), F over expert TP = TP; the
    router's fp32 logits, scores and probabilities (3·E per token), the routing map (E bools) and the top-k
    indices, permutation and probabilities (3 int64 + 2 fp32 per copy)."""
    e, k, widths = shape.dtype_bytes, shape.moe_topk, shape.moe_ffn_hidden / cfg.tp
    tokens = shape.micro_batch * shape.seq_len / cfg.cp
    copies = k * tokens
    glu = (2 if shape.gated_mlp else 1) + ((4 if shape.gated_mlp else 2) if not shape.fused_kernels else 2)
    router = tokens * (3 * shape.num_experts * FP32 + shape.num_experts) + copies * (3 * 8 + 2 * FP32)
    return copies * shape.hidden * e + copies * widths * glu * e + router


def _dense_mlp_bytes(shape: GPTShape, cfg: JobConfig, width: int, tokens: float) -> float:
    """fc1's output and the activation's (a gated unit: 2 x width + width; unfused: 2 x width more)."""
    unfused = not shape.fused_kernels
    widths = (5 if unfused else 3) if shape.gated_mlp else 2
    return tokens * width / cfg.tp * shape.dtype_bytes * widths


def _mla_projection_bytes(shape: GPTShape, cfg: JobConfig, tokens: float) -> float:
    """What MLA's low-rank projections save before the attention: the compressed query (q_lora_rank) and the kv
    down projection's output (kv_lora_rank + the RoPE dims; the compressed kv is a view of it) as their norms'
    inputs, the norms' outputs as the up projections' inputs (unfused torch RMSNorm: its normalized input too)
    and fp32 statistics; per token of the CP rank, over TP with sequence parallelism."""
    sp = cfg.tp if cfg.sequence_parallel else 1
    outputs = 1 + (not shape.fused_kernels and shape.rmsnorm)
    widths = (1 + outputs) * shape.q_lora_rank + shape.kv_lora_rank + shape.qk_rope_head_dim \
        + outputs * shape.kv_lora_rank
    norms = (shape.q_lora_rank > 0) + 1
    return tokens / sp * (widths * shape.dtype_bytes + norms * FP32)


def layer_activation_bytes(shape: GPTShape, cfg: JobConfig, recompute: str = "none",
                           dense: bool = False) -> Mapping[str, float]:
    """Bytes one transformer layer saves for backward, one micro-batch, one rank, without full recompute;
    ``dense``: one of a MoE model's first ``moe_dense_layers`` (a dense MLP of ``ffn_hidden``). Read-only, cached
    per the job's TP, CP grid and sequence parallelism (all it depends on)."""
    return _layer_activation_bytes(shape, cfg.tp, cfg.ulysses, cfg.ring, cfg.sequence_parallel, recompute, dense)


@functools.lru_cache(maxsize=1 << 14)
def _layer_activation_bytes(shape: GPTShape, tp: int, ulysses: int, ring: int, sequence_parallel: bool,
                            recompute: str, dense: bool) -> Mapping[str, float]:
    cfg = JobConfig(tp=tp, ulysses=ulysses, ring=ring, sequence_parallel=sequence_parallel)
    e, t, u, r, d = shape.dtype_bytes, cfg.tp, cfg.ulysses, cfg.ring, shape.attention_head_dim
    tokens = shape.micro_batch * shape.seq_len / (u * r)
    sp = t if cfg.sequence_parallel else 1
    stats = 1 if shape.rmsnorm else 2
    n, g = shape.heads / t, shape.kv_heads / t
    norm_copies = 4 + (2 if not shape.fused_kernels and shape.rmsnorm else 0)
    if shape.moe and not dense:
        mlp = moe_activation_bytes(shape, cfg) + _dense_mlp_bytes(shape, cfg, shape.moe_shared_ffn_hidden, tokens)
    else:
        mlp = _dense_mlp_bytes(shape, cfg, shape.ffn_hidden, tokens)
    parts = {
        "norms": norm_copies * tokens * shape.hidden * e / sp + 2 * stats * tokens / sp * FP32,
        "rope": 4 * tokens * shape.rope_head_dim * e,
        "mlp": mlp,
    }
    out = tokens * n * shape.value_head_dim * e  # the projection's input, before the output all-to-all
    if shape.mla:  # the attention keeps q, k, v padded to one width (new tensors, not the projections' outputs)
        parts["attention"] = _mla_projection_bytes(shape, cfg, tokens)
        saved_inputs = tokens * 3 * n * d * e
        checkpoint_inputs = tokens * n * (2 * d + shape.v_head_dim) * e  # q, k after RoPE, v (unpadded)
    else:
        parts["attention"] = 0.0
        saved_inputs = checkpoint_inputs = tokens * (n + g) * d * e + tokens * (n + 2 * g) * d * e  # q, k; QKV
    if recompute == "selective":  # checkpoint inputs q, k (after RoPE), v (a view of the QKV output) + its output
        parts["attention"] += checkpoint_inputs + out
    elif u == 1:
        padded_out = tokens * n * d * e if shape.mla else 0.0  # MLA: the attention's output at the padded width
        parts["attention"] += saved_inputs + out + padded_out + tokens * n * FP32
    else:
        rows = shape.micro_batch * shape.seq_len / r  # ring-level: s/r tokens, heads / u
        q_heads, kv_heads = n / u, _kv_heads_after_a2a(shape, cfg)
        parts["attention"] += (rows * (2 * q_heads + 2 * kv_heads) * d * e  # q, k, v, out after the a2a
                               + rows * q_heads * FP32 + out)  # lse; out after the inverse a2a
    return MappingProxyType(parts)


def head_activation_bytes(shape: GPTShape, cfg: JobConfig) -> float:
    """Final norm + output layer + vocab-parallel cross entropy (fp32 softmax), last stage, one micro-batch."""
    tokens = shape.micro_batch * shape.seq_len / cfg.cp
    sp = cfg.tp if cfg.sequence_parallel else 1
    stats = 1 if shape.rmsnorm else 2
    copies = 3 if shape.rmsnorm and not shape.fused_kernels else 2
    return (copies * tokens * shape.hidden * shape.dtype_bytes / sp + stats * tokens / sp * FP32
            + tokens * shape.vocab / cfg.tp * FP32 + 2 * tokens * 8 + tokens)  # + token ids, labels, mask


def stage_layer_counts(shape: GPTShape, cfg: JobConfig) -> tuple[int, ...]:
    """Layers of each pipeline stage as megatron-core's ``get_num_layers_to_build`` splits them: the given first /
    last stage counts on the end stages, the remaining layers evenly over the other stages (check_job refuses a
    split that does not divide)."""
    return _stage_layer_counts(shape.num_layers, cfg.pp, cfg.first_stage_layers, cfg.last_stage_layers)


@functools.lru_cache(maxsize=1 << 12)
def _stage_layer_counts(num_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> tuple[int, ...]:
    others = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    counts = [rest // others if others > 0 else 0] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return tuple(counts)


def stage_layers(shape: GPTShape, cfg: JobConfig, stage: Optional[int] = None) -> int:
    """Layers of pipeline ``stage`` (None: of the stage with the most, which sets the pipeline's pace)."""
    counts = stage_layer_counts(shape, cfg)
    return max(counts) if stage is None else counts[stage]


def chunk_layers(shape: GPTShape, cfg: JobConfig, stage: Optional[int] = None) -> int:
    """Layers of one model chunk of ``stage`` (a virtual stage; the whole stage without interleaving)."""
    return stage_layers(shape, cfg, stage) // cfg.virtual_stages


def _layers_bytes(shape: GPTShape, cfg: JobConfig, recompute: str, layers: float, dense: float) -> dict[str, float]:
    """Activation parts of ``layers`` layers, ``dense`` of them with a dense MLP."""
    parts = {name: (layers - dense) * value for name, value in layer_activation_bytes(shape, cfg, recompute).items()}
    if dense:
        for name, value in layer_activation_bytes(shape, cfg, recompute, dense=True).items():
            parts[name] += dense * value
    return parts


def stage_activation_bytes(shape: GPTShape, cfg: JobConfig, stage: int) -> Mapping[str, float]:
    """Activation parts of ``stage`` for ONE micro-batch through ONE model chunk (the whole stage without virtual
    stages); the last stage's output layer and loss are counted once. Read-only, cached by what they depend on
    (not DP, EP, the optimizer or the number of micro-batches)."""
    return _stage_activations(shape, cfg, stage)[0]


def _stage_activation_sums(shape: GPTShape, cfg: JobConfig, stage: int) -> tuple[float, float]:
    """The sum of :func:`stage_activation_bytes` and its head part (cached with them)."""
    return _stage_activations(shape, cfg, stage)[1:]


def _stage_activations(shape: GPTShape, cfg: JobConfig, stage: int) -> tuple[Mapping[str, float], float, float]:
    return _stage_activation_bytes(shape, cfg.tp, cfg.ulysses, cfg.ring, cfg.sequence_parallel, cfg.pp,
                                   cfg.virtual_stages, cfg.first_stage_layers, cfg.last_stage_layers, cfg.recompute,
                                   cfg.recompute_method, cfg.recompute_num_layers, stage)


@functools.lru_cache(maxsize=1 << 16)
def _stage_activation_bytes(shape: GPTShape, tp: int, ulysses: int, ring: int, sequence_parallel: bool, pp: int,
                            virtual_stages: int, first_stage_layers: Optional[int], last_stage_layers: Optional[int],
                            recompute: str, recompute_method: str, recompute_num_layers: int,
                            stage: int) -> tuple[Mapping[str, float], float, float]:
    cfg = JobConfig(tp=tp, pp=pp, ulysses=ulysses, ring=ring, recompute=recompute, recompute_method=recompute_method,
                    recompute_num_layers=recompute_num_layers, sequence_parallel=sequence_parallel,
                    virtual_stages=virtual_stages, first_stage_layers=first_stage_layers,
                    last_stage_layers=last_stage_layers)
    layers = chunk_layers(shape, cfg, stage)
    tokens = shape.micro_batch * shape.seq_len / cfg.cp
    layer_input = tokens * shape.hidden * shape.dtype_bytes / (cfg.tp if cfg.sequence_parallel else 1)
    dense = stage_dense_layers(shape, cfg, stage) / cfg.virtual_stages  # a chunk's share of the dense layers
    if cfg.recompute == "full":
        k = max(1, min(cfg.recompute_num_layers, layers))
        if cfg.recompute_method == "uniform":
            kept, inputs = 0, math.ceil(layers / k)
        else:
            kept, inputs = layers - k, k
        # block recomputes a stage's first k layers: the dense layers (the model's first) are recomputed first
        parts = _layers_bytes(shape, cfg, "none", kept, min(max(0.0, dense - k), kept))
        parts["layer inputs"] = inputs * layer_input + tokens * shape.rope_head_dim * FP32  # + rotary table once
    else:
        parts = _layers_bytes(shape, cfg, cfg.recompute, layers, dense)
    if stage == cfg.pp - 1:
        parts["head"] = head_activation_bytes(shape, cfg)
    return MappingProxyType(parts), sum(parts.values()), parts.get("head", 0.0)


def recompute_working_bytes(shape: GPTShape, cfg: JobConfig) -> float:
    """Under full recompute the backward rebuilds one checkpointed chunk's activations at a time: that chunk's
    saved tensors are live on top of the kept ones (selective: one layer's core attention)."""
    if cfg.recompute == "full":
        chunk = cfg.recompute_num_layers if cfg.recompute_method == "uniform" else 1
        return min(chunk, chunk_layers(shape, cfg)) * sum(layer_activation_bytes(shape, cfg).values())
    if cfg.recompute == "selective":
        full, kept = layer_activation_bytes(shape, cfg), layer_activation_bytes(shape, cfg, "selective")
        return max(0.0, full["attention"] - kept["attention"])
    return 0.0


def in_flight(cfg: JobConfig, stage: int) -> int:
    """1F1B: micro-batches whose activations stage ``stage`` holds at its peak; interleaved (virtual stages):
    chunk-micro-batches, megatron-core's warm-up count + 1."""
    if cfg.virtual_stages == 1:
        return max(1, min(cfg.pp - stage, cfg.micro_batches))
    warmup = 2 * (cfg.pp - stage - 1) + (cfg.virtual_stages - 1) * cfg.pp
    return max(1, min(warmup + 1, cfg.micro_batches * cfg.virtual_stages))


def expert_parameter_count(shape: GPTShape, cfg: JobConfig) -> float:
    """Parameters of ONE expert's MLP on one rank (expert TP = TP); 0 for a dense model."""
    return _mlp_parameter_count(shape, cfg, shape.moe_ffn_hidden) if shape.moe else 0.0


def _mlp_parameter_count(shape: GPTShape, cfg: JobConfig, width: int) -> float:
    """A dense MLP of ``width`` (fc1 2 x wide with a gated unit, fc2) on one TP rank."""
    fc1 = width * (2 if shape.gated_mlp else 1)
    return (shape.hidden * fc1 + width * shape.hidden) / cfg.tp + (fc1 / cfg.tp + shape.hidden if shape.bias else 0)


def _attention_parameter_count(shape: GPTShape, cfg: JobConfig) -> float:
    """The attention's projections on one TP rank. MLA (Transformer Engine's layer spec): the down projections
    (hidden -> q_lora_rank, hidden -> kv_lora_rank + RoPE dims) and their norms replicated, the up projections
    (-> heads x (qk_head_dim + RoPE dims); -> heads x (qk_head_dim + v_head_dim)) and the output projection
    over TP."""
    t, h, n = cfg.tp, shape.hidden, shape.heads
    if shape.mla:
        qk = shape.head_dim + shape.qk_rope_head_dim
        query = (shape.q_lora_rank * (h + 1) + shape.q_lora_rank * n * qk / t if shape.q_lora_rank
                 else h * n * qk / t)
        kv = h * (shape.kv_lora_rank + shape.qk_rope_head_dim) + shape.kv_lora_rank * (
            1 + n * (shape.head_dim + shape.v_head_dim) / t)
        return query + kv + n * shape.v_head_dim * h / t
    widths = (n + 2 * shape.kv_heads) * shape.head_dim
    return (h * widths + n * shape.head_dim * h) / t + (widths / t + h if shape.bias else 0)


def layer_parameter_count(shape: GPTShape, cfg: JobConfig, norms: bool = True, experts: bool = True,
                          dense: bool = False) -> float:
    """Parameters of one transformer layer on one TP rank (the norms replicated); a MoE layer's router
    (replicated), its shared experts and, with ``experts``, the routed experts this EP rank holds
    (``num_experts / EP``); ``dense``: one of a MoE model's first ``moe_dense_layers``."""
    h = shape.hidden
    count = _attention_parameter_count(shape, cfg)
    if shape.moe and not dense:
        count += h * shape.num_experts + (shape.num_experts // cfg.ep * expert_parameter_count(shape, cfg)
                                          if experts else 0)
        count += _mlp_parameter_count(shape, cfg, shape.moe_shared_ffn_hidden) if shape.moe_shared_ffn_hidden else 0
    else:
        count += _mlp_parameter_count(shape, cfg, shape.ffn_hidden)
    return count + (2 * (1 if shape.rmsnorm else 2) * h if norms else 0)


def stage_dense_layers(shape: GPTShape, cfg: JobConfig, stage: int) -> int:
    """How many of a MoE model's first ``moe_dense_layers`` (dense MLPs) ``stage`` holds: layers go to the stages
    in order (with V virtual stages: chunk ``c`` of the model to stage ``c mod PP``)."""
    dense = min(shape.moe_dense_layers, shape.num_layers) if shape.moe else 0
    if not dense:
        return 0
    return _stage_dense_layers(dense, stage_layer_counts(shape, cfg), cfg.virtual_stages, stage)


@functools.lru_cache(maxsize=1 << 12)
def _stage_dense_layers(dense: int, stage_counts: tuple[int, ...], virtual_stages: int, stage: int) -> int:
    counts = [count // virtual_stages for count in stage_counts]
    held, start = 0, 0
    for _ in range(virtual_stages):
        for index, count in enumerate(counts):
            if index == stage:
                held += max(0, min(dense, start + count) - start)
            start += count
    return held


def layer_active_parameter_count(shape: GPTShape, cfg: JobConfig) -> float:
    """Parameters one token meets per layer on one rank (a MoE layer: the router and top-k experts): its GEMM FLOPs
    per token are twice this forward."""
    return layer_parameter_count(shape, cfg, norms=False, experts=False) + shape.moe_topk * expert_parameter_count(
        shape, cfg)


def stage_expert_count(shape: GPTShape, cfg: JobConfig, stage: int) -> float:
    """Parameters of the routed experts one rank of ``stage`` holds."""
    layers = stage_layers(shape, cfg, stage) - stage_dense_layers(shape, cfg, stage)
    return layers * (shape.num_experts // cfg.ep) * expert_parameter_count(shape, cfg)


def parameter_count(shape: GPTShape, cfg: JobConfig, stage: int) -> float:
    """Parameters one rank of ``stage`` holds (TP-sharded where megatron-core shards; norms replicated)."""
    dense = stage_dense_layers(shape, cfg, stage)
    count = (stage_layers(shape, cfg, stage) - dense) * layer_parameter_count(shape, cfg)
    if dense:
        count += dense * layer_parameter_count(shape, cfg, dense=True)
    if stage == 0:
        count += shape.vocab * shape.hidden / cfg.tp
    if stage == cfg.pp - 1:
        count += (1 if shape.rmsnorm else 2) * shape.hidden
        count += shape.vocab * shape.hidden / cfg.tp if shape.untied_embeddings or cfg.pp > 1 else 0
    return count


def state_bytes(shape: GPTShape, cfg: JobConfig, stage: int) -> Mapping[str, float]:
    """Parameters (model dtype), fp32 main gradients, Adam state (fp32 master unless fp32 params, 2 moments); the
    distributed optimizer shards the dense parameters' state over DP x CP, the experts' over the expert-data-parallel
    group (DP x CP / EP). Cached by what they depend on (not CP's split, recompute or micro-batches): read-only."""
    return _state_bytes(shape, cfg.tp, cfg.pp, cfg.virtual_stages, cfg.first_stage_layers, cfg.last_stage_layers,
                        cfg.ep, cfg.dp * cfg.cp, cfg.distributed_optimizer, stage)


@functools.lru_cache(maxsize=1 << 14)
def _state_bytes(shape: GPTShape, tp: int, pp: int, virtual_stages: int, first_stage_layers: Optional[int],
                 last_stage_layers: Optional[int], ep: int, dp_cp: int, distributed_optimizer: bool,
                 stage: int) -> Mapping[str, float]:
    cfg = JobConfig(tp=tp, pp=pp, dp=dp_cp, virtual_stages=virtual_stages, first_stage_layers=first_stage_layers,
                    last_stage_layers=last_stage_layers, ep=ep, distributed_optimizer=distributed_optimizer)
    count = parameter_count(shape, cfg, stage)
    experts = stage_expert_count(shape, cfg, stage)
    per_param = 2 * FP32 + (FP32 if shape.dtype_bytes != FP32 else 0)
    dense_shards, expert_shards = (cfg.dp * cfg.cp, cfg.expert_dp) if cfg.distributed_optimizer else (1, 1)
    optimizer = ((count - experts) / dense_shards + experts / expert_shards) * per_param
    return MappingProxyType({"params": count * shape.dtype_bytes, "grads": count * FP32, "optimizer": optimizer})


def stage_memory(shape: GPTShape, cfg: JobConfig, stage: int) -> JobMemory:
    """Memory per GPU of pipeline ``stage``: its states + the (chunk-)micro-batches in flight at its peak (the
    output layer and loss counted once)."""
    states = state_bytes(shape, cfg, stage)
    flight = in_flight(cfg, stage)
    parts, activations, head = _stage_activations(shape, cfg, stage)
    return JobMemory(stage, states["params"], states["grads"], states["optimizer"],
                     flight * (activations - head) + head, flight, parts)


def _stage_total(shape: GPTShape, cfg: JobConfig, stage: int) -> float:
    """``stage_memory(shape, cfg, stage).total``, the same float, without building the breakdown."""
    states = state_bytes(shape, cfg, stage)
    activations, head = _stage_activation_sums(shape, cfg, stage)
    return (states["params"] + states["grads"] + states["optimizer"]) + (
        in_flight(cfg, stage) * (activations - head) + head)


@functools.lru_cache(maxsize=1 << 16)
def job_memory(shape: GPTShape, cfg: JobConfig) -> JobMemory:
    """Memory per GPU of the stage that needs the most (states + in-flight activations); cached (the planner asks
    for the same job under every ring impl): read-only. Only stages 0, 1 and the
    last are looked at: the middle stages 1..PP-2 hold the same layers and parameters, and the in-flight count
    falls with the stage in both schedules, so stage 1 needs at least what any other middle stage needs."""
    stages = memory_stages(cfg)
    if len(stages) > 1:  # the breakdown of the fullest stage only (the first of equals)
        stages = (max(stages, key=lambda stage: _stage_total(shape, cfg, stage)),)
    return stage_memory(shape, cfg, stages[0])


def memory_stages(cfg: JobConfig) -> tuple[int, ...]:
    """The pipeline stages whose memory bounds every stage's: 0, 1 and the last (the middle stages 1..PP-2 hold the
    same layers and parameters, and the in-flight count falls with the stage)."""
    return (0,) if cfg.pp == 1 else (0, 1) if cfg.pp == 2 else (0, 1, cfg.pp - 1)


def uneven_stages_reason(num_layers: int, pp: int, first: Optional[int], last: Optional[int],
                         virtual_stages: int = 1) -> str:
    """Why megatron-core refuses these first / last stage layer counts (empty when it takes them, or none given):
    each >= 1, PP >= 2, the rest divisible by the other stages and none of them empty."""
    if first is None and last is None:
        return ""
    if pp < 2:
        return "uneven first / last pipeline stages need PP >= 2"
    if any(count is not None and count < 1 for count in (first, last)):
        return f"first / last pipeline stage layers must be >= 1, got {first} / {last}"
    others = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if (others == 0 and rest != 0) or (others > 0 and (rest < others or rest % others)):
        return (f"{num_layers} layers minus first {first} / last {last} stage layers leave {rest} for the other "
                f"{others} stages, which must split them evenly, at least one layer each")
    if virtual_stages > 1 and any(count is not None and count % virtual_stages for count in (first, last)):
        return f"first / last stage layers {first} / {last} not divisible by {virtual_stages} virtual stages"
    if virtual_stages > 1 and others > 0 and (rest // others) % virtual_stages:
        return f"{rest // others} layers per middle stage not divisible by {virtual_stages} virtual stages"
    return ""


def check_job(shape: GPTShape, cfg: JobConfig) -> str:
    """Why megatron-core would refuse ``cfg`` (empty string when it accepts it)."""
    if cfg.recompute not in RECOMPUTE_MODES:
        return f"recompute {cfg.recompute!r} not one of {RECOMPUTE_MODES}"
    if cfg.recompute_method not in RECOMPUTE_METHODS:
        return f"recompute method {cfg.recompute_method!r} not one of {RECOMPUTE_METHODS}"
    uneven = uneven_stages_reason(shape.num_layers, cfg.pp, cfg.first_stage_layers, cfg.last_stage_layers,
                                  cfg.virtual_stages)
    if uneven:
        return uneven
    if cfg.first_stage_layers is None and cfg.last_stage_layers is None and shape.num_layers % cfg.pp != 0:
        return f"{shape.num_layers} layers not divisible by PP {cfg.pp}"
    if cfg.pp > 1 and cfg.micro_batches < cfg.pp:
        return f"{cfg.micro_batches} micro-batches < PP {cfg.pp}: the pipeline never fills"
    if cfg.virtual_stages > 1:
        if cfg.pp == 1:
            return "virtual pipeline stages need PP > 1"
        if cfg.first_stage_layers is None and cfg.last_stage_layers is None and \
                shape.num_layers % (cfg.pp * cfg.virtual_stages):
            return f"{shape.num_layers} layers not divisible by PP {cfg.pp} x {cfg.virtual_stages} virtual stages"
        if cfg.micro_batches % cfg.pp:  # megatron-core: micro-batch groups of PP, no partial group
            return (f"{cfg.micro_batches} micro-batches not a multiple of PP {cfg.pp} "
                    "(megatron-core's interleaved schedule)")
    if shape.mla and shape.kv_heads != shape.heads:
        return f"multi-latent attention has no query groups: kv heads {shape.kv_heads} must equal heads {shape.heads}"
    if shape.ffn_hidden % cfg.tp and (not shape.moe or shape.moe_dense_layers):
        return f"ffn hidden {shape.ffn_hidden} not divisible by TP {cfg.tp}"
    if shape.moe:
        if shape.num_experts % cfg.ep:
            return f"{shape.num_experts} experts not divisible by EP {cfg.ep}"
        if (cfg.dp * cfg.cp) % cfg.ep:
            return f"EP {cfg.ep} does not divide DP {cfg.dp} x CP {cfg.cp} (megatron-core: expert TP x EP divides TP x CP x DP)"
        if shape.moe_shared_ffn_hidden % cfg.tp:
            return f"shared expert ffn hidden {shape.moe_shared_ffn_hidden} not divisible by TP {cfg.tp}"
        if shape.moe_ffn_hidden % cfg.tp:
            return f"MoE ffn hidden {shape.moe_ffn_hidden} not divisible by expert TP = TP {cfg.tp}"
        if cfg.tp > 1 and not cfg.sequence_parallel:
            return "MoE with TP > 1 needs sequence parallelism (megatron-core)"
    elif cfg.ep > 1:
        return f"EP {cfg.ep} without experts"
    return ""
