"""Train a megatron-core GPTModel with Unified Sequence Parallelism (ulysses x ring) under torchrun.

    torchrun --nproc-per-node 4 examples/pretrain_gpt_usp.py --ulysses-degree 2 --ring-degree 2 \\
        --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 256 --train-iters 20

gloo on CPU, NCCL on GPU (chosen automatically). Flags are named as in Megatron-LM's pretrain_gpt.py, plus
``--ulysses-degree --ring-degree --usp-ring-impl --usp-attn-backend``. The world is TP x PP x DP x (u x r): every
rank of a USP group holds ``seq_length / (u*r)`` tokens of the same samples. The training machinery is
megatron-core's: DistributedDataParallel, the (distributed, by default) optimizer and its parameter scheduler,
the pipeline schedules, and dist_checkpointing, whose checkpoints (``--save/--load``) resume under another TP,
PP, ulysses/ring degree or ring_impl. On CPU, ``megatron_lm_cpu``'s megatron-core stand-ins route its CUDA calls.
"""
from __future__ import annotations

import argparse
import csv
import functools
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt_data import ByteCorpus, GPTSamples, IndexedTokens  # noqa: E402

from megatron_usp.flags import adam_beta, nonnegative_float, nonnegative_int, positive_float, positive_int  # noqa: E402
from megatron_usp.job_cost import uneven_stages_reason  # noqa: E402
from megatron_usp.megatron import (  # noqa: E402
    add_usp_args,
    destroy_model_parallel,
    get_batch_on_this_usp_rank,
    get_usp_groups,
    initialize_model_parallel,
    megatron_lm_cpu,
    optimizer_load,
    validate_usp_args,
)
from megatron_usp.megatron.specs import get_gpt_decoder_block_local_spec  # noqa: E402

CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"
# Arguments that fix the model's parameters: a checkpoint only loads into the same values.
MODEL_SHAPE_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "vocab_size", "max_position_embeddings", "tensor_model_parallel_size", "swiglu", "normalization",
                    "disable_bias_linear")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
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
                       help="default: 256 for the byte corpus, largest token id + 1 for --data-path")
    model.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (gated linear unit with SiLU)")
    model.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    model.add_argument("--disable-bias-linear", action="store_true", help="no biases in the linear layers")
    model.add_argument("--untie-embeddings-and-output-weights", action=argparse.BooleanOptionalAction, default=True,
                       help="always untied in this trainer (default on, unlike Megatron-LM); "
                            "--no-untie-embeddings-and-output-weights is refused")
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
    check_run_args(args)
    return args


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


def open_data(args: argparse.Namespace):
    """The token stream of ``--data-path`` (or the byte corpus) and its samples, checked against the model before
    any process group: every token id must be below ``--vocab-size`` (default: the data's own vocabulary)."""
    stream = IndexedTokens(args.data_path) if args.data_path else ByteCorpus(args.corpus_bytes)
    data_vocab = stream.vocab_size
    if args.vocab_size is None:
        args.vocab_size = data_vocab + (-data_vocab) % args.tensor_model_parallel_size
    elif args.vocab_size < data_vocab:
        raise ValueError(f"--vocab-size {args.vocab_size} is below the data's vocabulary ({stream.description}: token "
                         f"ids up to {data_vocab - 1}); tokens >= {args.vocab_size} would have no embedding: raise "
                         f"--vocab-size to at least {data_vocab} or drop it")
    try:
        samples = GPTSamples(stream, args.seq_length, args.seed)
    except ValueError as error:
        raise ValueError(f"{error} (--corpus-bytes / --data-path)") from None
    return stream, samples


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


def build_model(args) -> list:
    """This pipeline rank's model chunks (one, or V with virtual pipeline stages, as Megatron-LM's ``get_model``):
    GPTModels (fp32 or bf16) each wrapped in megatron-core's DistributedDataParallel, which reduces gradients over
    DP x CP in fp32 buckets (reduce-scatter with the distributed optimizer)."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    recompute = {} if args.recompute_granularity is None else dict(
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method if args.recompute_granularity == "full" else None,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity == "full" else None,
    )
    virtual = args.virtual_pipeline_model_parallel_size
    # as Megatron-LM's defaults: the interleaved schedule overlaps its p2p sends / receives (not batched)
    interleaved = {} if virtual is None else dict(virtual_pipeline_model_parallel_size=virtual,
                                                  overlap_p2p_comm=True, batch_p2p_comm=False)
    swiglu = dict(gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False) if args.swiglu else {}
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        tensor_model_parallel_size=args.tensor_model_parallel_size, sequence_parallel=args.sequence_parallel,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size, context_parallel_size=args.context_parallel_size,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        normalization=args.normalization, add_bias_linear=not args.disable_bias_linear,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype, calculate_per_token_loss=True,
        # weights drawn on CPU from the seeded default generator: the same for every TP, u, r and device
        use_cpu_initialization=True, perform_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        **swiglu, **interleaved, **recompute,
    )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=args.use_distributed_optimizer,
    )
    chunks = []
    for vp_stage in ([None] if virtual is None else range(virtual)):
        # as Megatron-LM: each pipeline stage draws its layers from its own seed (each virtual stage too)
        torch.manual_seed(args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank() + 10000 * (vp_stage or 0))
        model = GPTModel(
            config=config, transformer_layer_spec=get_gpt_decoder_block_local_spec(config, vp_stage=vp_stage),
            vocab_size=args.vocab_size, max_sequence_length=args.max_position_embeddings,
            position_embedding_type="rope", share_embeddings_and_output_weights=False,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        # as Megatron-LM: only the first chunk's gradients are split into buckets
        chunks.append(DistributedDataParallel(config, ddp_config, model, disable_bucketing=len(chunks) > 0))
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = chunks[0].no_sync if len(chunks) == 1 else [chunk.no_sync for chunk in chunks]
    return chunks


def megatron_optimizer(args, model: list):
    """megatron-core's optimizer over the DDP-wrapped model: AdamW on fp32 main parameters (ZeRO-1 sharded over
    DP x CP with ``--use-distributed-optimizer``, the default), global-norm clipping, and its parameter scheduler
    (warmup, then constant / linear / cosine decay to ``--min-lr``)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=1e-8, clip_grad=args.clip_grad,
        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model, use_gloo_process_groups=False)
    optimizer_load.fix_distributed_optimizer_load()  # megatron-core 0.16 cannot reload it otherwise
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant",
    )
    return optimizer, scheduler


def checkpoint_dir(directory: str, iteration: int) -> Path:
    return Path(directory) / f"iter_{iteration:07d}"


# The distributed optimizer's state in the checkpoint: one tensor per parameter in model space, so it reloads under
# another DP (u, r, TP and PP change DP too) and TP / PP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_keys(model: list) -> list[str]:
    """As Megatron-LM's checkpoints: "model", or "model0", "model1", ... for virtual pipeline chunks. The tensors'
    own keys are global (layer numbers included), so a checkpoint reloads across virtual stages too."""
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _sharded_state(model: list, optimizer, is_loading: bool) -> dict:
    state = {key: chunk.module.sharded_state_dict() for key, chunk in zip(_model_keys(model), model)}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return state


def save_checkpoint(args, iteration: int, model, optimizer, scheduler) -> None:
    """A megatron-core ``dist_checkpointing`` checkpoint (torch_dist: every rank writes its shards) in
    ``SAVE/iter_N``. Crash-safe: written under ``iter_N.partial``, renamed to ``iter_N`` once every rank is done,
    and only then named in the tracker file (replaced atomically): a run killed mid-write leaves the tracker on
    the last complete checkpoint."""
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(args.save, iteration)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing it
        partial.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state.update(iteration=iteration, scheduler=scheduler.state_dict(),
                 model_shape={name: getattr(args, name) for name in MODEL_SHAPE_ARGS},
                 grid={"ulysses_degree": args.ulysses_degree, "ring_degree": args.ring_degree,
                       "usp_ring_impl": args.usp_ring_impl, "tensor_model_parallel_size": args.tensor_model_parallel_size,
                       "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
                       "virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
                       "use_distributed_optimizer": args.use_distributed_optimizer})
    dist_checkpointing.save(state, str(partial), content_metadata=OPTIMIZER_METADATA)
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():  # the same iteration saved again: the new copy replaces it
            shutil.rmtree(final)
        os.replace(partial, final)
        tracker = Path(args.save) / CHECKPOINT_TRACKER
        tracker.with_suffix(".tmp").write_text(f"{iteration}\n")
        os.replace(tracker.with_suffix(".tmp"), tracker)
        print(f" saved checkpoint at iteration {iteration} to {args.save}", flush=True)
    dist.barrier()


def load_checkpoint(args, model, optimizer, scheduler) -> int:
    """Load the latest checkpoint under ``--load`` (or ``--ckpt-step``); returns its iteration, 0 when there is
    none yet. TP, PP, ulysses/ring degrees and ring_impl may differ from the saving run's; the model may not."""
    from megatron.core import dist_checkpointing

    tracker = Path(args.load) / CHECKPOINT_TRACKER
    if args.ckpt_step is not None:
        iteration = args.ckpt_step
    elif tracker.is_file():
        iteration = int(tracker.read_text().strip())
    else:  # as Megatron: --load with nothing saved yet (first run of a requeued job) starts from scratch
        if dist.get_rank() == 0:
            print(f" WARNING: --load {args.load} has no {CHECKPOINT_TRACKER}; starting from random weights",
                  flush=True)
        return 0
    directory = checkpoint_dir(args.load, iteration)
    if not (directory / "common.pt").is_file():
        raise ValueError(f"--load {args.load}: no complete checkpoint for iteration {iteration} ({directory})")
    common = dist_checkpointing.load_common_state_dict(str(directory))
    for name, saved in common["model_shape"].items():
        if name != "tensor_model_parallel_size" and getattr(args, name) != saved:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--load {args.load}: the checkpoint has {flag} {saved}, this run {getattr(args, name)}")
    grid = common["grid"]
    if grid["use_distributed_optimizer"] != args.use_distributed_optimizer:
        flag = "--use-distributed-optimizer" if grid["use_distributed_optimizer"] else "--no-use-distributed-optimizer"
        raise ValueError(f"--load {args.load}: the checkpoint's optimizer state was saved with {flag}; resume with it")
    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(directory))
    for key, chunk in zip(_model_keys(model), model):
        chunk.module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if dist.get_rank() == 0:
        print(f" loaded checkpoint at iteration {iteration} from {args.load} (saved with TP "
              f"{grid['tensor_model_parallel_size']} PP {grid['pipeline_model_parallel_size']} ulysses "
              f"{grid['ulysses_degree']} x ring {grid['ring_degree']} {grid['usp_ring_impl']})", flush=True)
    return iteration


def open_loss_csv(path: str, start_iteration: int):
    """Open ``path`` for ``iteration,loss`` rows, keeping the rows of earlier iterations of a resumed run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if start_iteration and path.is_file():
        with open(path, newline="") as existing:
            kept = [row for row in csv.DictReader(existing) if int(row["iteration"]) <= start_iteration]
    loss_file = open(path, "w", newline="")
    writer = csv.writer(loss_file)
    writer.writerow(["iteration", "loss"])
    writer.writerows([row["iteration"], row["loss"]] for row in kept)
    return loss_file


class MicroBatches:
    """The data iterator Megatron's schedules pull micro-batches from: this DP rank's share of each global batch,
    every tensor sharded along the sequence for this USP rank (every pipeline stage reads the same ones)."""

    def __init__(self, args, samples, device):
        from megatron.core import parallel_state

        self.args, self.samples, self.device = args, samples, device
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.iteration, self.micro = 0, 0

    def start(self, iteration: int) -> "MicroBatches":
        self.iteration, self.micro = iteration, 0
        return self

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        args = self.args
        first = (self.iteration * args.global_batch_size
                 + (self.micro * args.data_parallel_size + self.dp_rank) * args.micro_batch_size)
        self.micro += 1
        batch = get_batch_on_this_usp_rank(self.samples.batch(first, args.micro_batch_size))
        return {key: value.to(self.device) for key, value in batch.items()}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token losses ``[b, s_local]`` -> (sum over this rank's tokens, their count, for logging): with
    ``calculate_per_token_loss`` megatron-core divides the gradients by the global token count (DP x CP)."""
    loss_sum = (output_tensor.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach().double(), num_tokens.double()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(loss_func, batch["loss_mask"])


def train_step(args, model, optimizer, scheduler, micro_batches, iteration: int) -> tuple[float, float]:
    """One optimizer step over the global batch through megatron-core's schedule (1F1B with PP > 1, interleaved
    with virtual pipeline stages); returns
    (mean loss per token over the global batch, grad norm)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    # one iterator per model chunk, all over the same micro-batches (each virtual stage reads them in turn)
    iterators = [batches.start(iteration) for batches in micro_batches]
    outputs = forward_backward(
        forward_step_func=forward_step, data_iterator=iterators if len(model) > 1 else iterators[0], model=model,
        num_microbatches=args.num_micro_batches, seq_length=args.seq_length,  # the schedule divides by CP
        micro_batch_size=args.micro_batch_size, forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    if not update_successful:
        raise RuntimeError(f"iteration {iteration + 1}: the optimizer skipped its step (non-finite gradients)")
    scheduler.step(increment=1)
    device = next(model[0].parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for output in outputs:  # the last pipeline stage's micro-batches; empty elsewhere
        totals += output["lm loss"].to(device)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if args.pipeline_model_parallel_size > 1:  # the loss lives on the last stage; rank 0 logs it
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return (totals[0] / totals[1]).item(), float(grad_norm or 0.0)


def main(argv=None, configured: Optional[tuple] = None) -> None:
    """Train; ``configured``: what :func:`configure` returned (else it runs on ``argv`` first)."""
    # validated before any process group exists: a bad flag fails every rank the same way, never hangs
    args, stream, samples = configured or configure(argv)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    standins = megatron_lm_cpu.install(megatron_lm=False)  # megatron-core's CUDA calls -> CPU; nothing with CUDA
    initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size, ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree, ring_impl=args.usp_ring_impl, ulysses_inner=not args.usp_ring_inner,
        attn_backend=args.usp_attn_backend, micro_q=args.usp_micro_q, usp_check=getattr(args, "usp_check", None),
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        create_gloo_process_groups=False,
    )
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(args.seed)  # the RNG tracker activation recompute restores
    model = build_model(args)
    optimizer, scheduler = megatron_optimizer(args, model)
    start_iteration = load_checkpoint(args, model, optimizer, scheduler) if args.load else 0
    micro_batches = [MicroBatches(args, samples, device) for _ in model]
    rank0 = dist.get_rank() == 0
    groups = get_usp_groups()
    if rank0:
        params = sum(p.numel() for chunk in model for p in chunk.parameters()) * args.tensor_model_parallel_size
        print(f"> {stream.description}\n> GPT: {args.num_layers} layers, hidden {args.hidden_size}, "
              f"{args.num_attention_heads} heads / {args.num_query_groups} query groups, vocab {args.vocab_size}, "
              f"{'bf16' if args.bf16 else 'fp32'}, {args.normalization}{', SwiGLU' if args.swiglu else ''}"
              f"{', no linear biases' if args.disable_bias_linear else ''}; ~{params / 1e6:.2f}M parameters on "
              "pipeline stage 0\n"
              f"> grid: world {args.world_size} = TP {args.tensor_model_parallel_size}"
              f"{' (sequence parallel)' if args.sequence_parallel else ''} x PP {args.pipeline_model_parallel_size}"
              f"{f' ({len(model)} virtual stages)' if len(model) > 1 else ''} x DP {args.data_parallel_size} x USP "
              f"(ulysses {groups.ulysses_degree} x ring {groups.ring_degree}, {args.usp_ring_impl}, "
              f"{'ring' if args.usp_ring_inner else 'ulysses'}-inner), {dist.get_backend()} on {device.type}\n"
              f"> megatron-core: DistributedDataParallel, {type(optimizer).__name__}"
              f"{' (ZeRO-1 over DP x CP)' if args.use_distributed_optimizer else ''}, OptimizerParamScheduler, "
              f"{get_forward_backward_func_name()}, dist_checkpointing"
              f"{'; CPU stand-ins: ' + ', '.join(standins) if standins else ''}\n"
              f"> batch: global {args.global_batch_size} x {args.seq_length} tokens, micro {args.micro_batch_size},"
              f" {args.num_micro_batches} micro-batches per step; {args.seq_length // groups.sp_size} tokens per "
              "rank per sample", flush=True)
    loss_file = open_loss_csv(args.loss_csv, start_iteration) if rank0 and args.loss_csv else None
    writer = csv.writer(loss_file) if loss_file else None
    run_start = window_start = time.perf_counter()
    window_losses = []
    for iteration in range(start_iteration, args.train_iters):
        learning_rate = optimizer.param_groups[0]["lr"]
        loss, grad_norm = train_step(args, model, optimizer, scheduler, micro_batches, iteration)
        window_losses.append(loss)
        if loss_file:
            writer.writerow([iteration + 1, repr(loss)])
            loss_file.flush()
        done = iteration + 1
        if done % args.log_interval == 0 or done == args.train_iters:
            elapsed = time.perf_counter() - window_start
            per_iteration = elapsed / len(window_losses)
            total = time.perf_counter() - run_start
            remaining = (args.train_iters - done) * total / (done - start_iteration)
            if rank0:
                print(f" iteration {done:8d}/{args.train_iters:8d} | consumed samples: {done * args.global_batch_size:10d}"
                      f" | elapsed time per iteration (ms): {1000 * per_iteration:.1f} | learning rate: "
                      f"{learning_rate:.3E} | lm loss: {sum(window_losses) / len(window_losses):.6E}"
                      f" | grad norm: {grad_norm:.3f} | tokens per second: "
                      f"{args.global_batch_size * args.seq_length / per_iteration:.0f} | elapsed: {total:.1f} s"
                      f" | [{100 * done / args.train_iters:3.0f}% eta {remaining:.0f} s]", flush=True)
            window_start, window_losses = time.perf_counter(), []
        if args.save and args.save_interval and done % args.save_interval == 0 and done != args.train_iters:
            save_checkpoint(args, done, model, optimizer, scheduler)
    if args.save and args.train_iters > start_iteration:
        save_checkpoint(args, args.train_iters, model, optimizer, scheduler)
    if loss_file:
        loss_file.close()
    destroy_model_parallel()
    dist.destroy_process_group()


def get_forward_backward_func_name() -> str:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func().__name__


if __name__ == "__main__":
    try:
        configured = configure()  # a bad flag or data file ends here with its message, not a traceback
    except ValueError as flag_error:
        sys.exit(f"{Path(__file__).name}: error: {flag_error}")
    main(configured=configured)
