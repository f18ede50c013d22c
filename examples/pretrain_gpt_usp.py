"""Train a megatron-core GPTModel with Unified Sequence Parallelism (ulysses x ring) under torchrun.

    torchrun --nproc-per-node 4 examples/pretrain_gpt_usp.py --ulysses-degree 2 --ring-degree 2 \\
        --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 256 --train-iters 20

gloo on CPU, NCCL on GPU (chosen automatically). Flags are named as in Megatron-LM's pretrain_gpt.py, plus
``--ulysses-degree --ring-degree --usp-ring-impl --usp-attn-backend``. The world is TP x DP x (u x r): every
rank of a USP group holds ``seq_length / (u*r)`` tokens of the same samples. Checkpoints (``--save/--load``)
hold whole (per-TP-rank) models, so a run can resume under other ulysses/ring degrees or without SP.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt_data import ByteCorpus, GPTSamples, IndexedTokens  # noqa: E402

from megatron_usp.megatron import (  # noqa: E402
    add_usp_args,
    destroy_model_parallel,
    enable_cpu_mode,
    get_batch_on_this_usp_rank,
    get_gpt_layer_local_spec,
    get_usp_groups,
    initialize_model_parallel,
    validate_usp_args,
)

CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"
# Arguments that fix the model's parameters: a checkpoint only loads into the same values.
MODEL_SHAPE_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "vocab_size", "max_position_embeddings", "tensor_model_parallel_size")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--hidden-size", type=int, default=64)
    model.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    model.add_argument("--num-attention-heads", type=int, default=4)
    model.add_argument("--group-query-attention", action="store_true")
    model.add_argument("--num-query-groups", type=int, default=None)
    model.add_argument("--seq-length", type=int, default=256)
    model.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    model.add_argument("--vocab-size", type=int, default=None,
                       help="default: 256 for the byte corpus, largest token id + 1 for --data-path")
    train = parser.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=int, default=1)
    train.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP size")
    train.add_argument("--train-iters", type=int, default=100)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--min-lr", type=float, default=0.0)
    train.add_argument("--lr-warmup-iters", type=int, default=0)
    train.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--adam-beta1", type=float, default=0.9)
    train.add_argument("--adam-beta2", type=float, default=0.95)
    train.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--bf16", action="store_true", help="bf16 parameters and compute, fp32 master weights")
    train.add_argument("--tensor-model-parallel-size", type=int, default=1)
    data = parser.add_argument_group("data and logging")
    data.add_argument("--data-path", default=None,
                      help="Megatron indexed dataset prefix (PREFIX.bin/.idx); default: stdlib byte corpus")
    data.add_argument("--corpus-bytes", type=int, default=8 << 20, help="size cap of the byte corpus")
    data.add_argument("--save", default=None, help="checkpoint directory")
    data.add_argument("--save-interval", type=int, default=None, help="default: only at the end")
    data.add_argument("--load", default=None, help="resume from the latest checkpoint in this directory")
    data.add_argument("--ckpt-step", type=int, default=None, help="with --load: this iteration, not the latest")
    data.add_argument("--log-interval", type=int, default=10)
    data.add_argument("--loss-csv", default=None, help="write iteration,loss for every iteration (rank 0)")
    add_usp_args(parser)
    args = parser.parse_args(argv)
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    elif args.num_query_groups is None:
        raise ValueError("--group-query-attention needs --num-query-groups")
    return args


def check_batch_args(args: argparse.Namespace) -> None:
    """Derive DP size and micro-batches per step; raise ValueError for a batch size that does not split."""
    sp_size = args.ulysses_degree * args.ring_degree
    args.data_parallel_size = args.world_size // (args.tensor_model_parallel_size * sp_size)
    per_step = args.micro_batch_size * args.data_parallel_size
    args.global_batch_size = args.global_batch_size or per_step
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                         f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_micro_batches = args.global_batch_size // per_step
    if args.seq_length > args.max_position_embeddings:
        raise ValueError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{args.max_position_embeddings}")


def build_model(args, device: torch.device):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        tensor_model_parallel_size=args.tensor_model_parallel_size, context_parallel_size=args.context_parallel_size,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype,
        # weights drawn on CPU from the seeded default generator: identical for every grid and device
        use_cpu_initialization=True, perform_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
    )
    torch.manual_seed(args.seed)
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=args.vocab_size,
        max_sequence_length=args.max_position_embeddings, position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    return model.to(device)


class MixedPrecisionAdamW:
    """AdamW on fp32 master copies of the (fp32 or bf16) model parameters, as Megatron's optimizer does.

    Gradients are summed over the data x context parallel group in one flat fp32 buffer (what Megatron's DDP
    does: every rank's loss is already scaled by the global token count) and clipped by the global norm.
    """

    def __init__(self, model, args, dp_cp_group, tp_group):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() if p.dtype != torch.float32 else p for p in self.params]
        self.dp_cp_group, self.tp_group, self.clip_grad = dp_cp_group, tp_group, args.clip_grad
        decay = [m for p, m in zip(self.params, self.masters) if p.dim() > 1]
        no_decay = [m for p, m in zip(self.params, self.masters) if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=1e-8,
        )

    def zero_grad(self) -> None:
        for param, master in zip(self.params, self.masters):
            param.grad = None
            master.grad = None

    def _reduce_gradients(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.dp_cp_group)
        offset = 0
        for master in self.masters:
            master.grad = flat[offset:offset + master.numel()].view_as(master)
            offset += master.numel()

    def _grad_norm(self) -> float:
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        # TP-duplicated parameters (layer norms) count once; TP-sharded ones are summed over the TP group
        square = sum(m.grad.double().square().sum() for p, m in zip(self.params, self.masters)
                     if param_is_not_tensor_parallel_duplicate(p))
        square = torch.as_tensor(square, dtype=torch.float64, device=self.masters[0].device)
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(square, group=self.tp_group)
        return math.sqrt(square.item())

    def step(self, lr: float) -> float:
        self._reduce_gradients()
        grad_norm = self._grad_norm()
        if self.clip_grad > 0 and grad_norm > self.clip_grad:
            for master in self.masters:
                master.grad.mul_(self.clip_grad / (grad_norm + 1e-6))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            for param, master in zip(self.params, self.masters):
                if param is not master:
                    param.copy_(master)
        return grad_norm

    def state_dict(self) -> dict:
        return {"adam": self.optimizer.state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["adam"])
        with torch.no_grad():
            for param, master, saved in zip(self.params, self.masters, state["masters"]):
                master.copy_(saved)
                if param is not master:
                    param.copy_(master)


def learning_rate(args, iteration: int) -> float:
    """Megatron's schedule: linear warmup, then constant / linear / cosine decay to --min-lr."""
    if args.lr_warmup_iters and iteration < args.lr_warmup_iters:
        return args.lr * (iteration + 1) / args.lr_warmup_iters
    if args.lr_decay_style == "constant":
        return args.lr
    decay_iters = max(1, args.train_iters - args.lr_warmup_iters)
    progress = min(1.0, (iteration - args.lr_warmup_iters) / decay_iters)
    factor = 1.0 - progress if args.lr_decay_style == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return args.min_lr + (args.lr - args.min_lr) * factor


def checkpoint_file(directory: str, iteration: int, tp_rank: int) -> Path:
    return Path(directory) / f"iter_{iteration:07d}" / f"mp_rank_{tp_rank:02d}" / "model_optim.pt"


def save_checkpoint(args, iteration: int, model, optimizer) -> None:
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:  # one writer per TP rank
        path = checkpoint_file(args.save, iteration, parallel_state.get_tensor_model_parallel_rank())
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = {name: getattr(args, name) for name in MODEL_SHAPE_ARGS}
        torch.save({"iteration": iteration, "model_shape": shape, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "grid": {"ulysses_degree": args.ulysses_degree, "ring_degree": args.ring_degree,
                             "usp_ring_impl": args.usp_ring_impl}}, path)
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(args.save) / CHECKPOINT_TRACKER).write_text(f"{iteration}\n")
        print(f" saved checkpoint at iteration {iteration} to {args.save}", flush=True)
    dist.barrier()


def load_checkpoint(args, model, optimizer) -> int:
    """Load the latest checkpoint under ``--load`` (or ``--ckpt-step``); returns its iteration, 0 when there is
    none yet. ulysses/ring degrees may differ from the saving run's; TP and the model shape may not."""
    from megatron.core import parallel_state

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
    path = checkpoint_file(args.load, iteration, parallel_state.get_tensor_model_parallel_rank())
    if not path.is_file():
        raise ValueError(f"--load {args.load}: {path} is missing; no checkpoint for iteration {iteration}, or it "
                         "was written with another --tensor-model-parallel-size (ulysses/ring degrees may change, "
                         "TP may not)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    for name, saved in state["model_shape"].items():
        if getattr(args, name) != saved:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--load {args.load}: the checkpoint has {flag} {saved}, this run {getattr(args, name)}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if dist.get_rank() == 0:
        grid = state["grid"]
        print(f" loaded checkpoint at iteration {iteration} from {args.load} (saved with ulysses "
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


def train_step(args, model, optimizer, samples, iteration: int, device) -> tuple[float, float]:
    """One optimizer step over the global batch; returns (mean loss per token, grad norm)."""
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    global_tokens = args.global_batch_size * args.seq_length
    first_sample = iteration * args.global_batch_size
    optimizer.zero_grad()
    loss_sum = torch.zeros((), dtype=torch.float64)
    for micro in range(args.num_micro_batches):
        start = first_sample + (micro * args.data_parallel_size + dp_rank) * args.micro_batch_size
        batch = get_batch_on_this_usp_rank(samples.batch(start, args.micro_batch_size))
        batch = {key: value.to(device) for key, value in batch.items()}
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s_local]
        local = (losses.float() * batch["loss_mask"]).sum()
        (local / global_tokens).backward()
        loss_sum += local.detach().double().cpu()
    grad_norm = optimizer.step(learning_rate(args, iteration))
    loss_sum = loss_sum.to(device)
    dist.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return loss_sum.item() / global_tokens, grad_norm


def main(argv=None) -> None:
    args = parse_args(argv)
    # validated before any process group exists: a bad flag fails every rank the same way, never hangs
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    validate_usp_args(args)  # sets context_parallel_size = u x r; ValueError names the flag to fix
    check_batch_args(args)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    enable_cpu_mode()  # no-op with CUDA
    initialize_model_parallel(
        args.tensor_model_parallel_size, 1, ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
        ring_impl=args.usp_ring_impl, ulysses_inner=not args.usp_ring_inner, attn_backend=args.usp_attn_backend,
        micro_q=args.usp_micro_q, usp_check=getattr(args, "usp_check", None), create_gloo_process_groups=False,
    )
    from megatron.core import parallel_state

    stream = IndexedTokens(args.data_path) if args.data_path else ByteCorpus(args.corpus_bytes)
    args.vocab_size = args.vocab_size or stream.vocab_size
    samples = GPTSamples(stream, args.seq_length, args.seed)
    model = build_model(args, device)
    optimizer = MixedPrecisionAdamW(model, args, parallel_state.get_data_parallel_group(with_context_parallel=True),
                                    parallel_state.get_tensor_model_parallel_group())
    start_iteration = load_checkpoint(args, model, optimizer) if args.load else 0
    rank0 = dist.get_rank() == 0
    groups = get_usp_groups()
    if rank0:
        params = sum(p.numel() for p in model.parameters()) * args.tensor_model_parallel_size
        print(f"> {stream.description}\n> GPT: {args.num_layers} layers, hidden {args.hidden_size}, "
              f"{args.num_attention_heads} heads / {args.num_query_groups} query groups, vocab {args.vocab_size}, "
              f"~{params / 1e6:.2f}M parameters, {'bf16' if args.bf16 else 'fp32'}\n"
              f"> grid: world {args.world_size} = TP {args.tensor_model_parallel_size} x DP {args.data_parallel_size}"
              f" x USP (ulysses {groups.ulysses_degree} x ring {groups.ring_degree}, {args.usp_ring_impl}, "
              f"{'ring' if args.usp_ring_inner else 'ulysses'}-inner), {dist.get_backend()} on {device.type}\n"
              f"> batch: global {args.global_batch_size} x {args.seq_length} tokens, micro {args.micro_batch_size},"
              f" {args.num_micro_batches} micro-batches per step; {args.seq_length // groups.sp_size} tokens per "
              "rank per sample", flush=True)
    loss_file = open_loss_csv(args.loss_csv, start_iteration) if rank0 and args.loss_csv else None
    writer = csv.writer(loss_file) if loss_file else None
    run_start = window_start = time.perf_counter()
    window_losses = []
    for iteration in range(start_iteration, args.train_iters):
        loss, grad_norm = train_step(args, model, optimizer, samples, iteration, device)
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
                      f"{learning_rate(args, iteration):.3E} | lm loss: {sum(window_losses) / len(window_losses):.6E}"
                      f" | grad norm: {grad_norm:.3f} | tokens per second: "
                      f"{args.global_batch_size * args.seq_length / per_iteration:.0f} | elapsed: {total:.1f} s"
                      f" | [{100 * done / args.train_iters:3.0f}% eta {remaining:.0f} s]", flush=True)
            window_start, window_losses = time.perf_counter(), []
        if args.save and args.save_interval and done % args.save_interval == 0 and done != args.train_iters:
            save_checkpoint(args, done, model, optimizer)
    if args.save and args.train_iters > start_iteration:
        save_checkpoint(args, args.train_iters, model, optimizer)
    if loss_file:
        loss_file.close()
    destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
