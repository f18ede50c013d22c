"""The planner against measured runs: rank statistics (:func:`spearman`, :func:`kendall_tau`, the pairs the
measurement itself can order, :func:`resolved_pairs`), the records of ``tools/bench_attention.py`` (per layer,
:func:`compare`) and ``tools/bench_job.py`` (whole job, per iteration, :func:`compare_job`) predicted as given, and
the ``--compare`` report (:func:`format_compare`)."""
from __future__ import annotations

import json
import math
from typing import Optional, Sequence

from megatron_usp.planner.hardware import Hardware
from megatron_usp.planner.job import JobChoice, predict_job
from megatron_usp.planner.layer import Cluster, ModelShape, ParallelConfig, predict


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the (tie-averaged) ranks; nan with < 2 points or no variance."""
    if len(x) != len(y) or len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either list handled); nan with < 2 points or no variance."""
    n = len(x)
    if len(y) != n or n < 2:
        return float("nan")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else float("nan")


def load_bench_records(path: str, mode: Optional[str] = None) -> list[dict]:
    """The records of one mode: "multi-rank" (tools/bench_attention.py) or "job" (tools/bench_job.py); by
    default the file's own mode, "job" if every record is a whole-job record."""
    with open(path) as handle:
        data = json.load(handle)
    records = data.get("records", data) if isinstance(data, dict) else data
    if mode is None:
        mode = "job" if records and all(rec.get("mode") == "job" for rec in records) else "multi-rank"
    return [rec for rec in records if rec.get("mode", "multi-rank") == mode]


def _dtype_name(name: str) -> str:
    return str(name).replace("bfloat16", "bf16").replace("float16", "fp16").replace("float32", "fp32") \
        .replace("float64", "fp64")


def _ranked(rows: list[dict]) -> dict:
    """Rank correlation of the rows' measured_ms vs predicted_ms (rows gain their ranks)."""
    measured = [row["measured_ms"] for row in rows]
    predicted = [row["predicted_ms"] for row in rows]
    for row, m_rank, p_rank in zip(rows, _average_ranks(measured), _average_ranks(predicted)):
        row["measured_rank"], row["predicted_rank"] = m_rank, p_rank
    ratios = sorted(m / p for m, p in zip(measured, predicted) if p > 0)
    return {
        "rows": rows,
        "spearman": spearman(measured, predicted),
        "kendall": kendall_tau(measured, predicted),
        "median_measured_over_predicted": ratios[len(ratios) // 2] if ratios else float("nan"),
        **resolved_pairs(rows),
    }


def resolved_pairs(rows: list[dict]) -> dict:
    """Pairs the measurement itself can order: records that ran several rounds (``rounds_ms``) spread over
    [min, max]; a pair is resolved when its measured medians differ by more than half the sum of the two spreads.
    Returns how many such pairs the prediction orders the same way (empty without rounds)."""
    spreads = []
    for row in rows:
        rounds = row["record"].get("rounds_ms") or []
        if len(rounds) < 2:
            return {}
        spreads.append(max(rounds) - min(rounds))
    resolved = concordant = 0
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            gap = rows[i]["measured_ms"] - rows[j]["measured_ms"]
            if abs(gap) > (spreads[i] + spreads[j]) / 2:
                resolved += 1
                concordant += gap * (rows[i]["predicted_ms"] - rows[j]["predicted_ms"]) > 0
    noise = sorted(spread / row["measured_ms"] for spread, row in zip(spreads, rows))
    return {"resolved_pairs": resolved, "concordant_resolved_pairs": concordant, "pairs": len(rows) * (len(rows) - 1) // 2,
            "median_round_spread": noise[len(noise) // 2]}


def job_from_record(rec: dict, gpus_per_node: Optional[int] = None) -> tuple[ModelShape, Cluster, ParallelConfig,
                                                                           JobChoice]:
    """The whole job a tools/bench_job.py record ran: model shape, cluster, grid and job choice."""
    world = int(rec["world_size"])
    tp, pp = int(rec["tp"]), int(rec["pp"])
    u, r = int(rec["ulysses_degree"]), int(rec["ring_degree"])
    heads = int(rec["heads"])
    shape = ModelShape(heads=heads, kv_heads=int(rec.get("kv_heads", heads)),
                       head_dim=int(rec.get("head_dim", int(rec["hidden"]) // heads)), seq_len=int(rec["seq_len"]),
                       hidden=int(rec["hidden"]), num_layers=int(rec["num_layers"]), dtype=_dtype_name(rec["dtype"]),
                       causal=bool(rec.get("causal", True)), ffn_hidden=int(rec["ffn_hidden"]), vocab=int(rec["vocab"]),
                       gated_mlp=bool(rec.get("swiglu", False)), rmsnorm=bool(rec.get("rmsnorm", False)))
    per_node = gpus_per_node or world
    cluster = Cluster(per_node, max(1, math.ceil(world / per_node)))
    micro_q = rec.get("micro_q")
    config = ParallelConfig(tp, u, r, str(rec["ring_impl"]), 1, bool(rec.get("ulysses_inner", True)),
                            int(micro_q) if micro_q else None)
    choice = JobChoice(pp=pp, dp=world // (tp * pp * u * r), recompute=str(rec.get("recompute", "none")),
                       recompute_method=str(rec.get("recompute_method", "uniform")),
                       recompute_num_layers=int(rec.get("recompute_num_layers", 1)),
                       distributed_optimizer=bool(rec.get("distributed_optimizer", True)),
                       micro_batch=int(rec.get("micro_batch", 1)), global_batch=int(rec["global_batch"]),
                       virtual_stages=int(rec.get("virtual_stages", 1)))
    return shape, cluster, config, choice


def compare_job(records: Sequence[dict], hardware: Hardware, *, gpus_per_node: Optional[int] = None) -> dict:
    """Whole-job ranking check: predict_job's time per iteration of each tools/bench_job.py record (the given
    configuration evaluated, not searched) vs its measured ``time_ms`` per iteration."""
    rows = []
    for rec in records:
        shape, cluster, config, choice = job_from_record(rec, gpus_per_node)
        p = predict_job(shape, cluster, hardware, config, choice, reserve_gib=0.0)
        rows.append({"record": rec, "config": config, "label": p.label(), "measured_ms": float(rec["time_ms"]),
                     "predicted_ms": p.iteration_s * 1e3, "memory_gib": p.memory_gib,
                     "feasible": p.feasible, "reason": p.reason})
    return _ranked(rows)


def compare(
    records: Sequence[dict], hardware: Hardware, *, gpus_per_node: Optional[int] = None, micro_batch: int = 1
) -> dict:
    """Predict each benchmark record's config; rank correlation of predicted vs measured ``time_ms``."""
    rows = []
    for rec in records:
        world = int(rec["world_size"])
        u, r = int(rec["ulysses_degree"]), int(rec["ring_degree"])
        shape = ModelShape(
            heads=int(rec["heads"]), kv_heads=int(rec["kv_heads"]), head_dim=int(rec["head_dim"]),
            seq_len=int(rec["seq_len"]), micro_batch=int(rec.get("batch", rec.get("micro_batch", micro_batch))),
            dtype=str(rec.get("dtype", "bf16")).replace("bfloat16", "bf16").replace("float16", "fp16")
            .replace("float32", "fp32").replace("float64", "fp64"),
            causal=bool(rec["causal"]),
        )
        per_node = gpus_per_node or world
        cluster = Cluster(per_node, max(1, math.ceil(world / per_node)))
        config = ParallelConfig(1, u, r, str(rec["ring_impl"]), dp=max(1, world // (u * r)),
                                ulysses_inner=bool(rec.get("ulysses_inner", True)))
        prediction = predict(shape, cluster, hardware, config, check=False)
        rows.append({"record": rec, "config": config, "measured_ms": float(rec["time_ms"]),
                     "predicted_ms": prediction.total_ms})
    return _ranked(rows)


def format_compare(result: dict) -> str:
    lines = [f"{'meas.#':>6} {'pred.#':>6} {'measured ms':>12} {'predicted ms':>13}  config / problem"]
    for row in sorted(result["rows"], key=lambda row: row["measured_ms"]):
        rec = row["record"]
        if "label" in row:  # a whole-job record
            lines.append(f"{row['measured_rank']:>6g} {row['predicted_rank']:>6g} {row['measured_ms']:>12.1f} "
                         f"{row['predicted_ms']:>13.1f}  {row['label']}")
            continue
        lines.append(
            f"{row['measured_rank']:>6g} {row['predicted_rank']:>6g} {row['measured_ms']:>12.3f} "
            f"{row['predicted_ms']:>13.3f}  u={rec['ulysses_degree']} r={rec['ring_degree']} {rec['ring_impl']} "
            f"{'causal' if rec['causal'] else 'full'} s={rec['seq_len']} h={rec['heads']}/{rec['kv_heads']} "
            f"d={rec['head_dim']} {rec.get('dtype', '')} world={rec['world_size']}"
        )
    lines.append(f"rank correlation, measured vs predicted: Spearman rho = {result['spearman']:.3f}, "
                 f"Kendall tau = {result['kendall']:.3f} over {len(result['rows'])} records; "
                 f"median measured/predicted time = {result['median_measured_over_predicted']:.3g}")
    if "resolved_pairs" in result:
        lines.append(f"pairs the measurement orders (medians apart by more than their rounds' spread): "
                     f"{result['resolved_pairs']} of {result['pairs']}; the prediction orders "
                     f"{result['concordant_resolved_pairs']} of them the same way; median spread of one "
                     f"configuration's rounds = {result['median_round_spread']:.0%} of its time")
    return "\n".join(lines)
