"""Benchmark USP attention: per-rank efficiency against monolithic attention, traffic, load balance.

    # (a) real ranks (gloo on CPU, NCCL on GPU): time, TFLOPS per rank, bytes per rank vs analytic, efficiency
    torchrun --nproc-per-node 4 tools/bench_attention.py --mode multi-rank --seq-len 4096 --json runs/bench/mr.json
    # (b) one process runs one rank's whole schedule (real kernels and merges, no comm) for a world of P ranks
    python tools/bench_attention.py --mode simulate-rank --world-size 4 --seq-len 8192 --json runs/bench/sim.json
    # (c) attention work per rank from the schedules: max / mean
    python tools/bench_attention.py --mode balance --world-size 8 --seq-len 65536

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_usp.kernels import resolve_kernel  # noqa: E402
from megatron_usp.layout import RING_SCHEDULE_IMPLS, check_seq_len  # noqa: E402
from megatron_usp.simulate import RankProblem, attention_pairs, monolithic_step, rank_step  # noqa: E402
from megatron_usp.cost import analytic_bytes_per_rank, attention_flops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


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
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype}


def problem(args, ring_impl: str, causal: bool, u: int, r: int) -> RankProblem:
    return RankProblem(ring_impl, args.seq_len, args.heads, args.kv_heads, args.head_dim, u, r, causal, args.batch)


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


def time_rounds(steps: dict, repeats: int, warmup: int, device: torch.device) -> list[dict]:
    """Seconds of each step per round. A round times every step once, round-robin, with the monolithic step
    both first and last (its two times are averaged): drift of a shared machine then hits a round's steps alike,
    and per-round ratios cancel it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(step) -> float:
        sync()
        start = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - start

    for step in steps.values():
        for _ in range(warmup):
            step()
    rounds = []
    for _ in range(repeats):
        first = seconds(steps["monolithic"])
        times = {name: seconds(step) for name, step in steps.items() if name != "monolithic"}
        times["monolithic"] = (first + seconds(steps["monolithic"])) / 2
        rounds.append(times)
    return rounds


def peak_memory(step: Callable[[], None], device: torch.device):
    """Peak bytes of ``step``: its inputs plus what it allocates while running; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before + step.input_bytes


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
        rounds = time_rounds(steps, args.repeats, args.warmup, device)
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
    "simulate-rank": ["ring_impl", "causal", "ulysses_degree", "ring_degree", "kernel", "monolithic_ms", "time_ms",
                      "efficiency", "tflops_per_rank"],
    "multi-rank": ["ring_impl", "causal", "ulysses_degree", "ring_degree", "kernel", "monolithic_ms", "time_ms",
                   "efficiency", "tflops_per_rank", "bytes_per_rank", "bytes_analytic", "bytes_ratio"],
}


def markdown_table(records: list[dict], mode: str) -> str:
    columns = COLUMNS[mode]

    def cell(value):
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
    metric = "max_over_mean" if mode == "balance" else "efficiency"
    labels = [f"{r['ring_impl']}\n{'causal' if r['causal'] else 'full'} {r['ulysses_degree']}x{r['ring_degree']}"
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["multi-rank", "simulate-rank", "balance", "memory"], default="simulate-rank")
    parser.add_argument("--world-size", type=int, default=4, help="P for simulate-rank and balance")
    parser.add_argument("--ulysses-degree", type=int, default=None,
                        help="default: multi-rank every u the heads allow; simulate-rank and balance u = 1")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--ring-impls", nargs="+", choices=list(RING_SCHEDULE_IMPLS), default=list(RING_SCHEDULE_IMPLS))
    parser.add_argument("--causal", choices=["causal", "non-causal", "both"], default="causal")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--all-ranks", action="store_true",
                        help="simulate-rank: time every ring rank (default: the first and last, which bound the "
                             "balanced schedules; every rank for basic)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384],
                        help="memory: the sequence lengths to measure")
    parser.add_argument("--micro-q", type=int, default=256, help="memory: mqsp's micro-chunk of query rows")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--json", default=None, help="write the records (a JSON list) here")
    parser.add_argument("--png", default=None, help="write a bar chart here")
    args = parser.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
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
    leader = True
    if args.mode == "multi-rank":
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        leader = dist.get_rank() == 0
        records = run_multi_rank(args, device)
        dist.destroy_process_group()
    elif args.mode == "simulate-rank":
        records = run_simulate(args, device)
    elif args.mode == "memory":
        records = run_memory(args)
    else:
        records = run_balance(args)
    if leader:
        print(f"{args.mode} on {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
              f", {torch.get_num_threads()} threads):")
        print(markdown_table(records, args.mode), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(records, indent=1))
        if args.png:
            plot(records, args.mode, args.png)
    return records


if __name__ == "__main__":
    main()
