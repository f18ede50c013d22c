"""The trainer's flags (Megatron-LM's names) and every check of them, rank-independent and before any process
group: argparse types refuse bad single values (:mod:`megatron_usp.flags`); :func:`configure` adds the model
shapes, flag pairs, the USP grid (:func:`megatron_usp.megatron.validate_usp_args`), batch sizes, pipeline splits
and the data (:func:`.data.open_data`), raising ValueError naming the flag to fix."""
from __future__ import annotations

import argparse
import os

from ..flags import adam_beta, nonnegative_float, nonnegative_int, positive_float, positive_int
from ..job_cost import uneven_stages_reason
from ..megatron.args import add_usp_args, validate_usp_args
from .data import GPTSamples, open_data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_usp.train", allow_abbrev=False,
                                     description="Train a megatron-core GPTModel with Unified Sequence Parallelism")
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=positive_int, default=2)
    model.add_argument("--hidden-size", type=positive_int, default=64)
    model.add_argument("--ffn-hidden-size", type=positive_int, default=None, help="default: 4 x hidden size")
    model.add_argument("--num-attention-heads", type=positive_int, default=4)
    model.add_argument("--group-query-attention", action="store_true")
    model.add_argument("--num-query-groups", type=positive_int, default=None)
    model.add_argument("--seq-length", type=positive_int, default=256)
    model.add_argument("--max-position-embeddings", type=positive_int, default=None, help="default: --seq-length")
    model.add_argument("--vocab-size", type=positive_int, default=None,
                       help="default: the data's (256 for the byte corpus, largest token id + 1 for --data-path), "
                            "rounded up to a multiple of --tensor-model-parallel-size")
    model.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (gated linear unit with SiLU)")
    model.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    model.add_argument("--disable-bias-linear", action="store_true", help="no biases in the linear layers")
    model.add_argument("--untie-embeddings-and-output-weights", action=argparse.BooleanOptionalAction, default=True,
                       help="always untied in this trainer (default on, unlike Megatron-LM); "
                            "--no-untie-embeddings-and-output-weights is refused")
    moe = parser.add_argument_group("mixture of experts (megatron-core's MoE layer in every layer)")
    moe.add_argument("--num-experts", type=positive_int, default=None, help="experts per MoE layer (default: dense MLP)")
    moe.add_argument("--moe-router-topk", type=positive_int, default=None, help="experts per token (default 2)")
    moe.add_argument("--moe-ffn-hidden-size", type=positive_int, default=None, help="default: --ffn-hidden-size")
    moe.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default=None,
                     help="default alltoall")
    moe.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "none"], default=None,
                     help="default aux_loss")
    moe.add_argument("--moe-aux-loss-coeff", type=nonnegative_float, default=None,
                     help="load-balancing loss coefficient (default 0.0, as Megatron-LM)")
    moe.add_argument("--expert-model-parallel-size", type=positive_int, default=None,
                     help="experts sharded over this many ranks (default 1)")
    train = parser.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=positive_int, default=1)
    train.add_argument("--global-batch-size", type=positive_int, default=None, help="default: micro batch x DP size")
    train.add_argument("--train-iters", type=positive_int, default=100)
    train.add_argument("--lr", type=positive_float, default=1e-3)
    train.add_argument("--min-lr", type=nonnegative_float, default=0.0)
    train.add_argument("--lr-warmup-iters", type=nonnegative_int, default=0)
    train.add_argument("--lr-warmup-init", type=nonnegative_float, default=0.0,
                       help="learning rate of the first warmup iteration (Megatron-LM's flag and default)")
    train.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    train.add_argument("--weight-decay", type=nonnegative_float, default=0.01)
    train.add_argument("--adam-beta1", type=adam_beta, default=0.9)
    train.add_argument("--adam-beta2", type=adam_beta, default=0.95)
    train.add_argument("--clip-grad", type=nonnegative_float, default=1.0, help="0 disables clipping")
    train.add_argument("--seed", type=nonnegative_int, default=1234)
    train.add_argument("--bf16", action="store_true", help="bf16 parameters and compute, fp32 master weights")
    train.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=True,
                       help="ZeRO-1: optimizer state sharded over DP x CP (default on)")
    train.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    train.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                       help="with --recompute-granularity full (default there: uniform)")
    train.add_argument("--recompute-num-layers", type=positive_int, default=None,
                       help="with --recompute-granularity full: layers per recomputed group (default 1)")
    parallel = parser.add_argument_group("model parallelism (USP flags below)")
    parallel.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    parallel.add_argument("--sequence-parallel", action="store_true",
                          help="Megatron's sequence parallelism: activations outside attention / MLP split over TP")
    parallel.add_argument("--decoder-first-pipeline-num-layers", type=positive_int, default=None,
                          help="uneven pipeline stages: layers of the first stage (the others split the rest evenly)")
    parallel.add_argument("--decoder-last-pipeline-num-layers", type=positive_int, default=None,
                          help="uneven pipeline stages: layers of the last stage")
    virtual = parallel.add_mutually_exclusive_group()
    virtual.add_argument("--num-layers-per-virtual-pipeline-stage", type=positive_int, default=None,
                         help="interleaved 1F1B: this many layers per virtual pipeline stage")
    virtual.add_argument("--virtual-pipeline-model-parallel-size", type=positive_int, default=None,
                         help="interleaved 1F1B: this many model chunks per pipeline rank")
    data = parser.add_argument_group("data and logging")
    data.add_argument("--data-path", default=None,
                      help="Megatron indexed dataset prefix (PREFIX.bin/.idx); default: stdlib byte corpus")
    data.add_argument("--corpus-bytes", type=positive_int, default=8 << 20, help="size cap of the byte corpus")
    data.add_argument("--save", default=None, help="checkpoint directory")
    data.add_argument("--save-interval", type=positive_int, default=None, help="default: only at the end")
    data.add_argument("--load", default=None, help="resume from the latest checkpoint in this directory")
    data.add_argument("--ckpt-step", type=positive_int, default=None, help="with --load: this iteration, not the latest")
    data.add_argument("--log-interval", type=positive_int, default=10)
    data.add_argument("--loss-csv", default=None, help="write iteration,loss for every iteration (rank 0)")
    add_usp_args(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, each checked alone (argparse) and against the others (ValueError naming them)."""
    args = build_parser().parse_args(argv)
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if not args.untie_embeddings_and_output_weights:
        raise ValueError("--no-untie-embeddings-and-output-weights: this trainer always unties the embedding and "
                         "output weights (drop the flag)")
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    elif args.num_query_groups is None:
        raise ValueError("--group-query-attention needs --num-query-groups")
    check_model_args(args)
    check_moe_args(args)
    check_run_args(args)
    return args


MOE_DEFAULTS = {"moe_router_topk": 2, "moe_token_dispatcher_type": "alltoall",
                "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.0,
                "expert_model_parallel_size": 1}


def check_moe_args(args: argparse.Namespace) -> None:
    """MoE flags only beside --num-experts (refused alone, never ignored), then their defaults and divisibility."""
    given = [name for name in (*MOE_DEFAULTS, "moe_ffn_hidden_size") if getattr(args, name) is not None]
    if args.num_experts is None:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --num-experts (this model has a dense MLP)")
        args.expert_model_parallel_size = 1
        return
    for name, default in MOE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.moe_ffn_hidden_size = args.moe_ffn_hidden_size or args.ffn_hidden_size
    if not args.disable_bias_linear:
        raise ValueError("--num-experts needs --disable-bias-linear: megatron-core's local experts (SequentialMLP) "
                         "add their bias in place on a view autograd forbids (a RuntimeError in the first step)")
    if args.moe_router_topk > args.num_experts:
        raise ValueError(f"--moe-router-topk {args.moe_router_topk} exceeds --num-experts {args.num_experts}")
    if args.num_experts % args.expert_model_parallel_size:
        raise ValueError(f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size "
                         f"{args.expert_model_parallel_size} (each expert rank holds the same number of experts)")
    if args.moe_ffn_hidden_size % args.tensor_model_parallel_size:
        raise ValueError(f"--moe-ffn-hidden-size {args.moe_ffn_hidden_size} is not divisible by "
                         f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")


def check_model_args(args: argparse.Namespace) -> None:
    """Shapes megatron-core needs to divide evenly (it would fail in the first step, or deep in a constructor)."""
    if args.hidden_size % args.num_attention_heads:
        raise ValueError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                         f"{args.num_attention_heads} (each head gets hidden / heads channels)")
    if args.num_attention_heads % args.num_query_groups:
        raise ValueError(f"--num-attention-heads {args.num_attention_heads} is not divisible by --num-query-groups "
                         f"{args.num_query_groups} (each query group serves the same number of heads)")
    tp = args.tensor_model_parallel_size
    if args.ffn_hidden_size % tp:
        raise ValueError(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tensor-model-parallel-size "
                         f"{tp}")
    if args.vocab_size is not None and args.vocab_size % tp:
        raise ValueError(f"--vocab-size {args.vocab_size} is not divisible by --tensor-model-parallel-size {tp}: "
                         f"round it up to a multiple of {tp} (the extra ids are never seen)")


def check_run_args(args: argparse.Namespace) -> None:
    """Flags that only mean something beside another flag: refused alone, never silently ignored."""
    if args.recompute_granularity != "full":
        for flag, value in (("--recompute-method", args.recompute_method),
                            ("--recompute-num-layers", args.recompute_num_layers)):
            if value is not None:
                raise ValueError(f"{flag} {value} needs --recompute-granularity full (selective recompute recomputes "
                                 "the attention core of every layer)")
    else:
        args.recompute_method = args.recompute_method or "uniform"
        args.recompute_num_layers = args.recompute_num_layers or 1
    for flag, value, needs in (("--ckpt-step", args.ckpt_step, args.load and "--load"),
                               ("--save-interval", args.save_interval, args.save and "--save")):
        if value is not None and not needs:
            raise ValueError(f"{flag} {value} needs {'--load DIR' if flag == '--ckpt-step' else '--save DIR'}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")


def configure(argv=None) -> tuple[argparse.Namespace, object, GPTSamples]:
    """Every check of the command line and the data, on each rank alike and before any process group: returns
    ``(args, stream, samples)`` or raises ValueError naming the flag to fix."""
    args = parse_args(argv)
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    validate_usp_args(args)  # sets context_parallel_size = u x r; ValueError names the flag to fix
    check_batch_args(args)
    stream, samples = open_data(args)
    return args, stream, samples


def check_batch_args(args: argparse.Namespace) -> None:
    """Derive DP size and micro-batches per step; raise ValueError for a batch size that does not split."""
    sp_size = args.ulysses_degree * args.ring_degree
    # validate_usp_args checked that TP x PP x u x r divides the world
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * sp_size
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    uneven = uneven_stages_reason(args.num_layers, args.pipeline_model_parallel_size, first, last)
    if uneven:
        raise ValueError(f"--decoder-first-pipeline-num-layers {first} / --decoder-last-pipeline-num-layers {last} "
                         f"with --num-layers {args.num_layers} and --pipeline-model-parallel-size "
                         f"{args.pipeline_model_parallel_size}: {uneven}")
    if first is None and last is None and args.num_layers % args.pipeline_model_parallel_size:
        raise ValueError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size "
                         f"{args.pipeline_model_parallel_size}: change them, or give the end stages their own counts "
                         "(--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers)")
    args.data_parallel_size = args.world_size // model_parallel
    stage_ranks = args.world_size // args.pipeline_model_parallel_size
    if stage_ranks % (args.tensor_model_parallel_size * args.expert_model_parallel_size):
        raise ValueError(f"--expert-model-parallel-size {args.expert_model_parallel_size} x --tensor-model-parallel-"
                         f"size {args.tensor_model_parallel_size} does not divide the {stage_ranks} ranks of a "
                         "pipeline stage (megatron-core shards the experts over them)")
    per_step = args.micro_batch_size * args.data_parallel_size
    args.global_batch_size = args.global_batch_size or per_step
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                         f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_micro_batches = args.global_batch_size // per_step
    check_virtual_pipeline_args(args)
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        # as Megatron-LM: sequence parallelism splits over TP, so without TP there is nothing to split
        print("WARNING: --sequence-parallel without tensor parallelism: disabled", flush=True)
        args.sequence_parallel = False
    if args.sequence_parallel and (args.seq_length // sp_size) % args.tensor_model_parallel_size:
        raise ValueError(f"--sequence-parallel: the {args.seq_length // sp_size} tokens per USP rank (--seq-length "
                         f"{args.seq_length} / u x r {sp_size}) are not divisible by --tensor-model-parallel-size "
                         f"{args.tensor_model_parallel_size}")
    if args.lr_warmup_iters >= args.train_iters:
        raise ValueError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --train-iters {args.train_iters} "
                         "(megatron-core's scheduler decays after the warmup)")
    if args.seq_length > args.max_position_embeddings:
        raise ValueError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{args.max_position_embeddings}")


def check_virtual_pipeline_args(args: argparse.Namespace) -> None:
    """Set ``args.virtual_pipeline_model_parallel_size`` (None without interleaving) from either flag and check
    megatron-core's rules for the interleaved schedule, naming the flag to fix."""
    pp = args.pipeline_model_parallel_size
    uneven = args.decoder_first_pipeline_num_layers is not None or args.decoder_last_pipeline_num_layers is not None
    if uneven and (args.num_layers_per_virtual_pipeline_stage or args.virtual_pipeline_model_parallel_size):
        raise ValueError("virtual pipeline stages with --decoder-first/last-pipeline-num-layers: not supported by this "
                         "trainer; use one or the other")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        flag = f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage}"
        per_stage = args.num_layers // pp
        if args.num_layers_per_virtual_pipeline_stage < 1 or per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ValueError(f"{flag}: the {per_stage} layers per pipeline stage (--num-layers {args.num_layers} / "
                             f"--pipeline-model-parallel-size {pp}) are not divisible by it")
        virtual = per_stage // args.num_layers_per_virtual_pipeline_stage
    elif args.virtual_pipeline_model_parallel_size is not None:
        virtual = args.virtual_pipeline_model_parallel_size
        flag = f"--virtual-pipeline-model-parallel-size {virtual}"
        if virtual < 1 or args.num_layers % (pp * virtual):
            raise ValueError(f"{flag}: --num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-"
                             f"size {pp} x {virtual}")
    else:
        return
    if virtual == 1:  # one chunk per stage: plain 1F1B
        args.virtual_pipeline_model_parallel_size = None
        return
    if pp == 1:
        raise ValueError(f"{flag} needs --pipeline-model-parallel-size > 1 (interleaved pipeline schedule)")
    # megatron-core's interleaved schedule runs the micro-batches in groups of PP per virtual stage (default
    # microbatch_group_size_per_vp_stage): it refuses fewer than PP micro-batches and a partial last group
    if args.num_micro_batches % pp:
        raise ValueError(f"{flag}: the interleaved schedule needs a multiple of --pipeline-model-parallel-size {pp} "
                         f"micro-batches per step, not {args.num_micro_batches} (--global-batch-size "
                         f"{args.global_batch_size} / (--micro-batch-size {args.micro_batch_size} x DP "
                         f"{args.data_parallel_size})): raise --global-batch-size to a multiple of "
                         f"{pp * args.micro_batch_size * args.data_parallel_size}")
    args.virtual_pipeline_model_parallel_size = virtual
