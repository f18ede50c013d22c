"""usp_attn: Ulysses all-to-all, ring attention, inverse all-to-all."""
from __future__ import annotations

import functools
import math
import os
import types
import zlib
from numbers import Real
from typing import Optional, Union

import torch
import torch.distributed as dist

from .config import USPConfig
from .groups import USPGroups
from .kernels import resolve_kernel
from .kernels._adapt import varlen_plan
from .layout import RING_IMPL_TABLE, CuSeqlens, check_cu_seqlens, check_seq_len
from .comm import RingComm, grid_all_gather_ints, grid_all_gather_objects
from .masks import AttentionMask, BlockMasker, MaskMod, check_mask
from .mqsp import mqsp_attention
from .plan import attention_plan
from .ring import ring_attention
from .ulysses import check_head_counts, heads_to_seq, replicate_kv_heads, seq_to_heads


def validate_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: USPGroups,
    *,
    causal: bool,
    ring_impl: str,
    softmax_scale: Optional[float],
    mask: AttentionMask = AttentionMask(),
    cu_seqlens: Optional[CuSeqlens] = None,
    softmax_offset: Optional[torch.Tensor] = None,
    return_max_logit: bool = False,
) -> Optional[tuple[int, ...]]:
    """Every check of one call's data that can fail (``ring_impl`` is already valid: :class:`.config.USPConfig`), done
    locally before any collective so all ranks raise, none hangs. Returns the validated ``cu_seqlens`` as a tuple
    (None without documents)."""
    if not isinstance(groups, USPGroups):
        raise TypeError(f"groups must be a USPGroups (from megatron_usp.init_groups), got {type(groups).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [batch, seq_local, heads, head_dim] (bshd), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}: cast them to one")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on batch, seq_local and kv heads, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)} (v's head_dim may differ from k's: MLA)")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, seq_local and head_dim "
            "(layout bshd: [batch, seq_local, heads, head_dim])"
        )
    if q.shape[1] == 0 or q.shape[2] == 0 or k.shape[2] == 0 or q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError(f"empty q/k/v: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if softmax_offset is not None:
        if not isinstance(softmax_offset, torch.Tensor) or not softmax_offset.is_floating_point():
            raise TypeError(f"softmax_offset must be a floating-point tensor [heads] or None, got "
                            f"{type(softmax_offset).__name__}")
        if tuple(softmax_offset.shape) != (q.shape[2],) or softmax_offset.device != q.device:
            raise ValueError(f"softmax_offset must be [heads] = [{q.shape[2]}] on {q.device} (one sink logit per "
                             f"query head of q), got {tuple(softmax_offset.shape)} on {softmax_offset.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_max_logit, bool):
        raise TypeError(f"return_max_logit must be a bool, got {type(return_max_logit).__name__}")
    if softmax_scale is not None and (
        isinstance(softmax_scale, bool)
        or not isinstance(softmax_scale, Real)
        or not math.isfinite(softmax_scale)
        or softmax_scale <= 0
    ):
        raise ValueError(f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}")
    check_head_counts(q.shape[2], k.shape[2], groups.ulysses_degree)
    try:
        check_seq_len(q.shape[1] * groups.sp_size, groups.ulysses_degree, groups.ring_degree, ring_impl)
    except ValueError as error:
        raise ValueError(f"local sequence length {q.shape[1]} on a {groups.ulysses_degree} x {groups.ring_degree} "
                         f"grid: {error}") from None
    check_mask(mask, q.shape[0], q.shape[1] * groups.sp_size)
    return None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q.shape[1] * groups.sp_size)


def usp_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: USPGroups,
    *,
    causal: bool = True,
    ring_impl: str = "zigzag",
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
    window: Optional[tuple[int, int]] = None,
    document_ids: Optional[torch.Tensor] = None,
    mask_mod: Optional[MaskMod] = None,
    micro_q: Optional[int] = None,
    cu_seqlens: Optional[CuSeqlens] = None,
    softmax_offset: Optional[torch.Tensor] = None,
    return_max_logit: bool = False,
    check_agreement: Optional[bool] = None,
    document_layout: str = "local",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention over a sequence sharded across the ``u x r`` grid of ``groups``.

    ``q [batch, seq_local, heads, head_dim]``, ``k [batch, seq_local, kv_heads, head_dim]``, ``v [batch, seq_local,
    kv_heads, v_head_dim]`` (``v_head_dim`` may differ: MLA) hold this rank's tokens in the layout of ``ring_impl``
    (see :func:`megatron_usp.shard`). Returns ``[batch, seq_local, heads, v_head_dim]``, exactly what
    full-sequence attention gives for those tokens; differentiable w.r.t. q, k, v. Different widths run the
    engine at the larger one with the other zero-padded (exact; costs the padding in traffic and compute).
    ``softmax_offset [heads]`` (attention sinks, megatron-core's ``softmax_type`` "off-by-one" / "learnable"):
    every row's softmax also sees one virtual key of logit ``softmax_offset[h]`` and value 0; when it requires
    grad, this rank's ``softmax_offset.grad`` is its share (summed over the SP group: the full gradient).
    ``return_max_logit=True`` returns ``(out, max_logit)``: ``max_logit [heads]`` (fp32, the same on every rank)
    is each head's largest scaled pre-softmax logit over the whole sequence and batch, masked entries excluded
    (-inf for a head that sees nothing), for QK-clip / max-logit logging. It re-scores the blocks this rank
    computes (kernels do not report row maxima): about one more Q·Kᵀ per forward, no extra K/V traffic.
    Optional masks on top of ``causal`` (see :mod:`megatron_usp.masks`): ``window=(left, right)``,
    ``document_ids [batch, seq_len]`` of the whole sequence, ``mask_mod(b, h, q_idx, kv_idx)``. Rows that see no
    key give 0 and 0 gradient. ``ring_impl="mqsp"`` passes Q instead of K/V, ``micro_q`` query rows per rank
    at a time (default: all), which bounds its extra memory.

    Packed documents: ``cu_seqlens`` (offsets ``[0, ..., seq_len]`` of the documents of every row, the same on
    every rank) keeps attention inside each document AND means the tokens are in the document layout
    ``document_layout`` (:func:`megatron_usp.shard` with the same ``cu_seqlens`` and ``document_layout``):
    ``"local"`` (default) keeps documents whole on one ring rank where they fit, so only the cut ones travel the
    ring; ``"split"`` cuts every document over all ranks. Both balance the work of the ring.

    ``check_agreement`` (default: :func:`set_agreement_check`, on unless ``MEGATRON_USP_CHECK_AGREEMENT=0``): before
    the first collective, the ranks of the grid compare what they were called with, normalised so equivalent calls
    agree (dtype, device, q/k/v shapes, causal, ring_impl, softmax_scale as used, resolved kernel, window as it acts,
    document_ids and softmax_offset by value, mask_mod by code / closure / bound values, micro_q where MQSP uses it,
    cu_seqlens: see :func:`describe_call`, :func:`agree`; one all-gather of 18 ints over ``groups.sp``, or over the
    ulysses then the ring group where ``groups`` has no ``sp``) and all raise the same ``ValueError`` naming the
    fields and ranks that disagree, or the rank whose own inputs were rejected, instead of hanging or computing
    garbage. Its cost is one
    small collective per call (on GPUs also a host sync; a graph break under torch.compile): turn it off once a
    setup is known to be right if that matters.
    """
    check = _CHECK_AGREEMENT if check_agreement is None else bool(check_agreement)
    grid = (groups.ulysses_degree, groups.ring_degree) if isinstance(groups, USPGroups) else (1, 1)
    try:
        config = USPConfig(*grid, ring_impl=ring_impl, backend=backend, micro_q=micro_q,
                           document_layout=document_layout)
    except (ValueError, TypeError) as error:
        if check and isinstance(groups, USPGroups) and groups.sp_size > 1:
            agree(groups, None, error)  # the peers learn that this rank gave up (they raise, none hangs)
        raise
    return attend(q, k, v, groups, config, causal=causal, softmax_scale=softmax_scale, window=window,
                  document_ids=document_ids, mask_mod=mask_mod, cu_seqlens=cu_seqlens,
                  softmax_offset=softmax_offset, return_max_logit=return_max_logit, check_agreement=check)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: USPGroups,
    config: USPConfig,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[tuple[int, int]] = None,
    document_ids: Optional[torch.Tensor] = None,
    mask_mod: Optional[MaskMod] = None,
    cu_seqlens: Optional[CuSeqlens] = None,
    softmax_offset: Optional[torch.Tensor] = None,
    return_max_logit: bool = False,
    check_agreement: Optional[bool] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`usp_attn` with its grid's settings already validated (``USPAttention`` reads the grid's
    :class:`.config.USPConfig`); ``config``'s degrees must be those of ``groups``."""
    ring_impl, micro_q = config.ring_impl, config.micro_q
    mask = AttentionMask(window, document_ids, mask_mod)
    check = _CHECK_AGREEMENT if check_agreement is None else bool(check_agreement)
    try:
        cu_seqlens = validate_inputs(q, k, v, groups, causal=causal, ring_impl=ring_impl,
                                     softmax_scale=softmax_scale, mask=mask, cu_seqlens=cu_seqlens,
                                     softmax_offset=softmax_offset, return_max_logit=return_max_logit)
        head_dim, v_head_dim = q.shape[3], v.shape[3]
        width = max(head_dim, v_head_dim)  # the engine moves K and V together: one width
        kernel = resolve_kernel(config.backend, q.device, q.dtype, width)
        if (config.ulysses_degree, config.ring_degree) != (groups.ulysses_degree, groups.ring_degree):
            raise ValueError(f"config is for a {config.ulysses_degree} x {config.ring_degree} grid, the groups form "
                             f"{groups.ulysses_degree} x {groups.ring_degree}: build USPConfig with the groups' "
                             "degrees")
    except (ValueError, TypeError) as error:
        if check and isinstance(groups, USPGroups) and groups.sp_size > 1:
            agree(groups, None, error)  # the peers learn that this rank gave up (they raise, none hangs)
        raise
    if check and groups.sp_size > 1:
        agree(groups, describe_call(q, k, v, causal=causal, ring_impl=ring_impl, softmax_scale=softmax_scale,
                                    kernel=kernel, mask=mask, micro_q=micro_q, cu_seqlens=cu_seqlens,
                                    softmax_offset=softmax_offset, return_max_logit=return_max_logit,
                                    ulysses_degree=groups.ulysses_degree, document_layout=config.document_layout))
    scale = float(softmax_scale) if softmax_scale is not None else head_dim**-0.5
    q, k, v = (_pad_head_dim(x, width) for x in (q, k, v))  # zero columns: same logits, zero output columns
    seq_len = q.shape[1] * groups.sp_size
    plan = attention_plan(seq_len, groups.ulysses_degree, groups.ring_degree, groups.ring_rank, ring_impl, causal,
                          acting_micro_q(ring_impl, micro_q, q.shape[1] * groups.ulysses_degree), cu_seqlens,
                          config.document_layout)
    order = plan.order_on(q.device)
    k = replicate_kv_heads(k, groups.ulysses_degree)
    v = replicate_kv_heads(v, groups.ulysses_degree)
    q, k, v = seq_to_heads((q, k, v), groups, order)
    # global indices of the heads held here, for mask_mod (only built when a mask is given)
    heads = groups.ulysses_rank * q.shape[2] + torch.arange(q.shape[2]) if mask.active else None
    # the sinks of the heads held here (autograd: this rank's share of the gradient lands in those slots)
    local_offset = None if softmax_offset is None else softmax_offset.narrow(
        0, groups.ulysses_rank * q.shape[2], q.shape[2])
    max_logit = torch.full((q.shape[2],), float("-inf"), device=q.device) if return_max_logit else None
    if plan.mqsp is not None:
        out = mqsp_attention(q, k, v, plan.mqsp, RingComm(groups), kernel, scale, mask, heads, local_offset,
                             max_logit)
    else:
        masker = BlockMasker(mask, plan.q_positions, heads, q.shape[0], q.device) if mask.active else None
        out = ring_attention(q, k, v, plan.schedule, groups, kernel, scale, masker, local_offset, max_logit)
    out = heads_to_seq(out, groups, order)
    out = out if out.shape[3] == v_head_dim else out[..., :v_head_dim]
    return (out, _grid_max_logit(max_logit, groups)) if return_max_logit else out


def _grid_max_logit(local: torch.Tensor, groups: USPGroups) -> torch.Tensor:
    """This rank's ``[h/u]`` maxima (its heads, its rows / keys) -> ``[h]`` over the whole grid, on every rank."""
    if groups.ring_degree > 1:  # the ring ranks hold the other rows (pass-K/V) or keys (MQSP) of the same heads
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=groups.ring)
    if groups.ulysses_degree == 1:
        return local
    gathered = torch.empty(groups.ulysses_degree * local.shape[0], dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(gathered, local, group=groups.ulysses)
    return gathered


def _pad_head_dim(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x [b, s, h, d]`` zero-padded to ``[b, s, h, width]`` (itself when ``d == width``); differentiable."""
    return x if x.shape[3] == width else torch.nn.functional.pad(x, (0, width - x.shape[3]))


def clear_caches() -> None:
    """Empty every layout, schedule and varlen cache of the engine (they refill on the next call)."""
    for cache in (attention_plan, varlen_plan):
        cache.cache_clear()


# ------------------------------------------------------------------------------------------------ agreement check

_CHECK_AGREEMENT = os.environ.get("MEGATRON_USP_CHECK_AGREEMENT", "1").strip().lower() not in ("0", "false", "no", "off")


def set_agreement_check(enabled: bool) -> bool:
    """Module default of ``usp_attn(check_agreement=None)`` (Megatron's USPAttention uses it); returns the previous
    value. The environment variable ``MEGATRON_USP_CHECK_AGREEMENT=0`` sets it off at import."""
    global _CHECK_AGREEMENT
    previous, _CHECK_AGREEMENT = _CHECK_AGREEMENT, bool(enabled)
    return previous


AGREEMENT_FIELDS = ("dtype", "device", "q shape", "k shape", "v shape", "causal", "ring_impl", "softmax_scale",
                    "kernel", "window", "document_ids", "mask_mod", "micro_q", "cu_seqlens", "document_layout",
                    "softmax_offset", "return_max_logit")


def describe_call(q, k, v, *, causal, ring_impl, softmax_scale, kernel, mask, micro_q, cu_seqlens,
                  softmax_offset=None, return_max_logit=False, ulysses_degree: int = 1,
                  document_layout: str = "local") -> dict:
    """What every rank of the grid must agree on, field -> value (validated inputs). Values are normalised, so
    equivalent calls agree: the scale as used, the window as it acts under ``causal``, ``micro_q`` only where MQSP
    uses it; tensors (``document_ids``, ``softmax_offset``) by their values and ``mask_mod`` by what it computes
    (:func:`fingerprint`), not by shape or name."""
    mask = mask if mask is not None else AttentionMask()
    rows = q.shape[1] * ulysses_degree  # query rows of a ring rank after the all-to-all (MQSP's micro_q cap)
    return {
        "dtype": str(q.dtype),
        "device": q.device.type,
        "q shape": tuple(q.shape),
        "k shape": tuple(k.shape),
        "v shape": tuple(v.shape),
        "causal": causal,
        "ring_impl": ring_impl,
        "softmax_scale": float(softmax_scale) if softmax_scale is not None else q.shape[3] ** -0.5,
        "kernel": getattr(kernel, "name", type(kernel).__name__),
        "window": _acting_window(mask.window, causal),
        "document_ids": None if mask.document_ids is None else fingerprint(mask.document_ids),
        "mask_mod": None if mask.mask_mod is None else fingerprint(mask.mask_mod),
        "micro_q": acting_micro_q(ring_impl, micro_q, rows),
        "cu_seqlens": cu_seqlens,
        # as it acts: only packed documents of an impl that can keep them ring-local follow it
        "document_layout": (document_layout if cu_seqlens is not None
                            and RING_IMPL_TABLE[ring_impl].ring_local_documents else None),
        "softmax_offset": None if softmax_offset is None else fingerprint(softmax_offset),
        "return_max_logit": return_max_logit,
    }


def acting_micro_q(ring_impl: str, micro_q: Optional[int], rows: int) -> Optional[int]:
    """``micro_q`` as it acts on a ring rank's ``rows`` query rows: only pass-Q impls (MQSP) chunk, and a chunk of
    all rows or more is no chunking (None). The plan's cache key and the agreement check both use it."""
    if micro_q is None or RING_IMPL_TABLE[ring_impl].transport != "pass_q" or micro_q >= rows:
        return None
    return micro_q


def _acting_window(window, causal: bool):
    """``window`` as it restricts keys: the right side is 0 under ``causal``; -1 sides that leave nothing to
    restrict make no window."""
    if window is None:
        return None
    left, right = int(window[0]), 0 if causal else int(window[1])
    return None if left == -1 and (causal or right == -1) else (left, right)


def _tensor_digest(x: torch.Tensor) -> int:
    """An int64 of ``x``'s values, equal for equal values on any device (one reduction on x's device): Σ bits_i·w_i
    with odd weights w_i, so any single changed element changes it."""
    x = x.detach().contiguous().view(-1)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        x = x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]) \
            if x.dtype != torch.bool else x.to(torch.uint8)
    weights = (torch.arange(x.numel(), device=x.device, dtype=torch.int64) * 0x9E3779B1 % (2**31 - 1)) * 2 + 1
    return int((x.to(torch.int64) * weights).sum().item())


def fingerprint(value, depth: int = 0):
    """A plain, process-independent description of ``value`` for the agreement check: tensors by dtype, shape
    and values; functions by their code, constants, defaults, closure cells and the plain globals they read;
    ``functools.partial`` by its function and bound arguments (``partial(f)`` is ``f``); bound methods and
    callable objects by their function and the object's attributes."""
    if depth > 4:
        return type(value).__qualname__
    nested = functools.partial(fingerprint, depth=depth + 1)
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), _tensor_digest(value))
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if isinstance(value, (tuple, list, set, frozenset)):
        items = sorted(map(repr, map(nested, value))) if isinstance(value, (set, frozenset)) else map(nested, value)
        return (type(value).__name__, *items)
    if isinstance(value, dict):
        return ("dict", *sorted((repr(key), repr(nested(item))) for key, item in value.items()))
    if isinstance(value, types.ModuleType):
        return ("module", value.__name__)
    if isinstance(value, functools.partial):
        if not value.args and not value.keywords:
            return fingerprint(value.func, depth)
        return ("partial", nested(value.func), nested(value.args), nested(value.keywords))
    if isinstance(value, types.BuiltinFunctionType):
        return ("builtin", getattr(value, "__module__", None), value.__qualname__,
                nested(getattr(value, "__self__", None)))
    if isinstance(value, types.MethodType):
        return ("method", nested(value.__func__), nested(value.__self__))
    if isinstance(value, types.FunctionType):
        code = value.__code__
        cells = tuple(nested(cell.cell_contents) for cell in value.__closure__ or ())
        plain_globals = {name: value.__globals__[name] for name in code.co_names if name in value.__globals__
                         and not callable(value.__globals__[name])
                         and not isinstance(value.__globals__[name], types.ModuleType)}
        return ("function", value.__module__, value.__qualname__, _code_fingerprint(code), nested(value.__defaults__),
                nested(value.__kwdefaults__), cells, nested(plain_globals))
    if isinstance(value, type):
        return ("type", value.__module__, value.__qualname__)
    state = getattr(value, "__dict__", None)
    call = getattr(type(value), "__call__", None)
    return ("object", type(value).__module__, type(value).__qualname__,
            nested(call) if isinstance(call, types.FunctionType) else None, nested(state) if state else None)


def _code_fingerprint(code: types.CodeType) -> tuple:
    """Bytecode and constants (nested code objects recursively; their reprs hold memory addresses)."""
    consts = tuple(_code_fingerprint(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return code.co_code, consts, code.co_names


def _encode(value) -> int:
    """A field value as one int64, the same on every rank for equal values (no per-process hash seeds)."""
    if isinstance(value, int) and -(2**62) < value < 2**62:
        return int(value) * 2 + 1  # bools and ints: odd; everything else: even
    return zlib.crc32(repr(value).encode()) * 2


def agree(groups: USPGroups, descriptor: Optional[dict], error: Optional[BaseException] = None) -> None:
    """Collective over the grid of ``groups``: compare every rank's ``descriptor`` (``describe_call``). Raises the
    same ``ValueError`` on every rank that is fine when some fields differ or some rank passes its local
    validation ``error`` (that rank gets no exception here and raises its own). One all-gather of 18 ints over the
    SP group (``groups.sp``; else one over the ulysses and one over the ring group); the readable values travel
    (``all_gather_object``) only when something is wrong."""
    if error is None:
        row = [0] + [_encode(descriptor[name]) for name in AGREEMENT_FIELDS]
    else:
        row = [1] + [0] * len(AGREEMENT_FIELDS)
    table = grid_all_gather_ints(row, groups)
    if all(r == table[0] for r in table) and table[0][0] == 0:
        return
    import torch.distributed as dist

    mine = (dist.get_rank(), descriptor if error is None else f"{type(error).__name__}: {error}")
    everyone = sorted(grid_all_gather_objects(mine, groups), key=lambda item: item[0])
    if error is not None:
        return
    failed = [(rank, what) for rank, what in everyone if isinstance(what, str)]
    if failed:
        raise ValueError("usp_attn: rank(s) " + str([rank for rank, _ in failed]) + " of this rank's sequence-parallel "
                         "group rejected their inputs, so no rank runs the call: "
                         + "; ".join(f"rank {rank}: {what}" for rank, what in failed))
    differences = []
    for name in AGREEMENT_FIELDS:
        by_value: dict = {}
        for rank, what in everyone:
            by_value.setdefault(repr(what[name]), []).append(rank)
        if len(by_value) > 1:
            differences.append(f"{name}: " + ", ".join(f"{value} on ranks {ranks}" for value, ranks in
                                                       sorted(by_value.items(), key=lambda item: len(item[1]))))
    raise ValueError("usp_attn: the ranks of this sequence-parallel group disagree on their inputs — "
                     + "; ".join(differences) + ". Every rank of the ulysses x ring grid must call usp_attn with the "
                     "same dtype, shapes, causal, ring_impl, softmax_scale, backend, masks, micro_q, cu_seqlens and "
                     "document_layout "
                     "(usp_attn(check_agreement=False) or MEGATRON_USP_CHECK_AGREEMENT=0 skips this check)")
