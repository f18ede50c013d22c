#!/usr/bin/env python3
"""Verify megatron-usp's patch on a real Megatron-LM checkout (not part of CI: it needs the checkout).

    python tools/check_megatron_patch.py MEGATRON_DIR [--python PY] [--deps DIR] [--world-size 8]

1. tools/apply_megatron_patch.py: apply, then --check (must say applied), then apply again (idempotent).
2. ``PY -m py_compile`` on every file the patch set touches.
3. When PY imports torch (e.g. the project's .venv with megatron-core 0.16.1, Python 3.11): with the checkout first
   on PYTHONPATH (so megatron.training AND megatron.core come from the checkout), ``PY -m
   megatron_usp.rehearsal.parse_check``: import the patched pretrain_gpt.py (module level), then run what its
   ``__main__`` runs before training: ``install()``, Megatron-LM's ``parse_args`` with ``with_usp_args``
   (no argparse conflicts), ``validate_usp_args`` (CP = u*r), then Megatron-LM's own ``validate_args`` through the
   install() wrapper (DP = world / (TP*PP*CP)). Two CPU stand-ins, printed when used: Megatron's
   ``get_device_arch_version`` (reads CUDA) returns 9, and ``batch_invariant_kernels`` (imports triton) is
   replaced by an empty module when triton is absent.

4. ``--train``: Megatron-LM's own ``pretrain_gpt.py`` (patched) trains a tiny GPT on CPU/gloo under torchrun
   through the rehearsal's launcher, ``python -m megatron_usp.rehearsal`` (the CUDA stand-ins of
   ``megatron_usp.megatron.cpu_standins``): for every case of ``megatron_usp.rehearsal.cases.train_cases``
   a run without SP and a USP run with the same Megatron flags, mock data, fp32, dropout 0. Every iteration's lm
   loss must agree (relative difference <= ``--rtol``, default 2e-6: Megatron prints 7 digits), the baseline must
   not have USP and the USP run must report its grid and attention calls. Prints the commands, a table, and exits
   non-zero on any mismatch. ``--cases`` picks cases by name; ``--logs DIR`` keeps every run's output.
   The resume cases save at u=2 r=2 half-way (``--exit-interval``) and ``--load`` at u=1 r=4 and without SP, with
   Megatron's own optimizer and with ``--use-distributed-optimizer``. TP=2 cases run USP beside tensor parallelism;
   MTP cases run multi-token prediction. A *refused* case (``TrainCase.refused``) runs only the USP run, which must
   stop before training with the given message (validate_usp_args refusing a combination), and has no baseline.
   The packed THD cases (``--sft``) make a tiny chat dataset and character tokenizer locally (no download:
   ``megatron_usp.rehearsal.sft_fixture``) and need transformers<5, datasets and jinja2 (``pip install --target
   /tmp/mlm-sft-deps "transformers<5" datasets jinja2``, ``--sft-deps /tmp/mlm-sft-deps``); without them they are
   skipped, with the reason in the table.

Megatron-LM's training code imports a few small packages megatron-core does not need; install them aside, e.g.
``pip install --target /tmp/mlm-deps six regex pyyaml pydantic pybind11 psutil``, and pass ``--deps /tmp/mlm-deps``
(pybind11 builds Megatron's dataset helpers for ``--train``).
Exits non-zero when a step fails. This file drives and judges; what runs is in ``megatron_usp.rehearsal``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_usp.megatron.megatron_lm import HYBRID_CP_REFUSAL  # noqa: E402  (imports megatron.core)
from megatron_usp.rehearsal.cases import (MTP_LOCAL_NORMALIZATION_RTOL, CaseResult, TrainCase, TrainRun,
                                          distributed_optimizer_checkpoint, select_cases, train_cases,
                                          train_model_args)

REPO = Path(__file__).resolve().parent.parent
USP_ARGV = ["--ulysses-degree", "2", "--ring-degree", "2", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
            "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]


def run(command, **kwargs) -> int:
    print("$", " ".join(str(part) for part in command), flush=True)
    result = subprocess.run(command, text=True, capture_output=True, **kwargs)
    output = (result.stdout + result.stderr).strip()
    print("\n".join(line for line in output.splitlines() if "warn" not in line.lower()))
    print(f"(exit {result.returncode})", flush=True)
    return result.returncode


def touched_files(megatron_dir: Path) -> list:
    out = subprocess.run([sys.executable, str(REPO / "tools" / "apply_megatron_patch.py"), str(megatron_dir),
                          "--check"], capture_output=True, text=True).stdout
    patch_set = Path(re.search(r"patch set (\S+)", out).group(1))
    files = []
    for patch in sorted(patch_set.glob("*.patch")):
        numstat = subprocess.run(["git", "apply", "--numstat", str(patch)], capture_output=True, text=True).stdout
        files += [line.split("\t")[2] for line in numstat.splitlines()]
    return files


# ---------------------------------------------------------------------------------------------- --train

LAUNCHER = "megatron_usp.rehearsal"
USP_PROBE = re.compile(r"megatron_lm_cpu: USP grid: (?P<grid>.*?); attention calls: (?P<calls>\d+)")
LOSS_LINE = re.compile(r"iteration\s+(?P<it>\d+)/\s*\d+ \|.*?\| lm loss: (?P<loss>[-+0-9.eEnaNiIf]+) \|")


def launcher_command(python: str, script: Path, run: TrainRun, model_args: Sequence[str]) -> List[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(run.nproc),
            "-m", LAUNCHER, *run.launcher, str(script), *[arg for arg in model_args if arg not in run.without],
            *run.data, *run.args]


def make_sft_fixture(python: str, folder: Path, env: Dict[str, str]) -> Tuple[Optional[Path], str]:
    """Make the --sft tokenizer and jsonl in ``folder`` with ``python``; (folder, "") or (None, why not)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([python, "-m", "megatron_usp.rehearsal.sft_fixture", str(folder), "128"], env=env,
                            text=True, capture_output=True)
    if result.returncode != 0 or "SFT FIXTURE OK" not in result.stdout:
        last = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
        return None, ("the --sft fixture needs transformers<5 (SFTTokenizer indexes apply_chat_template's result), "
                      f"datasets and jinja2 (pass --sft-deps): {last[0]}")
    print(result.stdout.strip(), flush=True)
    return folder, ""


def parse_losses(output: str) -> Dict[int, float]:
    """``{iteration: lm loss}`` from Megatron's training log lines (``... | lm loss: 5.549841E+00 | ...``)."""
    return {int(m.group("it")): float(m.group("loss")) for m in LOSS_LINE.finditer(output)}


def undo_first_log_accumulation(losses: Dict[int, float], first: int) -> Dict[int, float]:
    """Megatron-LM (<= 0.16 at least) logs a process's first iteration without resetting its loss accumulator
    (``training_log(is_first_iteration=True)``), so with --log-interval 1 the next line prints the mean of both
    iterations. Every fresh run does it at iteration 2 alike; a run resumed at ``first`` does it at ``first + 1``,
    which this undoes (``2 * logged - logged[first]``) to compare it with an uninterrupted run."""
    fixed = dict(losses)
    if first in losses and first + 1 in losses:
        fixed[first + 1] = 2 * losses[first + 1] - losses[first]
    return fixed


def parse_usp_probe(output: str) -> Optional[Tuple[str, int]]:
    """(grid, attention calls) from the launcher's probe line; grid is "none" without USP."""
    match = USP_PROBE.search(output)
    return (match.group("grid"), int(match.group("calls"))) if match else None


def relative_difference(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def compare_losses(name: str, baseline: Dict[int, float], usp: Dict[int, float], train_iters: int,
                   rtol: float, first: int = 1) -> CaseResult:
    """Every iteration first..train_iters must be in both logs and agree within ``rtol`` (NaN never agrees)."""
    result = CaseResult(name, "ok", baseline, usp)
    expected = set(range(first, train_iters + 1))
    for label, losses in (("baseline", baseline), ("USP", usp)):
        missing = sorted(expected - set(losses))
        if missing:
            result.status, result.note = "FAILED", f"{label} has no lm loss for iterations {missing}"
            return result
    worst, worst_it = 0.0, None
    for it in sorted(expected):
        diff = relative_difference(baseline[it], usp[it])
        if diff != diff:  # NaN
            diff = float("inf")
        if worst_it is None or diff > worst:
            worst, worst_it = diff, it
    result.max_rel, result.worst_iteration = worst, worst_it
    if worst > rtol:
        result.status = "MISMATCH"
        result.note = (f"iteration {worst_it}: baseline {baseline[worst_it]:.6E} vs USP {usp[worst_it]:.6E} "
                       f"(relative {worst:.2e} > {rtol:.0e})")
    return result


def check_probe(result: CaseResult, case: TrainCase, baseline_probe, usp_probe) -> CaseResult:
    """The baseline must run without USP, the USP run on the case's grid with USP attention calls (none when the
    case's grid is "none")."""
    problems = []
    if baseline_probe is None or baseline_probe[0] != "none" or baseline_probe[1] != 0:
        problems.append(f"baseline probe {baseline_probe} (expected no USP grid and 0 attention calls)")
    if case.grid == "none":
        if usp_probe != ("none", 0):
            problems.append(f"probe {usp_probe} (expected no USP grid and 0 attention calls)")
    elif usp_probe is None or usp_probe[0] != case.grid or usp_probe[1] <= 0:
        problems.append(f"USP probe {usp_probe} (expected grid {case.grid!r} and attention calls)")
    if problems:
        result.status = "FAILED"
        result.note = "; ".join(filter(None, [result.note] + problems))
    return result


def check_expected(result: CaseResult, pattern: str, output: str, iterations: int) -> CaseResult:
    """The USP run's output must match ``pattern`` at least ``iterations`` times; the note shows the last match
    (its ``value`` group when it has one)."""
    matches = list(re.finditer(pattern, output))
    if len(matches) < iterations:
        result.status = "FAILED"
        result.note = "; ".join(filter(None, [result.note, f"{len(matches)} lines match {pattern!r}, expected "
                                              f"{iterations}"]))
        return result
    last = matches[-1].groupdict().get("value") or matches[-1].group(0)
    result.note = "; ".join(filter(None, [result.note, f"{len(matches)} lines match the expected report, last {last}"]))
    return result


def judge_refusal(name: str, returncode: int, output: str, fragment: str) -> CaseResult:
    """A refused case passes when the run failed, its output has ``fragment`` (the refusal's message) and it logged
    no lm loss (it stopped before training)."""
    problems = []
    if returncode == 0:
        problems.append("the run succeeded")
    if fragment not in output:
        problems.append(f"no {fragment!r} in its output")
    if parse_losses(output):
        problems.append("it trained (logged lm loss)")
    if problems:
        return CaseResult(name, "FAILED", note=f"expected a refusal before training with {fragment!r}: "
                          + "; ".join(problems))
    return CaseResult(name, "ok", note=f"refused as expected ({fragment!r}, exit {returncode})")


def format_table(results: Sequence[CaseResult], rtol: float) -> str:
    """One row per case: the first and last losses of both runs, the largest relative difference, the verdict."""
    header = ("case", "iters", "baseline first", "baseline last", "USP first", "USP last", "max rel diff", "result")
    rows = [header]
    for r in results:
        def pick(losses: Dict[int, float], last: bool) -> str:
            return f"{losses[max(losses) if last else min(losses)]:.6E}" if losses else "-"

        rows.append((r.name, str(len(r.usp) if r.usp else len(r.baseline)),
                     pick(r.baseline, False), pick(r.baseline, True), pick(r.usp, False), pick(r.usp, True),
                     "-" if r.max_rel is None else f"{r.max_rel:.1e}", r.status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    notes = [f"  {r.name}: {r.note}" for r in results if r.note]
    footer = [f"tolerance: relative {rtol:.0e} per iteration (Megatron prints 7 digits)"]
    return "\n".join(lines + footer + notes)


def per_iteration_table(result: CaseResult) -> str:
    lines = [f"{result.name}:", "  iter  baseline       USP            rel diff"]
    for it in sorted(set(result.baseline) | set(result.usp)):
        base, usp = result.baseline.get(it), result.usp.get(it)
        diff = "-" if base is None or usp is None else f"{relative_difference(base, usp):.1e}"
        lines.append(f"  {it:<5} {'-' if base is None else f'{base:.6E}':<14} {'-' if usp is None else f'{usp:.6E}':<14} "
                     f"{diff}")
    return "\n".join(lines)


def run_training(command: List[str], env: Dict[str, str], cwd: Path, log: Path) -> Tuple[int, str]:
    print("$", " ".join(shlex.quote(part) for part in command), flush=True)
    result = subprocess.run(command, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log.write_text(result.stdout)
    print(f"  (exit {result.returncode}, log {log})", flush=True)
    if result.returncode != 0:
        errors = [line for line in result.stdout.splitlines() if "Error" in line or "error:" in line]
        print("\n".join("  " + line for line in errors[-5:]), flush=True)
    return result.returncode, result.stdout


def train(options, env: Dict[str, str]) -> int:
    """Run the --train cases; print the table; return the number of cases that did not pass."""
    script = options.megatron_dir.resolve() / "pretrain_gpt.py"
    logs = Path(options.logs or tempfile.mkdtemp(prefix="megatron-usp-train-")).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    model_args = train_model_args(options.train_iters, options.seq_length)
    env = dict(env, OMP_NUM_THREADS="1")  # same threads in every run; ranks share few cores
    checkpoint = logs / "checkpoint"
    for folder in (checkpoint, distributed_optimizer_checkpoint(checkpoint)):
        shutil.rmtree(folder, ignore_errors=True)  # the resume cases load what this run saves

    # the checkout's MTP loss weighs each CP rank's tokens by its own rolled count (0.19): see the constant
    mtp_source = options.megatron_dir / "megatron" / "core" / "transformer" / "multi_token_prediction.py"
    mtp_rtol = (MTP_LOCAL_NORMALIZATION_RTOL
                if mtp_source.is_file() and "original_num_tokens" in mtp_source.read_text() else None)

    # the checkout shards hybrid-CP batches through get_batch_on_this_cp_rank(is_hybrid_cp=...): USP refuses that
    utils_source = options.megatron_dir / "megatron" / "core" / "utils.py"
    signature = re.search(r"def get_batch_on_this_cp_rank\((.*?)\):", utils_source.read_text(), re.S) \
        if utils_source.is_file() else None
    hybrid_refused = HYBRID_CP_REFUSAL if signature and "is_hybrid_cp" in signature.group(1) else None

    def all_cases(fixture: Optional[Path] = None, why: str = "no SFT fixture") -> List[TrainCase]:
        return train_cases(fixture, why, checkpoint, options.train_iters, mtp_rtol, hybrid_refused)

    cases = select_cases(all_cases(), options.cases)
    sft_env = env
    if any(case.name.startswith("THD") for case in cases):
        sft_env = dict(env, HF_DATASETS_CACHE=str(logs / "hf-datasets"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        if options.sft_deps:
            sft_env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"].split(os.pathsep)[0],
                                                     str(Path(options.sft_deps).resolve()), env["PYTHONPATH"]])
        fixture, why = make_sft_fixture(options.python, logs / "sft", sft_env)
        chosen = [case.name for case in cases]
        cases = [case for case in all_cases(fixture, why) if case.name in chosen]
    outputs: Dict[TrainRun, Tuple[int, str]] = {}

    def output_of(run: TrainRun, env: Dict[str, str]) -> Tuple[int, str]:
        if run not in outputs:  # baselines shared by several cases run once
            outputs[run] = run_training(launcher_command(options.python, script, run, model_args), env, logs,
                                        logs / f"run{len(outputs):02d}-np{run.nproc}.log")
        return outputs[run]

    results = []
    for case in cases:
        print(f"== {case.name}", flush=True)
        if case.skip:
            results.append(CaseResult(case.name, "SKIP", note=case.skip))
            continue
        run_env = sft_env if case.name.startswith("THD") else env
        if case.refused is not None:
            usp_rc, usp_out = output_of(case.usp, run_env)
            result = judge_refusal(case.name, usp_rc, usp_out, case.refused)
            print(f"  {result.status}: {result.note}", flush=True)
            results.append(result)
            continue
        base_rc, base_out = output_of(case.baseline, run_env)
        pre_note = ""
        if case.pre is not None:
            pre_rc, pre_out = output_of(case.pre, run_env)
            last = case.first_iteration - 1
            pre = compare_losses(case.name, parse_losses(base_out), parse_losses(pre_out), last, options.rtol)
            print(per_iteration_table(dataclasses.replace(pre, name=f"{case.name} (run before)")), flush=True)
            if pre_rc or pre.status != "ok":
                pre_note = f"run before (iterations 1-{last}): exit {pre_rc}, {pre.status} {pre.note}".strip()
        usp_rc, usp_out = output_of(case.usp, run_env)
        rtol = case.rtol if case.rtol is not None else options.rtol
        usp_losses = parse_losses(usp_out)
        if case.first_iteration > 1:
            usp_losses = undo_first_log_accumulation(usp_losses, case.first_iteration)
        result = compare_losses(case.name, parse_losses(base_out), usp_losses, options.train_iters,
                                rtol, case.first_iteration)
        if case.rtol is not None:
            result.note = "; ".join(filter(None, [f"tolerance {rtol:.0e} for this case", result.note]))
        early = sorted(it for it in usp_losses if it < case.first_iteration)
        if early:  # a --load run that logs iterations before the checkpoint's did not resume
            pre_note = "; ".join(filter(None, [pre_note, f"did not resume: logged iterations {early}"]))
        if base_rc or usp_rc or pre_note:
            result.status = "FAILED"
            result.note = "; ".join(filter(None, [result.note, pre_note] +
                                           ([f"exit codes: baseline {base_rc}, USP {usp_rc}"] if base_rc or usp_rc
                                            else [])))
        result = check_probe(result, case, parse_usp_probe(base_out), parse_usp_probe(usp_out))
        if case.expect is not None:
            result = check_expected(result, case.expect, usp_out, options.train_iters - case.first_iteration + 1)
        print(per_iteration_table(result), flush=True)
        results.append(result)
    print(f"\nMegatron-LM pretrain_gpt.py on CPU/gloo, baseline (no SP) vs USP (logs in {logs}):")
    print(format_table(results, options.rtol), flush=True)
    return sum(result.status not in ("ok", "SKIP") for result in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("megatron_dir", type=Path)
    parser.add_argument("--python", default=sys.executable, help="interpreter for py_compile and the parse check")
    parser.add_argument("--deps", help="folder with Megatron-LM's extra packages (pip install --target)")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--train", action="store_true", help="also train baseline vs USP and compare losses")
    parser.add_argument("--cases", help="--train: comma-separated case names (default: all)")
    parser.add_argument("--train-iters", type=int, default=6)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--rtol", type=float, default=2e-6)
    parser.add_argument("--logs", help="--train: folder for every run's output (default: a new temporary folder)")
    parser.add_argument("--sft-deps", help="--train: folder with transformers<5, datasets and jinja2 for the THD "
                        "(--sft) cases (pip install --target); without them those cases are skipped")
    options = parser.parse_args()
    if os.sep in options.python:  # the parse check runs from another folder
        options.python = str(Path(options.python).absolute())
    tool = [sys.executable, str(REPO / "tools" / "apply_megatron_patch.py"), str(options.megatron_dir)]
    failures = 0
    failures += run(tool) != 0
    failures += run(tool + ["--check"]) != 0
    failures += run(tool) != 0
    files = [str(options.megatron_dir / name) for name in touched_files(options.megatron_dir)]
    failures += run([options.python, "-m", "py_compile", *files]) != 0
    has_torch = subprocess.run([options.python, "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        print(f"parse check skipped: {options.python} has no torch (py_compile only)")
        return int(failures > 0)
    path = [str(options.megatron_dir.resolve())] + ([str(Path(options.deps).resolve())] if options.deps else []) + [str(REPO)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), WORLD_SIZE=str(options.world_size), RANK="0",
               CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONWARNINGS="ignore")
    print(f"PYTHONPATH={env['PYTHONPATH']} WORLD_SIZE={options.world_size}")
    failures += run([options.python, "-m", "megatron_usp.rehearsal.parse_check", *USP_ARGV], env=env, cwd="/") != 0
    if options.train:
        failures += train(options, env)
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
