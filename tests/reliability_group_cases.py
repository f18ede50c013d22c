"""Rank-side bodies of test_reliability_groups.py (issue 15, items 3, 6, 7): timeouts of our process groups, grid
checks of USPGroups.from_groups, and the agreement check of usp_attn. Run on every rank of a RankPool."""
from __future__ import annotations

import time
from datetime import timedelta

import functools

import numpy as np
import torch
import torch.distributed as dist

import megatron_usp as usp
from megatron_usp import groups as groups_module
from megatron_usp import usp as usp_module


def _timeout_of(group) -> timedelta:
    """The timeout a process group's collectives wait for (read from the backend's options)."""
    backend = group._get_backend(torch.device("cpu"))
    return backend.options._timeout


# --------------------------------------------------------------------------------------------- item 3: timeouts

def groups_inherit_timeout(rank, world_size) -> dict:
    """init_groups without ``timeout=`` gives its groups the default group's timeout; with it, the one given."""
    default = _timeout_of(dist.group.WORLD)
    inherited = usp.init_groups(2, world_size // 2)
    explicit = usp.init_groups(2, world_size // 2, timeout=timedelta(seconds=17))
    return dict(default=default.total_seconds(),
                inherited=[_timeout_of(inherited.ulysses).total_seconds(), _timeout_of(inherited.ring).total_seconds()],
                explicit=[_timeout_of(explicit.ulysses).total_seconds(), _timeout_of(explicit.ring).total_seconds()])


def _qkv(seq_local=6, heads=4, kv_heads=2, head_dim=8, batch=1, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + dist.get_rank())
    q = torch.randn(batch, seq_local, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, seq_local, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, seq_local, kv_heads, head_dim, generator=gen).to(dtype)
    return q, k, v


def _timed(call) -> dict:
    start = time.monotonic()
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test looks at what ended the call and when
        return dict(error=f"{type(error).__name__}: {str(error)[:300]}", seconds=time.monotonic() - start)
    return dict(error=None, seconds=time.monotonic() - start)


def mismatch_ends_within_default_timeout(rank, world_size, timeout_s) -> dict:
    """The user's init_process_group timeout (here set short on the default group) reaches our groups: a call made
    on rank 0 only (its peers never join) ends with an error within it, not after torch's 30 minutes."""
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))
    groups = usp.init_groups(2, world_size // 2)
    if rank != 0:
        return dict(error=None, seconds=0.0)
    q, k, v = _qkv()
    return _timed(lambda: usp.usp_attn(q, k, v, groups))


def impl_mismatch_ends_within_timeout(rank, world_size, timeout_s) -> dict:
    """One ring zigzag, the other allgather (agreement check off, so the collectives themselves mismatch): with
    ``init_groups(timeout=)`` every rank ends within that timeout."""
    groups = usp.init_groups(1, world_size, timeout=timedelta(seconds=timeout_s))
    q, k, v = _qkv(seq_local=8, batch=64, head_dim=64)  # large enough that the transfers cannot complete by chance
    impl = "zigzag" if rank == 0 else "allgather"
    return _timed(lambda: usp.usp_attn(q, k, v, groups, ring_impl=impl, check_agreement=False))


def megatron_ring_inner_timeout(rank, world_size) -> dict:
    """Megatron grid with ring inner: our own groups get the timeout megatron-core gave its CP group."""
    from megatron.core import parallel_state

    from megatron_usp.megatron import destroy_model_parallel, initialize_model_parallel

    groups = initialize_model_parallel(ulysses_degree=2, ring_degree=world_size // 2, ulysses_inner=False,
                                       distributed_timeout_minutes=7)
    try:
        return dict(cp=_timeout_of(parallel_state.get_context_parallel_group()).total_seconds(),
                    ours=[_timeout_of(groups.ulysses).total_seconds(), _timeout_of(groups.ring).total_seconds()])
    finally:
        destroy_model_parallel()


# --------------------------------------------------------------------------------------------- item 6: from_groups

def _all_groups(rank_lists):
    """Create every group in the same order on every rank (new_group is collective); return this rank's."""
    me, mine = dist.get_rank(), None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if me in ranks:
            mine = group
    return mine


def from_groups_cases(rank, world_size) -> dict:
    """Groups that form a grid are accepted (as init_groups builds them, ulysses or ring inner); groups that do
    not raise the same ValueError on every rank. Returns {case: error message or None}."""
    assert world_size == 4
    world = dist.group.WORLD
    cases = {
        "ulysses_inner": ([[0, 1], [2, 3]], [[0, 2], [1, 3]]),
        "ring_inner": ([[0, 2], [1, 3]], [[0, 1], [2, 3]]),
        "dp_blocks": ([[0, 1], [2, 3]], [[0], [1], [2], [3]]),
        "ring_mixes_ulysses_ranks": ([[0, 1], [2, 3]], [[0, 3], [1, 2]]),
        "ring_equals_ulysses": ([[0, 1], [2, 3]], [[0, 1], [2, 3]]),
        "uneven_sizes": ([[0, 1], [2], [3]], [[0, 2], [1, 3]]),
        "ring_spans_blocks": ([[0, 1], [2, 3]], [[0, 1, 2, 3]]),
        "with_sp": ([[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0, 1, 2, 3]]),
        "sp_not_the_grid": ([[0, 1], [2, 3]], [[0], [1], [2], [3]], [[0, 1, 2, 3]]),
    }
    results = {}
    for name, lists in cases.items():
        ulysses, ring = _all_groups(lists[0]), _all_groups(lists[1])
        sp = _all_groups(lists[2]) if len(lists) > 2 else None
        try:
            usp.USPGroups.from_groups(ulysses, ring, sp=sp)
            results[name] = None
        except ValueError as error:
            results[name] = str(error)
    try:
        usp.USPGroups.from_groups(world, world)
        results["world_twice"] = None
    except ValueError as error:
        results["world_twice"] = str(error)
    return results


def from_groups_garbage_is_refused(rank, world_size) -> dict:
    """The issue's cases with the original signature: the world group twice, and ring groups that mix ulysses
    ranks (both computed garbage, error 0.67-0.73); now a ValueError on every rank."""
    results = {}
    ulysses, ring = _all_groups([[0, 1], [2, 3]]), _all_groups([[0, 3], [1, 2]])
    for name, pair in (("world_twice", (dist.group.WORLD, dist.group.WORLD)), ("ring_mixes", (ulysses, ring))):
        try:
            usp.USPGroups.from_groups(*pair)
            results[name] = "accepted"
        except ValueError as error:
            results[name] = str(error)
    return results


# --------------------------------------------------------------------------------------------- item 7: agreement

def _disagreements(rank, world_size):
    """(name, field the error must name, kwargs for usp_attn on the odd rank(s), kwargs on the others)."""
    seq = 6
    cu = (0, 5, 13, 24)
    return [
        ("dtype", "dtype", dict(dtype=torch.bfloat16), dict(dtype=torch.float16)),
        ("causal", "causal", dict(causal=False), dict(causal=True)),
        ("mask", "window", dict(window=(3, 0)), dict()),
        ("seq_len", "q shape", dict(seq_local=2 * seq), dict(seq_local=seq)),
        ("batch", "q shape", dict(batch=2), dict(batch=1)),
        ("heads", "q shape", dict(heads=8), dict(heads=4)),
        ("micro_q", "micro_q", dict(ring_impl="mqsp", micro_q=2), dict(ring_impl="mqsp", micro_q=3)),
        ("impl", "ring_impl", dict(ring_impl="allgather"), dict(ring_impl="zigzag")),
        ("backend", "kernel", dict(backend="math"), dict(backend="torch_cpu")),
        ("cu_seqlens", "cu_seqlens", dict(cu_seqlens=cu), dict(cu_seqlens=(0, 12, 24))),
        ("scale", "softmax_scale", dict(softmax_scale=0.5), dict()),
        ("fp32_vs_bf16", "dtype", dict(dtype=torch.float32), dict(dtype=torch.bfloat16)),
        # issue 24 item 2: same shape or name, different values (ran and returned garbage before)
        ("document_ids", "document_ids", dict(document_ids=_two_documents(seq * world_size, 5)),
         dict(document_ids=_two_documents(seq * world_size, 11))),
        ("mask_mod", "mask_mod", dict(mask_mod=_band_mod(2)), dict(mask_mod=_band_mod(3))),
        ("softmax_offset", "softmax_offset", dict(softmax_offset=torch.ones(4)), dict(softmax_offset=torch.zeros(4))),
    ]


def _two_documents(seq_len: int, boundary: int) -> torch.Tensor:
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    ids[:, boundary:] = 1
    return ids


def _band_mod(width: int):
    """A mask_mod whose behaviour lives in a closure cell: the same qualified name for every width."""
    return lambda b, h, q_idx, kv_idx: q_idx - kv_idx <= width


def _causal_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _equivalent_calls(world_size):
    """(name, kwargs on the odd rank(s), kwargs on the others) that mean the same call (issue 24 item 8)."""
    seq_len = 6 * world_size
    cu = (0, 5, seq_len // 2 + 1, seq_len)
    return [
        ("scale", dict(softmax_scale=8 ** -0.5), dict()),
        ("causal_window_right", dict(window=(4, -1)), dict(window=(4, 0))),
        ("unbounded_window", dict(window=(-1, 3)), dict()),
        ("micro_q_without_mqsp", dict(micro_q=2), dict()),
        ("micro_q_above_rows", dict(ring_impl="mqsp", micro_q=10 ** 6), dict(ring_impl="mqsp")),
        ("partial", dict(mask_mod=functools.partial(_causal_mod)), dict(mask_mod=_causal_mod)),
        ("numpy_cu_seqlens", dict(cu_seqlens=np.array(cu)), dict(cu_seqlens=cu)),
        ("numpy_int_list", dict(cu_seqlens=[np.int64(x) for x in cu]), dict(cu_seqlens=list(cu))),
        ("tensor_cu_seqlens", dict(cu_seqlens=torch.tensor(cu, dtype=torch.int32)), dict(cu_seqlens=cu)),
    ]


def agreement_equivalents(rank, world_size, ulysses_degree, ring_degree, odd_ranks) -> dict:
    """Equivalent spellings on different ranks run (no refusal) and give the output of the plain spelling."""
    groups = usp.init_groups(ulysses_degree, ring_degree)
    results = {}
    for name, odd, even in _equivalent_calls(world_size):
        out = _call(groups, **(odd if rank in odd_ranks else even))
        expected = _call(groups, **even)
        assert torch.equal(out, expected), name
        results[name] = True
    return results


def _call(groups, *, seq_local=6, batch=1, heads=4, dtype=torch.float32, **kwargs):
    q, k, v = _qkv(seq_local=seq_local, batch=batch, heads=heads, dtype=dtype)
    return usp.usp_attn(q, k, v, groups, **kwargs)


def agreement_cases(rank, world_size, ulysses_degree, ring_degree, odd_ranks) -> dict:
    """Each disagreement raises the same ValueError on every rank naming the field and the odd ranks; a call
    afterwards still works. Returns {case: message} (the test compares them across ranks)."""
    groups = usp.init_groups(ulysses_degree, ring_degree)
    results = {}
    for name, field, odd, even in _disagreements(rank, world_size):
        kwargs = odd if rank in odd_ranks else even
        try:
            _call(groups, **kwargs)
            results[name] = None
        except ValueError as error:
            message = str(error)
            assert field in message, (name, field, message)
            assert f"{sorted(odd_ranks)}" in message, (name, odd_ranks, message)
            results[name] = message
    # a local validation error on one rank only: that rank raises its own error, the others name it; no hang
    try:
        if rank == odd_ranks[0]:
            _call(groups, softmax_scale=-1.0)
        else:
            _call(groups)
        results["local_error"] = None
    except (ValueError, TypeError) as error:
        results["local_error"] = f"{type(error).__name__}: {error}"
    out = _call(groups)  # the world is healthy afterwards
    out.sum().backward() if out.requires_grad else None
    return results


def agreement_can_be_turned_off(rank, world_size) -> dict:
    """check_agreement=False skips the check (a disagreeing softmax_scale then runs, as it did before);
    set_agreement_check(False) does the same as the module default."""
    groups = usp.init_groups(2, world_size // 2)
    scale = 0.5 if rank == 0 else None
    _call(groups, softmax_scale=scale, check_agreement=False)
    previous = usp_module.set_agreement_check(False)
    try:
        _call(groups, softmax_scale=scale)
    finally:
        usp_module.set_agreement_check(previous)
    return dict(default=previous)


def agreement_cost(rank, world_size, calls=50) -> dict:
    """Microseconds per call of the check alone, and of a small usp_attn with and without it (2 x 2 grid)."""
    groups = usp.init_groups(2, world_size // 2)
    q, k, v = _qkv()
    timings = {}
    for label, check in (("with", True), ("without", False), ("with2", True), ("without2", False)):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            usp.usp_attn(q, k, v, groups, check_agreement=check)
        timings[label] = (time.perf_counter() - start) / calls * 1e6
    kernel = usp_module.resolve_kernel("auto", q.device, q.dtype, q.shape[3])
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        usp_module.agree(groups, usp_module.describe_call(q, k, v, causal=True, ring_impl="zigzag", softmax_scale=None,
                                                          kernel=kernel, mask=None, micro_q=None, cu_seqlens=None))
    timings["check_only"] = (time.perf_counter() - start) / calls * 1e6
    return timings


def raw_gather_cost(rank, world_size, calls=100) -> dict:
    """Microseconds of one bare 15-int all-gather on the ulysses, ring and SP groups (2 x 2), of the check, and
    of building + encoding the descriptor (the check's Python side)."""
    groups = usp.init_groups(2, world_size // 2)
    x = torch.zeros(1, 15, dtype=torch.int64)
    out = {}
    for label, group, size in (("ulysses", groups.ulysses, 2), ("ring", groups.ring, 2), ("sp", groups.sp, 4)):
        buf = torch.empty(size, 15, dtype=torch.int64)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            dist.all_gather_into_tensor(buf, x, group=group)
        out[label] = (time.perf_counter() - start) / calls * 1e6
    q, k, v = _qkv()
    kernel = usp_module.resolve_kernel("auto", q.device, q.dtype, q.shape[3])
    describe = lambda: usp_module.describe_call(q, k, v, causal=True, ring_impl="zigzag", softmax_scale=None,  # noqa
                                                kernel=kernel, mask=None, micro_q=None, cu_seqlens=None)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        usp_module.agree(groups, describe())
    out["check"] = (time.perf_counter() - start) / calls * 1e6
    start = time.perf_counter()
    for _ in range(calls):
        d = describe()
        [usp_module._encode(d[n]) for n in usp_module.AGREEMENT_FIELDS]
    out["describe_encode"] = (time.perf_counter() - start) / calls * 1e6
    return out
