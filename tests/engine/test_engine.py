"""usp_attn against a float64 single-process reference, forward and backward, across gloo ranks."""
from __future__ import annotations

import pytest

from conftest import record_error

IMPLS = ["basic", "zigzag", "stripe", "allgather", "mqsp"]
# (world_size, ulysses_degree, ring_degree, ulysses_inner); world > u*r means DP x SP (several SP blocks)
GRIDS = [
    (1, 1, 1, True),
    (2, 1, 2, True),
    (2, 2, 1, True),
    (4, 1, 4, True),
    (4, 2, 2, True),
    (4, 4, 1, True),
    (4, 2, 2, False),
    (4, 1, 2, True),
    (4, 2, 1, True),
    (8, 2, 4, True),
    (8, 4, 2, True),
    (8, 2, 4, False),
    (8, 2, 2, True),
]


def configs_for(sp_size: int, impl: str, world_size: int) -> list[dict]:
    """MHA/GQA/MQA x causal/non-causal, batch 2, head_dim 12, seq 3*2*P (never a power of two), plus a
    custom softmax_scale and float64 / bfloat16 cases."""
    seq_len = 6 * sp_size
    base = dict(batch=2, seq_len=seq_len, head_dim=12, ring_impl=impl)
    configs = []
    for heads, kv_heads in ((8, 8), (8, 2), (8, 1)):
        for causal in (True, False):
            configs.append(dict(base, heads=heads, kv_heads=kv_heads, causal=causal, seed=len(configs)))
    configs.append(dict(base, heads=4, kv_heads=2, causal=True, softmax_scale=0.37, seq_len=10 * sp_size, seed=11))
    configs.append(dict(base, heads=8, kv_heads=4, causal=True, dtype="float64", head_dim=6, seed=12))
    configs.append(dict(base, heads=8, kv_heads=2, causal=False, dtype="bfloat16", seed=13))
    if impl == "mqsp":  # micro-chunks of 2 and 5 query rows (5 does not divide the rows: a shorter last chunk)
        configs += [dict(base, heads=8, kv_heads=2, causal=causal, micro_q=micro_q, seed=14 + micro_q)
                    for micro_q in (2, 5) for causal in (True, False)]
    return configs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g[0]}-u{g[1]}-r{g[2]}-{'uinner' if g[3] else 'rinner'}")
def test_attention_matches_float64_reference(rank_pool, grid, impl):
    world_size, ulysses_degree, ring_degree, ulysses_inner = grid
    configs = configs_for(ulysses_degree * ring_degree, impl, world_size)
    reports = rank_pool(world_size).run(
        "engine_cases:attention_matrix",
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        ulysses_inner=ulysses_inner,
        configs=configs,
    )
    for rank_report in reports:
        for entry in rank_report:
            dtype = entry["config"].get("dtype", "float32")
            for name, err in entry["errors"].items():
                record_error(f"{impl} {dtype} {name}", err)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_accuracy_does_not_drift_with_ring_size(rank_pool, impl):
    results = rank_pool(8).run("engine_cases:bf16_no_drift", ulysses_degree=1, ring_degree=8, ring_impl=impl)
    for result in results:
        record_error(f"{impl} bf16 ring8 mean err (single {result['single']:.1e})", result["usp"])


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_run_is_bitwise_identical(rank_pool, impl):
    assert all(rank_pool(4).run("engine_cases:determinism", ulysses_degree=2, ring_degree=2, ring_impl=impl))


@pytest.mark.parametrize("grid", [(4, 2, 2, True), (4, 2, 2, False), (8, 2, 2, True), (4, 1, 4, True), (4, 4, 1, True)])
def test_unshard_inverts_shard(rank_pool, grid):
    world_size, ulysses_degree, ring_degree, ulysses_inner = grid
    assert all(
        rank_pool(world_size).run(
            "engine_cases:shard_roundtrip",
            ulysses_degree=ulysses_degree,
            ring_degree=ring_degree,
            ulysses_inner=ulysses_inner,
        )
    )


@pytest.mark.parametrize("grid", [(4, 2, 2), (4, 4, 1), (4, 1, 4), (2, 2, 1)])
def test_bad_input_raises_on_every_rank_without_hanging(rank_pool, grid):
    world_size, ulysses_degree, ring_degree = grid
    counts = rank_pool(world_size).run(
        "engine_cases:bad_inputs", timeout=90, ulysses_degree=ulysses_degree, ring_degree=ring_degree
    )
    assert len(counts) == world_size and min(counts) >= 20
