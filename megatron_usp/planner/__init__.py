"""The planner of Unified Sequence Parallelism: which (TP, ulysses u, ring r, ring_impl) to use, or the whole Megatron
job, from a cost model. ``tools/plan_usp.py`` is its command line; docs/planner.md shows it at work.

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
gradient reduction + the optimizer step. ``tools/measure_hardware.py`` measures these figures on a machine. The
command line prints the winner's Megatron-LM and trainer command lines, and when nothing fits, the least-memory
job's arithmetic and the smallest change (more nodes, shorter sequence) that fits.

The feasibility rules are the library's own (``check_head_counts``, ``check_seq_len``), imported, not copied.

Modules, each importing only those before it: ``hardware`` (what a GPU or CPU rank achieves, the presets),
``layer`` (the attention-layer model, :func:`predict`), ``search`` (the attention grid, :func:`plan`), ``job`` (the
whole-job model on ``megatron_usp.job_cost``, :func:`predict_job`, :func:`plan_job`, :func:`smallest_change`),
``comparison`` (predictions vs measured runs) and ``report`` (tables, explanations, command lines), ``cli`` (the
command line). This package re-exports their public names.
"""
from megatron_usp.cost import block_pairs
from megatron_usp.layout import RING_IMPLS
from megatron_usp.planner.hardware import PRESETS, Hardware, hardware_from_args
from megatron_usp.planner.layer import (
    A2A_CALLS, ACCUMULATION_BYTES, BACKWARD_FLOPS_FACTOR, DTYPE_BYTES, GIB, TP_COLLECTIVES_PER_LAYER, BlockShape,
    Cluster, ModelShape, ParallelConfig, Prediction, attention_blocks, attention_transient_bytes, feasibility_reason,
    gpt_shape, kernel_efficiency, kv_heads_per_tp_rank_after_replication, load_imbalance, memory_gib,
    mqsp_chunk_blocks, mqsp_chunk_comm_ms, mqsp_query_bytes, mqsp_rows, placement, predict, ring_kv_block_bytes,
    schedule_blocks, step_compute_ms, ulysses_a2a_bytes,
)
from megatron_usp.planner.search import IMPL_PREFERENCE, enumerate_configs, impl_variants, plan
from megatron_usp.planner.search import _divisors  # noqa: F401  (private, but tests/planner/test_plan_usp.py uses it)
from megatron_usp.planner.job import (
    DEFAULT_RESERVE_GIB, ELEMENTWISE_PASSES, FP32_BYTES, OPTIMIZER_BYTES_PER_PARAM, RECOMPUTE_CHOICES, JobChoice,
    JobPrediction, job_choices, job_config, memory_breakdown, pipeline_splits, plan_job, predict_job, smallest_change,
    states_floor, uneven_split,
)
from megatron_usp.planner.comparison import (
    compare, compare_job, format_compare, job_from_record, kendall_tau, load_bench_records, resolved_pairs, spearman,
)
from megatron_usp.planner.report import (
    explain, explain_job, format_infeasible, format_job_table, format_table, megatron_lm_command, trainer_command,
)
from megatron_usp.planner.cli import build_parser, check_plan_args, main, main_job

__all__ = [
    "A2A_CALLS", "ACCUMULATION_BYTES", "BACKWARD_FLOPS_FACTOR", "DEFAULT_RESERVE_GIB", "DTYPE_BYTES",
    "ELEMENTWISE_PASSES", "FP32_BYTES", "GIB", "IMPL_PREFERENCE", "OPTIMIZER_BYTES_PER_PARAM", "PRESETS",
    "RECOMPUTE_CHOICES", "RING_IMPLS", "TP_COLLECTIVES_PER_LAYER", "BlockShape", "Cluster", "Hardware", "JobChoice",
    "JobPrediction", "ModelShape", "ParallelConfig", "Prediction", "attention_blocks", "attention_transient_bytes",
    "block_pairs", "build_parser", "check_plan_args", "compare", "compare_job", "enumerate_configs", "explain",
    "explain_job", "feasibility_reason", "format_compare", "format_infeasible", "format_job_table", "format_table",
    "gpt_shape", "hardware_from_args", "impl_variants", "job_choices", "job_config", "job_from_record",
    "kendall_tau", "kernel_efficiency", "kv_heads_per_tp_rank_after_replication", "load_bench_records",
    "load_imbalance", "main", "main_job", "megatron_lm_command", "memory_breakdown", "memory_gib",
    "mqsp_chunk_blocks", "mqsp_chunk_comm_ms", "mqsp_query_bytes", "mqsp_rows", "pipeline_splits", "placement",
    "plan", "plan_job", "predict", "predict_job", "resolved_pairs", "ring_kv_block_bytes", "schedule_blocks",
    "smallest_change", "spearman", "states_floor", "step_compute_ms", "trainer_command", "ulysses_a2a_bytes",
    "uneven_split",
]
