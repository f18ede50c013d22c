"""One unattended GPU check: every GPU figure the project claims, on one H100/H200, in at most ~8 minutes.

    make gpu-check                                   # = .venv/bin/python tools/gpu_check.py (after make install)
    python tools/gpu_check.py --json runs/gpu_check.json
    python tools/gpu_check.py --device cpu --tiny    # smoke test of this script on CPU, seconds

(a) kernel parity: every registered CUDA kernel (torch_flash, torch_efficient, torch_cudnn; flash_attn2/3 and te
    when importable), dense and varlen, bf16, d=128, GQA 16/4 heads, causal and not: worst relative error of the
    forward (out, lse) and backward (dq, dk, dv) against the math kernel in float64 (varlen: against the
    per-segment fallback, i.e. one math call per segment; segments include empty ones). Kernels without a native
    varlen entry point are skipped for varlen on CUDA (their fallback is the dense kernel, one call per segment).
(b) simulate-rank efficiency: one rank's whole ring schedule (megatron_usp.simulate.rank_step: real kernels and
    merges, loopback communication) against monolithic attention over the whole sequence with the same kernel,
    8K and 32K tokens per rank, P = 8 as u=1 x r=8 and u=2 x r=4, ring_impl zigzag / allgather / mqsp, bf16,
    causal. efficiency = (monolithic time / P) / slowest timed rank.
(c) packed rows: the same on rows packed from documents (lognormal lengths, median 1000 tokens, sigma 1.5) with
    the document layout (cu_seqlens), against one varlen call over the whole row. Runs when
    megatron_usp.simulate.RankProblem has a cu_seqlens (or documents) field; skipped with the reason otherwise.
(d) peak memory per rank (torch.cuda.max_memory_allocated: inputs held + transients of one forward + backward)
    against monolithic / P.

What the machine lacks (a package, CUDA, an architecture, time) is skipped with the reason. Ends with one summary
table; exit status 1 when a parity check fails or a case errors, else 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_usp import kernels  # noqa: E402
from megatron_usp.kernels import MathKernel, varlen  # noqa: E402
from megatron_usp.kernels.varlen import Segments  # noqa: E402
from megatron_usp.layout import check_seq_len  # noqa: E402
from megatron_usp.simulate import RankProblem, monolithic_step, rank_step  # noqa: E402
from megatron_usp.testing import random_segments  # noqa: E402

from megatron_usp.document_mixes import LOGNORMAL_SIGMA, packed_row  # noqa: E402
from megatron_usp.timing import peak_memory, time_rounds  # noqa: E402  (the benchmarks' one timing method)

CUDA_KERNELS = ["torch_flash", "torch_efficient", "torch_cudnn", "flash_attn2", "flash_attn3", "te"]
RING_IMPLS = ["zigzag", "allgather", "mqsp"]
MATH = MathKernel()


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch: int  # parity
    seq: int  # parity (dense)
    segments: int  # parity (varlen): number of segments, lengths up to max_segment
    max_segment: int
    heads: int
    kv_heads: int
    head_dim: int
    tokens_per_rank: tuple[int, ...]  # (b), (c), (d)
    world_size: int
    grids: tuple[tuple[int, int], ...]  # (u, r) with u * r = world_size
    repeats: int
    warmup: int
    document_median: int  # (c): lognormal document lengths, sigma LOGNORMAL_SIGMA


FULL = Sizes(batch=2, seq=1024, segments=24, max_segment=300, heads=16, kv_heads=4, head_dim=128,
             tokens_per_rank=(8192, 32768), world_size=8, grids=((1, 8), (2, 4)), repeats=3, warmup=1,
             document_median=1000)
TINY = Sizes(batch=2, seq=64, segments=9, max_segment=12, heads=4, kv_heads=2, head_dim=16,
             tokens_per_rank=(16,), world_size=8, grids=((1, 8), (2, 4)), repeats=1, warmup=0,
             document_median=24)
# parity tolerances (max |error| / max |reference|) per input dtype: bf16 kernels vs float64 math
TOLERANCE = {torch.bfloat16: {"out": 2e-2, "lse": 1e-3, "grad": 3e-2},
             torch.float32: {"out": 1e-4, "lse": 1e-5, "grad": 1e-4}}


class Skip(Exception):
    """A case this machine cannot run; the message is the reason."""


@dataclasses.dataclass
class Record:
    section: str
    case: str
    status: str  # PASS, FAIL, INFO, SKIP, ERROR
    figure: str
    data: dict = dataclasses.field(default_factory=dict)


class Report:
    def __init__(self, budget_s: float) -> None:
        self.records: list[Record] = []
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def add(self, record: Record) -> None:
        self.records.append(record)
        print(f"[{self.elapsed():6.1f} s] ({record.section}) {record.case}: {record.status} {record.figure}",
              flush=True)

    def run(self, section: str, case: str, fn: Callable[[], Record]) -> Optional[Record]:
        """Run one case: its record, or SKIP (reason) / ERROR (exception) records; out of time -> SKIP."""
        if self.elapsed() > self.budget_s:
            self.add(Record(section, case, "SKIP", f"time budget of {self.budget_s:.0f} s spent"))
            return None
        try:
            record = fn()
        except Skip as exc:
            record = Record(section, case, "SKIP", str(exc))
        except torch.cuda.OutOfMemoryError as exc:
            record = Record(section, case, "ERROR", f"out of memory: {str(exc).splitlines()[0]}")
        except Exception as exc:  # one broken case must not hide the others
            traceback.print_exc()
            record = Record(section, case, "ERROR", f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.add(record)
        return record


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the tests' measure), over finite reference entries."""
    expected = expected.double()
    finite = torch.isfinite(expected)
    norm = expected[finite].abs().max().clamp_min(1e-30)
    return ((actual.double()[finite] - expected[finite]).abs().max() / norm).item()


def _randn(shape, dtype, device, seed):
    return torch.randn(*shape, generator=torch.Generator(device=device).manual_seed(seed), device=device,
                       dtype=torch.float32).to(dtype)


# ---- (a) kernel parity ----

def _parity_figures(errors: dict, tolerance: dict) -> tuple[str, str, dict]:
    fwd = max(errors["out"], errors["lse"])
    bwd = max(errors["dq"], errors["dk"], errors["dv"])
    ok = (errors["out"] < tolerance["out"] and errors["lse"] < tolerance["lse"]
          and bwd < tolerance["grad"])
    figure = (f"fwd {fwd:.2e} (out {errors['out']:.2e}, lse {errors['lse']:.2e}) bwd {bwd:.2e} "
              f"(dq {errors['dq']:.2e}, dk {errors['dk']:.2e}, dv {errors['dv']:.2e})")
    return ("PASS" if ok else "FAIL"), figure, {"errors": errors, "fwd": fwd, "bwd": bwd, "tolerance": tolerance}


def kernel_parity(name: str, mode: str, causal: bool, sizes: Sizes, dtype, device) -> Record:
    entry = kernels.registry._KERNELS.get(name)
    case = f"{name} {mode} {'causal' if causal else 'full'}"
    if entry is None:
        raise Skip(f"{name} is not registered")
    reason = entry.unavailable_reason(device, dtype, sizes.head_dim)
    if reason is not None:
        raise Skip(f"{name} unavailable: {reason}")
    kernel = entry.factory()
    scale = sizes.head_dim ** -0.5
    if mode == "dense":
        seq_k = sizes.seq if causal else sizes.seq + sizes.seq // 2  # rectangular when not causal
        shapes = ((sizes.batch, sizes.seq, sizes.heads), (sizes.batch, seq_k, sizes.kv_heads))
        segments = None
    else:
        longest = sizes.max_segment  # every kind of emptiness (0 x 0; m x 0 and 0 x n when not causal)
        fixed = [(0, 0), (1, 1)] if causal else [(0, 0), (longest // 2, 0), (0, longest // 3), (1, longest)]
        segments = random_segments(17 + causal, causal, sizes.segments, longest, fixed=fixed, min_len=1)
        shapes = ((sizes.batch, segments.cu_q[-1], sizes.heads), (sizes.batch, segments.cu_k[-1], sizes.kv_heads))
    q, g = (_randn((*shapes[0], sizes.head_dim), dtype, device, s) for s in (1, 4))
    k, v = (_randn((*shapes[1], sizes.head_dim), dtype, device, s) for s in (2, 3))
    q64, k64, v64, g64 = (x.double() for x in (q, k, v, g))
    if segments is None:
        out, lse = kernel.forward(q, k, v, causal=causal, softmax_scale=scale)
        ref_out, ref_lse = MATH.forward(q64, k64, v64, causal=causal, softmax_scale=scale)
        grads = kernel.backward(g, q, k, v, ref_out.to(dtype), ref_lse.float(), causal=causal, softmax_scale=scale)
        ref_grads = MATH.backward(g64, q64, k64, v64, ref_out, ref_lse, causal=causal, softmax_scale=scale)
    else:
        if not hasattr(kernel, "varlen_forward"):
            if device.type == "cuda":  # one dense call per segment: the dense case above; each new shape may
                raise Skip(f"{name} has no native varlen entry point (its per-segment fallback is the dense "
                           "kernel checked above)")  # cost a cuDNN graph build
            case += " (no native varlen: per-segment fallback)"
        out, lse = varlen.varlen_forward(kernel, q, k, v, segments, causal=causal, softmax_scale=scale)
        ref_out, ref_lse = varlen.varlen_forward(MATH, q64, k64, v64, segments, causal=causal, softmax_scale=scale)
        empty = torch.isinf(ref_lse)  # rows of segments without keys: exactly out 0, lse -inf
        if not torch.equal(torch.isneginf(lse), empty) or not (out.transpose(1, 2)[empty] == 0).all():
            return Record("a", case, "FAIL", "rows of segments without keys are not out 0 / lse -inf")
        # the backward gets the rows' final lse: finite everywhere (other blocks gave the empty rows keys)
        final_lse = torch.where(empty, torch.zeros_like(ref_lse), ref_lse)
        grads = varlen.varlen_backward(kernel, g, q, k, v, ref_out.to(dtype), final_lse.float(), segments,
                                       causal=causal, softmax_scale=scale)
        ref_grads = varlen.varlen_backward(MATH, g64, q64, k64, v64, ref_out, final_lse, segments, causal=causal,
                                           softmax_scale=scale)
    if any(x.isnan().any() for x in (out, lse, *grads)):
        return Record("a", case, "FAIL", "NaN in the kernel's output or gradients")
    errors = {"out": rel_error(out, ref_out), "lse": rel_error(lse, ref_lse)}
    errors.update({n: rel_error(mine, ref) for n, mine, ref in zip(("dq", "dk", "dv"), grads, ref_grads)})
    status, figure, data = _parity_figures(errors, TOLERANCE[dtype])
    return Record("a", case, status, figure, {"kernel": kernel.name, **data})


# ---- (b), (c), (d): one rank vs monolithic ----

def lognormal_row(seq_len: int, seed: int, median: int = 1000) -> tuple[int, ...]:
    """cu_seqlens of one row of ``seq_len`` tokens packed from lognormal documents (the last one truncated)."""
    mu = math.log(median)
    return packed_row(lambda rng: max(1, round(rng.lognormvariate(mu, LOGNORMAL_SIGMA))), seq_len, str(seed))


def with_documents(problem: RankProblem, cu: tuple[int, ...]) -> RankProblem:
    """``problem`` on packed rows, through whichever field RankProblem has for them (Skip when it has none)."""
    fields = {f.name for f in dataclasses.fields(RankProblem)}
    for name in ("cu_seqlens", "documents"):
        if name in fields:
            return dataclasses.replace(problem, **{name: cu})
    raise Skip("megatron_usp.simulate.RankProblem has no cu_seqlens/documents field yet (one rank of the engine's "
               "document path cannot be simulated)")


def monolithic_packed_step(seq_len: int, cu: tuple[int, ...], sizes: Sizes, kernel, dtype, device):
    """Monolithic attention over packed rows: one varlen call over the row's documents, forward and backward."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(1, seq_len, h, sizes.head_dim, generator=gen, device=device, dtype=dtype)
                     for h in (sizes.heads, sizes.kv_heads, sizes.kv_heads, sizes.heads))
    segments = Segments(cu, cu)
    scale = sizes.head_dim ** -0.5

    def step() -> None:
        out, lse = varlen.varlen_forward(kernel, q, k, v, segments, causal=True, softmax_scale=scale)
        varlen.varlen_backward(kernel, dout, q, k, v, out, lse, segments, causal=True, softmax_scale=scale)

    step.input_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, dout))
    return step


def pick_kernel(backend: str, device, dtype, head_dim: int, need_varlen: bool):
    """``backend``'s kernel; for "auto" with ``need_varlen`` the best available one with a native varlen entry
    point (else "auto" through the per-segment fallback)."""
    auto = kernels.resolve_kernel(backend, device, dtype, head_dim)
    if backend != "auto" or not need_varlen or hasattr(auto, "varlen_forward"):
        return auto
    usable = [e for e in kernels.registry._KERNELS.values()
              if e.unavailable_reason(device, dtype, head_dim) is None and hasattr(e.factory(), "varlen_forward")]
    return max(usable, key=lambda e: e.priority).factory() if usable else auto


def simulate(report: Report, section: str, tokens_per_rank: int, sizes: Sizes, dtype, device,
             backend: str = "auto") -> None:
    """(b) + (d) (section "b") or (c) (section "c") at one size: every impl x grid, one record each."""
    world = sizes.world_size
    seq_len = tokens_per_rank * world
    label = f"{tokens_per_rank // 1024}K" if tokens_per_rank >= 1024 else str(tokens_per_rank)
    kernel = None
    cu = lognormal_row(seq_len, tokens_per_rank, sizes.document_median) if section == "c" else None
    steps: dict = {}
    cases = []

    def build() -> Record:
        nonlocal kernel
        kernel = pick_kernel(backend, device, dtype, sizes.head_dim, need_varlen=section == "c")
        base = RankProblem("basic", seq_len, sizes.heads, sizes.kv_heads, sizes.head_dim, 1, 1, True)
        if cu is None:
            steps["monolithic"] = monolithic_step(base, kernel, dtype, device)
        else:
            with_documents(base, cu)  # Skip before building anything when the engine cannot take documents
            steps["monolithic"] = monolithic_packed_step(seq_len, cu, sizes, kernel, dtype, device)
        for u, r in sizes.grids:
            for impl in RING_IMPLS:
                check_seq_len(seq_len, u, r, impl)
                problem = RankProblem(impl, seq_len, sizes.heads, sizes.kv_heads, sizes.head_dim, u, r, True)
                if cu is not None:
                    problem = with_documents(problem, cu)
                ranks = sorted({0, r - 1})  # the balanced layouts' first and last ranks bound the rest
                for rank in ranks:
                    steps[(impl, u, r, rank)] = rank_step(problem, rank, kernel, dtype, device)
                cases.append((impl, u, r, ranks))
        documents = "" if cu is None else f", {len(cu) - 1} documents (max {max(b - a for a, b in zip(cu, cu[1:]))})"
        return Record(section, f"setup {label} tokens/rank", "INFO",
                      f"P={world}, seq_len={seq_len}, kernel {kernel.name}, {dtype}{documents}")

    if report.run(section, f"setup {label} tokens/rank", build) is None or "monolithic" not in steps:
        return
    rounds_holder: dict = {}

    def timing() -> Record:
        rounds_holder["rounds"] = time_rounds(steps, sizes.repeats, sizes.warmup, device)
        mono = statistics.median(t["monolithic"] for t in rounds_holder["rounds"])
        return Record(section, f"monolithic {label} tokens/rank", "INFO",
                      f"{1e3 * mono:.2f} ms for {seq_len} tokens ({'one varlen call' if cu else 'one dense call'})",
                      {"monolithic_ms": 1e3 * mono, "seq_len": seq_len})

    if report.run(section, f"timing {label} tokens/rank", timing) is None or "rounds" not in rounds_holder:
        return
    rounds = rounds_holder["rounds"]
    peaks: dict = {}
    for impl, u, r, ranks in cases:
        case = f"{impl} u{u} x r{r}, {label} tokens/rank" + (", packed" if cu else "")

        def efficiency(impl=impl, u=u, r=r, ranks=ranks, case=case) -> Record:
            per_round = [t["monolithic"] / world / max(t[(impl, u, r, k)] for k in ranks) for t in rounds]
            slowest = statistics.median(max(t[(impl, u, r, k)] for k in ranks) for t in rounds)
            mono = statistics.median(t["monolithic"] for t in rounds)
            eff = statistics.median(per_round)
            return Record(section, case, "INFO", f"efficiency {eff:.3f} (rank {1e3 * slowest:.2f} ms, monolithic/P "
                          f"{1e3 * mono / world:.2f} ms)",
                          {"efficiency": eff, "rank_ms": 1e3 * slowest, "monolithic_ms": 1e3 * mono,
                           "ring_impl": impl, "ulysses_degree": u, "ring_degree": r,
                           "tokens_per_rank": tokens_per_rank, "kernel": kernel.name})

        report.run(section, case, efficiency)
        if section != "b":
            continue

        def memory(impl=impl, u=u, r=r, ranks=ranks, case=case) -> Record:
            if device.type != "cuda":
                raise Skip("peak memory needs CUDA (torch.cuda.max_memory_allocated)")
            if "monolithic" not in peaks:
                peaks["monolithic"] = peak_memory(steps["monolithic"], device)
            rank_peak = max(peak_memory(steps[(impl, u, r, k)], device) for k in ranks)
            ratio = rank_peak * world / peaks["monolithic"]
            return Record("d", case, "INFO", f"peak {rank_peak / 2**20:.0f} MiB = {ratio:.2f} x monolithic/P "
                          f"({peaks['monolithic'] / world / 2**20:.0f} MiB)",
                          {"peak_mib": rank_peak / 2**20, "monolithic_peak_mib": peaks["monolithic"] / 2**20,
                           "memory_vs_monolithic_per_rank": ratio, "ring_impl": impl, "ulysses_degree": u,
                           "ring_degree": r, "tokens_per_rank": tokens_per_rank})

        report.run("d", case, memory)
    steps.clear()


# ---- driver ----

def summary_table(records: list[Record]) -> str:
    lines = ["| section | case | status | figure |", "|---|---|---|---|"]
    for record in records:
        lines.append(f"| {record.section} | {record.case} | {record.status} | {record.figure} |")
    counts = {s: sum(r.status == s for r in records) for s in ("PASS", "FAIL", "ERROR", "SKIP", "INFO")}
    lines.append("")
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of this script (seconds)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="cases starting after this many seconds are skipped (default 450: the whole run "
                             "stays under 8 minutes on an H100/H200)")
    parser.add_argument("--sections", default="abcd", help="which of a, b, c, d to run (default all)")
    parser.add_argument("--backend", default=None,
                        help="kernel of (b), (c), (d) (default: auto on CUDA, with a native varlen one for (c); math "
                             "on CPU, where the tiny blocks make it the quickest)")
    parser.add_argument("--json", default=None, help="write every record (a JSON list) here")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu needs --tiny (the full sizes take hours on a CPU)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(args.budget_s)
    sizes = TINY if args.tiny else FULL
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: every section is skipped (python tools/gpu_check.py --device cpu --tiny smoke-"
              "tests the script on CPU)")
        for section in "abc":
            if section in args.sections:
                report.add(Record(section, "all", "SKIP", "no CUDA device (torch.cuda.is_available() is False)"))
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"gpu_check on {name}, torch {torch.__version__}, {dtype}, {'tiny' if args.tiny else 'full'} sizes, "
              f"budget {args.budget_s:.0f} s", flush=True)
        if "a" in args.sections:
            names = CUDA_KERNELS + (["torch_cpu"] if device.type == "cpu" else [])
            for kernel_name in names:
                for mode in ("dense", "varlen"):
                    for causal in (True, False):
                        report.run("a", f"{kernel_name} {mode} {'causal' if causal else 'full'}",
                                   lambda: kernel_parity(kernel_name, mode, causal, sizes, dtype, device))
        backend = args.backend or ("auto" if device.type == "cuda" else "math")
        if "b" in args.sections or "d" in args.sections:
            for tokens in sizes.tokens_per_rank:
                simulate(report, "b", tokens, sizes, dtype, device, backend)
        if "c" in args.sections:
            for tokens in sizes.tokens_per_rank:
                simulate(report, "c", tokens, sizes, dtype, device, backend)
    print(f"\nsummary ({report.elapsed():.0f} s):")
    print(summary_table(report.records), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in report.records], indent=1))
    return 1 if any(r.status in ("FAIL", "ERROR") for r in report.records) else 0


if __name__ == "__main__":
    sys.exit(main())
