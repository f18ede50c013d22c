"""The planner's command line (``tools/plan_usp.py``): the parser and its flag checks, ``--compare``, the attention
grid (:func:`main`) and the whole job (:func:`main_job`), each printed and optionally written as JSON; exit status 0
when something fits, 1 when nothing does, 2 for a flag argparse refuses."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Optional, Sequence

from megatron_usp.document_mixes import packed_rows, source_detail
from megatron_usp.flags import (
    auto_or, comma_list, none_or, nonnegative_float, nonnegative_int, one_of, positive_float, positive_int,
)
from megatron_usp.layout import RING_IMPLS
from megatron_usp.planner.comparison import compare, compare_job, format_compare, load_bench_records
from megatron_usp.planner.hardware import PRESETS, Hardware, hardware_from_args
from megatron_usp.planner.job import DEFAULT_KEEP, DEFAULT_RESERVE_GIB, RECOMPUTE_CHOICES, plan_job, smallest_change
from megatron_usp.planner.layer import DTYPE_BYTES, Cluster, ModelShape, Prediction
from megatron_usp.planner.models import (
    DEFAULT_MOE_TOPK, DEFAULT_VOCAB, FFN_RATIO, MODELS, check_mla_flags, check_moe_flags, fill_model_flags,
)
from megatron_usp.planner.report import (
    explain, explain_job, format_infeasible, format_job_table, format_table, megatron_lm_command, trainer_command,
    describe_model, trainer_gap,
)
from megatron_usp.planner.search import _divisors, plan

DESCRIPTION = "Plan Unified Sequence Parallelism: which (TP, ulysses u, ring r, ring_impl) to use, from a cost model."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=sorted(MODELS), default=None,
                       help="a published model's shape (flags given beside it win)")
    model.add_argument("--heads", type=positive_int, help="attention heads")
    model.add_argument("--kv-heads", type=positive_int, help="K/V heads (query groups); default = heads")
    model.add_argument("--head-dim", type=positive_int, default=None, help="default 128")
    model.add_argument("--hidden", type=positive_int, default=None, help="hidden size (default: heads x head_dim)")
    mla = parser.add_argument_group("multi-latent attention (given --kv-lora-rank: megatron-core's MLASelfAttention; "
                                    "--head-dim is then its q/k head dim without RoPE)")
    mla.add_argument("--kv-lora-rank", type=positive_int, default=None, help="compressed K/V width")
    mla.add_argument("--q-lora-rank", type=positive_int, default=None,
                     help="compressed query width (default: queries not compressed)")
    mla.add_argument("--qk-rope-head-dim", type=positive_int, default=None,
                     help="q/k RoPE dims per head (Megatron's --qk-pos-emb-head-dim; default 64)")
    mla.add_argument("--v-head-dim", type=positive_int, default=None, help="value head dim (default: --head-dim)")
    model.add_argument("--num-layers", type=positive_int, default=None,
                       help="layers: plans the whole job (--ffn-hidden and --vocab default to printed assumptions); "
                            "with --attention-only, the layers of its memory check")
    model.add_argument("--attention-only", action="store_true",
                       help="plan the attention grid alone (TP, u, r, impl), not the whole job")
    model.add_argument("--seq-len", type=positive_int, help="tokens per sequence")
    model.add_argument("--micro-batch", type=positive_int, default=1)
    model.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    model.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    job = parser.add_argument_group("whole job (given --num-layers: plan PP, recompute, optimizer, batch, EP)")
    job.add_argument("--ffn-hidden", type=positive_int, default=None,
                     help=f"MLP hidden size (default: {FFN_RATIO} x hidden, rounded to 256)")
    job.add_argument("--vocab", type=positive_int, default=None,
                     help=f"vocabulary size, untied input and output embeddings (default {DEFAULT_VOCAB})")
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
    data = parser.add_argument_group("the data's lengths (packed documents)")
    data.add_argument("--documents", metavar="SOURCE", default=None,
                      help="plan for rows packed from a document-length source: stdlib, lognormal, dcp or a file of "
                           "lengths (as tools/bench_attention.py); the attention comes from each row's document "
                           "layout (ring-local or split, both searched), mean over the rows")
    data.add_argument("--document-rows", type=positive_int, default=4, help="packed rows sampled")
    data.add_argument("--document-seed", type=nonnegative_int, default=0, help="seed of the packed rows")
    moe = parser.add_argument_group("mixture of experts (every layer: megatron-core's MoE layer, alltoall dispatcher)")
    moe.add_argument("--num-experts", type=positive_int, default=None, help="routed experts per layer")
    moe.add_argument("--moe-topk", type=positive_int, default=None, help=f"experts per token (default {DEFAULT_MOE_TOPK})")
    moe.add_argument("--moe-ffn-hidden", type=positive_int, default=None, help="each expert's MLP width (default: --ffn-hidden)")
    moe.add_argument("--moe-shared-ffn-hidden", type=positive_int, default=None,
                     help="the shared experts' MLP width beside the routed ones (Megatron's "
                          "--moe-shared-expert-intermediate-size; default: none)")
    moe.add_argument("--moe-dense-layers", type=nonnegative_int, default=None,
                     help="the first layers keep a dense MLP of --ffn-hidden (DeepSeek's first_k_dense_replace; "
                          "default 0)")
    moe.add_argument("--ep", type=auto_or(positive_int), default="auto",
                     help="expert-parallel size: 'auto' (every divisor of the experts and DP x CP) or a number")
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
    out.add_argument("--top", type=positive_int, default=10,
                     help="jobs to show; the whole-job search predicts at least these exactly (branch and bound)")
    out.add_argument("--exhaustive", action="store_true",
                     help="whole job: predict every job exactly instead of bounding (same ranking, slower)")
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



def documents_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[tuple[tuple[int, ...], ...]]:
    """The packed rows of ``--documents`` (parser.error for a source it cannot read)."""
    if args.documents is None:
        return None
    try:
        return tuple(packed_rows(args.documents, args.seq_len, args.document_rows, args.document_seed))
    except (OSError, ValueError) as error:
        parser.error(f"--documents {args.documents}: {error}")


def documents_line(args: argparse.Namespace, shape: ModelShape) -> list[str]:
    if shape.documents is None:
        return []
    counts = [len(cu) - 1 for cu in shape.documents]
    longest = max(b - a for cu in shape.documents for b, a in zip(cu[1:], cu))
    return [f"documents: {source_detail(args.documents)}; {len(counts)} rows of {shape.seq_len} tokens, "
            f"{min(counts)}-{max(counts)} documents each, longest {longest}: attention from each row's document "
            "layout, mean over the rows"]


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
    assumptions = fill_model_flags(args)
    check_moe_flags(args, parser)
    args.head_dim = args.head_dim or 128
    if args.heads is None or args.seq_len is None:
        parser.error("--heads (or --model) and --seq-len are required (or --compare BENCH_JSON)")
    check_plan_args(parser, args, hardware)
    check_mla_flags(args, parser)
    shape = ModelShape(heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                       seq_len=args.seq_len, hidden=args.hidden or 0, num_layers=args.num_layers,
                       micro_batch=args.micro_batch, dtype=args.dtype, causal=args.causal,
                       ffn_hidden=args.ffn_hidden or 0, vocab=args.vocab or 0, gated_mlp=args.swiglu,
                       rmsnorm=args.rmsnorm, num_experts=args.num_experts or 0, moe_topk=args.moe_topk or 0,
                       moe_ffn_hidden=args.moe_ffn_hidden or 0, moe_shared_ffn_hidden=args.moe_shared_ffn_hidden or 0,
                       moe_dense_layers=args.moe_dense_layers or 0, q_lora_rank=args.q_lora_rank or 0,
                       kv_lora_rank=args.kv_lora_rank or 0, qk_rope_head_dim=args.qk_rope_head_dim or 0,
                       v_head_dim=args.v_head_dim or 0, documents=documents_of(parser, args))
    whole_job = args.num_layers is not None and not args.attention_only
    cluster = Cluster(args.gpus_per_node or 8, args.nodes)
    tp = args.tp or ("auto" if whole_job else 1)
    tp_choices = _divisors(cluster.gpus_per_node) if tp == "auto" else [tp]
    impls, micro_qs = list(dict.fromkeys(args.ring_impls)), list(dict.fromkeys(args.micro_q))
    virtual_stages = None if args.virtual_stages == "auto" else [args.virtual_stages]
    orders = {"ulysses-inner": (True,), "ring-inner": (False,), "both": (True, False)}[args.order]
    if whole_job:
        return main_job(args, shape, cluster, hardware, tp_choices, impls, orders, micro_qs, virtual_stages,
                        assumptions)
    if args.num_experts is not None:
        parser.error("--num-experts plans a whole job: drop --attention-only (the attention grid has no experts)")
    ranked, infeasible = plan(shape, cluster, hardware, tp_choices=tp_choices, ring_impls=impls, dp=args.dp,
                              orders=orders, other_memory_gib=args.other_memory_gib, micro_qs=micro_qs)
    kv = f"{shape.kv_heads} kv heads" if shape.kv_heads != shape.heads else "MHA"
    for line in documents_line(args, shape):
        print(line)
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
            print("  (attention-only planning: no recompute, no PP, half the GPU for the rest; drop --attention-only "
                  "and pass --num-layers to plan the whole job)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"ranked": [_jsonable(p) for p in ranked],
                       "infeasible": [{"config": asdict(p.config), "reason": p.reason} for p in infeasible]},
                      handle, indent=2)
    return 0 if ranked else 1


def main_job(args: argparse.Namespace, shape: ModelShape, cluster: Cluster, hardware: Hardware,
             tp_choices: Sequence[int], impls: Sequence[str], orders: Sequence[bool],
             micro_qs: Sequence[Optional[int]] = (None,), virtual_stages: Optional[Sequence[int]] = (1,),
             assumptions: Sequence[str] = ()) -> int:
    search = dict(tp_choices=tp_choices, ring_impls=impls, orders=orders,
                  pp_choices=None if args.pp == "auto" else [args.pp],
                  recomputes=RECOMPUTE_CHOICES if args.recompute == "auto" else (args.recompute,),
                  distributed_optimizers={"auto": (True, False), "on": (True,), "off": (False,)}[args.distributed_optimizer],
                  micro_batches=list(dict.fromkeys(args.micro_batch_sizes)),
                  global_batch=args.global_batch_size or 0, reserve_gib=args.reserve_gib, micro_qs=micro_qs,
                  virtual_stages=virtual_stages, keep=None if args.exhaustive else max(args.top, DEFAULT_KEEP),
                  ep_choices=None if args.ep == "auto" else [args.ep])
    ranked, infeasible = plan_job(shape, cluster, hardware, **search)
    for line in list(assumptions) + documents_line(args, shape):
        print(line)
    print(f"GPT {describe_model(shape)}, vocab {shape.vocab}, seq {shape.seq_len}, "
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
        trainer = trainer_command(shape, cluster, ranked[0])
        print("trainer:     " + (trainer or f"(megatron_usp.train builds no {trainer_gap(shape)}: use the "
                                            "Megatron-LM command)"))
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
