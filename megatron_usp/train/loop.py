"""The trainer's model, optimizer and loop, all megatron-core's: GPTModel chunks in DistributedDataParallel, the
(distributed) optimizer and its scheduler, ``get_forward_backward_func``'s pipeline schedules."""
from __future__ import annotations

import csv
import functools
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..megatron import (cpu_standins, destroy_model_parallel, get_usp_groups, initialize_model_parallel, moe,
                        optimizer_load)
from ..config import USPConfig
from ..megatron.specs import get_gpt_decoder_block_local_spec
from .args import configure
from .checkpoint import load_checkpoint, save_checkpoint
from .data import MicroBatches


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
    experts = {} if args.num_experts is None else dict(
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type, moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        expert_model_parallel_size=args.expert_model_parallel_size, moe_grouped_gemm=False,
    )
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
        **swiglu, **experts, **interleaved, **recompute,
    )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=args.use_distributed_optimizer,
    )
    if args.num_experts is not None:
        moe.fix_router_loss_scaling()  # megatron-core 0.16: router losses 1 / CP as strong under per-token loss
    chunks = []
    for vp_stage in ([None] if virtual is None else range(virtual)):
        # as Megatron-LM: each pipeline stage draws its layers from its own seed (each virtual stage too)
        torch.manual_seed(args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank() + 10000 * (vp_stage or 0))
        model = GPTModel(
            config=config, transformer_layer_spec=get_gpt_decoder_block_local_spec(
                config, vp_stage=vp_stage, num_experts=args.num_experts, moe_grouped_gemm=False),
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


def moe_description(args) -> str:
    if args.num_experts is None:
        return ""
    return (f", MoE {args.num_experts} experts top-{args.moe_router_topk} ({args.moe_token_dispatcher_type}, "
            f"{args.moe_router_load_balancing_type} x {args.moe_aux_loss_coeff}) over EP "
            f"{args.expert_model_parallel_size}")


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
    standins = cpu_standins.install(megatron_lm=False)  # megatron-core's CUDA calls -> CPU; nothing with CUDA
    initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size, config=USPConfig.from_args(args),
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size, create_gloo_process_groups=False,
    )
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
              f"{', no linear biases' if args.disable_bias_linear else ''}"
              f"{moe_description(args)}; ~{params / 1e6:.2f}M parameters on "
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
