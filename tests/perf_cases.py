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
