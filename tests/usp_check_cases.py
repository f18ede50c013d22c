"""Rank-side bodies of test_usp_check.py: verify_usp_attn on correct, corrupted and "CP off" runs."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

import megatron_usp as usp
from engine_cases import get_groups, make_inputs, sp_block
from megatron_usp.check import verify_usp_attn


def _run(groups, ring_impl, *, seq_len, heads=4, kv_heads=2, head_dim=8, batch=2, cu_seqlens=None, window=None,
         seed=0):
    q, k, v, _ = make_inputs(seed + 1000 * sp_block(groups), batch, seq_len, heads, kv_heads, head_dim, torch.float32)
    layout = dict(ring_impl=ring_impl, cu_seqlens=cu_seqlens)
    local = [usp.shard(t, groups, **layout).float() for t in (q, k, v)]
    out = usp.usp_attn(*local, groups, causal=True, window=window, **layout)
    return local, out


def _verify(groups, local, out, ring_impl, **kwargs):
    return verify_usp_attn(*local, out, groups, ring_impl=ring_impl, causal=True, expected_sp_size=groups.sp_size,
                           **kwargs)


def passes(rank, world_size, ulysses_degree, ring_degree, ring_impls) -> list[float]:
    """Correct output passes for every ring_impl, with and without documents, with a window; errors are tiny."""
    groups = get_groups(ulysses_degree, ring_degree)
    seq_len = 8 * groups.sp_size
    errors = []
    for impl in ring_impls:
        for cu in (None, [0, 3, seq_len // 2 + 1, seq_len - 2, seq_len]):
            for window in (None, (5, 0)):
                local, out = _run(groups, impl, seq_len=seq_len, cu_seqlens=cu, window=window)
                errors.append(_verify(groups, local, out, impl, cu_seqlens=cu, window=window, heads=2, rows=4,
                                      seed=len(errors), name=f"{impl}-{cu}-{window}"))
    assert max(errors) < 1e-5, errors
    return errors


def sinks_and_mla(rank, world_size, ulysses_degree, ring_degree, ring_impl) -> str:
    """Attention sinks and a narrower v (MLA): the check passes when handed the same softmax_offset, and catches
    the output as wrong when not (the sink really is part of what it recomputes)."""
    groups = get_groups(ulysses_degree, ring_degree)
    seq_len = 8 * groups.sp_size
    q, k, v, _ = make_inputs(sp_block(groups), 2, seq_len, 4, 2, 8, torch.float32, v_head_dim=6)
    local = [usp.shard(t, groups, ring_impl=ring_impl).float() for t in (q, k, v)]
    offset = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = usp.usp_attn(*local, groups, causal=True, ring_impl=ring_impl, softmax_offset=offset)
    assert out.shape[-1] == 6
    assert _verify(groups, local, out, ring_impl, softmax_offset=offset, heads=4) < 1e-5
    try:
        _verify(groups, local, out, ring_impl, heads=4, name="without the sink")
    except RuntimeError as error:
        return str(error)
    raise AssertionError(f"rank {rank}: output with sinks passed a check without them")


def corrupted(rank, world_size, ulysses_degree, ring_degree, ring_impl, bad_rank) -> str:
    """+1e-3 on every row of one rank's output (all heads): every rank raises, naming the layer."""
    groups = get_groups(ulysses_degree, ring_degree)
    local, out = _run(groups, ring_impl, seq_len=8 * groups.sp_size)
    if rank == bad_rank:
        out = out + 1e-3
    try:
        _verify(groups, local, out, ring_impl, name="layer 7")
    except RuntimeError as error:
        return str(error)
    raise AssertionError(f"rank {rank}: the corrupted output was not caught")


def cp_off(rank, world_size, ulysses_degree, ring_degree) -> list[str]:
    """The grid is not what the caller expects, or every rank holds the same positions (a 1x1 grid per rank)."""
    groups = get_groups(ulysses_degree, ring_degree)
    local, out = _run(groups, "zigzag", seq_len=8 * groups.sp_size)
    messages = []
    try:
        verify_usp_attn(*local, out, groups, ring_impl="zigzag", causal=True, expected_sp_size=2 * groups.sp_size,
                        name="layer 1")
    except RuntimeError as error:
        messages.append(str(error))
    faked = replace(groups, ulysses_rank=0)  # two ranks claim the same place on the grid: same positions
    try:
        verify_usp_attn(*local, out, faked, ring_impl="zigzag", causal=True, name="layer 1")
    except RuntimeError as error:
        messages.append(str(error))
    single = usp.USPGroups.single()  # "CP off": every rank runs the whole sequence alone
    local, out = _run(single, "zigzag", seq_len=16)
    try:
        verify_usp_attn(*local, out, single, ring_impl="zigzag", causal=True, expected_sp_size=groups.sp_size,
                        name="layer 1")
    except RuntimeError as error:
        messages.append(str(error))
    return messages


def cost(rank, world_size, ulysses_degree, ring_degree, seq_len, heads, head_dim, repeats) -> dict:
    """ms per verify_usp_attn call (1 head, 4 rows) vs one usp_attn forward, at [1, seq_len, heads, head_dim]."""
    groups = get_groups(ulysses_degree, ring_degree)
    local, out = _run(groups, "zigzag", seq_len=seq_len, heads=heads, kv_heads=heads, head_dim=head_dim, batch=1)
    _verify(groups, local, out, "zigzag")
    start = time.perf_counter()
    for i in range(repeats):
        _verify(groups, local, out, "zigzag", seed=i)
    check_ms = (time.perf_counter() - start) / repeats * 1e3
    start = time.perf_counter()
    usp.usp_attn(*local, groups, causal=True, ring_impl="zigzag")
    attn_ms = (time.perf_counter() - start) * 1e3
    return dict(check_ms=check_ms, attn_ms=attn_ms)


def megatron_gpt(rank, world_size, ulysses_degree, ring_degree, ring_impl, every) -> dict:
    """--usp-check in a megatron-core GPTModel (USPAttention): checks on calls 1, 1 + every, ...; ``every`` clean
    calls, then call ``every + 1`` (checked) with a corrupted attention output on one rank: every rank raises."""
    import megatron_usp.megatron.attention as attention
    from megatron_cases import build_gpt, make_batch
    from megatron_usp.megatron import (
        destroy_model_parallel, enable_cpu_mode, get_batch_on_this_usp_rank, get_gpt_layer_local_spec,
        initialize_model_parallel,
    )

    enable_cpu_mode()
    initialize_model_parallel(1, 1, ulysses_degree=ulysses_degree, ring_degree=ring_degree, ring_impl=ring_impl,
                              usp_check=every, create_gloo_process_groups=False)
    model = build_gpt(get_gpt_layer_local_spec, 1, context_parallel_size=ulysses_degree * ring_degree)
    batch = get_batch_on_this_usp_rank(make_batch())
    checked = []
    real_verify, real_attn = attention.verify_usp_attn, attention.attend

    def counting_verify(*args, **kwargs):
        checked.append(kwargs["name"])
        return real_verify(*args, **kwargs)

    def corrupt_attn(*args, **kwargs):
        out = real_attn(*args, **kwargs)
        return out + 1e-3 if rank == 2 else out

    attention.verify_usp_attn = counting_verify
    try:
        with torch.no_grad():
            for _ in range(every):
                model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        checked_before = list(checked)
        attention.attend = corrupt_attn
        try:
            with torch.no_grad():
                model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
            message = None
        except RuntimeError as error:
            message = str(error)
    finally:
        attention.verify_usp_attn, attention.attend = real_verify, real_attn
        destroy_model_parallel()
    return dict(checked=checked_before, message=message)
