"""The attention of today's long-context models under USP, against the float64 reference, forward and backward
across gloo ranks: MLA's value head dim != query/key head dim, attention sinks (softmax_offset, its gradient
summed over the SP group), the per-head max logit (return_max_logit), and all together with documents, windows
and packed rows."""
from __future__ import annotations

import pytest

from conftest import record_error

IMPLS = ["basic", "zigzag", "stripe", "allgather", "mqsp"]
GRIDS = [(2, 1, 2), (2, 2, 1), (4, 2, 2), (4, 1, 4), (4, 4, 1)]  # (world, ulysses, ring)


def configs_for(sp_size: int, impl: str) -> list[dict]:
    seq_len = 6 * sp_size
    base = dict(batch=2, seq_len=seq_len, head_dim=12, ring_impl=impl, max_logit=True)
    configs = []
    for heads, kv_heads in ((8, 8), (8, 2), (8, 1)):  # MHA, GQA, MQA
        for causal in (True, False):
            configs.append(dict(base, heads=heads, kv_heads=kv_heads, causal=causal, v_head_dim=8,
                                sink="learnable", seed=len(configs)))
    configs += [
        dict(base, heads=8, kv_heads=2, causal=True, v_head_dim=8, seed=20),          # MLA widths alone
        dict(base, heads=8, kv_heads=2, causal=True, v_head_dim=16, seed=21),         # v wider than q/k
        dict(base, heads=8, kv_heads=2, causal=True, sink="off-by-one", seed=22),     # sinks alone
        dict(base, heads=8, kv_heads=2, causal=True, v_head_dim=8, sink="learnable", mask="window_and_documents",
             seed=23),
        dict(base, heads=8, kv_heads=2, causal=True, sink="learnable", mask="mask_mod", seed=24),  # empty rows
        dict(base, heads=8, kv_heads=2, causal=True, v_head_dim=8, sink="learnable", seed=25,
             cu_seqlens=[0, 5, seq_len // 2 + 1, seq_len]),
        dict(base, heads=8, kv_heads=2, causal=False, v_head_dim=8, sink="learnable", dtype="bfloat16", seed=26),
    ]
    if impl == "mqsp":
        configs.append(dict(base, heads=8, kv_heads=2, causal=True, v_head_dim=8, sink="learnable", micro_q=5,
                            seed=27))
    return configs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"u{g[1]}-r{g[2]}")
def test_mla_widths_sinks_and_max_logit_match_float64_reference(rank_pool, grid, impl):
    world_size, ulysses_degree, ring_degree = grid
    reports = rank_pool(world_size).run("engine_cases:attention_matrix", ulysses_degree=ulysses_degree,
                                        ring_degree=ring_degree, ulysses_inner=True,
                                        configs=configs_for(ulysses_degree * ring_degree, impl))
    names = set()
    for rank_report in reports:
        for entry in rank_report:
            config = entry["config"]
            feature = "+".join(f for f in ("mla" if config.get("v_head_dim") else "", config.get("sink") or "") if f)
            for name, err in entry["errors"].items():
                record_error(f"{feature} {config.get('dtype', 'float32')} {name}", err)
                names.add(name)
    assert {"dsink", "max_logit"} <= names  # the sink's gradient and the max logit were compared
