"""Checkpoint loading for megatron-core's distributed optimizer over torch's Adam (its fallback without TE / apex).

megatron-core 0.16 saves such a run but cannot load it back: two gaps, closed here at class level by
:func:`fix_distributed_optimizer_load` (idempotent; does nothing to an optimizer over TE's or apex's FusedAdam, which
needs neither). Not a CPU stand-in: a GPU run without TE / apex has the same gaps.

* ``sharded_state_dict(is_loading=True)`` reads every parameter's ``step`` / ``exp_avg`` / ``exp_avg_sq``, which
  torch's Adam allocates only at its first step: allocated first (zeros; the load overwrites them, ``step`` comes
  from the checkpoint's param groups).
* ``_set_main_param_and_optimizer_states`` copies every state key from the checkpoint's per-parameter tensors,
  which leave out ``step`` on purpose (``fully_reshardable`` format): the copy skips ``step``.
* ``load_state_dict`` gives every parameter the *same* ``step`` tensor, which torch's Adam then increments in place
  once per parameter: every parameter gets its own copy (without it the second step after a resume is wrong:
  measured 8e-3 in the loss).
"""
from __future__ import annotations

import functools
import inspect

import torch

_TORCH_ADAMS = (torch.optim.Adam, torch.optim.AdamW)


def allocate_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero ``step`` / ``exp_avg`` / ``exp_avg_sq`` for every parameter of a torch Adam that has no state yet."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)


def fix_distributed_optimizer_load() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer, "_usp_torch_adam_fix", False):
        return
    sharded_state_dict = DistributedOptimizer.sharded_state_dict
    signature = inspect.signature(sharded_state_dict)

    @functools.wraps(sharded_state_dict)
    def allocating_sharded_state_dict(self, *args, **kwargs):
        is_loading = signature.bind(self, *args, **kwargs).arguments.get("is_loading", False)
        if is_loading and isinstance(self.optimizer, _TORCH_ADAMS):
            allocate_state(self.optimizer)
        return sharded_state_dict(self, *args, **kwargs)

    set_states = getattr(DistributedOptimizer, "_set_main_param_and_optimizer_states", None)
    if set_states is not None:  # feature, not version: older releases load another way

        @functools.wraps(set_states)
        def set_states_without_step(self, model_param, tensors):
            if not isinstance(self.optimizer, _TORCH_ADAMS) or "step" in tensors:
                return set_states(self, model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None)
            try:
                return set_states(self, model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        DistributedOptimizer._set_main_param_and_optimizer_states = set_states_without_step
    load_state_dict = DistributedOptimizer.load_state_dict

    @functools.wraps(load_state_dict)
    def load_state_dict_with_own_steps(self, *args, **kwargs):
        result = load_state_dict(self, *args, **kwargs)
        if isinstance(self.optimizer, _TORCH_ADAMS):
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        return result

    DistributedOptimizer.sharded_state_dict = allocating_sharded_state_dict
    DistributedOptimizer.load_state_dict = load_state_dict_with_own_steps
    DistributedOptimizer._usp_torch_adam_fix = True
