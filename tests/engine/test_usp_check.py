"""verify_usp_attn (--usp-check): passes on correct output, stops every rank on a wrong one or when CP is off."""
from __future__ import annotations

import pytest

GRIDS = [(2, 2), (1, 4)]
IMPLS = ["zigzag", "stripe", "mqsp"]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"u{g[0]}-r{g[1]}")
def test_check_passes_on_correct_output(rank_pool, grid):
    reports = rank_pool(4).run("usp_check_cases:passes", ulysses_degree=grid[0], ring_degree=grid[1],
                               ring_impls=IMPLS)
    assert len(reports) == 4


@pytest.mark.parametrize("impl,grid,bad_rank", [("zigzag", (2, 2), 3), ("stripe", (1, 4), 0), ("mqsp", (2, 2), 1)])
def test_corrupted_output_raises_on_every_rank(rank_pool, impl, grid, bad_rank):
    messages = rank_pool(4).run("usp_check_cases:corrupted", ulysses_degree=grid[0], ring_degree=grid[1],
                                ring_impl=impl, bad_rank=bad_rank)
    assert len(set(messages)) == 1, messages  # every rank raised the same error
    message = messages[0]
    assert "layer 7" in message and f"u={grid[0]} r={grid[1]} ring_impl={impl}" in message
    assert "differs" in message and "up to 1.000e-03" in message  # the error is named


@pytest.mark.parametrize("impl", ["zigzag", "mqsp"])
def test_check_covers_sinks_and_mla_widths(rank_pool, impl):
    messages = rank_pool(4).run("usp_check_cases:sinks_and_mla", ulysses_degree=2, ring_degree=2, ring_impl=impl)
    assert len(set(messages)) == 1 and "without the sink" in messages[0] and "differs" in messages[0], messages


def test_cp_off_raises(rank_pool):
    for messages in rank_pool(4).run("usp_check_cases:cp_off", ulysses_degree=2, ring_degree=2):
        assert len(messages) == 3, messages
        assert "4 ranks but 8 were expected" in messages[0] and "layer 1" in messages[0]
        assert "same sequence positions" in messages[1]
        assert "1 ranks but 4 were expected" in messages[2]


def test_megatron_usp_check_flag(isolated_rank_pool):
    """initialize_model_parallel(usp_check=3) (--usp-check 3): each layer checked on call 1 of 3, then call 4 (checked)
    with a corrupted output on one rank raises on every rank, naming layer 1 and the grid."""
    pytest.importorskip("megatron.core")
    reports = isolated_rank_pool(4).run("usp_check_cases:megatron_gpt", timeout=300, ulysses_degree=2, ring_degree=2,
                                     ring_impl="stripe", every=3)
    for report in reports:
        assert report["checked"] == ["layer 1", "layer 2"], report["checked"]
        assert report["message"] is not None and "layer 1 (u=2 r=2 ring_impl=stripe)" in report["message"]
    assert len({report["message"] for report in reports}) == 1


def test_usp_check_flag_parses_and_validates():
    pytest.importorskip("megatron.core")
    import argparse

    from megatron_usp.megatron.args import add_usp_args, validate_usp_args

    parser = add_usp_args(argparse.ArgumentParser())
    assert parser.parse_args([]).usp_check is None
    assert parser.parse_args(["--usp-check"]).usp_check == 0
    assert parser.parse_args(["--usp-check", "100"]).usp_check == 100
    with pytest.raises(SystemExit):  # the flag's own type (megatron_usp.flags)
        parser.parse_args(["--usp-check", "-1"])
    args = parser.parse_args([])
    args.usp_check = -1  # set by a program: validate_usp_args still refuses it
    with pytest.raises(ValueError, match="--usp-check -1"):
        validate_usp_args(args)
