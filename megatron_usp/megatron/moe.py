"""megatron-core's mixture of experts beside USP: the router losses' gradient under per-token loss.

MoE layers see tokens, not sequences: under USP each rank routes its own shard, and megatron-core already makes the
router's load-balancing statistics whole-sequence (``tokens_per_expert`` and the token count are summed over its
``tp_cp`` group, which is the USP grid). What is per shard is the scale of the router losses' gradient with
``calculate_per_token_loss`` (Megatron-LM's ``--calculate-per-token-loss``, always on in ``megatron_usp.train``):
megatron-core divides every gradient by the global token count (micro-batches x DP x CP x TP shards), and the router
pre-multiplies its aux loss (and z-loss) by the tokens it holds to cancel that. megatron-core 0.16 multiplies by the
local count only, so with CP > 1 (stock CP and USP alike) or TP the router losses pull ``1 / (TP x CP)`` as hard as
in the same run without them; 0.19 also multiplies by ``tp_cp_group.size()``. :func:`fix_router_loss_scaling` gives
releases that lack it 0.19's scaling (found by behaviour: :func:`router_losses_scaled_by_tp_cp`), at class level,
logging unchanged.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

from ..patching import wrap


class _RouterStub:
    """What the router methods read of ``self``, for the probes; everything else reads as None."""

    calculate_per_token_loss = True
    training = True
    layer_number = None  # no logging

    def __init__(self, tp_cp_size: int) -> None:
        self.tp_cp_group = type("Group", (), {"size": staticmethod(lambda: tp_cp_size)})()
        self.config = type("Config", (), {"num_layers": 1, "mtp_num_layers": None, "moe_z_loss_coeff": 1.0})()

    def __getattr__(self, name):
        return None


def _owner(method: str) -> type:
    from megatron.core.transformer.moe.router import TopKRouter

    return next(cls for cls in TopKRouter.__mro__ if method in vars(cls))


def _aux_gradient(tp_cp_size: int) -> float:
    activation = torch.zeros(3, 1, requires_grad=True)
    aux_loss = torch.ones((), requires_grad=True)
    _owner("attach_and_log_load_balancing_loss").attach_and_log_load_balancing_loss(
        _RouterStub(tp_cp_size), activation, 1.0, aux_loss, "usp-probe", None, valid_token_count=3)[0].sum().backward()
    return float(aux_loss.grad)


def _z_gradient(tp_cp_size: int) -> float:
    logits = torch.linspace(-1.0, 1.0, 6).view(3, 2).requires_grad_()
    _owner("apply_z_loss").apply_z_loss(_RouterStub(tp_cp_size), logits).sum().backward()
    return float(logits.grad.abs().sum())


@functools.lru_cache(maxsize=1)
def router_losses_scaled_by_tp_cp() -> tuple[bool, bool]:
    """Whether this megatron-core's aux loss and z-loss gradients (per-token loss) carry the ``tp_cp`` factor:
    probed on a stub router with a ``tp_cp`` group of 1 and of 2 (the same gradient when they do)."""
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    previous = MoEAuxLossAutoScaler.main_loss_backward_scale
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    try:
        aux = _aux_gradient(2) == 2 * _aux_gradient(1)
        z_loss = _z_gradient(2) == _z_gradient(1)
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = previous
    return aux, z_loss


def _scale_aux(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def attach_and_log_load_balancing_loss(self, *args, **kwargs):
        if not self.calculate_per_token_loss or self.tp_cp_group.size() == 1:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        factor = self.tp_cp_group.size()
        # both scaled: the gradient gets the factor, the logged aux_loss / aux_loss_coeff does not
        bound.arguments["aux_loss"] = bound.arguments["aux_loss"] * factor
        bound.arguments["aux_loss_coeff"] = bound.arguments["aux_loss_coeff"] * factor
        return original(*bound.args, **bound.kwargs)

    return attach_and_log_load_balancing_loss


def _scale_z(original: Callable) -> Callable:
    @functools.wraps(original)
    def apply_z_loss(self, *args, **kwargs):
        coefficient = self.config.moe_z_loss_coeff
        if not self.calculate_per_token_loss or coefficient is None or self.tp_cp_group.size() == 1:
            return original(self, *args, **kwargs)
        # the coefficient (read once, at the call) scales the gradient; the logged z_loss / coefficient is unchanged
        self.config.moe_z_loss_coeff = coefficient * self.tp_cp_group.size()
        try:
            return original(self, *args, **kwargs)
        finally:
            self.config.moe_z_loss_coeff = coefficient

    return apply_z_loss


def fix_router_loss_scaling() -> list[str]:
    """Give the router's aux loss and z-loss 0.19's per-token-loss gradient scale where megatron-core lacks it
    (idempotent). Returns the methods wrapped."""
    aux, z_loss = router_losses_scaled_by_tp_cp()
    fixed = []
    for method, scaled, fix in (("attach_and_log_load_balancing_loss", aux, _scale_aux),
                                ("apply_z_loss", z_loss, _scale_z)):
        if not scaled:
            wrap(_owner(method), method, fix, owner=__name__)
            fixed.append(method)
    return fixed
