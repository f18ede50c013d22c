"""``--ulysses-degree`` / ``--ring-degree`` flags for Megatron's argument parser, and their validation."""
from __future__ import annotations

import argparse

from ..flags import nonnegative_int, positive_int
from ..kernels import kernel_names
from ..layout import RING_IMPLS, ZIGZAG_LAYOUT_IMPLS, check_seq_len
from ..ulysses import check_head_counts


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
    group.add_argument("--usp-ring-inner", action="store_true",
                       help="put the ring group on adjacent ranks instead of the ulysses group")
    return parser


def _default_cp_comm_type(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(v in (None, "p2p") for v in values)


def validate_usp_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check the USP flags against the rest of Megatron's arguments and set ``context_parallel_size = u*r``.

    Raises ``ValueError`` naming the conflicting flag and how to fix it.
    """
    ulysses_degree, ring_degree = args.ulysses_degree, args.ring_degree
    for flag, value in (("--ulysses-degree", ulysses_degree), ("--ring-degree", ring_degree)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    micro_q = getattr(args, "usp_micro_q", None)
    if micro_q is not None and (micro_q < 1 or args.usp_ring_impl != "mqsp"):
        raise ValueError(f"--usp-micro-q {micro_q}: needs a positive value and --usp-ring-impl mqsp (it sets the "
                         "query rows MQSP processes at a time)")
    usp_check = getattr(args, "usp_check", None)
    if usp_check is not None and usp_check < 0:
        raise ValueError(f"--usp-check {usp_check}: N must be >= 1 (check every N-th call of each layer); "
                         "--usp-check alone (or 0) checks each layer's first call")
    sp_size = ulysses_degree * ring_degree
    explicit_cp = getattr(args, "context_parallel_size", 1) or 1
    if explicit_cp not in (1, sp_size):
        raise ValueError(
            f"--context-parallel-size {explicit_cp} conflicts with --ulysses-degree {ulysses_degree} x --ring-degree "
            f"{ring_degree} = {sp_size}: drop --context-parallel-size, USP sets it to ulysses x ring"
        )
    if sp_size > 1 and not _default_cp_comm_type(getattr(args, "cp_comm_type", None)):
        raise ValueError(
            f"--cp-comm-type {args.cp_comm_type} conflicts with USP, which does its own ulysses x ring communication: "
            "drop --cp-comm-type"
        )
    if sp_size > 1 and getattr(args, "hierarchical_context_parallel_sizes", None):
        raise ValueError("--hierarchical-context-parallel-sizes conflicts with USP: use --ulysses-degree/--ring-degree")
    backend = getattr(args, "attention_backend", None)
    if sp_size > 1 and backend is not None and getattr(backend, "name", str(backend)).split(".")[-1] == "local":
        # megatron-core 0.19's GPTModelBuilder replaces core_attention with DotProductAttention for this backend
        raise ValueError(
            "--attention-backend local conflicts with USP: Megatron would put its own core attention back into the "
            "layer spec; use --attention-backend auto (USP picks its kernel with --usp-attn-backend)"
        )
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
    if sp_size > 1 and getattr(args, "mtp_num_layers", None):
        _check_mtp_layout(args)
    if sp_size > 1:
        _check_attention_variants(args)
    args.context_parallel_size = sp_size
    return args


_DOCUMENT_FLAGS = (("reset_attention_mask", "--reset-attention-mask"), ("sft", "--sft"),
                   ("dataloader_inter_document_masking", "--dataloader-inter-document-masking"))


def _check_mtp_layout(args: argparse.Namespace) -> None:
    """Multi-token prediction rolls labels and tokens along the sequence across CP ranks (megatron-core's
    ``roll_tensor``) assuming Megatron's own layout: 2P chunks of the row, CP rank i holding chunks i and 2P-1-i,
    CP ranks in group order. USP has that layout only for the zigzag-layout impls with Ulysses inner and without
    packed documents (measured in Megatron-LM's loop: stripe differs from 1 rank by 1.4e-4, basic by 4.0e-6)."""
    conflicts = []
    if args.usp_ring_impl not in ZIGZAG_LAYOUT_IMPLS:
        conflicts.append(f"--usp-ring-impl {args.usp_ring_impl}")
    if getattr(args, "usp_ring_inner", False):
        conflicts.append("--usp-ring-inner")
    conflicts += [flag for name, flag in _DOCUMENT_FLAGS if getattr(args, name, False)]
    if conflicts:
        raise ValueError(
            f"--mtp-num-layers with {', '.join(conflicts)}: multi-token prediction shifts tokens across ranks assuming "
            f"Megatron's zigzag layout, which this USP layout is not; use --usp-ring-impl "
            f"{'/'.join(ZIGZAG_LAYOUT_IMPLS)} with Ulysses inner and no packed documents, or drop --mtp-num-layers"
        )
    # The rolled loss mask loses the row's last token on the rank holding it, and without per-token loss each rank
    # divides its MTP loss by its own token count (megatron-core's GPTModel, stock CP alike): measured in Megatron-LM's
    # loop at u=2 r=2 zigzag, 2.2e-6 from 1 rank by iteration 6 (2.0e-7 with --calculate-per-token-loss).
    if not getattr(args, "calculate_per_token_loss", False):
        raise ValueError(
            "--mtp-num-layers without --calculate-per-token-loss: each of the --ulysses-degree x --ring-degree ranks "
            "divides its MTP loss by its own count of loss tokens, which differ (the shifted row loses its last "
            "token on one rank), so the gradients differ from training without sequence parallelism: add "
            "--calculate-per-token-loss"
        )


def _check_attention_variants(args: argparse.Namespace) -> None:
    """Attention features that USP's core attention does not compute, or whose sequence handling under CP is not
    USP's (megatron-core 0.16's TransformerConfig flags, exposed by Megatron-LM's argument parser). Attention sinks
    (``--softmax-type off-by-one|learnable``) and QK-clip / max-logit logging are USPAttention's own: accepted."""
    if (getattr(args, "multi_latent_attention", False) and getattr(args, "apply_rope_fusion", False)
            and getattr(args, "position_embedding_type", None) == "rope"
            and getattr(args, "rope_type", None) in (None, "yarn")):
        # fused_apply_mla_rope_for_q/kv index the rotary table by the local row (sbhd) or by Megatron's zigzag
        # split of each document (thd, from cp_rank / cp_size), not by the rows this rank holds in USP's layout
        raise ValueError(
            "--multi-latent-attention with YaRN and RoPE fusion conflicts with USP: the fused MLA RoPE kernels place "
            "tokens by Megatron's own CP layout; add --no-rope-fusion (USP's hooks then give every ring_impl its rows)"
        )
    variant = getattr(args, "experimental_attention_variant", None)
    if variant is not None:
        raise ValueError(
            f"--experimental-attention-variant {variant} conflicts with USP: its layers ({variant}: "
            f"{'DSA indexer over the local queries and keys' if variant == 'dsa' else 'linear-attention scan, no CP'}) "
            "do not use USP's core attention and see only this rank's part of the sequence; drop it or set both "
            "degrees to 1"
        )
