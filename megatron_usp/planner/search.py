"""The attention grid search: every (TP, u, r, ring_impl, micro_q, order) a cluster allows
(:func:`enumerate_configs`), each predicted by the layer model and ranked fastest first (:func:`plan`), with the
divisor and impl helpers the whole-job search shares."""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

from megatron_usp.layout import RING_IMPL_TABLE, RING_IMPLS, ring_local
from megatron_usp.planner.hardware import Hardware
from megatron_usp.planner.layer import Cluster, ModelShape, ParallelConfig, Prediction, predict

IMPL_PREFERENCE = ("zigzag", "stripe", "allgather", "mqsp", "basic")  # tie-break between equal predictions


@functools.lru_cache(maxsize=None)
def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def impl_variants(ring_impls: Sequence[str], ring: int, micro_qs: Sequence[Optional[int]]) -> list[tuple[str, Optional[int]]]:
    """(ring_impl, micro_q) pairs to try; with r == 1 every impl runs the same local attention: the preferred one."""
    if ring == 1:
        return [(sorted(ring_impls, key=lambda i: IMPL_PREFERENCE.index(i) if i in IMPL_PREFERENCE else 99)[0], None)]
    return [(impl, micro_q) for impl in ring_impls
            for micro_q in (micro_qs if RING_IMPL_TABLE[impl].transport == "pass_q" else (None,))]


def document_layouts(shape: ModelShape, ring_impl: str, ring: int) -> tuple[Optional[str], ...]:
    """Document layouts to try for ``ring_impl``: none without documents; with them ring-local and split where the
    impl keeps documents ring-local (layout.ring_local), else split; with r = 1 nothing travels: one."""
    if shape.documents is None:
        return (None,)
    if ring > 1 and ring_local(ring_impl, "local"):
        return ("local", "split")
    return ("local",) if ring == 1 else ("split",)


def enumerate_configs(
    cluster: Cluster, tp_choices: Sequence[int], ring_impls: Sequence[str], dp: int, orders: Sequence[bool],
    micro_qs: Sequence[Optional[int]] = (None,), shape: Optional[ModelShape] = None,
) -> list[ParallelConfig]:
    """Every grid of the cluster; with ``shape.documents`` each in every document layout it can use."""
    configs = []
    for tp in tp_choices:
        if cluster.world % (tp * dp) != 0:
            continue
        sp = cluster.world // (tp * dp)
        for u in _divisors(sp):
            for impl, micro_q in impl_variants(ring_impls, sp // u, micro_qs):
                for inner in orders:
                    if not inner and (u == 1 or sp // u == 1):
                        continue  # the order only matters with both degrees > 1
                    for layout in (document_layouts(shape, impl, sp // u) if shape is not None else (None,)):
                        configs.append(ParallelConfig(tp, u, sp // u, impl, dp, inner, micro_q, layout))
    return configs


def plan(
    shape: ModelShape,
    cluster: Cluster,
    hardware: Hardware,
    *,
    tp_choices: Sequence[int],
    ring_impls: Sequence[str] = RING_IMPLS,
    dp: int = 1,
    orders: Sequence[bool] = (True,),
    other_memory_gib: Optional[float] = None,
    micro_qs: Sequence[Optional[int]] = (None,),
) -> tuple[list[Prediction], list[Prediction]]:
    """(feasible predictions ranked fastest first, infeasible ones with their reasons)."""
    feasible, infeasible = [], []
    for config in enumerate_configs(cluster, tp_choices, ring_impls, dp, orders, micro_qs, shape):
        prediction = predict(shape, cluster, hardware, config, other_memory_gib=other_memory_gib)
        (feasible if prediction.feasible else infeasible).append(prediction)
    # r == 1: every impl runs the same local attention; keep one of them
    seen: dict[tuple, Prediction] = {}
    ranked = []
    for p in sorted(feasible, key=lambda p: (round(p.total_ms, 9), IMPL_PREFERENCE.index(p.config.ring_impl))):
        key = (p.config.tp, p.config.ulysses, p.config.ring, p.config.ulysses_inner, p.config.document_layout)
        if p.config.ring == 1 and key in seen:
            continue
        seen[key] = p
        ranked.append(p)
    return ranked, infeasible
