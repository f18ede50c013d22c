"""Rank-pool bodies for the traffic counter: bytes sent per rank vs the analytic count."""
from __future__ import annotations

import torch

import megatron_usp as usp
from megatron_usp.comm import count_traffic
from megatron_usp.cost import analytic_bytes_per_rank
from engine_cases import DTYPES, get_groups, make_inputs


def traffic(rank, world_size, ulysses_degree, ring_degree, configs) -> list[dict]:
    """For each config: what this rank sent in one forward + backward (per kind, with call counts) and the
    analytic count."""
    groups = get_groups(ulysses_degree, ring_degree)
    reports = []
    for config in configs:
        dtype = DTYPES[config["dtype"]]
        q, k, v, grad = make_inputs(0, config["batch"], config["seq_len"], config["heads"], config["kv_heads"],
                                    config["head_dim"], dtype)
        impl = config["ring_impl"]
        local = [usp.shard(t, groups, ring_impl=impl).to(dtype).requires_grad_() for t in (q, k, v)]
        with count_traffic() as counter:
            out = usp.usp_attn(*local, groups, causal=config["causal"], ring_impl=impl)
            out.backward(usp.shard(grad, groups, ring_impl=impl).to(dtype))
        analytic = analytic_bytes_per_rank(
            batch=config["batch"], seq_len=config["seq_len"], heads=config["heads"], kv_heads=config["kv_heads"],
            head_dim=config["head_dim"], dtype=dtype, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
            ring_impl=impl,
        )
        reports.append({"config": config, "sent": dict(counter.bytes_sent), "calls": dict(counter.calls),
                        "analytic": analytic})
    return reports


def ring_local_traffic(rank, world_size, ring_degree, cu_seqlens, document_layout) -> dict:
    """Ring p2p bytes this rank sent in one forward + backward of a packed row (zigzag, u = 1), and the analytic
    count for its ring rank."""
    groups = get_groups(1, ring_degree)
    seq_len, batch, heads, head_dim = cu_seqlens[-1], 1, 2, 8
    q, k, v, grad = make_inputs(0, batch, seq_len, heads, heads, head_dim, torch.float32)
    layout = dict(ring_impl="zigzag", cu_seqlens=cu_seqlens, document_layout=document_layout)
    local = [usp.shard(t, groups, **layout).float().requires_grad_() for t in (q, k, v)]
    with count_traffic() as counter:
        out = usp.usp_attn(*local, groups, causal=True, check_agreement=False, **layout)
        out.backward(usp.shard(grad, groups, **layout).float())
    analytic = analytic_bytes_per_rank(batch=batch, seq_len=seq_len, heads=heads, kv_heads=heads, head_dim=head_dim,
                                       dtype=torch.float32, ulysses_degree=1, ring_degree=ring_degree,
                                       ring_impl="zigzag", cu_seqlens=tuple(cu_seqlens),
                                       document_layout=document_layout, ring_rank=groups.ring_rank)
    return {"sent": counter.bytes_sent.get("ring_p2p", 0), "calls": counter.calls.get("ring_p2p", 0),
            "analytic": analytic.get("ring_p2p", 0)}
