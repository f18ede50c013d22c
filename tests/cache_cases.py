"""Rank-side bodies of test_reliability_caches.py (issue 24, item 5): an evaluation call under
``torch.inference_mode()`` must leave nothing behind that breaks a later training call with the same shapes."""
from __future__ import annotations

import torch

import megatron_usp as usp
from engine_cases import TOLERANCE, get_groups, run_case
from megatron_usp import usp as usp_module

IMPLS = ("basic", "zigzag", "stripe", "allgather", "mqsp")


def evaluation_then_training(rank, world_size, ulysses_degree, ring_degree, configs) -> dict:
    """For every config: empty the engine's caches, call usp_attn once under inference_mode (evaluation), then
    train the same shapes (forward + backward vs the float64 reference). Returns the worst error per config."""
    groups = get_groups(ulysses_degree, ring_degree)
    worst = {}
    for config in configs:
        usp_module.clear_caches()
        seq_len, layout = config["seq_len"], dict(ring_impl=config["ring_impl"], cu_seqlens=config.get("cu_seqlens"))
        local = [torch.randn(config["batch"], seq_len // groups.sp_size, heads, config["head_dim"])
                 for heads in (config["heads"], config["kv_heads"], config["kv_heads"])]
        with torch.inference_mode():
            usp.usp_attn(*local, groups, causal=config["causal"], micro_q=config.get("micro_q"),
                         backend=config.get("backend", "auto"), **layout)
        errors = run_case(groups, config, torch.float32)
        bad = {name: error for name, error in errors.items() if not error <= TOLERANCE[torch.float32]}
        assert not bad, f"rank {rank} {config}: training after evaluation, errors {bad}"
        worst[repr(config)] = max(errors.values())
    return worst
