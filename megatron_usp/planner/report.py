"""What the planner prints: the attention grid's table, the reasons a config cannot run and why the winner wins
(:func:`format_table`, :func:`format_infeasible`, :func:`explain`); the whole job's table and arithmetic
(:func:`format_job_table`, :func:`explain_job`), and the winner's Megatron-LM and trainer command lines
(:func:`megatron_lm_command`, :func:`trainer_command`)."""
from __future__ import annotations

from typing import Optional, Sequence

from megatron_usp.layout import RING_IMPL_TABLE

from megatron_usp.planner.job import JobPrediction, memory_breakdown
from megatron_usp.planner.layer import Cluster, ModelShape, Prediction, load_imbalance


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
        if RING_IMPL_TABLE[c.ring_impl].transport == "allgather":
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


def describe_model(shape: ModelShape) -> str:
    """Layers, hidden size, attention and MLP of a whole-job ``shape``, in words."""
    if shape.kv_lora_rank:
        kv = (f"MLA: q/k {shape.head_dim} + RoPE {shape.qk_rope_head_dim}, v {shape.v_head_dim}, kv_lora "
              f"{shape.kv_lora_rank}, q_lora {shape.q_lora_rank or 'none'}")
    else:
        kv = f"{shape.kv_heads} kv heads" if shape.kv_heads != shape.heads else "MHA"
    mlp = (f"MoE {shape.num_experts} experts top-{shape.moe_topk} x ffn {shape.moe_ffn_hidden}" if shape.num_experts
           else f"ffn {shape.ffn_hidden}")
    if shape.moe_shared_ffn_hidden:
        mlp += f" + shared {shape.moe_shared_ffn_hidden}"
    if shape.moe_dense_layers:
        mlp += f", first {shape.moe_dense_layers} layers dense ffn {shape.ffn_hidden}"
    return (f"{shape.num_layers} layers, hidden {shape.hidden_size}, {shape.heads} heads ({kv}) x {shape.head_dim}, "
            f"{mlp}{' SwiGLU' if shape.gated_mlp else ''}")


def _model_flags(shape: ModelShape) -> list[str]:
    mla = ""
    if shape.kv_lora_rank:
        mla = (f"--multi-latent-attention --kv-lora-rank {shape.kv_lora_rank} --qk-head-dim {shape.head_dim} "
               f"--qk-pos-emb-head-dim {shape.qk_rope_head_dim} --v-head-dim {shape.v_head_dim} --qk-layernorm"
               + (f" --q-lora-rank {shape.q_lora_rank}" if shape.q_lora_rank else ""))
    moe = ""
    if shape.num_experts:
        moe = (f"--num-experts {shape.num_experts} --moe-router-topk {shape.moe_topk} --moe-ffn-hidden-size "
               f"{shape.moe_ffn_hidden} --moe-token-dispatcher-type alltoall")
        if shape.moe_shared_ffn_hidden:
            moe += f" --moe-shared-expert-intermediate-size {shape.moe_shared_ffn_hidden}"
        if shape.moe_dense_layers:
            moe += (f" --moe-layer-freq '([0]*{shape.moe_dense_layers}+[1]*"
                    f"{(shape.num_layers or 1) - shape.moe_dense_layers})'")
    return [f"--num-layers {shape.num_layers} --hidden-size {shape.hidden_size} --ffn-hidden-size {shape.ffn_hidden}",
            f"--num-attention-heads {shape.heads}", mla,
            f"--group-query-attention --num-query-groups {shape.kv_heads}" if shape.kv_heads != shape.heads else "",
            moe]


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
            f"--expert-model-parallel-size {j.ep}" if shape.num_experts else "",
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


def trainer_gap(shape: ModelShape) -> str:
    """What of ``shape`` the trainer (``megatron_usp.train``) does not build (empty when it builds all of it)."""
    gaps = [name for name, present in (("multi-latent attention", shape.kv_lora_rank),
                                       ("shared experts", shape.moe_shared_ffn_hidden),
                                       ("dense first layers in a MoE model", shape.moe_dense_layers)) if present]
    return " or ".join(gaps)


def trainer_command(shape: ModelShape, cluster: Cluster, p: JobPrediction) -> Optional[str]:
    """The trainer (``python -m megatron_usp.train``) with the same model and grid (it takes Megatron-LM's flags);
    None when it cannot build the model (:func:`trainer_gap`)."""
    if trainer_gap(shape):
        return None
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
        at_least = "" if p.exact else ">="
        lines.append(f"{i:>3}  {p.label():<72} {at_least:>2}{p.iteration_s:>6.2f} {p.layer_ms:>9.1f} "
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
    # the first of the ranking with another recompute, and whether one without fits (JobRanking: without ranking
    # every job)
    first = getattr(ranked, "first", lambda wanted: next((p for p in ranked if wanted(p.job)), None))
    cheaper = first(lambda choice: choice.recompute != best.job.recompute)
    if best.job.recompute != "none" and (cheaper is None or cheaper.job.recompute != "none") and first(
            lambda choice: choice.recompute == "none") is None:
        lines.append(f"recompute {best.job.recompute}: no job without recompute fits")
    elif cheaper is not None:
        lines.append(f"best with recompute {cheaper.job.recompute}: {'' if cheaper.exact else '>= '}"
                     f"{cheaper.iteration_s:.2f} s/iteration, {cheaper.memory_gib:.1f} GiB")
    return lines
