"""Issue 15, items 3, 6, 7: our process groups honour the caller's timeout; USPGroups.from_groups refuses groups
that do not form a grid; ranks that disagree on their usp_attn inputs all raise the same clear ValueError."""
from __future__ import annotations

import pytest

TIMEOUT_S = 3


def _same_everywhere(results):
    assert all(r == results[0] for r in results), results
    return results[0]


# ---------------------------------------------------------------------------------------------- item 3: timeouts

def test_init_groups_inherit_the_default_groups_timeout(rank_pool):
    results = rank_pool(4).run("reliability_group_cases:groups_inherit_timeout", timeout=60)
    for result in results:
        assert result["inherited"] == [result["default"]] * 2, result  # torch's default for new groups: 1800 s
        assert result["explicit"] == [17.0, 17.0], result


def test_call_on_some_ranks_ends_within_the_default_groups_timeout(isolated_rank_pool):
    """Rank 0 calls usp_attn, its peers never do: it fails within the short timeout set on the default group
    (before: it waited torch's 30 minutes, so the pool's 30 s limit fired)."""
    results = isolated_rank_pool(4).run("reliability_group_cases:mismatch_ends_within_default_timeout", timeout=30,
                                     timeout_s=TIMEOUT_S)
    assert results[0]["error"] is not None, results[0]
    assert results[0]["seconds"] < TIMEOUT_S + 10, results[0]


def test_impl_mismatch_ends_within_init_groups_timeout(isolated_rank_pool):
    """One rank zigzag, the other allgather, agreement check off: both end (with an error) within
    init_groups(timeout=)."""
    results = isolated_rank_pool(2).run("reliability_group_cases:impl_mismatch_ends_within_timeout", timeout=30,
                                     timeout_s=TIMEOUT_S)
    for result in results:
        assert result["error"] is not None, results
        assert result["seconds"] < TIMEOUT_S + 10, results


def test_megatron_ring_inner_groups_get_megatrons_timeout(isolated_rank_pool):
    pytest.importorskip("megatron.core")
    results = isolated_rank_pool(2).run("reliability_group_cases:megatron_ring_inner_timeout", timeout=90)
    for result in results:
        assert result["cp"] == 7 * 60, result
        assert result["ours"] == [7 * 60, 7 * 60], result


# -------------------------------------------------------------------------------------------- item 6: from_groups

def test_from_groups_refuses_groups_that_do_not_form_a_grid(rank_pool):
    results = _same_everywhere(rank_pool(4).run("reliability_group_cases:from_groups_cases", timeout=60))
    for ok in ("ulysses_inner", "ring_inner", "dp_blocks", "with_sp"):
        assert results[ok] is None, (ok, results[ok])
    expected = {
        "ring_mixes_ulysses_ranks": "mixes ulysses ranks",
        "ring_equals_ulysses": "must share exactly",
        "uneven_sizes": "same degrees",
        "ring_spans_blocks": "must share exactly",
        "world_twice": "must share exactly",
        "sp_not_the_grid": "is not its grid",
    }
    for case, words in expected.items():
        assert results[case] is not None and words in results[case], (case, results[case])


def test_from_groups_refuses_the_issues_cases(rank_pool):
    results = _same_everywhere(rank_pool(4).run("reliability_group_cases:from_groups_garbage_is_refused", timeout=60))
    assert results["world_twice"].startswith("USPGroups.from_groups"), results
    assert "mixes ulysses ranks" in results["ring_mixes"], results


# -------------------------------------------------------------------------------------------- item 7: agreement

@pytest.mark.parametrize("grid,odd_ranks", [((2, 2), [3]), ((1, 4), [1, 2])], ids=["u2r2-rank3", "u1r4-ranks12"])
def test_ranks_that_disagree_raise_the_same_error(rank_pool, grid, odd_ranks):
    results = rank_pool(4).run("reliability_group_cases:agreement_cases", timeout=60, ulysses_degree=grid[0],
                               ring_degree=grid[1], odd_ranks=odd_ranks)
    for name in results[0]:
        if name == "local_error":
            continue
        messages = [result[name] for result in results]
        assert messages[0] is not None, (name, "no error")
        assert all(m == messages[0] for m in messages), (name, messages)
    local = [result["local_error"] for result in results]
    for rank, message in enumerate(local):
        if rank == odd_ranks[0]:
            assert message.startswith("ValueError: softmax_scale"), message
        else:
            assert f"rank(s) [{odd_ranks[0]}]" in message and "softmax_scale" in message, message


@pytest.mark.parametrize("grid,odd_ranks", [((2, 2), [3]), ((1, 4), [1, 2])], ids=["u2r2-rank3", "u1r4-ranks12"])
def test_equivalent_calls_are_not_refused(rank_pool, grid, odd_ranks):
    """Issue 24 item 8: the check compares normalised settings (scale as used, window as it acts, micro_q where MQSP
    uses it, partial(f) as f, cu_seqlens as integers from any array-like)."""
    results = rank_pool(4).run("reliability_group_cases:agreement_equivalents", timeout=60, ulysses_degree=grid[0],
                               ring_degree=grid[1], odd_ranks=odd_ranks)
    assert all(all(result.values()) and len(result) == 9 for result in results)


def test_agreement_check_can_be_turned_off(rank_pool):
    results = rank_pool(4).run("reliability_group_cases:agreement_can_be_turned_off", timeout=60)
    assert all(result["default"] is True for result in results)


def test_agreement_check_cost(rank_pool, capsys):
    results = rank_pool(4).run("reliability_group_cases:agreement_cost", timeout=60)
    worst = {key: max(result[key] for result in results) for key in results[0]}
    with capsys.disabled():
        print("\nagreement check, 4 ranks (2 x 2), CPU gloo, us per call:",
              {key: round(value, 1) for key, value in worst.items()})
    assert all(value > 0 for value in worst.values())  # a measurement, not a bound: the machine is shared
