"""Issue 24 (reliability round 2), items 1, 6, 7: table-driven flag tests for the trainer, tools/plan_usp.py and
tools/bench_attention.py. Every numeric flag gets 0 (where 0 is not a valid value), a negative value and a
non-number; every pair of flags with a divisibility or range rule gets a bad pair. Each must end with exit status
!= 0 and a message naming the flag(s): never a traceback, a hang or a silently different plan. The trainer's checks
run in its rank-independent ``configure`` (no torchrun, no process group)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

from conftest import load_tool  # noqa: E402

bench_attention = load_tool("bench_attention")

from megatron_usp import planner  # noqa: E402
from megatron_usp.train import args as trainer_args  # noqa: E402
from megatron_usp.train import loop as trainer_loop  # noqa: E402

TOOLS = {"trainer": trainer_args.build_parser, "plan_usp": planner.build_parser,
         "bench_attention": bench_attention.build_parser}
# the smallest command line each tool runs with, before the flag under test
BASE_ARGV = {"trainer": [], "plan_usp": ["--heads", "8", "--seq-len", "8192"], "bench_attention": []}


def _numeric_flags(parser: argparse.ArgumentParser) -> list[tuple[str, bool]]:
    """(flag, accepts 0) for every flag that takes numbers; fails on a numeric flag without a checked type."""
    flags = []
    for action in parser._actions:
        if not action.option_strings or action.type is None:
            continue
        assert action.type not in (int, float), (f"{action.option_strings[0]} uses type={action.type.__name__}: use a "
                                                 "megatron_usp.flags type, which refuses 0 / negatives / nan")
        if hasattr(action.type, "accepts_zero"):
            flags.append((action.option_strings[0], action.type.accepts_zero))
    return flags


def _bad_values(tool: str) -> list[tuple[str, str]]:
    cases = []
    for flag, accepts_zero in _numeric_flags(TOOLS[tool]()):
        cases += [(flag, "x"), (flag, "-3")] + ([] if accepts_zero else [(flag, "0")])
    return cases


FLAG_TABLE = [(tool, flag, value) for tool in TOOLS for flag, value in _bad_values(tool)]


def test_flag_table_size():
    sizes = {tool: len(_numeric_flags(TOOLS[tool]())) for tool in TOOLS}
    print(f"\nflag table: {len(FLAG_TABLE)} (flag, bad value) cases over numeric flags {sizes}")
    assert sizes["trainer"] >= 30 and sizes["plan_usp"] >= 25 and sizes["bench_attention"] >= 15, sizes


@pytest.mark.parametrize("tool,flag,value", FLAG_TABLE, ids=[f"{t}{f}={v}" for t, f, v in FLAG_TABLE])
def test_bad_numeric_value_is_refused_naming_the_flag(tool, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[tool]().parse_args(BASE_ARGV[tool] + [flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- pairs of flags

TRAINER_MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64"]
PP2 = ["--pipeline-model-parallel-size", "2"]
TRAINER_PAIRS = [  # (world size, argv, words the message must contain)
    (1, ["--hidden-size", "30"], ["--hidden-size 30", "--num-attention-heads 4"]),
    (1, ["--group-query-attention", "--num-query-groups", "3"], ["--num-attention-heads 4", "--num-query-groups 3"]),
    (1, ["--group-query-attention"], ["--num-query-groups"]),
    (2, ["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "33"], ["--ffn-hidden-size 33", "--tensor-model"]),
    (2, ["--tensor-model-parallel-size", "2", "--vocab-size", "257"], ["--vocab-size 257", "--tensor-model"]),
    (1, ["--vocab-size", "100"], ["--vocab-size 100", "256"]),
    (4, ["--tensor-model-parallel-size", "2", "--ulysses-degree", "2", "--vocab-size", "100"], ["--vocab-size 100"]),
    (2, [*PP2, "--num-layers", "3"], ["--num-layers 3", "--pipeline-model-parallel-size 2"]),
    (2, [*PP2, "--num-layers", "3", "--decoder-first-pipeline-num-layers", "3"],
     ["--decoder-first-pipeline-num-layers 3", "--num-layers 3"]),
    (4, ["--pipeline-model-parallel-size", "4", "--num-layers", "7", "--decoder-last-pipeline-num-layers", "2"],
     ["--decoder-last-pipeline-num-layers 2", "split them evenly"]),
    (1, ["--decoder-first-pipeline-num-layers", "1"], ["--decoder-first-pipeline-num-layers 1", "PP >= 2"]),
    (2, [*PP2, "--num-layers", "4", "--decoder-first-pipeline-num-layers", "1",
         "--virtual-pipeline-model-parallel-size", "2"], ["virtual pipeline stages"]),
    (2, [*PP2, "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "3"],
     ["--num-layers-per-virtual-pipeline-stage 3"]),
    (2, ["--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "2"], ["--pipeline-model-parallel-size"]),
    (2, [*PP2, "--num-layers", "4", "--virtual-pipeline-model-parallel-size", "2", "--global-batch-size", "3"],
     ["--global-batch-size"]),
    (4, ["--ring-degree", "2", "--global-batch-size", "3", "--micro-batch-size", "2"],
     ["--global-batch-size 3", "--micro-batch-size 2"]),
    (4, ["--ring-degree", "4", "--seq-length", "50"], ["--seq-length"]),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "45"],
     ["--sequence-parallel", "--tensor-model-parallel-size 2"]),
    (4, ["--ulysses-degree", "3"], ["not divisible", "ulysses 3"]),
    (8, ["--ulysses-degree", "8"], ["heads"]),
    (4, ["--pipeline-model-parallel-size", "3", "--num-layers", "3"], ["TP 1 x PP 3"]),
    (1, ["--train-iters", "5", "--lr-warmup-iters", "5"], ["--lr-warmup-iters 5", "--train-iters 5"]),
    (1, ["--seq-length", "512", "--max-position-embeddings", "256"], ["--max-position-embeddings 256"]),
    (1, ["--lr", "1e-4", "--min-lr", "1e-3"], ["--min-lr", "--lr"]),
    (1, ["--recompute-num-layers", "2"], ["--recompute-num-layers 2", "--recompute-granularity full"]),
    (1, ["--recompute-granularity", "selective", "--recompute-method", "block"], ["--recompute-method block"]),
    (1, ["--ckpt-step", "3"], ["--ckpt-step 3", "--load"]),
    (1, ["--save-interval", "3"], ["--save-interval 3", "--save"]),
    (1, ["--data-path", "/nonexistent/prefix"], ["--data-path /nonexistent/prefix"]),
    (1, ["--corpus-bytes", "10"], ["--seq-length 64", "--corpus-bytes"]),
    (2, ["--usp-micro-q", "8", "--ring-degree", "2"], ["--usp-micro-q 8", "--usp-ring-impl mqsp"]),
]


def test_trainer_flag_pairs_fail_before_any_process_group(monkeypatch):
    """configure() is what every rank runs first: a bad pair raises ValueError naming both flags; main() never
    reaches init_process_group with them."""
    monkeypatch.setattr(trainer_loop.dist, "init_process_group",
                        lambda *a, **k: pytest.fail("init_process_group reached with bad flags"))
    for world_size, argv, words in TRAINER_PAIRS:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        with pytest.raises(ValueError) as error:
            trainer_loop.main(TRAINER_MODEL + argv)
        assert all(word in str(error.value) for word in words), (argv, str(error.value))


def test_trainer_takes_one_spelling_of_virtual_stages(capsys):
    with pytest.raises(SystemExit):  # Megatron-LM's two spellings of the virtual stages: one at a time
        trainer_args.parse_args(["--num-layers-per-virtual-pipeline-stage", "1",
                                     "--virtual-pipeline-model-parallel-size", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_trainer_good_flags_pass_configure(monkeypatch):
    """The other side of the table: values that are valid (0 where it means something) are accepted."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    args, stream, _ = trainer_args.configure(TRAINER_MODEL + [
        "--tensor-model-parallel-size", "2", "--ulysses-degree", "2", "--clip-grad", "0", "--weight-decay", "0",
        "--seed", "0", "--lr-warmup-iters", "0", "--min-lr", "0", "--recompute-granularity", "full",
        "--usp-check", "0", "--corpus-bytes", "4096"])
    assert (args.recompute_method, args.recompute_num_layers, args.vocab_size) == ("uniform", 1, stream.vocab_size)


def _run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", **env))


def test_trainer_command_line_error_has_no_traceback():
    """The issue's silent wrong training (item 1): TP=2, u=2, --vocab-size 100 on the byte corpus trained against
    zero embeddings and exited 0; now every rank stops before any process group with the reason."""
    result = _run(["-m", "megatron_usp.train", *TRAINER_MODEL, "--tensor-model-parallel-size", "2",
                   "--ulysses-degree", "2", "--vocab-size", "100", "--corpus-bytes", "65536"], {"WORLD_SIZE": "4"})
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--vocab-size 100" in result.stderr and "256" in result.stderr, result.stderr[-2000:]


PLAN_PAIRS = [
    (["--kv-heads", "3"], ["--kv-heads 3", "--heads 8"]),
    (["--tp", "3"], ["--tp 3", "--gpus-per-node 8"]),
    (["--num-layers", "8", "--pp", "16", "--ffn-hidden", "28672", "--vocab", "128256"], ["--pp 16", "--num-layers 8"]),
    (["--reserve-gib", "1000"], ["--reserve-gib 1000"]),
    (["--other-memory-gib", "500"], ["--other-memory-gib 500"]),
    (["--hardware", "/nonexistent.json"], ["--hardware /nonexistent.json"]),
    (["--compare", "/nonexistent.json"], ["--compare /nonexistent.json"]),
    (["--ring-impls", ","], ["--ring-impls"]),
    (["--ring-impls", "zigzag,spiral"], ["--ring-impls", "spiral"]),
    (["--micro-q", "none,0"], ["--micro-q"]),
    (["--virtual-stages", "0"], ["--virtual-stages"]),
]


@pytest.mark.parametrize("argv,words", PLAN_PAIRS, ids=[" ".join(a) for a, _ in PLAN_PAIRS])
def test_plan_usp_bad_pairs(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        planner.main(BASE_ARGV["plan_usp"] + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


BENCH_PAIRS = [
    (["--seq-len", "64", "--heads", "2", "--head-dim", "8", "--kv-heads", "3"], ["--kv-heads 3", "--heads 2"]),
    (["--heads", "3", "--ulysses-degree", "2"], ["--heads 3", "ulysses degree 2"]),
    (["--ulysses-degree", "3", "--world-size", "4"], ["ulysses degree 3", "world size 4"]),
    (["--mode", "balance", "--documents", "lognormal", "--world-sizes", "6", "--ulysses-degrees", "4"],
     ["ulysses degree 4", "world size 6"]),
    (["--seq-lens", "1024"], ["--seq-lens", "--mode simulate-rank"]),
    (["--mode", "memory", "--seq-len", "1024"], ["--seq-len", "--mode memory"]),
    (["--world-sizes", "4"], ["--world-sizes"]),
    (["--micro-q", "64"], ["--micro-q"]),
    (["--mode", "multi-rank", "--world-size", "4"], ["--world-size 4", "launcher"]),
]


@pytest.mark.parametrize("argv,words", BENCH_PAIRS, ids=[" ".join(a) for a, _ in BENCH_PAIRS])
def test_bench_attention_bad_pairs(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_attention.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


def test_bench_attention_kv_heads_that_do_not_divide_exit_cleanly():
    """Item 6: this command died with SIGFPE (exit 136, no message)."""
    result = _run(["tools/bench_attention.py", "--seq-len", "64", "--heads", "2", "--head-dim", "8", "--kv-heads", "3"],
                  {})
    assert result.returncode == 2 and "--kv-heads 3" in result.stderr and "Traceback" not in result.stderr
