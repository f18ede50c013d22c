"""Probes (not stand-ins): lines the launcher prints so the harness (``tools/check_megatron_patch.py``) can tell what
ran. Their prefix, ``megatron_lm_cpu:``, is the one every launcher line has kept since the launcher's first name: the
harness parses them (its ``USP_PROBE`` and the cases' ``MAX_LOGIT_LINE``)."""
from __future__ import annotations

import functools
import os
from typing import Dict

from ..megatron import grid
from ..megatron.attention import USPAttention
from ..patching import patch

USP_PROBE_PREFIX = "megatron_lm_cpu: USP"


def count_usp_attention_calls() -> Dict[str, int]:
    """Count USPAttention forwards, so a harness can tell USP really ran."""
    calls = {"forward": 0}
    original = USPAttention.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        calls["forward"] += 1
        return original(self, *args, **kwargs)

    USPAttention.forward = forward
    return calls


MAX_LOGIT_PREFIX = "megatron_lm_cpu: max attention logit"


def report_max_attention_logit() -> None:
    """Megatron-LM sends the max attention logit of --qk-clip / --log-max-attention-logit only to TensorBoard / W&B;
    print what ``clip_qk`` returns after every step (rank 0), so a harness can see it."""
    import megatron.training.training as training

    original = getattr(training, "clip_qk", None)
    if original is None:
        return

    @functools.wraps(original)
    def clip_qk(model, *args, **kwargs):
        value = original(model, *args, **kwargs)
        if os.environ.get("RANK", "0") == "0":
            print(f"{MAX_LOGIT_PREFIX}: {value:.6E}", flush=True)
        return value

    patch(training, "clip_qk", clip_qk, owner=__name__)


def usp_probe_line(calls: int) -> str:
    """One line saying whether USP ran on this rank and on which grid."""
    if not grid.usp_is_initialized():
        return f"{USP_PROBE_PREFIX} grid: none; attention calls: {calls}"
    groups = grid.get_usp_groups()
    return (f"{USP_PROBE_PREFIX} grid: u={groups.ulysses_degree} r={groups.ring_degree} "
            f"ring_impl={grid.get_usp_ring_impl()}; attention calls: {calls}")
