"""``--ulysses-degree`` / ``--ring-degree`` flags for Megatron's argument parser, and their validation."""
from __future__ import annotations

import argparse

from ..config import USPConfig
from ..flags import nonnegative_int, positive_int
from ..kernels import kernel_names
from ..layout import DOCUMENT_LAYOUTS, RING_IMPLS, check_seq_len
from ..ulysses import check_head_counts
from .refusals import check_refusals


def add_usp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the USP flags; usable as Megatron's ``extra_args_provider``."""
    group = parser.add_argument_group(title="unified sequence parallelism (megatron-usp)")
    group.add_argument("--ulysses-degree", type=positive_int, default=1,
                       help="ranks that exchange heads by all-to-all (DeepSpeed-Ulysses); keep within a node")
    group.add_argument("--ring-degree", type=positive_int, default=1, help="ranks that pass K/V around a ring")
    group.add_argument("--usp-ring-impl", default="zigzag", choices=list(RING_IMPLS),
                       help="ring schedule; zigzag balances causal work and matches Megatron's CP layout; mqsp passes Q "
                            "instead of K/V (with --usp-micro-q to bound memory)")
    group.add_argument("--usp-attn-backend", default="auto", choices=kernel_names(),
                       help="local attention kernel")
    group.add_argument("--usp-micro-q", type=positive_int, default=None,
                       help="mqsp: query rows per rank per micro-chunk (bounds its extra memory; default: all)")
    group.add_argument("--usp-check", type=nonnegative_int, nargs="?", const=0, default=None, metavar="N",
                       help="check each USP layer's output (one sampled head, a few query rows) against attention on "
                            "all-gathered K/V, and that CP is really on; stop on a mismatch. On each layer's first "
                            "call, and every N-th call if N >= 1 is given")
    group.add_argument("--usp-document-layout", default="local", choices=list(DOCUMENT_LAYOUTS),
                       help="packed documents (THD, --reset-attention-mask): local keeps each document whole on one "
                            "ring rank where it fits (only cut documents travel the ring); split cuts every "
                            "document over all ranks (allgather and mqsp always split)")
    group.add_argument("--usp-ring-inner", action="store_true",
                       help="put the ring group on adjacent ranks instead of the ulysses group")
    return parser


def validate_usp_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check the USP flags against the rest of Megatron's arguments and set ``context_parallel_size = u*r``.

    Raises ``ValueError`` naming the conflicting flag and how to fix it.
    """
    config = USPConfig.from_args(args)  # the USP flags themselves, errors naming them
    ulysses_degree, ring_degree, sp_size = config.ulysses_degree, config.ring_degree, config.sp_size
    check_refusals(args)  # every flag USP cannot honour: one table (refusals.py)
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    world = getattr(args, "world_size", None)
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if world is not None and world % (tp * pp * sp_size) != 0:
        raise ValueError(
            f"world size {world} is not divisible by TP {tp} x PP {pp} x ulysses {ulysses_degree} x ring {ring_degree}"
            f" = {tp * pp * sp_size}: change the degrees or the number of GPUs"
        )
    heads = getattr(args, "num_attention_heads", None)
    if heads is not None:
        kv_heads = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
        if heads % tp or kv_heads % tp:
            raise ValueError(
                f"--num-attention-heads {heads} and query groups {kv_heads} must be divisible by "
                f"--tensor-model-parallel-size {tp}"
            )
        try:
            check_head_counts(heads // tp, kv_heads // tp, ulysses_degree)
        except ValueError as error:
            raise ValueError(f"with --tensor-model-parallel-size {tp}, per-TP-rank {error}") from None
    seq_length = getattr(args, "seq_length", None)
    if seq_length is not None and sp_size > 1:
        try:
            check_seq_len(seq_length, ulysses_degree, ring_degree, args.usp_ring_impl)
        except ValueError as error:
            raise ValueError(f"--seq-length: {error}") from None
    args.context_parallel_size = sp_size
    return args

