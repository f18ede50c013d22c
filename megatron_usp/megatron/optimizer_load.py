"""Loading megatron-core's distributed-optimizer checkpoints: five gaps of megatron-core 0.16, closed at class level
by :func:`fix_distributed_optimizer_load` (idempotent, feature-detected). Not CPU stand-ins: a GPU run without TE /
apex (torch's Adam is megatron-core's fallback then) or in fp32 has them too; the trainer (``megatron_usp.train``) and
``megatron_lm.install()`` (the patched Megatron-LM) apply it on every device. Over TE's or apex's FusedAdam the
torch-Adam parts change nothing.

Over torch's Adam, any format:

* ``sharded_state_dict(is_loading=True)`` reads every parameter's ``step`` / ``exp_avg`` / ``exp_avg_sq``, which
  torch's Adam allocates only at its first step: allocated first (zeros; the load overwrites them, ``step`` comes
  from the checkpoint's param groups).
* ``_set_main_param_and_optimizer_states`` copies every state key from the checkpoint's per-parameter tensors,
  which leave out ``step`` on purpose (``fully_reshardable``, the trainer's format): the copy skips ``step``.
* ``load_state_dict`` gives every parameter the *same* ``step`` tensor, which torch's Adam then increments in place
  once per parameter: every parameter gets its own copy (without it the second step after a resume is wrong:
  measured 8e-3 in the loss).

``dp_reshardable`` (Megatron-LM's default ``--ckpt-format torch_dist``), ``load_parameter_state_from_dp_reshardable``:

* it copies into the main params in grad mode (its ``fs_model_space`` sibling runs under ``@torch.no_grad()``);
  without --bf16/--fp16 the main params are views of the model's parameters, so an fp32 run cannot resume ("a view
  of a leaf Variable that requires grad is being used in an in-place operation"): runs under ``torch.no_grad()``;
* over torch's Adam it keeps each parameter's ``step`` as a ``LocalNonpersistentObject`` (the loading run's own
  value: zero) and copies it over the step ``load_state_dict`` just took from the checkpoint (measured: 1.0e-2 in
  the loss two iterations after a resume): the per-parameter ``step`` entries are dropped
  (:func:`drop_local_steps`), the param groups' step stays.
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
    """Close the five gaps of this module's docstring in ``DistributedOptimizer`` (idempotent)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer, "_usp_load_fixed", False):
        return
    _fix_dp_reshardable_load(DistributedOptimizer)
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
    DistributedOptimizer._usp_load_fixed = True


def _fix_dp_reshardable_load(DistributedOptimizer) -> None:
    load = getattr(DistributedOptimizer, "load_parameter_state_from_dp_reshardable", None)
    if load is None:  # feature, not version
        return

    @functools.wraps(load)
    def load_without_grad_or_local_steps(self, state_dict, *args, **kwargs):
        drop_local_steps(state_dict)
        with torch.no_grad():
            return load(self, state_dict, *args, **kwargs)

    DistributedOptimizer.load_parameter_state_from_dp_reshardable = load_without_grad_or_local_steps


def drop_local_steps(state_dict) -> int:
    """Remove ``step`` from every per-parameter entry of a ``dp_reshardable`` parameter state
    (``{gbuf_idx: {dtype: [[{"param": ..., "exp_avg": ..., "step": ...}, ...] per bucket]}}``); how many."""
    dropped = 0
    for gbuf_idx, per_dtype in (state_dict or {}).items():
        if not isinstance(gbuf_idx, int) or not isinstance(per_dtype, dict):
            continue  # per_bucket_numel, per_bucket_numel_unpadded
        for buckets in per_dtype.values():
            for bucket in buckets:
                for tensors in bucket:
                    if isinstance(tensors, dict) and tensors.pop("step", None) is not None:
                        dropped += 1
    return dropped
