"""The trainer: a megatron-core GPTModel with Unified Sequence Parallelism (ulysses x ring) under torchrun.

    torchrun --nproc-per-node 4 -m megatron_usp.train --ulysses-degree 2 --ring-degree 2 \\
        --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 256 --train-iters 20

gloo on CPU, NCCL on GPU (chosen automatically). Flags are named as in Megatron-LM's pretrain_gpt.py, plus
``--ulysses-degree --ring-degree --usp-ring-impl --usp-attn-backend``. The world is TP x PP x DP x (u x r): every
rank of a USP group holds ``seq_length / (u*r)`` tokens of the same samples. The training machinery is
megatron-core's: DistributedDataParallel, the (distributed, by default) optimizer and its parameter scheduler,
the pipeline schedules (1F1B, interleaved, uneven stages), and dist_checkpointing, whose checkpoints
(``--save/--load``) resume under another TP, PP, ulysses/ring degree or ring_impl. On CPU, the megatron-core stand-ins
of ``megatron_usp.megatron.cpu_standins`` route its CUDA calls.

Modules: :mod:`.args` (flags and every check, rank-independent: :func:`.args.configure`), :mod:`.data` (token
streams, samples, the per-rank micro-batches), :mod:`.checkpoint` (crash-safe dist_checkpointing), :mod:`.loop`
(model, optimizer, the training loop: :func:`.loop.main`).
"""
from .args import build_parser, configure, parse_args
from .loop import main

__all__ = ["build_parser", "configure", "main", "parse_args"]
