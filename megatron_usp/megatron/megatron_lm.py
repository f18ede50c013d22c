"""Glue for a patched Megatron-LM ``pretrain_gpt.py`` (see ``patches/`` and ``tools/apply_megatron_patch.py``).

The patches only call the names below; all logic lives here and is feature-detected (no version strings):

* :func:`with_usp_args` / :func:`extra_args_provider`: the ``--ulysses-degree`` / ``--ring-degree`` flags.
* :func:`install`: Megatron-LM's own ``validate_args`` runs :func:`validate_usp_args` first (so
  ``context_parallel_size = u*r`` before the data-parallel size is derived), and its
  ``mpu.initialize_model_parallel`` call builds the USP grid.
* :func:`usp_layer_spec`: USP core attention in whatever layer / block / MTP spec Megatron-LM built.
* :func:`wrap_get_batch_on_this_cp_rank` / :func:`wrap_get_thd_batch_on_this_cp_rank`: batches follow the USP
  layout (packed THD rows and ``--reset-attention-mask`` documents included, see :mod:`.documents`).

USP is on when ``--ulysses-degree x --ring-degree > 1``. Otherwise every hook passes through and the patched
script behaves like stock Megatron-LM (its own context parallelism included).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import inspect
from typing import Any, Callable, Dict, Optional

import torch
from megatron.core import parallel_state

from ..config import USPConfig
from ..patching import mark, original_of, undo_all, wrap
from . import grid
from .args import add_usp_args, validate_usp_args
from .batch import get_batch_on_this_usp_rank
from .refusals import refusal
from .specs import substitute_core_attention
from .moe import fix_router_loss_scaling
from .optimizer_load import fix_distributed_optimizer_load

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]

# Modules of Megatron-LM whose ``validate_args`` name install() wraps (0.16 imports it into initialize by name;
# 0.18+ calls it inside arguments.parse_and_validate_args). Whichever of them exist are wrapped.
VALIDATE_ARGS_MODULES = ("megatron.training.arguments", "megatron.training.initialize")
# Batch entries that are metadata, not [batch, seq, ...] tensors (Megatron's own list, megatron-core 0.19).
BATCH_METADATA_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", "local_cp_size", "hybrid_cp_group")

_get_megatron_args: Optional[Callable[[], Any]] = None


def usp_requested(args: Any) -> bool:
    """True when the parsed arguments ask for USP (``--ulysses-degree x --ring-degree > 1``)."""
    return getattr(args, "ulysses_degree", 1) * getattr(args, "ring_degree", 1) > 1


def usp_active() -> bool:
    """True once the USP grid with ``u*r > 1`` is built on this rank."""
    return grid.usp_is_initialized() and grid.get_usp_groups().sp_size > 1


# ---------------------------------------------------------------------------------------------- flags


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider`` that adds the USP flags; a no-op when the parser already has them."""
    if "--ulysses-degree" in parser._option_string_actions:  # argparse keeps no public lookup
        return parser
    return add_usp_args(parser)


def with_usp_args(chained: Optional[ArgsProvider] = None) -> ArgsProvider:
    """An ``extra_args_provider`` that adds the USP flags, then runs ``chained`` (e.g. ModelOpt's) if given."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser = extra_args_provider(parser)
        return chained(parser) if chained is not None else parser

    return provider


# ---------------------------------------------------------------------------------------------- install


def _megatron_args() -> Any:
    if _get_megatron_args is not None:
        return _get_megatron_args()
    from megatron.training import get_args

    return get_args()


MAX_LOGIT_FLAGS = (("qk_clip", "--qk-clip"), ("log_max_attention_logit", "--log-max-attention-logit"))


def _te_reports_max_logits() -> bool:
    """Megatron-LM's own test for --qk-clip / --log-max-attention-logit: Transformer Engine >= 2.9 (raises
    without TE: megatron-core compares ``None`` with a version)."""
    try:
        from megatron.core.utils import is_te_min_version

        return bool(is_te_min_version("2.9.0"))
    except Exception:
        return False


def hold_max_logit_flags(args: Any, te_reports: Optional[bool] = None) -> Dict[str, Any]:
    """Under USP, --qk-clip and --log-max-attention-logit need no Transformer Engine: Megatron-LM asserts TE >= 2.9
    only because TE's DotProductAttention is the core attention that fills ``current_max_attn_logits`` (the local one
    does not), and with USP every layer's core attention is USPAttention, which reports them (each head's largest
    scaled logit over the whole sequence, the same on every rank). Without such a TE this checks what Megatron checks
    besides the version (--qk-clip-alpha, --qk-clip-threshold), clears the flags on ``args`` for Megatron's
    validate_args and returns them to :func:`restore_max_logit_flags` afterwards; ``{}`` when no flag is set or TE
    reports the logits itself."""
    held = {name: True for name, _ in MAX_LOGIT_FLAGS if getattr(args, name, False)}
    if not held or (_te_reports_max_logits() if te_reports is None else te_reports):
        return {}
    if held.get("qk_clip"):
        if not 0.0 < getattr(args, "qk_clip_alpha", 0.5) < 1.0:
            raise ValueError("--qk-clip-alpha must be between 0.0 and 1.0 when using --qk-clip.")
        if not getattr(args, "qk_clip_threshold", 100) > 0:
            raise ValueError("--qk-clip-threshold must be greater than 0 when using --qk-clip.")
    for name in held:
        setattr(args, name, False)
    return held


def restore_max_logit_flags(args: Any, held: Dict[str, Any]) -> None:
    for name, value in held.items():
        setattr(args, name, value)


HYBRID_CP_REFUSAL = ("this Megatron-LM's hybrid-CP batch path (get_batch_on_this_cp_rank(is_hybrid_cp=True), "
                     "after core_v0.16) is not supported under USP yet: drop --hybrid-context-parallel; "
                     "core_v0.16.1's hybrid CP (a cp_group per sample) is")


def hybrid_cp_batches_by_flag() -> bool:
    """Whether this megatron-core shards hybrid-CP batches through ``get_batch_on_this_cp_rank(is_hybrid_cp=...)``
    (after 0.16), which USP does not take yet (0.16.1 hands each sample its own ``cp_group``, which it does)."""
    import megatron.core.utils as core_utils

    function = getattr(core_utils, "get_batch_on_this_cp_rank", None)
    return function is not None and "is_hybrid_cp" in inspect.signature(original_of(function)).parameters


def _wrap_validate_args(original: Callable) -> Callable:
    @functools.wraps(original)
    def validate_args(args, *rest, **kwargs):
        if not usp_requested(args):
            return original(args, *rest, **kwargs)
        if getattr(args, "hybrid_context_parallel", False) and hybrid_cp_batches_by_flag():
            raise ValueError(HYBRID_CP_REFUSAL)  # before training, on every rank
        validate_usp_args(args)  # sets context_parallel_size = u*r before Megatron derives the DP size
        held = hold_max_logit_flags(args)
        try:
            return original(args, *rest, **kwargs)
        finally:
            restore_max_logit_flags(args, held)

    return validate_args


def _bound_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> Dict[str, Any]:
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and arguments.get(name):
            raise TypeError(f"initialize_model_parallel got extra positional arguments {arguments[name]}")
    return arguments


def _wrap_initialize_model_parallel(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize_model_parallel(*args, **kwargs):
        margs = _megatron_args()
        if not usp_requested(margs):
            return original(*args, **kwargs)
        arguments = _bound_arguments(signature, args, kwargs)
        tp = arguments.pop("tensor_model_parallel_size", 1)
        pp = arguments.pop("pipeline_model_parallel_size", 1)
        sp_size = margs.ulysses_degree * margs.ring_degree
        cp = arguments.pop("context_parallel_size", sp_size)
        if cp != sp_size:
            raise ValueError(
                f"context_parallel_size={cp} but --ulysses-degree x --ring-degree = {sp_size}: validate_usp_args did "
                "not run; call megatron_usp.megatron.megatron_lm.install() before Megatron validates its arguments"
            )
        if arguments.pop("hierarchical_context_parallel_sizes", None):  # never silently dropped
            raise ValueError(refusal("--hierarchical-context-parallel-sizes").reason(margs))
        grid.initialize_model_parallel(tp, pp, config=USPConfig.from_args(margs), **arguments)

    return initialize_model_parallel


def install(get_args: Optional[Callable[[], Any]] = None) -> None:
    """Hook USP into Megatron-LM's initialization; call once before ``pretrain``/``parse_and_validate_args``.

    Wraps every ``validate_args`` of :data:`VALIDATE_ARGS_MODULES` that exists (USP validation first) and
    ``megatron.core.parallel_state.initialize_model_parallel`` (builds the USP grid when ``u*r > 1``), and closes
    megatron-core's distributed-optimizer load gaps (:mod:`.optimizer_load`).
    ``get_args`` returns Megatron's parsed arguments (default ``megatron.training.get_args``). Idempotent.
    """
    global _get_megatron_args
    if get_args is not None:
        _get_megatron_args = get_args
    holders = []
    for module_name in VALIDATE_ARGS_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if callable(getattr(module, "validate_args", None)):
            holders.append(module)
    if not holders:
        raise RuntimeError(
            f"install() found no validate_args in {', '.join(VALIDATE_ARGS_MODULES)}: it needs a Megatron-LM checkout "
            "(megatron.training) on PYTHONPATH; with megatron-core alone use megatron_usp.megatron.initialize_model_parallel"
        )
    for module in holders:
        wrap(module, "validate_args", _wrap_validate_args, owner=__name__)
    wrap(parallel_state, "initialize_model_parallel", _wrap_initialize_model_parallel, owner=__name__)
    import megatron.core.utils as core_utils

    if hasattr(core_utils, "get_batch_on_this_cp_rank"):  # get_batch_on_this_hybrid_cp_rank calls it by this name
        wrap(core_utils, "get_batch_on_this_cp_rank", wrap_get_batch_on_this_cp_rank, owner=__name__)
    fix_distributed_optimizer_load()  # megatron-core's distributed-optimizer --load gaps (any device)
    fix_router_loss_scaling()  # megatron-core 0.16's MoE router losses under --calculate-per-token-loss and CP


def uninstall() -> None:
    """Undo :func:`install` (for tests and notebooks)."""
    global _get_megatron_args
    undo_all(owner=__name__)
    _get_megatron_args = None


# ---------------------------------------------------------------------------------------------- layer spec


def usp_layer_spec(spec: Any) -> Any:
    """``spec`` with USP core attention once the USP grid (``u*r > 1``) is up; otherwise unchanged, so runs
    without USP flags (and checkpoint tools that import the same builder) keep Megatron's attention.

    A spec with no self-attention at all (a pipeline stage without layers) is returned as it is."""
    if spec is not None and usp_active():
        substitute_core_attention(spec)
    return spec


# ---------------------------------------------------------------------------------------------- batch


def _eod_token(batch: Dict[str, Any]) -> Optional[int]:
    """Megatron-LM's EOD token when ``--reset-attention-mask`` must take documents from tokens (no dense mask)."""
    if batch.get("attention_mask") is not None or batch.get("cu_seqlens") is not None:
        return None
    if not getattr(_megatron_args(), "reset_attention_mask", False):
        return None
    from megatron.training import get_tokenizer

    return int(get_tokenizer().eod)


def get_batch_on_this_rank(batch: Dict[str, Any], cp_group=None) -> Dict[str, Any]:
    """This rank's tokens of a ``[batch, seq, ...]`` batch under USP (see :func:`get_batch_on_this_usp_rank`);
    metadata entries pass through, packed THD rows get the offsets of their document layout in ``cu_seqlens``
    (``cu_seqlens_padded`` None), a dense ``attention_mask`` becomes None or document ids. Key order is kept.
    ``cp_group``: the CP group of a hybrid-CP sample (its sub-grid's layout), None for the grid's."""
    sequences = {key: value for key, value in batch.items()
                 if key not in BATCH_METADATA_KEYS or key in ("cu_seqlens", "cu_seqlens_padded")}
    if sequences.get("cu_seqlens") is None:
        sequences.pop("cu_seqlens", None)
        sequences.pop("cu_seqlens_padded", None)
    groups = None if cp_group is None else grid.usp_groups_of_cp_group(cp_group)
    sharded = get_batch_on_this_usp_rank(sequences, groups, eod_token=_eod_token(batch))
    return {key: sharded[key] if key in sharded else value for key, value in batch.items()}


def wrap_get_batch_on_this_cp_rank(megatron_fn: Callable) -> Callable:
    """Megatron's ``get_batch_on_this_cp_rank`` (any signature) that uses :func:`get_batch_on_this_rank` while
    USP is active and calls ``megatron_fn`` unchanged otherwise."""
    signature = inspect.signature(megatron_fn)

    @functools.wraps(megatron_fn)
    def get_batch_on_this_cp_rank(batch, *args, **kwargs):
        if not usp_active():
            return megatron_fn(batch, *args, **kwargs)
        arguments = signature.bind(batch, *args, **kwargs).arguments
        if arguments.get("is_hybrid_cp"):
            raise ValueError(HYBRID_CP_REFUSAL)
        return get_batch_on_this_rank(batch, arguments.get("cp_group"))  # a hybrid-CP sample's own group

    return mark(get_batch_on_this_cp_rank, megatron_fn)


def wrap_get_thd_batch_on_this_cp_rank(megatron_fn: Callable) -> Callable:
    """megatron-core's ``get_thd_batch_on_this_cp_rank(batch, cu_seqlens, cu_seqlens_padded, max_seqlen, ...)``
    (Megatron-LM <= 0.16's packed path: --sft) that, while USP is active, shards with the document layout instead
    of Transformer Engine's ``thd_get_partitioned_indices`` and returns ``(batch, PackedSeqParams)`` whose
    ``cu_seqlens`` are the layout's offsets; calls ``megatron_fn`` unchanged otherwise."""
    signature = inspect.signature(megatron_fn)

    @functools.wraps(megatron_fn)
    def get_thd_batch_on_this_cp_rank(batch, *args, **kwargs):
        if not usp_active():
            return megatron_fn(batch, *args, **kwargs)
        from megatron.core.packed_seq_params import PackedSeqParams

        arguments = signature.bind(batch, *args, **kwargs).arguments
        max_seqlen = int(torch.as_tensor(arguments["max_seqlen"]).reshape(-1)[0])
        sharded = get_batch_on_this_usp_rank({**batch, "cu_seqlens": arguments["cu_seqlens"],
                                              "cu_seqlens_padded": arguments.get("cu_seqlens_padded")})
        cu_seqlens = sharded["cu_seqlens"].reshape(-1)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                 max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
        return {key: sharded[key] for key in batch}, params

    return mark(get_thd_batch_on_this_cp_rank, megatron_fn)
