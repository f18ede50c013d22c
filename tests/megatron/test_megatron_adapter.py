"""USPAttention takes its groups from what megatron-core hands it (pg_collection / model_comm_pgs), checked
against the USP grid (CPU, gloo, 4 ranks)."""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-usp[megatron])")


def test_usp_attention_checks_the_cp_group_megatron_core_hands_it(isolated_rank_pool):
    reports = isolated_rank_pool(4).run("megatron_adapter_cases:pg_collection_cases", timeout=300)
    for rank, report in enumerate(reports):
        assert report["same_groups"] and report["same_outputs"], (rank, report)
        assert report["whole_collection"], (rank, report)
        for case in ("other_members", "other_size"):
            message = report[case]
            assert "pg_collection.cp" in message and "sequence-parallel group" in message, (rank, case, message)
            assert "get_context_parallel_group" in message, (rank, case, message)  # the fix
