"""Traffic counter vs analytic bytes, the one-rank simulation, load balance and the benchmark tool (CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_usp.kernels import MathKernel
from megatron_usp.simulate import RankProblem, attention_pairs, monolithic_step, rank_step
from megatron_usp.cost import analytic_bytes_per_rank

REPO = Path(__file__).resolve().parents[2]
from conftest import load_tool  # noqa: E402

bench_attention = load_tool("bench_attention")

IMPLS = ["basic", "zigzag", "stripe", "allgather"]


@pytest.mark.parametrize("grid", [(4, 2, 2), (4, 1, 4), (4, 4, 1), (2, 1, 2)], ids=lambda g: f"w{g[0]}-u{g[1]}-r{g[2]}")
def test_bytes_sent_equal_the_analytic_count(rank_pool, grid):
    world_size, ulysses_degree, ring_degree = grid
    configs = [dict(batch=2, seq_len=16 * world_size, heads=8, kv_heads=kv_heads, head_dim=8, ring_impl=impl,
                    causal=causal, dtype=dtype)
               for impl in IMPLS for kv_heads, causal, dtype in ((8, True, "float32"), (2, False, "bfloat16"),
                                                                  (1, True, "float64"))]
    for rank_report in rank_pool(world_size).run("perf_cases:traffic", ulysses_degree=ulysses_degree,
                                                  ring_degree=ring_degree, configs=configs):
        for entry in rank_report:
            assert entry["sent"] == entry["analytic"], entry
            if ulysses_degree > 1:  # q, k, v in one packed all-to-all: qkv + out forward, dout + dqkv backward
                assert entry["calls"]["all_to_all"] == 4, entry
            if ring_degree > 1 and entry["config"]["ring_impl"] != "allgather":
                # K/V r-1 times each way, dK/dV r times (fp32 for bf16: the analytic count says so too)
                assert entry["calls"]["ring_p2p"] == 2 * (ring_degree - 1) + ring_degree, entry


def test_analytic_bytes_by_hand():
    common = dict(batch=1, seq_len=64, heads=4, head_dim=8, ulysses_degree=2, ring_degree=2)
    # u=2: 16 tokens per rank; q,k,v,out = (4+2+2+4) heads * 8 * 4 bytes * 16 tokens, half leaves the rank, x2 bwd
    mha = analytic_bytes_per_rank(kv_heads=2, dtype=torch.float32, ring_impl="zigzag", **common)
    assert mha["all_to_all"] == 2 * 16 * 12 * 8 * 4 // 2
    # ring: 32 tokens per ring rank, 1 kv head per ulysses rank: K+V block = 2*32*8*4 bytes; 1 hop each way + 2 dkv
    assert mha["ring_p2p"] == 2 * 2048 + 2 * 2048
    bf16 = analytic_bytes_per_rank(kv_heads=2, dtype=torch.bfloat16, ring_impl="zigzag", **common)
    assert bf16["ring_p2p"] == 2 * 1024 + 2 * 2048  # dK/dV travel in fp32
    mqa = analytic_bytes_per_rank(kv_heads=1, dtype=torch.float32, ring_impl="allgather", **common)
    assert mqa["all_gather"] == 2 * 2048 and mqa["reduce_scatter"] == 2048  # kv replicated to 2 heads, 1 per rank


def test_balance_zigzag_stripe_allgather_are_even_and_basic_is_not():
    records = bench_attention.main(["--mode", "balance", "--world-size", "8", "--seq-len", "8192", "--causal", "both"])
    ratios = {(r["ring_impl"], r["causal"]): r["max_over_mean"] for r in records}
    for impl in ("zigzag", "allgather"):
        assert ratios[(impl, True)] == 1.0
    assert 1.0 < ratios[("stripe", True)] < 1.001  # one diagonal of imbalance
    assert ratios[("basic", True)] == pytest.approx(2 - 1 / 8, rel=1e-3)  # last rank r - 1/2 blocks, mean r/2
    assert all(ratios[(impl, False)] == 1.0 for impl in IMPLS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_schedules_cover_the_attention_exactly_once(impl, causal):
    problem = RankProblem(impl, 96, 4, 2, 8, 2, 4, causal)
    total = sum(attention_pairs(problem, rank) for rank in range(4))
    assert total == (96 * 97 // 2 if causal else 96 * 96)  # every (q, k) pair once


def test_simulated_rank_runs_real_kernels():
    kernel = MathKernel()
    for impl in IMPLS:
        problem = RankProblem(impl, 32, 4, 2, 8, 2, 2, True)
        for rank in range(2):
            rank_step(problem, rank, kernel, torch.float32, torch.device("cpu"))()
    monolithic_step(RankProblem("basic", 32, 4, 2, 8, 1, 1, True), kernel, torch.float32, torch.device("cpu"))()


def test_bench_simulate_rank_json_and_png(tmp_path):
    json_path, png_path = tmp_path / "sim.json", tmp_path / "sim.png"
    bench_attention.main(["--mode", "simulate-rank", "--world-size", "4", "--seq-len", "512", "--heads", "2",
                          "--repeats", "1", "--warmup", "0", "--json", str(json_path), "--png", str(png_path)])
    records = json.loads(json_path.read_text())
    assert [r["ring_impl"] for r in records] == IMPLS
    for record in records:
        assert record["mode"] == "simulate-rank" and record["causal"] is True and record["efficiency"] > 0
        assert set(record["rank_ms"]) == ({"0", "1", "2", "3"} if record["ring_impl"] == "basic" else {"0", "3"})
    assert png_path.stat().st_size > 5000


@pytest.mark.timeout(300)
def test_bench_multi_rank_under_torchrun(tmp_path):
    json_path = tmp_path / "mr.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "tools" / "bench_attention.py"), "--mode", "multi-rank", "--seq-len", "128", "--heads", "4",
               "--kv-heads", "2", "--repeats", "1", "--warmup", "0", "--causal", "both", "--json", str(json_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(json_path.read_text())
    assert {(r["ulysses_degree"], r["ring_degree"]) for r in records} == {(1, 2), (2, 1)}
    assert len(records) == 2 * 2 * len(IMPLS)
    for record in records:
        assert record["bytes_per_rank"] == record["bytes_analytic"] > 0, record
        assert record["efficiency"] > 0 and record["tflops_per_rank"] > 0
    assert "| ring_impl |" in result.stdout


def test_bench_memory_mode_measures_each_config_in_a_fresh_process(tmp_path):
    records = bench_attention.main(["--mode", "memory", "--seq-lens", "1024", "--world-size", "2", "--heads", "2",
                                    "--micro-q", "64", "--png", str(tmp_path / "memory.png")])
    assert [(r["ring_impl"], r["micro_q"]) for r in records] == [("zigzag", None), ("mqsp", None), ("mqsp", 64)]
    for record in records:
        assert record["peak_mib"] > record["input_mib"] > 0, record
        assert "VmHWM" in record["measure"]
    assert (tmp_path / "memory.png").stat().st_size > 5000


def test_simulated_mqsp_rank_runs():
    kernel = MathKernel()
    for micro_q in (None, 3):
        rank_step(RankProblem("mqsp", 32, 4, 2, 8, 2, 2, True, micro_q=micro_q), 1, kernel, torch.float32,
                  torch.device("cpu"))()


@pytest.fixture
def one_thread():
    """Packed documents mean many small tensor ops: one intra-op thread (a shared CI CPU stalls on more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rank_problem_with_documents_covers_each_visible_pair_once(one_thread):
    from megatron_usp.cost import document_pairs

    cu = (0, 1, 9, 10, 40, 41, 96)  # length-1 documents, one shorter than 2 P, boundaries anywhere
    for impl in IMPLS:
        for grid in ((1, 4), (2, 2)):
            problem = RankProblem(impl, 96, 4, 2, 8, *grid, True, cu_seqlens=torch.tensor(cu))
            assert problem.cu_seqlens == cu  # validated, stored as a tuple
            assert sum(attention_pairs(problem, rank) for rank in range(grid[1])) == document_pairs(cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        RankProblem("zigzag", 96, 4, 2, 8, 1, 4, True, cu_seqlens=(0, 50))


def test_simulated_rank_and_monolithic_run_on_packed_documents(one_thread):
    kernel, cpu = MathKernel(), torch.device("cpu")
    cu = (0, 3, 20, 21, 64)
    for impl in IMPLS + ["mqsp"]:
        for rank in range(2):
            rank_step(RankProblem(impl, 64, 4, 2, 8, 2, 2, True, cu_seqlens=cu), rank, kernel, torch.float32, cpu)()
    monolithic_step(RankProblem("zigzag", 64, 4, 2, 8, 1, 1, True, cu_seqlens=cu), kernel, torch.float32, cpu)()


def test_bench_simulate_rank_documents(tmp_path, one_thread):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("1\n40\n300\n7\n")
    json_path = tmp_path / "sim_documents.json"
    records = bench_attention.main(["--mode", "simulate-rank", "--documents", str(lengths), "--world-size", "4",
                                    "--seq-len", "512", "--heads", "2", "--head-dim", "8", "--rows", "2",
                                    "--repeats", "1", "--warmup", "0", "--ring-impls", "zigzag", "mqsp",
                                    "--dtype", "float32", "--threads", "1", "--json", str(json_path)])
    assert json.loads(json_path.read_text()) == records
    assert [(r["ring_impl"], r["document_layout"]) for r in records] == [("zigzag", "split"), ("zigzag", "local"),
                                                                          ("mqsp", "split")]  # mqsp keeps split
    for record in records:
        assert record["documents"] == "lengths.txt" and record["dtype"] == "float32" and len(record["per_row"]) == 2
        assert record["efficiency"] > 0 and record["efficiency_worst"] <= record["efficiency"]
        assert all(set(row["rank_ms"]) == {"0", "1", "2", "3"} for row in record["per_row"])


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                                        ("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("float64", torch.float64)])
def test_bench_dtype_takes_torch_names(name, dtype):
    args = bench_attention.parse_args(["--dtype", name])
    assert bench_attention.DTYPES[args.dtype] is dtype


def test_measure_hardware_writes_a_file_the_planner_reads(tmp_path):
    """tools/measure_hardware.py end to end at toy sizes (2 concurrent ranks, gloo link): every field it writes is
    a planner Hardware field, finite and positive where it must be, and --hardware takes the file."""
    out = tmp_path / "hw.json"
    subprocess.run([sys.executable, str(REPO / "tools/measure_hardware.py"), "--rounds", "1", "--repeats", "1",
                    "--lengths", "64,128,256", "--tokens", "256", "--hidden", "64", "--heads", "2", "--layer-tokens",
                    "128", "--concurrent", "2", "--out", str(out)], check=True, capture_output=True, timeout=300,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    record = json.loads(out.read_text())
    hardware = record["hardware"]
    from dataclasses import fields

    from megatron_usp import planner

    assert set(hardware) <= {f.name for f in fields(planner.Hardware)}
    for name in ("fwd_tflops", "bwd_tflops", "gemm_tflops", "memory_gbps", "intra_node_gbps", "optimizer_ns_per_param",
                 "layer_overhead_us"):
        assert 0 < hardware[name] < float("inf"), name
    assert 0 < hardware["causal_fraction"] <= 1.0 and hardware["comm_overlaps_compute"] is False
    assert {kind for kind, _, _ in record["measured"]["link_samples"][0]} == {
        "send/recv", "all_gather", "reduce_scatter", "all_to_all", "all_reduce"}
    args = planner.build_parser().parse_args(["--gpu", "cpu", "--hardware", str(out)])
    assert planner.hardware_from_args(args).gemm_tflops == hardware["gemm_tflops"]
