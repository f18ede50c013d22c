"""megatron-core GPTModel with USP vs the TP=1, CP=1 model with the same weights (CPU, gloo, 4 ranks)."""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-usp[megatron])")

from conftest import record_error  # noqa: E402

IMPLS = ["zigzag", "stripe", "basic", "allgather"]


@pytest.mark.parametrize(
    "tp,ulysses_degree,ring_degree,ulysses_inner",
    [(1, 2, 2, True), (1, 4, 1, True), (1, 1, 4, True), (2, 2, 1, True), (2, 1, 2, True), (1, 2, 2, False),
     (1, 2, 1, True), (1, 1, 2, False)],  # the last two: DP=2 beside SP
    ids=lambda v: str(v),
)
def test_gpt_losses_and_gradients_match_reference(fresh_rank_pool, tp, ulysses_degree, ring_degree, ulysses_inner):
    reports = fresh_rank_pool(4).run(
        "megatron_cases:gpt_parity",
        timeout=300,
        tp=tp,
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        ring_impls=IMPLS,
        ulysses_inner=ulysses_inner,
    )
    for rank_report in reports:
        for entry in rank_report:
            label = f"gpt tp{tp} u{ulysses_degree} r{ring_degree} {entry['ring_impl']}"
            record_error(label + " loss", entry["loss"])
            record_error(label + " grad", entry["grad"])


@pytest.mark.parametrize("ring_impl", ["zigzag", "stripe"])
def test_pipeline_parallel_with_usp(fresh_rank_pool, ring_impl):
    results = fresh_rank_pool(4).run("megatron_cases:gpt_pipeline_parity", timeout=300, ulysses_degree=1, ring_degree=2,
                               ring_impl=ring_impl)
    for result in results:
        for key, value in result.items():
            record_error(f"gpt pp2 r2 {ring_impl} {key}", value)
