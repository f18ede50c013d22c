"""Benchmark USP attention: per-rank efficiency against monolithic attention, traffic, load balance.

    # (a) real ranks (gloo on CPU, NCCL on GPU): time, TFLOPS per rank, bytes per rank vs analytic, efficiency
    torchrun --nproc-per-node 4 tools/bench_attention.py --mode multi-rank --seq-len 4096 --json runs/bench/mr.json
    # (b) one process runs one rank's whole schedule (real kernels and merges, no comm) for a world of P ranks
    python tools/bench_attention.py --mode simulate-rank --world-size 4 --seq-len 8192 --json runs/bench/sim.json
    # (c) attention work per rank from the schedules: max / mean
    python tools/bench_attention.py --mode balance --world-size 8 --seq-len 65536
    # (d) packed documents: step-synchronous ring cost / ideal, global zigzag layout vs the document layout
    python tools/bench_attention.py --mode balance --documents stdlib lognormal uniform --json docs/bench/balance_documents.json
    # (e) one rank on packed rows vs monolithic varlen attention over the row (same kernel, same varlen path)
    python tools/bench_attention.py --mode simulate-rank --documents stdlib --world-size 4 --seq-len 32768

efficiency = (monolithic time / P) / rank time, with the same kernel, in the same run; 1.0 is perfect scaling.
Prints a markdown table; --json writes a list of records, --png a bar chart.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from megatron_usp.flags import nonnegative_int, positive_int  # noqa: E402
from megatron_usp.kernels import resolve_kernel  # noqa: E402
from megatron_usp.layout import (DOCUMENT_LAYOUTS, RING_SCHEDULE_IMPLS, check_seq_len, ring_documents_of,  # noqa: E402
                                 ring_local)
from megatron_usp.document_mixes import (  # noqa: E402
    LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA, UNIFORM_RANGE, document_source, packed_rows, source_detail, source_label,
)
from megatron_usp.plan import attention_plan  # noqa: E402
from megatron_usp.timing import CLOCKS, peak_memory, time_rounds, time_rounds_clocks  # noqa: E402
from megatron_usp.simulate import RankProblem, attention_pairs, monolithic_step, rank_step  # noqa: E402
from megatron_usp.cost import (analytic_bytes_per_rank, attention_flops, block_pairs, document_pairs,  # noqa: E402
                                document_runs, document_work, piece_work, run_pairs, step_synchronous_cost,
                                visible_pairs)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
          "float": torch.float32, "half": torch.float16, "double": torch.float64}  # fp*/bf16 and torch's names


def step_flops(batch: int, seq_len: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward + backward FLOPs of attention (backward 2.5× forward)."""
    return 3.5 * attention_flops(batch, seq_len, heads, head_dim, causal)


def grids(world_size: int, heads: int, kv_heads: int, ulysses_degree) -> list[tuple[int, int]]:
    """(u, r) pairs to run: the given ulysses degree, or every u dividing the world that the heads allow."""
    from megatron_usp.ulysses import check_head_counts

    candidates = [ulysses_degree] if ulysses_degree else [u for u in range(1, world_size + 1) if world_size % u == 0]
    result = []
    for u in candidates:
        try:
            check_head_counts(heads, kv_heads, u)
        except ValueError:
            continue
        result.append((u, world_size // u))
    return result


def causal_flags(choice: str) -> list[bool]:
    return {"causal": [True], "non-causal": [False], "both": [True, False]}[choice]


def base_record(args, mode: str, ring_impl: str, causal: bool, u: int, r: int) -> dict:
    return {"mode": mode, "ring_impl": ring_impl, "causal": causal, "ulysses_degree": u, "ring_degree": r,
            "world_size": u * r, "seq_len": args.seq_len, "batch": args.batch, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype,
            "threads": torch.get_num_threads()}


def problem(args, ring_impl: str, causal: bool, u: int, r: int, cu_seqlens=None,
            document_layout: str = "local") -> RankProblem:
    return RankProblem(ring_impl, args.seq_len, args.heads, args.kv_heads, args.head_dim, u, r, causal, args.batch,
                       cu_seqlens=cu_seqlens, document_layout=document_layout)


def ring_bytes(args, ring_impl: str, u: int, r: int, cu: tuple[int, ...], document_layout: str) -> int:
    """The ring's p2p bytes per rank of one forward + backward (analytic; tests check it against the counter): the
    busiest ring rank's."""
    return max(analytic_bytes_per_rank(
        batch=args.batch, seq_len=len_of(cu), heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        dtype=DTYPES[args.dtype], ulysses_degree=u, ring_degree=r, ring_impl=ring_impl, cu_seqlens=cu,
        document_layout=document_layout, ring_rank=j).get("ring_p2p", 0) for j in range(r))


def ring_traffic(args, ring_impl: str, u: int, r: int, cu: tuple[int, ...], layout: str) -> dict:
    """``ring_bytes_per_rank`` of ``layout`` and its ratio to the split layout's, for one row."""
    sent = ring_bytes(args, ring_impl, u, r, cu, layout)
    split = sent if layout == "split" else ring_bytes(args, ring_impl, u, r, cu, "split")
    return {"ring_bytes_per_rank": sent, "ring_bytes_vs_split": sent / max(1, split)}


def len_of(cu: tuple[int, ...]) -> int:
    return cu[-1]


def projection(args, ring_impl: str, u: int, r: int, cu: tuple[int, ...], layout: str) -> dict:
    """``h100_projected_ms`` of the ring and ``h100_projected_efficiency`` (one GPU running the whole row, over P,
    against it) for one row; empty where the model does not apply."""
    ring = projected_ms(args, ring_impl, u, r, cu, layout)
    if ring is None:
        return {}
    return {"h100_projected_ms": ring,
            "h100_projected_efficiency": projected_ms(args, "zigzag", 1, 1, cu, layout) / (u * r) / ring}


def layouts_of(args) -> list[tuple[str, str]]:
    """(ring_impl, document_layout) pairs to measure: an impl that keeps the split layout whatever it is asked
    (allgather, mqsp) is measured once, as split."""
    return [(impl, layout) for impl in args.ring_impls for layout in args.document_layouts
            if layout == "split" or ring_local(impl, layout)]


def projected_ms(args, ring_impl: str, u: int, r: int, cu: tuple[int, ...], document_layout: str,
                 gpu: str = "h100") -> float:
    """The attention's fwd + bwd on one ring of ``gpu``s (the planner's preset: TFLOPS, kernel efficiency by block
    keys, per-call overhead, NVLink bandwidth and latency), bf16, from the plan's pieces: each step lasts as long as
    its slowest rank's kernels (one varlen call per kind) or its incoming transfer, whichever is longer. None for
    pass-Q (mqsp), whose chunks this model does not cover."""
    from megatron_usp.planner.hardware import PRESETS
    from megatron_usp.planner.layer import BACKWARD_FLOPS_FACTOR, kernel_efficiency

    hardware = PRESETS[gpu]
    heads = args.heads // u
    flops_per_pair = 4.0 * heads * args.head_dim * args.batch
    from megatron_usp.ulysses import kv_replication

    row_bytes = 2 * args.batch * args.kv_heads * kv_replication(args.kv_heads, u) // u * args.head_dim * 2  # K, V
    plans = [attention_plan(len_of(cu), u, r, j, ring_impl, True, None, cu, document_layout) for j in range(r)]
    if plans[0].schedule is None:
        return None
    total = 0.0
    for factor, tflops, grad_rows in ((1.0, hardware.fwd_tflops, 0), (BACKWARD_FLOPS_FACTOR, hardware.bwd_tflops, 2)):
        for index in range(r):
            compute, transfer = [], []
            for j, plan in enumerate(plans):
                step = plan.schedule.steps[index]
                kinds = {b.causal for b in step.blocks}
                compute.append(sum(block_pairs(b.q_stop - b.q_start, b.kv_stop - b.kv_start, b.causal)
                                   * flops_per_pair * factor / (tflops * 1e12 * kernel_efficiency(
                                       (b.q_stop - b.q_start, b.kv_stop - b.kv_start, b.causal),
                                       hardware.half_efficiency_tokens)) for b in step.blocks) * 1e3
                               + len(kinds) * hardware.kernel_overhead_us / 1e3)
                rows = len(plan.schedule.kv_positions(step)) if index > 0 else 0
                transfer.append(rows * row_bytes * (1 + grad_rows) / (hardware.intra_node_gbps * 1e9) * 1e3
                                + (hardware.intra_latency_us / 1e3 if rows else 0.0))
            total += max(max(compute), max(transfer))
    return total


def run_balance(args) -> list[dict]:
    records = []
    for u, r in grids(args.world_size, args.heads, args.kv_heads, args.ulysses_degree):
        for ring_impl in args.ring_impls:
            check_seq_len(args.seq_len, u, r, ring_impl)
            for causal in causal_flags(args.causal):
                work = [attention_pairs(problem(args, ring_impl, causal, u, r), rank) for rank in range(r)]
                records.append({**base_record(args, "balance", ring_impl, causal, u, r), "pairs_per_rank": work,
                                "max_over_mean": max(work) / statistics.mean(work)})
    return records


# ---------------------------------------------------------------------------------------------------------------
# Packed documents: rows of S tokens packed from random documents of a length source.

def old_layout_computed(seq_len: int, u: int, r: int, ring_impl: str, cu: tuple[int, ...],
                        positions: list[torch.Tensor]) -> list[list[int]]:
    """``[j][s]``: pairs ring rank j COMPUTES at step s when documents are only a mask on the global layout (what
    usp_attn(document_ids=...) does): a block the documents do not touch is skipped, a block inside one document
    runs as scheduled (a causal square counts n (n + 1) / 2), any other block runs with a mask over its whole
    area."""
    cu_tensor = torch.tensor(cu)
    result = []
    for j in range(r):
        schedule = attention_plan(seq_len, u, r, j, ring_impl, True, None, None).schedule
        row = []
        for step in schedule.steps:
            work = 0
            for block in step.blocks:
                q, kv = positions[j][block.q], positions[step.kv_rank][block.kv]
                if len(q) == 0 or len(kv) == 0 or visible_pairs(q, kv, cu) == 0:
                    continue
                low, high = min(int(q.min()), int(kv.min())), max(int(q.max()), int(kv.max()))
                docs = torch.searchsorted(cu_tensor, torch.tensor([low, high]), right=True)
                rows, cols = block.q_stop - block.q_start, block.kv_stop - block.kv_start
                work += block_pairs(rows, cols, block.causal) if docs[0] == docs[1] else rows * cols
            row.append(work)
        result.append(row)
    return result


def new_layout_computed(seq_len: int, u: int, r: int, ring_impl: str, cu: tuple[int, ...],
                        document_layout: str, pieces: bool = False) -> list[list[int]]:
    """``[j][s]``: pairs of the pieces the engine computes with ``cu_seqlens`` (document layout), step by step as
    the executor runs them (ring-local: the own step holds the local documents); with ``pieces`` each piece's
    fixed cost too (:func:`megatron_usp.cost.piece_work`)."""
    steps = [attention_plan(seq_len, u, r, j, ring_impl, True, None, cu, document_layout).schedule.steps
             for j in range(r)]
    if pieces:
        return [[piece_work(step.blocks) for step in rank_steps] for rank_steps in steps]
    return [[sum(block_pairs(b.q_stop - b.q_start, b.kv_stop - b.kv_start, b.causal) for b in step.blocks)
             for step in rank_steps] for rank_steps in steps]


def _visible_by_step(seq_len: int, u: int, r: int, ring_impl: str, cu: tuple[int, ...], layout_cu,
                     document_layout: str) -> list[list[int]]:
    """``[j][s]``: visible pairs of ring rank j's rows with the K/V rows its step s sees."""
    plans = [attention_plan(seq_len, u, r, j, ring_impl, True, None, layout_cu, document_layout) for j in range(r)]
    runs = [document_runs(p, cu) for p in plans[0].positions]
    return [[run_pairs(runs[j], document_runs(plans[j].schedule.kv_positions(step), cu))
             for step in plans[j].schedule.steps] for j in range(r)]


def row_balance(seq_len: int, u: int, r: int, ring_impl: str, cu: tuple[int, ...], document_layout: str) -> dict:
    """Step-synchronous cost / ideal of one packed row on a u x r grid, old (global) and new (document) layout:
    from visible pairs (counted analytically per document from position runs) and from computed pairs."""
    total = document_pairs(cu)
    result = {"documents": len(cu) - 1, "max_document": max(b - a for a, b in zip(cu, cu[1:]))}
    for name, layout_cu in (("old", None), ("new", cu)):
        positions = attention_plan(seq_len, u, r, 0, ring_impl, True, None, layout_cu).positions
        visible = _visible_by_step(seq_len, u, r, ring_impl, cu, layout_cu, document_layout)
        if sum(map(sum, visible)) != total:
            raise AssertionError(f"{name} layout: visible pairs {sum(map(sum, visible))} != {total} of the row")
        if name == "old":
            computed = old_layout_computed(seq_len, u, r, ring_impl, cu, positions)
        else:
            computed = new_layout_computed(seq_len, u, r, ring_impl, cu, document_layout)
        result[f"{name}_cost"] = step_synchronous_cost(visible)
        # computed work, each step as long as its busiest rank, over the same ideal (visible pairs / r)
        result[f"{name}_computed_cost"] = sum(max(computed[j][s] for j in range(r)) for s in range(r)) / (total / r)
        result[f"{name}_computed_over_visible"] = sum(map(sum, computed)) / total
        if name == "new":
            result["new_pieces_equal_visible"] = computed == visible
            # what the executor's time follows: each step's pairs plus a fixed cost per kernel piece, against the
            # monolithic run's (one piece per document) over r
            timed = new_layout_computed(seq_len, u, r, ring_impl, cu, document_layout, pieces=True)
            result["new_piece_cost"] = sum(max(timed[j][s] for j in range(r)) for s in range(r)) / (
                document_work(cu) / r)
    return result


def run_balance_documents(args) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny tensor ops: intra-op threads only add overhead (5x measured)
    try:
        return _balance_documents(args)
    finally:
        torch.set_num_threads(threads)


def _balance_documents(args) -> list[dict]:
    records = []
    for source in args.documents:
        for seq_len in args.seq_lens:
            rows = packed_rows(source, seq_len, args.rows, args.seed)
            for world_size in args.world_sizes:
                for u in args.ulysses_degrees:
                    if world_size % u:
                        continue
                    r = world_size // u
                    for ring_impl, layout in layouts_of(args):
                        check_seq_len(seq_len, u, r, ring_impl)
                        started = time.perf_counter()
                        per_row = [row_balance(seq_len, u, r, ring_impl, cu, layout) for cu in rows]
                        record = {"mode": "balance", "documents": source_label(source),
                                  "documents_detail": source_detail(source), "ring_impl": ring_impl,
                                  "document_layout": layout,
                                  "causal": True, "world_size": world_size, "ulysses_degree": u, "ring_degree": r,
                                  "seq_len": seq_len, "rows": len(rows), "seed": args.seed}
                        for key in ("old_cost", "new_cost", "old_computed_cost", "new_computed_cost",
                                    "new_piece_cost", "old_computed_over_visible", "new_computed_over_visible"):
                            values = [row[key] for row in per_row]
                            record[f"{key}_median"] = statistics.median(values)
                            record[f"{key}_worst"] = max(values)
                        record["new_pieces_equal_visible"] = all(row["new_pieces_equal_visible"] for row in per_row)
                        # the planner's H100 model on the same rows (--heads / --kv-heads / --head-dim, bf16)
                        projected = [projection(args, ring_impl, u, r, cu, layout) for cu in rows]
                        record.update({key: statistics.median(p[key] for p in projected) for key in
                                       ("h100_projected_ms", "h100_projected_efficiency") if key in projected[0]})
                        record["ring_bytes_vs_split"] = statistics.median(
                            ring_traffic(args, ring_impl, u, r, cu, layout)["ring_bytes_vs_split"] for cu in rows)
                        record["documents_per_row"] = [row["documents"] for row in per_row]
                        record["max_document"] = [row["max_document"] for row in per_row]
                        record["per_row"] = {key: [row[key] for row in per_row] for key in
                                             ("old_cost", "new_cost", "old_computed_cost", "new_computed_cost",
                                              "new_piece_cost")}
                        record["seconds"] = time.perf_counter() - started
                        records.append(record)
    return records


def run_simulate(args, device: torch.device) -> list[dict]:
    dtype = DTYPES[args.dtype]
    kernel = resolve_kernel(args.backend, device, dtype, args.head_dim)
    records = []
    for causal in causal_flags(args.causal):
        steps = {"monolithic": monolithic_step(problem(args, "basic", causal, 1, 1), kernel, dtype, device)}
        cases = []
        for u, r in grids(args.world_size, args.heads, args.kv_heads, args.ulysses_degree):
            for ring_impl in args.ring_impls:
                check_seq_len(args.seq_len, u, r, ring_impl)
                spec = problem(args, ring_impl, causal, u, r)
                ranks = range(r) if args.all_ranks or ring_impl == "basic" or not causal else sorted({0, r - 1})
                cases.append((ring_impl, u, r, list(ranks)))
                for rank in ranks:
                    steps[(ring_impl, u, r, rank)] = rank_step(spec, rank, kernel, dtype, device)
        rounds = time_rounds(steps, args.repeats, args.warmup, device, args.clock)
        peak = {name: peak_memory(step, device) for name, step in steps.items()}
        monolithic = statistics.median(times["monolithic"] for times in rounds)
        for ring_impl, u, r, ranks in cases:
            rank_times = {rank: statistics.median(times[(ring_impl, u, r, rank)] for times in rounds) for rank in ranks}
            # a step lasts as long as its slowest rank; efficiency per round, then the median over rounds
            efficiency = statistics.median(
                times["monolithic"] / (u * r) / max(times[(ring_impl, u, r, rank)] for rank in ranks) for times in rounds
            )
            slowest = max(rank_times.values())
            records.append({
                **base_record(args, "simulate-rank", ring_impl, causal, u, r), "kernel": kernel.name,
                "monolithic_ms": 1e3 * monolithic, "rank_ms": {str(k): 1e3 * t for k, t in rank_times.items()},
                "time_ms": 1e3 * slowest, "efficiency": efficiency,
                "tflops_per_rank": step_flops(args.batch, args.seq_len, args.heads, args.head_dim, causal)
                / (u * r) / slowest / 1e12,
            })
            if peak["monolithic"] is not None:  # GPU: peak bytes (inputs held + transients) vs monolithic / P
                rank_peak = max(peak[(ring_impl, u, r, rank)] for rank in ranks)
                records[-1].update(peak_memory_mib=rank_peak / 2**20,
                                   memory_vs_monolithic_per_rank=rank_peak * u * r / peak["monolithic"])
    return records


def _round_efficiency(rounds: list[dict], case: tuple, r: int) -> float:
    """Median over rounds of (monolithic / P) / the round's slowest rank of ``case`` (ring_impl, u, r, layout)."""
    u = case[1]
    return statistics.median(times["monolithic"] / (u * r) / max(times[(*case, rank)] for rank in range(r))
                             for times in rounds)


def run_simulate_documents(args, device: torch.device) -> list[dict]:
    """simulate-rank on packed rows (the first --documents source): every ring rank of each grid against
    monolithic attention over the whole row with the same kernel and the same varlen path (usp_attn's u = r = 1
    with cu_seqlens). Per row: efficiency per round = (monolithic / P) / slowest rank, median over rounds; the
    record reports the median and the worst over rows."""
    dtype = DTYPES[args.dtype]
    kernel = resolve_kernel(args.backend, device, dtype, args.head_dim)
    source = args.documents[0]
    rows = packed_rows(source, args.seq_len, args.rows, args.seed)
    records = {}
    for causal in causal_flags(args.causal):
        for row, cu in enumerate(rows):
            steps = {"monolithic": monolithic_step(problem(args, "zigzag", causal, 1, 1, cu), kernel, dtype, device)}
            cases = []
            for u, r in grids(args.world_size, args.heads, args.kv_heads, args.ulysses_degree):
                for ring_impl, layout in layouts_of(args):
                    check_seq_len(args.seq_len, u, r, ring_impl)
                    cases.append((ring_impl, u, r, layout))
                    for rank in range(r):  # documents: no rank bounds the others, time them all
                        steps[(ring_impl, u, r, layout, rank)] = rank_step(
                            problem(args, ring_impl, causal, u, r, cu, layout), rank, kernel, dtype, device)
            clocks = ("wall",) if device.type == "cuda" else ("wall", "cpu")
            by_clock = time_rounds_clocks(steps, args.repeats, args.warmup, device,
                                          tuple(dict.fromkeys((args.clock,) + clocks)))
            rounds = by_clock[args.clock]
            for ring_impl, u, r, layout in cases:
                case = (ring_impl, u, r, layout)
                slowest = [max(times[(*case, rank)] for rank in range(r)) for times in rounds]
                record = records.setdefault((causal, *case), {
                    **base_record(args, "simulate-rank", ring_impl, causal, u, r), "kernel": kernel.name,
                    "document_layout": layout,
                    "documents": source_label(source), "documents_detail": source_detail(source),
                    "rows": len(rows), "seed": args.seed, "repeats": args.repeats, "clock": args.clock,
                    "per_row": []})
                record["per_row"].append({
                    "documents": len(cu) - 1, "max_document": max(b - a for a, b in zip(cu, cu[1:])),
                    "cut_documents": (ring_documents_of(cu, r, ring_impl).cut_documents
                                      if ring_local(ring_impl, layout) else len(cu) - 1),
                    **ring_traffic(args, ring_impl, u, r, cu, layout),
                    **projection(args, ring_impl, u, r, cu, layout),
                    "monolithic_ms": 1e3 * statistics.median(times["monolithic"] for times in rounds),
                    "rank_ms": {str(rank): 1e3 * statistics.median(times[(*case, rank)] for times in rounds)
                                for rank in range(r)},
                    "time_ms": 1e3 * statistics.median(slowest),
                    "efficiency": statistics.median(times["monolithic"] / (u * r) / slow
                                                    for times, slow in zip(rounds, slowest)),
                    # noise on a shared machine only adds time: each step's best round, then the slowest rank
                    "efficiency_best_rounds": min(times["monolithic"] for times in rounds) / (u * r)
                    / max(min(times[(*case, rank)] for times in rounds) for rank in range(r)),
                    "rounds_ms": {clock: [{"monolithic": 1e3 * times["monolithic"],
                                           **{str(rank): 1e3 * times[(*case, rank)] for rank in range(r)}}
                                          for times in clock_rounds] for clock, clock_rounds in by_clock.items()},
                })
                for clock, clock_rounds in by_clock.items():
                    if clock != args.clock:
                        record["per_row"][-1][f"efficiency_{clock}_clock"] = _round_efficiency(clock_rounds, case, r)
    for record in records.values():
        per_row = record["per_row"]
        record.update(ring_bytes_per_rank=statistics.median(x["ring_bytes_per_rank"] for x in per_row),
                      **{key: statistics.median(x[key] for x in per_row) for key in
                         ("h100_projected_ms", "h100_projected_efficiency") if key in per_row[0]},
                      ring_bytes_vs_split=statistics.median(x["ring_bytes_vs_split"] for x in per_row),
                      cut_documents=statistics.median(x["cut_documents"] for x in per_row),
                      monolithic_ms=statistics.median(x["monolithic_ms"] for x in per_row),
                      time_ms=statistics.median(x["time_ms"] for x in per_row),
                      efficiency=statistics.median(x["efficiency"] for x in per_row),
                      efficiency_worst=min(x["efficiency"] for x in per_row),
                      efficiency_best_rounds=statistics.median(x["efficiency_best_rounds"] for x in per_row))
        other = [key for key in per_row[0] if key.startswith("efficiency_") and key.endswith("_clock")]
        record.update({key: statistics.median(x[key] for x in per_row) for key in other})
    return list(records.values())


def _yunchang_ulysses(group, causal: bool):
    """yunchang's Ulysses attention (its only path that is correct without flash-attn), or None."""
    try:
        from yunchang import UlyssesAttention
    except ImportError:
        return None

    attention = UlyssesAttention(group, scatter_idx=2, gather_idx=1)
    return lambda q, k, v: attention(q, k, v, causal=causal)


def run_multi_rank(args, device: torch.device) -> list[dict]:
    import torch.distributed as dist

    import megatron_usp as usp
    from megatron_usp.comm import count_traffic

    dtype = DTYPES[args.dtype]
    world, rank = dist.get_world_size(), dist.get_rank()
    kernel = resolve_kernel(args.backend, device, dtype, args.head_dim)
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(args.batch, args.seq_len, h, args.head_dim, generator=gen).to(device, dtype)
            for h in (args.heads, args.kv_heads, args.kv_heads, args.heads)]
    grid_groups = {(u, r): usp.init_groups(u, r) for u, r in grids(world, args.heads, args.kv_heads,
                                                                     args.ulysses_degree)}

    def usp_step(groups, ring_impl: str, causal: bool) -> Callable[[], None]:
        q, k, v, dout = (usp.shard(x, groups, dim=1, ring_impl=ring_impl).requires_grad_(i < 3)
                         for i, x in enumerate(full))

        def step() -> None:
            usp.usp_attn(q, k, v, groups, causal=causal, ring_impl=ring_impl, backend=args.backend).backward(dout)

        return step

    def together(step: Callable[[], None]) -> Callable[[], None]:
        def synchronised() -> None:  # every rank starts the step at once; the step ends with its slowest rank
            dist.barrier()
            step()

        return synchronised

    records = []
    for causal in causal_flags(args.causal):
        # every rank runs the whole sequence at once: the same contention as the parallel run
        steps = {"monolithic": monolithic_step(problem(args, "basic", causal, 1, 1), kernel, dtype, device)}
        sent = {}
        for (u, r), groups in grid_groups.items():
            for ring_impl in args.ring_impls:
                check_seq_len(args.seq_len, u, r, ring_impl)
                steps[(ring_impl, u, r)] = usp_step(groups, ring_impl, causal)
                with count_traffic() as counter:
                    steps[(ring_impl, u, r)]()
                sent[(ring_impl, u, r)] = counter.total_bytes
        yunchang = _yunchang_ulysses(dist.group.WORLD, causal)
        if yunchang is not None and args.heads % world == 0:
            q, k, v, dout = (x.chunk(world, dim=1)[rank].contiguous().requires_grad_(i < 3)
                             for i, x in enumerate(full))
            steps[("yunchang-ulysses", world, 1)] = lambda: yunchang(q, k, v).backward(dout)
        rounds = time_rounds({name: together(step) for name, step in steps.items()}, args.repeats, args.warmup,
                             device)
        names = list(rounds[0])
        local = torch.tensor([[times[name] for name in names] for times in rounds], dtype=torch.float64, device=device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)  # each step, each round: its slowest rank
        rounds = [dict(zip(names, row.tolist())) for row in local.cpu()]
        monolithic = statistics.median(times["monolithic"] for times in rounds)
        flops = step_flops(args.batch, args.seq_len, args.heads, args.head_dim, causal)
        for name in names:
            if name == "monolithic":
                continue
            ring_impl, u, r = name
            seconds = statistics.median(times[name] for times in rounds)
            record = {
                **base_record(args, "multi-rank", ring_impl, causal, u, r), "kernel": kernel.name,
                "backend": dist.get_backend(), "monolithic_ms": 1e3 * monolithic, "time_ms": 1e3 * seconds,
                "efficiency": statistics.median(times["monolithic"] / world / times[name] for times in rounds),
                "tflops_per_rank": flops / world / seconds / 1e12,
            }
            if name in sent:
                bytes_sent = torch.tensor([sent[name]], dtype=torch.float64, device=device)
                dist.all_reduce(bytes_sent, op=dist.ReduceOp.MAX)
                analytic = sum(analytic_bytes_per_rank(
                    batch=args.batch, seq_len=args.seq_len, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, dtype=dtype, ulysses_degree=u, ring_degree=r, ring_impl=ring_impl,
                ).values())
                record.update(bytes_per_rank=int(bytes_sent.item()), bytes_analytic=analytic,
                              bytes_ratio=bytes_sent.item() / analytic if analytic else 1.0)
            records.append(record)
    if rank == 0 and _yunchang_ulysses(dist.group.WORLD, True) is None:
        print("yunchang: not installed, skipped (pip install yunchang to compare its Ulysses attention)", flush=True)
    return records


def run_multi_rank_documents(args, device: torch.device) -> list[dict]:
    """fwd + bwd of ``usp_attn`` on packed rows (the first --documents source) on the launcher's ranks, split vs
    ring-local document layout, interleaved rounds (each round: every case once, every rank starting together, a
    case lasting as long as its slowest rank); per row the median over rounds, then the median and worst ratio
    split / local over rows. Bytes: counted p2p bytes per rank (the busiest) and whether they equal the analytic
    count."""
    import torch.distributed as dist

    import megatron_usp as usp
    from megatron_usp.comm import count_traffic

    dtype = DTYPES[args.dtype]
    world = dist.get_world_size()
    rows = packed_rows(args.documents[0], args.seq_len, args.rows, args.seed)
    records = []
    for u, r in grids(world, args.heads, args.kv_heads, args.ulysses_degree):
        groups = usp.init_groups(u, r)
        for ring_impl in args.ring_impls:
            check_seq_len(args.seq_len, u, r, ring_impl)
            per_row = []
            for row_index, cu in enumerate(rows):
                gen = torch.Generator().manual_seed(row_index)
                full = [torch.randn(args.batch, args.seq_len, h, args.head_dim, generator=gen).to(device, dtype)
                        for h in (args.heads, args.kv_heads, args.kv_heads, args.heads)]
                steps, counted = {}, {}
                for layout in ("split", "local"):
                    where = dict(ring_impl=ring_impl, cu_seqlens=cu, document_layout=layout)
                    q, k, v, dout = (usp.shard(x, groups, dim=1, **where).requires_grad_(i < 3)
                                     for i, x in enumerate(full))

                    def step(q=q, k=k, v=v, dout=dout, where=where) -> None:
                        dist.barrier()
                        usp.usp_attn(q, k, v, groups, causal=True, backend=args.backend, check_agreement=False,
                                     **where).backward(dout)

                    steps[layout] = step
                    with count_traffic() as counter:
                        step()
                    analytic = analytic_bytes_per_rank(
                        batch=args.batch, seq_len=args.seq_len, heads=args.heads, kv_heads=args.kv_heads,
                        head_dim=args.head_dim, dtype=dtype, ulysses_degree=u, ring_degree=r, ring_impl=ring_impl,
                        cu_seqlens=cu, document_layout=layout, ring_rank=groups.ring_rank).get("ring_p2p", 0)
                    counted[layout] = (counter.bytes_sent.get("ring_p2p", 0), analytic)
                # the split layout is the reference each round times first and last (time_rounds' "monolithic")
                rounds = time_rounds({"monolithic": steps["split"], "local": steps["local"]}, args.repeats,
                                     args.warmup, device)
                rounds = [{"split": times["monolithic"], "local": times["local"]} for times in rounds]
                names = list(rounds[0])
                table = torch.tensor([[times[name] for name in names] for times in rounds], dtype=torch.float64)
                dist.all_reduce(table, op=dist.ReduceOp.MAX)  # each case, each round: its slowest rank
                sent = torch.tensor([[counted[name][0], counted[name][0] == counted[name][1]] for name in names],
                                    dtype=torch.float64)
                dist.all_reduce(sent[:, 0], op=dist.ReduceOp.MAX)
                dist.all_reduce(sent[:, 1], op=dist.ReduceOp.MIN)
                times = {name: statistics.median(table[:, i].tolist()) for i, name in enumerate(names)}
                per_row.append({"documents": len(cu) - 1, "split_ms": 1e3 * times["split"],
                                "local_ms": 1e3 * times["local"],
                                "speedup": statistics.median((table[:, 0] / table[:, 1]).tolist()),
                                "split_bytes_per_rank": int(sent[0, 0]), "local_bytes_per_rank": int(sent[1, 0]),
                                "bytes_counted_equal_analytic": bool(sent[:, 1].min() == 1)})
            record = {**base_record(args, "multi-rank", ring_impl, True, u, r), "backend": dist.get_backend(),
                      "documents": source_label(args.documents[0]),
                      "documents_detail": source_detail(args.documents[0]), "rows": len(rows), "seed": args.seed,
                      "per_row": per_row}
            for key in ("split_ms", "local_ms", "speedup", "split_bytes_per_rank", "local_bytes_per_rank"):
                record[key] = statistics.median(row[key] for row in per_row)
            record["speedup_worst"] = min(row["speedup"] for row in per_row)
            record["bytes_counted_equal_analytic"] = all(row["bytes_counted_equal_analytic"] for row in per_row)
            records.append(record)
    return records


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(spec: dict) -> dict:
    """One rank's simulated forward + backward in this (fresh) process: peak memory above the pre-input baseline.
    CPU: the kernel's peak resident set (VmHWM, reset through /proc/self/clear_refs once the inputs exist);
    CUDA: torch.cuda.max_memory_allocated."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = DTYPES[spec["dtype"]]
    kernel = resolve_kernel(spec["backend"], device, dtype, spec["head_dim"])
    spec_problem = RankProblem(spec["ring_impl"], spec["seq_len"], spec["heads"], spec["kv_heads"], spec["head_dim"],
                               1, spec["world_size"], True, spec["batch"], spec["micro_q"])
    if device.type == "cuda":
        step = rank_step(spec_problem, spec["world_size"] - 1, kernel, dtype, device)
        return {"peak_mib": peak_memory(step, device) / 2**20, "input_mib": step.input_bytes / 2**20,
                "measure": "torch.cuda.max_memory_allocated"}
    baseline = _rss_kib("VmRSS")
    step = rank_step(spec_problem, spec["world_size"] - 1, kernel, dtype, device)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak RSS to the current RSS
    step()
    return {"peak_mib": (_rss_kib("VmHWM") - baseline) / 1024, "input_mib": step.input_bytes / 2**20,
            "measure": "peak RSS (VmHWM after clear_refs) above the RSS before the inputs, fresh process"}


def run_memory(args) -> list[dict]:
    """Peak memory of one rank against sequence length: zigzag, mqsp without micro-chunks, mqsp with them."""
    import subprocess

    configs = [("zigzag", None), ("mqsp", None), ("mqsp", args.micro_q)]
    records = []
    for seq_len in args.seq_lens:
        for ring_impl, micro_q in configs:
            check_seq_len(seq_len, 1, args.world_size, ring_impl)
            spec = dict(ring_impl=ring_impl, micro_q=micro_q, seq_len=seq_len, world_size=args.world_size,
                        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, batch=args.batch,
                        dtype=args.dtype, backend=args.backend)
            result = subprocess.run([sys.executable, __file__, "--memory-probe", json.dumps(spec)],
                                    capture_output=True, text=True, check=True)
            probe = json.loads(result.stdout.strip().splitlines()[-1])
            records.append({**base_record(args, "memory", ring_impl, True, 1, args.world_size),
                            "seq_len": seq_len, "micro_q": micro_q, **probe})
    return records


COLUMNS = {
    "memory": ["ring_impl", "micro_q", "seq_len", "ring_degree", "input_mib", "peak_mib"],
    "balance": ["ring_impl", "causal", "ulysses_degree", "ring_degree", "max_over_mean"],
    "balance-documents": ["documents", "document_layout", "world_size", "ulysses_degree", "ring_degree", "seq_len",
                          "old_cost_median",
                          "old_cost_worst", "new_cost_median", "new_cost_worst", "old_computed_cost_median",
                          "old_computed_cost_worst", "new_computed_cost_median", "new_computed_cost_worst",
                          "new_piece_cost_median", "new_piece_cost_worst", "ring_bytes_vs_split", "h100_projected_ms",
                          "h100_projected_efficiency"],
    "simulate-rank": ["ring_impl", "causal", "ulysses_degree", "ring_degree", "kernel", "monolithic_ms", "time_ms",
                      "efficiency", "tflops_per_rank"],
    "simulate-rank-documents": ["documents", "document_layout", "ring_impl", "ulysses_degree", "ring_degree",
                                "seq_len", "rows", "cut_documents", "clock", "monolithic_ms", "time_ms", "efficiency",
                                "efficiency_worst", "efficiency_best_rounds", "efficiency_cpu_clock",
                                "ring_bytes_per_rank", "ring_bytes_vs_split", "h100_projected_ms",
                                "h100_projected_efficiency"],
    "multi-rank-documents": ["documents", "ring_impl", "ulysses_degree", "ring_degree", "seq_len", "rows",
                             "split_ms", "local_ms", "speedup", "speedup_worst", "local_bytes_per_rank",
                             "split_bytes_per_rank", "bytes_counted_equal_analytic"],
    "multi-rank": ["ring_impl", "causal", "ulysses_degree", "ring_degree", "kernel", "monolithic_ms", "time_ms",
                   "efficiency", "tflops_per_rank", "bytes_per_rank", "bytes_analytic", "bytes_ratio"],
}


def markdown_table(records: list[dict], mode: str) -> str:
    columns = COLUMNS[mode]

    def cell(value):
        if isinstance(value, float) and mode == "balance-documents":
            return f"{value:.3f}"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(record.get(c, "")) for c in columns) + " |" for record in records]
    return "\n".join(lines)


def plot(records: list[dict], mode: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if mode == "memory":
        figure, axis = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys((r["ring_impl"], r["micro_q"]) for r in records):
            rows = [r for r in records if (r["ring_impl"], r["micro_q"]) == name]
            label = f"{name[0]}" + (f", micro_q {name[1]}" if name[1] else ", no micro-chunks" if name[0] == "mqsp" else "")
            axis.plot([r["seq_len"] for r in rows], [r["peak_mib"] for r in rows], marker="o", label=label)
        axis.plot([r["seq_len"] for r in rows], [r["input_mib"] for r in rows], color="gray", linestyle=":",
                  label="the rank's q, k, v, dout")
        axis.set_xlabel("sequence length")
        axis.set_ylabel("peak MiB per rank")
        axis.set_title(f"one rank of a ring of {records[0]['ring_degree']}: {records[0]['measure'].split(' (')[0]}",
                       fontsize=9)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return
    if mode == "balance-documents":
        plot_balance_documents(records, path)
        return
    metric = {"balance": "max_over_mean", "multi-rank-documents": "speedup"}.get(mode, "efficiency")
    labels = [f"{r['ring_impl']} {r.get('document_layout', '')}\n{'causal' if r['causal'] else 'full'} "
              f"{r['ulysses_degree']}x{r['ring_degree']}" + (f" S={r['seq_len']}" if "documents" in r else "")
              for r in records]
    figure, axis = plt.subplots(figsize=(max(6, 0.8 * len(records)), 4))
    axis.bar(range(len(records)), [r[metric] for r in records], color="tab:blue")
    axis.axhline(1.0, color="gray", linewidth=1, linestyle="--")
    axis.set_xticks(range(len(records)), labels, fontsize=7)
    axis.set_ylabel(metric)
    first = records[0]
    axis.set_title(f"{mode}: seq {first['seq_len']}, heads {first['heads']}/{first['kv_heads']}, d {first['head_dim']},"
                   f" {first['dtype']}")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_balance_documents(records: list[dict], path: str) -> None:
    """One panel per document source: the global zigzag layout (documents as a mask) and each document layout
    measured (split, ring-local), median bars, worst ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["documents"] for r in records))
    layouts = list(dict.fromkeys(r.get("document_layout", "split") for r in records))
    bars = [("old", layouts[0], "tab:red", "global zigzag (documents as a mask)")] + [
        ("new", layout, color, f"document layout {layout}")
        for layout, color in zip(layouts, ("tab:blue", "tab:green"))]
    width = 0.8 / len(bars)
    points = list(dict.fromkeys((r["world_size"], r["ulysses_degree"], r["ring_degree"], r["seq_len"]) for r in records))
    figure, axes = plt.subplots(len(sources), 1, figsize=(max(7, 0.7 * len(points) + 3), 3.2 * len(sources)),
                                squeeze=False)
    for axis, source in zip(axes[:, 0], sources):
        for index, (key, layout, color, label) in enumerate(bars):
            chosen = {(r["world_size"], r["ulysses_degree"], r["ring_degree"], r["seq_len"]): r for r in records
                      if r["documents"] == source and r.get("document_layout", "split") == layout}
            x = [i + (index - (len(bars) - 1) / 2) * width for i, point in enumerate(points) if point in chosen]
            axis.bar(x, [chosen[p][f"{key}_cost_median"] for p in points if p in chosen], width=width, color=color,
                     alpha=0.8, label=f"{label}: median")
            axis.scatter(x, [chosen[p][f"{key}_cost_worst"] for p in points if p in chosen], marker="_", s=80,
                         color="black", zorder=3, label="worst row" if index == len(bars) - 1 else None)
        axis.axhline(1.0, color="gray", linewidth=1, linestyle="--")
        axis.axhline(1.05, color="tab:green", linewidth=1, linestyle=":", label="target 1.05 (median)")
        axis.set_xticks(range(len(points)), [f"P={w} {u}x{r}\nS={s // 1024}K" for w, u, r, s in points], fontsize=7)
        axis.set_ylabel("step cost / ideal")
        axis.set_yscale("log")
        rows = next(r["rows"] for r in records if r["documents"] == source)
        axis.set_title(f"{source}: {rows} packed rows per point, causal ring (pass K/V), pairs per step",
                       fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def check_flags_apply(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A flag the chosen mode does not read is refused (parser.error), never silently ignored."""
    balance_documents = args.mode == "balance" and bool(args.documents)
    applies = {
        "--seq-len": args.mode not in ("memory",) and not balance_documents,
        "--seq-lens": args.mode == "memory" or balance_documents,
        "--world-sizes": balance_documents,
        "--ulysses-degrees": balance_documents,
        "--micro-q": args.mode == "memory",
        "--rows": bool(args.documents) and args.mode in ("balance", "simulate-rank", "multi-rank"),
        "--documents": args.mode in ("balance", "simulate-rank", "multi-rank"),
        "--document-layouts": bool(args.documents) and args.mode in ("balance", "simulate-rank"),
        "--world-size": not balance_documents,
    }
    for flag, applies_here in applies.items():
        if getattr(args, flag[2:].replace("-", "_")) is not None and not applies_here:
            mode = f"--mode {args.mode}{' --documents' if args.documents else ''}"
            parser.error(f"{flag} does not apply to {mode}; drop it (see --help for what each mode reads)")
    for source in args.documents or ():
        try:
            document_source(source)
        except ValueError as error:
            parser.error(f"--documents: {error}")


def check_grid_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Heads, K/V heads, ulysses degree and world size that form at least one grid; else parser.error with why."""
    from megatron_usp.ulysses import check_head_counts

    if args.heads % args.kv_heads:
        parser.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads} (each K/V head serves a group of "
                     "heads)")
    if args.mode == "multi-rank":
        launched = int(os.environ.get("WORLD_SIZE", 1))
        if args.world_size is not None and args.world_size != launched:
            parser.error(f"--world-size {args.world_size}: multi-rank runs on the launcher's {launched} ranks "
                         "(torchrun --nproc-per-node); drop --world-size")
        args.world_size = launched
    args.world_size = args.world_size or 4
    worlds = args.world_sizes if args.mode == "balance" and args.documents else [args.world_size]
    degrees = args.ulysses_degrees if args.mode == "balance" and args.documents else [args.ulysses_degree]
    for world in worlds:
        for u in degrees:
            if u is not None and world % u:
                parser.error(f"ulysses degree {u} does not divide the world size {world} (--ulysses-degree(s) / "
                             "--world-size(s))")
            if u is not None:
                try:
                    check_head_counts(args.heads, args.kv_heads, u)
                except ValueError as error:
                    parser.error(f"--heads {args.heads} / --kv-heads {args.kv_heads} with ulysses degree {u}: {error}")
    if args.ulysses_degree is None and not grids(args.world_size, args.heads, args.kv_heads, None):
        parser.error(f"--heads {args.heads} / --kv-heads {args.kv_heads} allow no ulysses degree dividing the world "
                     f"size {args.world_size}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["multi-rank", "simulate-rank", "balance", "memory"], default="simulate-rank")
    parser.add_argument("--world-size", type=positive_int, default=None,
                        help="P for simulate-rank, balance and memory (default 4; multi-rank: the launcher's)")
    parser.add_argument("--ulysses-degree", type=positive_int, default=None,
                        help="default: multi-rank every u the heads allow; simulate-rank and balance u = 1")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="default 8192 (memory and balance --documents take --seq-lens)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--kv-heads", type=positive_int, default=None, help="default: --heads")
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--ring-impls", nargs="+", choices=list(RING_SCHEDULE_IMPLS) + ["mqsp"], default=None,
                        help="default: basic zigzag stripe allgather; with --documents zigzag. mqsp: simulate-rank "
                             "and memory only; balance --documents: basic, zigzag, stripe (pass-K/V rings)")
    parser.add_argument("--causal", choices=["causal", "non-causal", "both"], default="causal")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: torch's). On a shared CPU 1 thread measures far more "
                             "steadily: spinning threads of an oversubscribed pool turn small ops into ~20 ms stalls")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="simulate-rank: wall seconds, or cpu = the process's CPU seconds (CPU with --threads 1:"
                             " the work done, immune to other processes' load on a shared machine)")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--warmup", type=nonnegative_int, default=1)
    parser.add_argument("--all-ranks", action="store_true",
                        help="simulate-rank: time every ring rank (default: the first and last, which bound the "
                             "balanced schedules; every rank for basic)")
    parser.add_argument("--seq-lens", type=positive_int, nargs="+", default=None,
                        help="memory: the sequence lengths to measure (default 2048 4096 8192 16384); balance "
                             "--documents: the row lengths (default 32768 131072)")
    parser.add_argument("--documents", nargs="+", default=None, metavar="SOURCE",
                        help="packed documents: stdlib (the Python standard library's .py files, bytes/4 tokens), "
                             f"lognormal (median {LOGNORMAL_MEDIAN}, sigma {LOGNORMAL_SIGMA}), dcp (Megatron-LM's "
                             f"dynamic-CP benchmark mix), uniform ({UNIFORM_RANGE[0]}..{UNIFORM_RANGE[1]}) or a file "
                             "of lengths, one per line. balance: old vs document layout per source; simulate-rank "
                             "and multi-rank: the first source")
    parser.add_argument("--document-layouts", nargs="+", choices=list(DOCUMENT_LAYOUTS), default=None,
                        help="balance / simulate-rank --documents: the document layouts to compare (default: split "
                             "local; multi-rank --documents always times both)")
    parser.add_argument("--rows", type=positive_int, default=None,
                        help="packed rows per point (default: balance 8, simulate-rank 2)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the packed rows")
    parser.add_argument("--world-sizes", type=positive_int, nargs="+", default=None,
                        help="balance --documents: P (default 4 8 16)")
    parser.add_argument("--ulysses-degrees", type=positive_int, nargs="+", default=None,
                        help="balance --documents: u of each u x (P/u) grid (default 1 2)")
    parser.add_argument("--micro-q", type=positive_int, default=None,
                        help="memory: mqsp's micro-chunk of query rows (default 256)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--json", default=None, help="write the records (a JSON list) here")
    parser.add_argument("--png", default=None, help="write a bar chart here")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.ring_impls is None:
        args.ring_impls = ["zigzag"] if args.documents else list(RING_SCHEDULE_IMPLS)
    check_flags_apply(parser, args)
    args.seq_len = args.seq_len or 8192
    if args.seq_lens is None:
        args.seq_lens = [32768, 131072] if args.documents else [2048, 4096, 8192, 16384]
    args.document_layouts = args.document_layouts or ["split", "local"]
    if args.rows is None:
        args.rows = 8 if args.mode == "balance" else 2
    args.world_sizes, args.ulysses_degrees = args.world_sizes or [4, 8, 16], args.ulysses_degrees or [1, 2]
    args.micro_q = args.micro_q or 256
    check_grid_flags(parser, args)
    if args.mode == "balance" and "mqsp" in args.ring_impls:
        parser.error("balance counts pass-K/V and allgather schedules: mqsp passes Q")
    if args.documents and args.mode == "balance" and "allgather" in args.ring_impls:
        parser.error("balance --documents measures pass-K/V rings: choose among basic, zigzag, stripe")
    if args.mode != "multi-rank" and args.ulysses_degree is None:
        args.ulysses_degree = 1
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return []
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    leader = True
    if args.mode == "multi-rank":
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        leader = dist.get_rank() == 0
        records = run_multi_rank_documents(args, device) if args.documents else run_multi_rank(args, device)
        dist.destroy_process_group()
    elif args.mode == "simulate-rank" and args.documents:
        records = run_simulate_documents(args, device)
    elif args.mode == "simulate-rank":
        records = run_simulate(args, device)
    elif args.mode == "memory":
        records = run_memory(args)
    elif args.documents:
        records = run_balance_documents(args)
    else:
        records = run_balance(args)
    if leader:
        print(f"{args.mode} on {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
              f", {torch.get_num_threads()} threads):")
        table_mode = f"{args.mode}-documents" if args.documents else args.mode
        print(markdown_table(records, table_mode), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(records, indent=1))
        if args.png:
            plot(records, table_mode, args.png)
    return records


if __name__ == "__main__":
    main()
