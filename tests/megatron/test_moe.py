"""megatron_usp.megatron.moe: the MoE router losses' gradient scale under per-token loss, found by behaviour.
End to end (u=2 x r=2 with EP=2 against the same run without SP): tests/megatron/test_trainer.py and the rehearsal's
MoE cases."""
import pytest
import torch

from megatron_usp.megatron import moe
from megatron_usp.patching import undo_all


@pytest.fixture
def fresh_probe():
    moe.router_losses_scaled_by_tp_cp.cache_clear()
    yield
    undo_all(owner=moe.__name__)
    moe.router_losses_scaled_by_tp_cp.cache_clear()


def test_router_losses_carry_the_tp_cp_factor_after_the_fix(fresh_probe):
    """megatron-core 0.16 leaves the aux loss and z-loss gradients 1 / (TP x CP) as strong under per-token loss
    (both probes False), 0.19 does not (both True): the fix wraps exactly the methods that lack the factor, after
    which both probes hold; a second call wraps nothing."""
    before = moe.router_losses_scaled_by_tp_cp()
    wrapped = moe.fix_router_loss_scaling()
    assert len(wrapped) == sum(not scaled for scaled in before)
    moe.router_losses_scaled_by_tp_cp.cache_clear()
    assert moe.router_losses_scaled_by_tp_cp() == (True, True)
    assert moe.fix_router_loss_scaling() == []


def test_the_fix_scales_the_gradient_not_the_logged_loss():
    """The wrapper multiplies the aux loss AND its coefficient by the tp_cp size: megatron-core logs loss /
    coefficient (unchanged) and back-propagates the loss (scaled); with tp_cp 1 it passes everything through."""
    seen = []

    def attach(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group, reduce_group_has_dp=False,
               valid_token_count=None):
        seen.append((aux_loss_coeff, float(aux_loss), valid_token_count))
        return activation

    wrapped = moe._scale_aux(attach)
    activation = torch.zeros(3, 1)
    for size in (1, 4):
        wrapped(moe._RouterStub(size), activation, 0.5, torch.tensor(2.0), "load_balancing_loss", None,
                valid_token_count=3)
    assert seen == [(0.5, 2.0, 3), (2.0, 8.0, 3)]


@pytest.mark.parametrize("ulysses_degree,ring_degree,expert_model_parallel_size", [(2, 2, 2), (1, 4, 4), (2, 1, 2)])
def test_expert_groups_are_megatron_cores_own(isolated_rank_pool, ulysses_degree, ring_degree,
                                              expert_model_parallel_size):
    """The grid passes expert_model_parallel_size to megatron-core: its expert-parallel, expert-data-parallel and
    expert TP x EP groups are those megatron-core builds without USP for the same CP size (on 4 ranks)."""
    reports = isolated_rank_pool(4).run("megatron_cases:expert_groups_with_and_without_usp", timeout=120,
                                     ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                                     expert_model_parallel_size=expert_model_parallel_size)
    for report in reports:
        assert report["usp"] == report["megatron"], report
        assert len(report["usp"]["ep"]) == expert_model_parallel_size
