"""Every Megatron flag (or combination) USP cannot honour, one row each: the flag, when it applies, and the reason
with the fix. :func:`check_refusals` runs the whole table from :func:`.args.validate_usp_args`, before any process
group, on every rank alike (the trainer's ``configure`` and Megatron-LM's ``validate_args`` both call it). Every
row's flag is discussed in docs/megatron_lm_audit.md (tests/megatron/test_megatron_args.py checks both directions
of that).

Rows read a parsed-arguments namespace (Megatron-LM's, the trainer's or a hand-made one: missing attributes count as
unset) and apply only with ``--ulysses-degree x --ring-degree > 1``, except ``--context-parallel-size``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..layout import ZIGZAG_LAYOUT_IMPLS

DOCUMENT_FLAGS = (("reset_attention_mask", "--reset-attention-mask"), ("sft", "--sft"),
                  ("dataloader_inter_document_masking", "--dataloader-inter-document-masking"))
UNEVEN_LOSS_FLAGS = (("sft", "--sft"), ("eod_mask_loss", "--eod-mask-loss"))


def _get(args: Any, name: str, default=None):
    return getattr(args, name, default)


def _sp_size(args: Any) -> int:
    return _get(args, "ulysses_degree", 1) * _get(args, "ring_degree", 1)


def _set(args: Any, flags) -> list[str]:
    return [flag for name, flag in flags if _get(args, name, False)]


def _default_cp_comm_type(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(v in (None, "p2p") for v in values)


def _mtp_layout_conflicts(args: Any) -> list[str]:
    conflicts = []
    if _get(args, "usp_ring_impl", "zigzag") not in ZIGZAG_LAYOUT_IMPLS:
        conflicts.append(f"--usp-ring-impl {args.usp_ring_impl}")
    if _get(args, "usp_ring_inner", False):
        conflicts.append("--usp-ring-inner")
    return conflicts + _set(args, DOCUMENT_FLAGS)


def _pipeline_without_batch(args: Any) -> bool:
    pp = _get(args, "pipeline_model_parallel_size", 1) or 1
    virtual = _get(args, "virtual_pipeline_model_parallel_size") or _get(args, "num_layers_per_virtual_pipeline_stage")
    return pp > 2 or (pp > 1 and bool(virtual))


_VARIANT_WORK = {"dsa": "DSA indexer over the local queries and keys"}
_SCAN = "linear-attention scan, no CP"


@dataclass(frozen=True)
class Refusal:
    """``flag`` is refused when ``applies(args)``; ``reason(args)`` is the whole message (what and the fix)."""

    flag: str
    applies: Callable[[Any], bool]
    reason: Callable[[Any], str]
    with_usp_only: bool = True


REFUSALS = (
    Refusal(
        "--context-parallel-size",
        lambda a: (_get(a, "context_parallel_size", 1) or 1) not in (1, _sp_size(a)),
        lambda a: (f"--context-parallel-size {a.context_parallel_size} conflicts with --ulysses-degree "
                   f"{a.ulysses_degree} x --ring-degree {a.ring_degree} = {_sp_size(a)}: drop --context-parallel-size, "
                   "USP sets it to ulysses x ring"),
        with_usp_only=False),
    Refusal(
        "--cp-comm-type",
        lambda a: not _default_cp_comm_type(_get(a, "cp_comm_type")),
        lambda a: (f"--cp-comm-type {a.cp_comm_type} conflicts with USP, which does its own ulysses x ring "
                   "communication: drop --cp-comm-type")),
    Refusal(
        "--hierarchical-context-parallel-sizes",
        lambda a: bool(_get(a, "hierarchical_context_parallel_sizes")),
        lambda a: "--hierarchical-context-parallel-sizes conflicts with USP: use --ulysses-degree/--ring-degree"),
    Refusal(
        "--use-legacy-models",
        lambda a: bool(_get(a, "use_legacy_models", False)),
        lambda a: "--use-legacy-models conflicts with --ulysses-degree/--ring-degree: drop it or set both degrees to 1"),
    Refusal(
        # megatron-core 0.19's GPTModelBuilder puts its own core attention back into the spec for this backend
        "--attention-backend local",
        lambda a: _get(a, "attention_backend") is not None
        and getattr(a.attention_backend, "name", str(a.attention_backend)).split(".")[-1] == "local",
        lambda a: ("--attention-backend local conflicts with USP: Megatron would put its own core attention back into "
                   "the layer spec; use --attention-backend auto (USP picks its kernel with --usp-attn-backend)")),
    Refusal(
        # Megatron-LM hands intermediate pipeline stages no batch: their attention would not see the documents
        "--reset-attention-mask / --sft / --dataloader-inter-document-masking with PP > 2 or virtual stages",
        lambda a: bool(_set(a, DOCUMENT_FLAGS)) and _pipeline_without_batch(a),
        lambda a: (f"{_set(a, DOCUMENT_FLAGS)[0]} with USP needs every pipeline stage to be a first or last stage "
                   "(Megatron-LM gives intermediate stages no batch, so their attention would not see the documents): "
                   "use --pipeline-model-parallel-size <= 2 without a virtual pipeline")),
    Refusal(
        # Without per-token loss Megatron divides each CP rank's loss sum by that rank's own count of loss tokens and
        # averages the gradients over CP: exact only when every rank holds as many loss tokens (measured in
        # Megatron-LM's loop: --sft at u=2 r=2 drifts 4.1e-3 from 1 rank within 5 iterations).
        "--sft / --eod-mask-loss without --calculate-per-token-loss",
        lambda a: bool(_set(a, UNEVEN_LOSS_FLAGS)) and not _get(a, "calculate_per_token_loss", False),
        lambda a: (f"{_set(a, UNEVEN_LOSS_FLAGS)[0]} masks loss tokens unevenly over the --ulysses-degree x "
                   "--ring-degree ranks; without --calculate-per-token-loss Megatron averages per-rank mean losses and "
                   "the gradients differ from training without sequence parallelism: add --calculate-per-token-loss")),
    Refusal(
        # MTP rolls labels and tokens across CP ranks (megatron-core's roll_tensor) assuming Megatron's zigzag layout
        # (measured in Megatron-LM's loop: stripe differs from 1 rank by 1.4e-4, basic by 4.0e-6)
        "--mtp-num-layers with a layout other than Megatron's zigzag",
        lambda a: bool(_get(a, "mtp_num_layers")) and bool(_mtp_layout_conflicts(a)),
        lambda a: (f"--mtp-num-layers with {', '.join(_mtp_layout_conflicts(a))}: multi-token prediction shifts tokens "
                   "across ranks assuming Megatron's zigzag layout, which this USP layout is not; use --usp-ring-impl "
                   f"{'/'.join(ZIGZAG_LAYOUT_IMPLS)} with Ulysses inner and no packed documents, or drop "
                   "--mtp-num-layers")),
    Refusal(
        # the rolled loss mask loses the row's last token on the rank holding it (measured: 2.2e-6 from 1 rank by
        # iteration 6 at u=2 r=2 zigzag; 2.0e-7 with --calculate-per-token-loss)
        "--mtp-num-layers without --calculate-per-token-loss",
        lambda a: bool(_get(a, "mtp_num_layers")) and not _get(a, "calculate_per_token_loss", False),
        lambda a: ("--mtp-num-layers without --calculate-per-token-loss: each of the --ulysses-degree x --ring-degree "
                   "ranks divides its MTP loss by its own count of loss tokens, which differ (the shifted row loses "
                   "its last token on one rank), so the gradients differ from training without sequence parallelism: "
                   "add --calculate-per-token-loss")),
    Refusal(
        # fused_apply_mla_rope_for_q/kv index the rotary table by the local row (sbhd) or by Megatron's zigzag split
        # of each document (thd), not by the rows this rank holds in USP's layout
        "--multi-latent-attention with YaRN RoPE and --apply-rope-fusion",
        lambda a: (bool(_get(a, "multi_latent_attention", False)) and bool(_get(a, "apply_rope_fusion", False))
                   and _get(a, "position_embedding_type") == "rope" and _get(a, "rope_type") in (None, "yarn")),
        lambda a: ("--multi-latent-attention with YaRN and RoPE fusion conflicts with USP: the fused MLA RoPE kernels "
                   "place tokens by Megatron's own CP layout; add --no-rope-fusion (USP's hooks then give every "
                   "ring_impl its rows)")),
    Refusal(
        "--experimental-attention-variant",
        lambda a: _get(a, "experimental_attention_variant") is not None,
        lambda a: (f"--experimental-attention-variant {a.experimental_attention_variant} conflicts with USP: its layers "
                   f"({a.experimental_attention_variant}: {_VARIANT_WORK.get(a.experimental_attention_variant, _SCAN)}) "
                   "do not use USP's core attention and see only this rank's part of the sequence; drop it or set "
                   "both degrees to 1")),
)


def refusal(flag: str) -> Refusal:
    """The row of ``flag`` (as written in :data:`REFUSALS`)."""
    return next(row for row in REFUSALS if row.flag == flag)


def check_refusals(args: Any) -> None:
    """ValueError with the first applicable row's reason (local: every rank raises the same, no collective)."""
    usp = _sp_size(args) > 1
    for row in REFUSALS:
        if (usp or not row.with_usp_only) and row.applies(args):
            raise ValueError(row.reason(args))
