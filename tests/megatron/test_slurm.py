"""examples/slurm: syntax, and every launch path against a fake SLURM (stub scontrol / srun / torchrun on PATH).

The scripts are run as sbatch runs them: a copy in a spool directory, with SLURM_SUBMIT_DIR at the repo root.
"""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "examples" / "slurm"
USP = "pretrain_gpt_usp.sbatch"
MLM = "pretrain_gpt_megatron_lm.sbatch"
JOB_ID = 4242
PORT = str(10000 + JOB_ID % 50000)

SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: unexpected $*" >&2; exit 2; }
for ((i = 1; i <= ${FAKE_HOSTS:-2}; i++)); do printf 'node%03d\\n' "$i"; done
"""
# records its argv and environment, then runs the command after its options once per node, as srun would
SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_LOG/srun.argv"
env -0 > "$FAKE_LOG/srun.env"
while [[ "${1:-}" == -* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" || exit $?
done
"""
TORCHRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_LOG/torchrun.$SLURM_NODEID.argv"
"""


@pytest.fixture
def slurm(tmp_path):
    """-> run(script, *args, **env): CompletedProcess of the script in a fake 2-node x 8-GPU allocation."""
    bin_dir, log, spool = tmp_path / "bin", tmp_path / "log", tmp_path / "spool"
    for d in (bin_dir, log, spool):
        d.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("torchrun", TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run(script, *args, copy=True, **env):
        path = SLURM_DIR / script
        if copy:  # sbatch runs a copy of the batch script from its spool directory
            path = spool / "slurm_script"
            shutil.copy(SLURM_DIR / script, path)
        full_env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "FAKE_LOG": str(log),
            "SLURM_JOB_ID": str(JOB_ID),
            "SLURM_JOB_NODELIST": "node[001-002]",
            "SLURM_NNODES": "2",
            "SLURM_NODEID": "0",
            "SLURM_GPUS_ON_NODE": "8",
            "SLURM_SUBMIT_DIR": str(REPO),
        }
        full_env.update({k: v for k, v in env.items() if v is not None})
        for k in [k for k, v in env.items() if v is None]:
            full_env.pop(k, None)
        return subprocess.run(["bash", str(path), *args], env=full_env, capture_output=True, text=True, timeout=30)

    run.log = log
    return run


@pytest.fixture
def megatron_lm(tmp_path):
    """A fake Megatron-LM checkout whose pretrain_gpt.py has been patched for USP."""
    root = tmp_path / "Megatron-LM"
    root.mkdir()
    (root / "pretrain_gpt.py").write_text("from megatron_usp.megatron import add_usp_args\n")
    return root


def dry_run_command(result):
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "DRY_RUN=1" in lines[-2]
    return shlex.split(lines[-1])


def torchrun_part(argv):
    """(torchrun options, trainer script or module, trainer args) of a recorded or printed srun command line (``-m``
    is an option: the module after it is the trainer)."""
    i = argv.index("torchrun")
    rest = argv[i + 1:]
    script = next(j for j, a in enumerate(rest) if not a.startswith("-"))
    return rest[:script], rest[script], rest[script + 1:]


def flag(args, name):
    return args[args.index(name) + 1]


def read_nul(path):
    return path.read_text().split("\0")[:-1]


@pytest.mark.parametrize("path", sorted(SLURM_DIR.glob("*.sh")) + sorted(SLURM_DIR.glob("*.sbatch")),
                         ids=lambda p: p.name)
def test_bash_syntax(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_both_launchers_exist():
    assert {USP, MLM} <= {p.name for p in SLURM_DIR.glob("*.sbatch")}


@pytest.mark.parametrize("script", [USP, MLM])
def test_dry_run_prints_resolved_command(slurm, megatron_lm, script):
    result = slurm(script, "--foo", "a b", "--name", "it's $HOME", "--lr", "1e-5", DRY_RUN="1",
                   MEGATRON_LM_DIR=str(megatron_lm))
    argv = dry_run_command(result)
    assert argv[0] == "srun"
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1"} <= set(argv[:argv.index("bash")])
    options, trainer, args = torchrun_part(argv)
    launch = ["--nnodes=2", "--nproc-per-node=8", "--master-addr=node001", f"--master-port={PORT}"]
    assert options == (launch + ["-m"] if script == USP else launch)
    assert trainer == ("megatron_usp.train" if script == USP else str(megatron_lm / "pretrain_gpt.py"))
    assert flag(args, "--ulysses-degree") == "8" and flag(args, "--ring-degree") == "2"
    assert flag(args, "--tensor-model-parallel-size") == "1"
    assert flag(args, "--usp-ring-impl") == "zigzag"
    assert flag(args, "--num-query-groups") == "8" and "--group-query-attention" in args and "--bf16" in args
    assert args[-6:] == ["--foo", "a b", "--name", "it's $HOME", "--lr", "1e-5"]  # passed through, last so that they win
    assert "ulysses 8 x ring 2" in result.stdout
    assert not list(slurm.log.iterdir()), "a dry run must not call srun"


@pytest.mark.parametrize("script", [USP, MLM])
def test_launch_runs_torchrun_per_node(slurm, megatron_lm, script):
    dry = dry_run_command(slurm(script, "--foo", "a b", DRY_RUN="1", MEGATRON_LM_DIR=str(megatron_lm)))
    result = slurm(script, "--foo", "a b", MEGATRON_LM_DIR=str(megatron_lm))
    assert result.returncode == 0, result.stderr
    srun_argv = read_nul(slurm.log / "srun.argv")
    assert ["srun", *srun_argv] == dry, "the dry run must print exactly what is launched"
    env = dict(item.split("=", 1) for item in read_nul(slurm.log / "srun.env"))
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["MASTER_ADDR"] == "node001" and env["MASTER_PORT"] == PORT
    assert str(REPO) in env["PYTHONPATH"].split(":")
    if script == MLM:
        assert str(megatron_lm) in env["PYTHONPATH"].split(":")
    # each node's torchrun gets its own --node-rank from SLURM_NODEID, and otherwise the same command
    _, trainer, args = torchrun_part(dry)
    for node in (0, 1):
        torchrun_argv = read_nul(slurm.log / f"torchrun.{node}.argv")
        assert torchrun_argv[0] == f"--node-rank={node}"
        assert torchrun_argv[1:3] == ["--nnodes=2", "--nproc-per-node=8"]
        assert torchrun_argv[-len(args) - 1:] == [trainer, *args]
        assert torchrun_argv[-2:] == ["--foo", "a b"]


def test_degrees_models_and_paths_from_environment(slurm, tmp_path):
    result = slurm(USP, DRY_RUN="1", GPUS_PER_NODE="4", TP_SIZE="2", ULYSSES_DEGREE="2", RING_DEGREE="1",
                   NUM_ATTENTION_HEADS="16", NUM_QUERY_GROUPS="16", SEQ_LENGTH="8192", MICRO_BATCH_SIZE="2",
                   BF16="0", USP_RING_IMPL="stripe", USP_ATTN_BACKEND="torch",
                   DATA_PATH="/data/x_text_document", CHECKPOINT_DIR="/ckpt", MASTER_PORT="29555")
    argv = dry_run_command(result)
    options, _, args = torchrun_part(argv)
    assert "--nproc-per-node=4" in options and "--master-port=29555" in options
    assert flag(args, "--tensor-model-parallel-size") == "2"
    assert flag(args, "--ulysses-degree") == "2" and flag(args, "--ring-degree") == "1"
    assert flag(args, "--global-batch-size") == "4"  # micro batch 2 x DP 2 (8 GPUs / TP 2 / U 2 / R 1)
    assert flag(args, "--usp-ring-impl") == "stripe" and flag(args, "--usp-attn-backend") == "torch"
    assert flag(args, "--seq-length") == "8192"
    assert flag(args, "--data-path") == "/data/x_text_document"
    assert flag(args, "--save") == "/ckpt" and flag(args, "--load") == "/ckpt"
    assert "--bf16" not in args and "--group-query-attention" not in args


@pytest.mark.parametrize("script", [USP, MLM])
@pytest.mark.parametrize("env, message", [
    ({"ULYSSES_DEGREE": "3"}, "16 GPUs is not divisible by TP_SIZE 1 x PP_SIZE 1 x ULYSSES_DEGREE 3 x RING_DEGREE 2 = 6"),
    ({"TP_SIZE": "4", "ULYSSES_DEGREE": "4"}, "16 GPUs is not divisible by TP_SIZE 4 x PP_SIZE 1 x ULYSSES_DEGREE 4"),
    ({"RING_DEGREE": "4"}, "= 32: change the degrees"),
    ({"TP_SIZE": "3"}, "GPUS_PER_NODE 8 is not divisible by TP_SIZE 3"),
    ({"RING_DEGREE": "0"}, "RING_DEGREE must be a positive integer, got '0'"),
    ({"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE must be a positive integer, got 'eight'"),
])
def test_bad_degrees_fail_before_launch(slurm, megatron_lm, script, env, message):
    for dry in ("1", None):
        result = slurm(script, DRY_RUN=dry, MEGATRON_LM_DIR=str(megatron_lm), **env)
        assert result.returncode != 0
        assert message in result.stderr
        assert not (slurm.log / "srun.argv").exists()


def test_srun_cpus_and_extra_args(slurm):
    argv = dry_run_command(slurm(USP, DRY_RUN="1", SLURM_CPUS_ON_NODE="96",
                                 SRUN_EXTRA_ARGS="--container-image=nvcr.io#nvidia/pytorch:25.01-py3 --mpi=none"))
    srun_options = argv[1:argv.index("bash")]
    assert srun_options[-3:] == ["--cpus-per-task=96", "--container-image=nvcr.io#nvidia/pytorch:25.01-py3",
                                 "--mpi=none"]


def test_ulysses_across_nodes_warns(slurm):
    result = slurm(USP, DRY_RUN="1", ULYSSES_DEGREE="16", RING_DEGREE="1")
    argv = dry_run_command(result)
    assert flag(argv, "--ulysses-degree") == "16"
    assert "ulysses all-to-all groups will span nodes" in result.stderr


@pytest.mark.parametrize("script", [USP, MLM])
def test_pipeline_and_virtual_stages_reach_both_trainers(slurm, megatron_lm, script):
    """The trainer runs PP and the interleaved schedule (tests/megatron/test_trainer.py): the launcher passes them on."""
    result = slurm(script, DRY_RUN="1", PP_SIZE="2", ULYSSES_DEGREE="4", NUM_LAYERS_PER_VIRTUAL_STAGE="3",
                   MEGATRON_LM_DIR=str(megatron_lm))
    _, _, args = torchrun_part(dry_run_command(result))
    assert flag(args, "--pipeline-model-parallel-size") == "2" and flag(args, "--ulysses-degree") == "4"
    assert flag(args, "--num-layers-per-virtual-pipeline-stage") == "3"
    assert args.count("--pipeline-model-parallel-size") == 1


def test_long_node_list(slurm):
    """`scontrol show hostnames | head -n1` under pipefail dies of SIGPIPE with many hosts: must not happen."""
    result = slurm(USP, DRY_RUN="1", FAKE_HOSTS="20000")
    assert "--master-addr=node001" in dry_run_command(result)


def test_gpus_from_slurm_gpus_per_node(slurm):
    result = slurm(USP, DRY_RUN="1", SLURM_GPUS_ON_NODE=None, SLURM_GPUS_PER_NODE="h100:4")
    assert "--nproc-per-node=4" in dry_run_command(result)
    result = slurm(USP, DRY_RUN="1", SLURM_GPUS_ON_NODE=None)
    assert result.returncode != 0 and "set GPUS_PER_NODE" in result.stderr


def test_outside_an_allocation(slurm):
    result = slurm(USP, DRY_RUN="1", SLURM_NNODES=None, SLURM_JOB_NODELIST=None, SLURM_GPUS_ON_NODE=None,
                   SLURM_JOB_ID=None, SLURM_SUBMIT_DIR=None, copy=False)
    assert result.returncode != 0 and "not inside a SLURM allocation" in result.stderr
    # a dry run on a login node with everything given by hand
    result = slurm(USP, DRY_RUN="1", SLURM_NNODES=None, SLURM_JOB_NODELIST=None, SLURM_GPUS_ON_NODE=None,
                   SLURM_JOB_ID=None, SLURM_SUBMIT_DIR=None, copy=False,
                   NNODES="4", GPUS_PER_NODE="8", MASTER_ADDR="login1")
    options, _, args = torchrun_part(dry_run_command(result))
    assert options[:3] == ["--nnodes=4", "--nproc-per-node=8", "--master-addr=login1"]
    assert flag(args, "--ring-degree") == "4"


def test_common_sh_located_from_spool_copy(slurm, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = slurm(USP, DRY_RUN="1", SLURM_SUBMIT_DIR=str(elsewhere))
    assert result.returncode != 0 and "set USP_REPO" in result.stderr
    assert dry_run_command(slurm(USP, DRY_RUN="1", SLURM_SUBMIT_DIR=str(elsewhere), USP_REPO=str(REPO)))
    assert dry_run_command(slurm(USP, DRY_RUN="1", SLURM_SUBMIT_DIR=str(SLURM_DIR)))  # submitted from examples/slurm


def test_megatron_lm_requires_patched_checkout(slurm, tmp_path, megatron_lm):
    result = slurm(MLM, DRY_RUN="1")
    assert result.returncode != 0
    assert "MEGATRON_LM_DIR is not set" in result.stderr and "tools/apply_megatron_patch.py" in result.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    result = slurm(MLM, DRY_RUN="1", MEGATRON_LM_DIR=str(empty))
    assert result.returncode != 0 and "has no pretrain_gpt.py" in result.stderr

    unpatched = tmp_path / "Megatron-LM-unpatched"
    unpatched.mkdir()
    (unpatched / "pretrain_gpt.py").write_text("from megatron.training import pretrain\n")
    for dry in ("1", None):
        result = slurm(MLM, DRY_RUN=dry, MEGATRON_LM_DIR=str(unpatched))
        assert result.returncode != 0
        assert "is not patched for USP" in result.stderr
        assert "tools/apply_megatron_patch.py $MEGATRON_LM_DIR" in result.stderr
        assert not (slurm.log / "srun.argv").exists()


def test_megatron_lm_flags(slurm, megatron_lm):
    _, _, args = torchrun_part(dry_run_command(slurm(MLM, DRY_RUN="1", MEGATRON_LM_DIR=str(megatron_lm))))
    assert flag(args, "--pipeline-model-parallel-size") == "1"
    assert flag(args, "--max-position-embeddings") == flag(args, "--seq-length")
    assert flag(args, "--attention-backend") == "auto"
    assert flag(args, "--tokenizer-type") == "NullTokenizer" and flag(args, "--vocab-size") == "32000"
    assert "--mock-data" in args and "--data-path" not in args

    argv = dry_run_command(slurm(MLM, DRY_RUN="1", MEGATRON_LM_DIR=str(megatron_lm), PP_SIZE="2",
                                 ULYSSES_DEGREE="4", DATA_PATH="/data/d", TOKENIZER_TYPE="HuggingFaceTokenizer",
                                 TOKENIZER_MODEL="meta-llama/Llama-3.1-8B"))
    _, _, args = torchrun_part(argv)
    assert flag(args, "--pipeline-model-parallel-size") == "2" and flag(args, "--ulysses-degree") == "4"
    assert flag(args, "--data-path") == "/data/d" and "--mock-data" not in args
    assert flag(args, "--tokenizer-model") == "meta-llama/Llama-3.1-8B" and "--vocab-size" not in args
