"""tools/gpu_check.py on CPU in tiny mode: the script's own smoke test (its figures need a GPU)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
from conftest import load_tool  # noqa: E402

gpu_check = load_tool("gpu_check")

GRIDS = {(impl, u, r) for impl in gpu_check.RING_IMPLS for u, r in gpu_check.TINY.grids}


def test_tiny_cpu_run_reports_every_section(tmp_path, capsys):
    path = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    parity = [r for r in records if r["section"] == "a"]
    cpu = [r for r in parity if r["case"].startswith("torch_cpu")]
    assert len(cpu) == 4 and all(r["status"] == "PASS" for r in cpu)  # dense + varlen (fallback), causal or not
    assert all(r["data"]["fwd"] < 1e-4 and r["data"]["bwd"] < 1e-4 for r in cpu)
    cuda = [r for r in parity if not r["case"].startswith("torch_cpu")]
    assert len(cuda) == 4 * len(gpu_check.CUDA_KERNELS)
    assert all(r["status"] == "SKIP" and "needs CUDA" in r["figure"] for r in cuda)  # skipped with the reason
    efficiency = [r for r in records if r["section"] == "b" and "efficiency" in r["data"]]
    assert len(efficiency) == len(GRIDS) * len(gpu_check.TINY.tokens_per_rank)
    grids = {(r["data"]["ring_impl"], r["data"]["ulysses_degree"], r["data"]["ring_degree"]) for r in efficiency}
    assert grids == GRIDS
    assert all(r["status"] == "INFO" and r["data"]["efficiency"] > 0 for r in efficiency)
    memory = [r for r in records if r["section"] == "d"]
    assert len(memory) == len(efficiency) and all(r["status"] == "SKIP" and "CUDA" in r["figure"] for r in memory)
    assert [r for r in records if r["section"] == "c"]  # measured, or skipped with the reason
    assert all(r["status"] in ("INFO", "SKIP") for r in records if r["section"] == "c")
    setups = [r for r in records if r["section"] == "c" and r["case"].startswith("setup") and r["status"] == "INFO"]
    assert all("documents" in r["figure"] for r in setups)
    output = capsys.readouterr().out
    assert "| section | case | status | figure |" in output and "0 FAIL, 0 ERROR" in output


def test_packed_rows_use_the_rank_problem_documents_field(monkeypatch):
    """(c) hands every rank the packed row through RankProblem's cu_seqlens and times it against one varlen call
    over the row (here with a stand-in RankProblem that has the field and a rank step that records it)."""

    @dataclasses.dataclass(frozen=True)
    class WithDocuments(gpu_check.RankProblem):
        cu_seqlens: Optional[tuple] = None

    seen = []

    def rank_step(problem, ring_rank, kernel, dtype, device):
        seen.append((problem.ring_impl, problem.cu_seqlens))

        def step() -> None:
            pass

        step.input_bytes = 0
        return step

    monkeypatch.setattr(gpu_check, "RankProblem", WithDocuments)
    monkeypatch.setattr(gpu_check, "rank_step", rank_step)
    report = gpu_check.Report(budget_s=60)
    gpu_check.simulate(report, "c", 16, gpu_check.TINY, torch.float32, torch.device("cpu"))
    row = gpu_check.lognormal_row(16 * gpu_check.TINY.world_size, 16, gpu_check.TINY.document_median)
    assert {impl for impl, _ in seen} == set(gpu_check.RING_IMPLS) and all(cu == row for _, cu in seen)
    measured = [r for r in report.records if "efficiency" in r.data]
    assert len(measured) == len(GRIDS) and all(r.section == "c" and "packed" in r.case for r in measured)
    assert "one varlen call" in next(r.figure for r in report.records if r.case.startswith("monolithic"))


def test_rank_problem_without_documents_skips_with_the_reason():
    if any(f.name in ("cu_seqlens", "documents") for f in dataclasses.fields(gpu_check.RankProblem)):
        pytest.skip("RankProblem takes documents: (c) runs")
    report = gpu_check.Report(budget_s=60)
    gpu_check.simulate(report, "c", 16, gpu_check.TINY, torch.float32, torch.device("cpu"))
    assert [r.status for r in report.records] == ["SKIP"] and "cu_seqlens" in report.records[0].figure


def test_lognormal_rows_and_arguments():
    row = gpu_check.lognormal_row(65536, seed=1)
    assert row[0] == 0 and row[-1] == 65536 and all(b > a for a, b in zip(row, row[1:]))
    assert row == gpu_check.lognormal_row(65536, seed=1)  # the same row on every run
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu"])  # full sizes on a CPU: refused
