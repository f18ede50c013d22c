"""The trainer (python -m megatron_usp.train) end to end under torchrun (gloo, CPU), its data, and tools/loss_parity.py."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

from conftest import load_tool  # noqa: E402

loss_parity = load_tool("loss_parity")

from megatron_usp.train import data as gpt_data  # noqa: E402

MODEL_ARGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention",
              "--num-query-groups", "2", "--seq-length", "48", "--micro-batch-size", "1", "--global-batch-size", "2",
              "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--corpus-bytes", "200000"]


def torchrun(world_size: int, args: list[str], timeout: int = 240, script: Path = None, env: dict = None,
             expect_failure: bool = False) -> str:
    """The trainer (``-m megatron_usp.train``, or ``script``) on ``world_size`` gloo ranks."""
    trainer = [str(script)] if script is not None else ["-m", "megatron_usp.train"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
               *trainer, *MODEL_ARGS, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    failed = result.returncode != 0
    assert failed == expect_failure, f"{' '.join(command)} exit {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                     f"{result.stderr[-5000:]}"
    return result.stdout + result.stderr if expect_failure else result.stdout


def losses(path: Path) -> dict[int, float]:
    return loss_parity.read_losses(str(path))


@pytest.mark.timeout(900)
def test_checkpoint_resumes_across_grids(tmp_path):
    """dist_checkpointing with the distributed optimizer: written under (u=2, r=2) zigzag at iteration 2, resumed
    without SP and under TP=2 x PP=2 (DP, TP and PP all change): iterations 3 and 4 have the losses of the
    uninterrupted (2, 2) run (model, Adam moments and step, scheduler all restored and resharded). Megatron-LM's
    rehearsal covers u=1 r=4 stripe."""
    save = tmp_path / "ckpt"
    out = torchrun(4, ["--ulysses-degree", "2", "--ring-degree", "2", "--usp-ring-impl", "zigzag", "--train-iters",
                       "4", "--save", str(save), "--save-interval", "2", "--loss-csv", str(tmp_path / "full.csv")])
    assert "lm loss" in out and "saved checkpoint at iteration 2" in out, out
    assert "DistributedDataParallel" in out and "ZeRO-1" in out and "dist_checkpointing" in out, out
    full = losses(tmp_path / "full.csv")
    assert sorted(full) == [1, 2, 3, 4] and full[4] < full[1], full
    resumed = {}
    for name, world_size, grid in (("nosp", 1, []),
                                   ("tp2pp2", 4, ["--tensor-model-parallel-size", "2",
                                                  "--pipeline-model-parallel-size", "2"])):
        csv_path = tmp_path / f"{name}.csv"
        csv_path.write_text((tmp_path / "full.csv").read_text())  # the resumed run keeps rows 1-2 of its log
        out = torchrun(world_size, [*grid, "--train-iters", "4", "--load", str(save), "--ckpt-step", "2",
                                    "--loss-csv", str(csv_path)])
        assert "loaded checkpoint at iteration 2" in out and "ulysses 2 x ring 2 zigzag" in out, out
        resumed[name] = losses(csv_path)
        assert sorted(resumed[name]) == [1, 2, 3, 4], resumed[name]
        assert resumed[name][2] == full[2]
        for iteration in (3, 4):  # the second step after the resume also checks Adam's step counts
            assert abs(resumed[name][iteration] - full[iteration]) <= 1e-6 * full[iteration], (name, resumed, full)
    # and they differ from a model that did not load the checkpoint: the comparison can fail. (--load of a
    # directory with nothing saved yet starts from scratch, as Megatron does for a requeued job's first run.)
    fresh = tmp_path / "fresh.csv"
    out = torchrun(1, ["--train-iters", "2", "--loss-csv", str(fresh), "--load", str(tmp_path / "empty")])
    assert "starting from random weights" in out, out
    assert abs(losses(fresh)[1] - full[3]) > 1e-2


@pytest.mark.timeout(600)
def test_pipeline_recompute_and_plain_optimizer_match_without_sp(tmp_path):
    """megatron-core's 1F1B schedule (PP=2) with u=2 and full activation recompute, non-distributed optimizer:
    every iteration's loss equals PP=2 without SP and without recompute (fp32, <= 1e-6 relative)."""
    common = ["--pipeline-model-parallel-size", "2", "--train-iters", "3", "--no-use-distributed-optimizer",
              "--global-batch-size", "4"]
    out = torchrun(4, [*common, "--ulysses-degree", "2", "--recompute-granularity", "full",
                       "--loss-csv", str(tmp_path / "usp.csv")])
    assert "forward_backward_pipelining_without_interleaving" in out and "ZeRO-1" not in out, out
    torchrun(2, [*common, "--loss-csv", str(tmp_path / "base.csv")])
    usp, base = losses(tmp_path / "usp.csv"), losses(tmp_path / "base.csv")
    assert sorted(usp) == sorted(base) == [1, 2, 3]
    for iteration in usp:
        assert abs(usp[iteration] - base[iteration]) <= 1e-6 * base[iteration], (iteration, usp, base)
    assert base[3] < base[1] - 1e-3, base  # it trains: a step that did nothing would fail


@pytest.mark.timeout(600)
def test_uneven_pipeline_stages_with_usp_match_without_sp(tmp_path):
    """Megatron-LM's --decoder-first-pipeline-num-layers (3 layers over PP=2: 1 + 2) with u=2: every iteration's
    loss equals the same uneven pipeline without SP (the planner proposes such splits when PP does not divide the
    layers)."""
    common = ["--pipeline-model-parallel-size", "2", "--num-layers", "3", "--decoder-first-pipeline-num-layers", "1",
              "--train-iters", "3", "--global-batch-size", "4"]
    torchrun(4, [*common, "--ulysses-degree", "2", "--loss-csv", str(tmp_path / "usp.csv")])
    torchrun(2, [*common, "--loss-csv", str(tmp_path / "base.csv")])
    base = losses(tmp_path / "base.csv")
    assert_same_losses(losses(tmp_path / "usp.csv"), base, [1, 2, 3])
    assert base[3] < base[1] - 1e-3, base


def assert_same_losses(got: dict, want: dict, iterations: list[int], rel: float = 1e-6) -> float:
    """Every iteration's loss within ``rel`` relative; returns the largest relative difference."""
    assert sorted(got) == sorted(want) == iterations, (got, want)
    worst = max(abs(got[i] - want[i]) / want[i] for i in iterations)
    assert worst <= rel, (worst, got, want)
    return worst


MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2", "--disable-bias-linear",
       "--expert-model-parallel-size", "2", "--train-iters", "4"]


@pytest.mark.timeout(600)
def test_moe_with_expert_parallelism_and_load_balancing_loss_matches_without_sp(tmp_path):
    """MoE layers (top-2 of 4 experts, alltoall dispatcher, load-balancing loss) with EP=2 beside u=2 x r=2 (4 ranks):
    every iteration's loss equals EP=2 x DP=2 without SP. Routing is per token; the router's statistics are summed
    over the tp_cp group (the USP grid), and its losses' gradient must be whole-sequence too: megatron-core 0.16
    scales it 1 / CP under per-token loss (without megatron_usp.megatron.moe's fix iteration 3 differs, 3e-4 at
    EP=1)."""
    out = torchrun(4, [*MOE, "--ulysses-degree", "2", "--ring-degree", "2", "--loss-csv", str(tmp_path / "usp.csv")])
    assert "ulysses 2 x ring 2" in out and "MoE 4 experts top-2 (alltoall, aux_loss x 0.01) over EP 2" in out, out
    torchrun(2, [*MOE, "--loss-csv", str(tmp_path / "base.csv")])
    base = losses(tmp_path / "base.csv")
    worst = assert_same_losses(losses(tmp_path / "usp.csv"), base, [1, 2, 3, 4])
    assert base[4] < base[1] - 1e-3, base
    print(f"MoE EP=2 u2 r2: max relative difference {worst:.2e}")


@pytest.mark.parametrize("flags, message", [
    (["--moe-router-topk", "2"], "--moe-router-topk needs --num-experts"),
    (["--num-experts", "4", "--moe-router-topk", "5", "--disable-bias-linear"], "--moe-router-topk 5 exceeds --num-experts 4"),
    (["--num-experts", "6", "--expert-model-parallel-size", "4", "--disable-bias-linear"],
     "--num-experts 6 is not divisible by"),
    (["--num-experts", "4"], "--num-experts needs --disable-bias-linear"),
])
def test_moe_flags_are_checked(flags, message):
    from megatron_usp.train.args import parse_args

    with pytest.raises(ValueError, match=message):
        parse_args(flags)


@pytest.mark.timeout(600)
def test_sequence_parallel_with_usp_matches_tensor_parallel_without(tmp_path):
    """Megatron's --sequence-parallel with TP=2 and u=2 (4 ranks): every iteration's loss equals TP=2 without
    sequence parallelism and without USP (fp32, <= 1e-6 relative). The LayerNorms' gradients are partial sums per
    TP rank under sequence parallelism: the torch norms of our spec mark their weights ``sequence_parallel`` so
    finalize_model_grads sums them over TP (without that, iterations 3-4 differ)."""
    common = ["--tensor-model-parallel-size", "2", "--train-iters", "4", "--lr-warmup-iters", "0"]
    out = torchrun(4, [*common, "--sequence-parallel", "--ulysses-degree", "2", "--loss-csv", str(tmp_path / "sp.csv")])
    assert "TP 2 (sequence parallel)" in out and "ulysses 2 x ring 1" in out, out
    torchrun(2, [*common, "--loss-csv", str(tmp_path / "tp.csv")])
    sp, tp = losses(tmp_path / "sp.csv"), losses(tmp_path / "tp.csv")
    worst = assert_same_losses(sp, tp, [1, 2, 3, 4])
    assert tp[4] < tp[1] - 1e-3, tp  # it trains: the norms' updates matter
    print(f"sequence parallel: max relative difference {worst:.2e}")


@pytest.mark.timeout(600)
def test_swiglu_rmsnorm_without_biases_ring_matches_one_rank(tmp_path):
    """--swiglu --normalization RMSNorm --disable-bias-linear under r=2 equals the same model on one rank (fp32,
    <= 1e-6 relative); the three flags are part of the model's shape: its checkpoint refuses a LayerNorm model."""
    common = ["--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--train-iters", "3",
              "--lr-warmup-iters", "0"]
    out = torchrun(2, [*common, "--ring-degree", "2", "--save", str(tmp_path / "ckpt"),
                       "--loss-csv", str(tmp_path / "ring.csv")])
    assert "RMSNorm, SwiGLU, no linear biases" in out, out
    torchrun(1, [*common, "--loss-csv", str(tmp_path / "one.csv")])
    ring, one = losses(tmp_path / "ring.csv"), losses(tmp_path / "one.csv")
    worst = assert_same_losses(ring, one, [1, 2, 3])
    print(f"swiglu / rmsnorm / no bias: max relative difference {worst:.2e}")
    # the flags built that model: gated fc1 (2 x ffn rows), no linear biases, RMSNorm (no norm biases)
    from megatron.core import dist_checkpointing

    shapes = {key: tuple(meta.global_shape) for key, meta in
              dist_checkpointing.load_tensors_metadata(str(tmp_path / "ckpt" / "iter_0000003")).items()
              if not key.startswith("optimizer")}
    assert shapes["decoder.layers.mlp.linear_fc1.weight"] == (2, 2 * 128, 32), shapes
    assert shapes["decoder.final_layernorm.weight"] == (32,), shapes
    assert not [key for key in shapes if key.endswith("bias")], shapes
    # and they are part of its shape: a LayerNorm model does not load the checkpoint
    out = torchrun(1, ["--swiglu", "--disable-bias-linear", "--train-iters", "4", "--load", str(tmp_path / "ckpt")],
                   expect_failure=True)
    assert "the checkpoint has --normalization RMSNorm, this run LayerNorm" in out, out[-3000:]


@pytest.mark.timeout(600)
def test_virtual_pipeline_stages_resume_a_pipeline_checkpoint(tmp_path):
    """Interleaved 1F1B: a PP=2 checkpoint (4 layers, iteration 2) loaded with PP=2 and two virtual stages of one
    layer each (--num-layers-per-virtual-pipeline-stage 1: model chunks "model0", "model1", two data iterators)
    continues with the losses of the uninterrupted PP=2 run (fp32, <= 1e-6 relative): the chunks hold the right
    layers, read the right micro-batches, and the checkpoint reshards across virtual stages."""
    save = tmp_path / "ckpt"
    common = ["--pipeline-model-parallel-size", "2", "--num-layers", "4", "--train-iters", "4",
              "--lr-warmup-iters", "0"]
    torchrun(2, [*common, "--save", str(save), "--save-interval", "2", "--loss-csv", str(tmp_path / "full.csv")])
    full = losses(tmp_path / "full.csv")
    (tmp_path / "vpp.csv").write_text((tmp_path / "full.csv").read_text())
    out = torchrun(2, [*common, "--num-layers-per-virtual-pipeline-stage", "1", "--load", str(save), "--ckpt-step",
                       "2", "--loss-csv", str(tmp_path / "vpp.csv")])
    assert "forward_backward_pipelining_with_interleaving" in out and "PP 2 (2 virtual stages)" in out, out
    assert "loaded checkpoint at iteration 2" in out, out
    vpp = losses(tmp_path / "vpp.csv")
    worst = assert_same_losses({i: vpp[i] for i in (3, 4)}, {i: full[i] for i in (3, 4)}, [3, 4])
    assert full[4] < full[1] - 1e-3, full
    print(f"virtual pipeline: max relative difference {worst:.2e}")


@pytest.mark.timeout(600)
def test_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    """SIGKILL of a rank as it writes the checkpoint of iteration 3: the tracker still names iteration 2, whose
    files are intact; --load resumes from it and iteration 3 has the loss the killed run logged before dying."""
    save = tmp_path / "ckpt"
    grid = ["--ring-degree", "2", "--usp-ring-impl", "zigzag", "--save", str(save), "--save-interval", "1"]
    torchrun(2, [*grid, "--train-iters", "4", "--loss-csv", str(tmp_path / "killed.csv")],
             script=REPO / "tests" / "trainer_crash.py", env={"KILL_AT_ITERATION": "3"}, expect_failure=True)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (save / "iter_0000002" / "metadata.json").is_file() and (save / "iter_0000003.partial").is_dir()
    assert not (save / "iter_0000003").exists()
    killed = losses(tmp_path / "killed.csv")
    assert sorted(killed) == [1, 2, 3], killed  # iteration 3 ran, its checkpoint did not complete
    resumed_csv = tmp_path / "resumed.csv"
    resumed_csv.write_text((tmp_path / "killed.csv").read_text())
    torchrun(2, [*grid, "--train-iters", "4", "--load", str(save), "--loss-csv", str(resumed_csv)])
    resumed = losses(resumed_csv)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (save / "iter_0000003" / "metadata.json").is_file() and not (save / "iter_0000003.partial").exists()
    assert sorted(resumed) == [1, 2, 3, 4] and resumed[2] == killed[2]
    assert abs(resumed[3] - killed[3]) <= 1e-6 * killed[3], (resumed, killed)


@pytest.mark.timeout(600)
def test_indexed_dataset_bf16_ring_stripe(tmp_path):
    """--data-path with a Megatron indexed dataset, --bf16, r=2 stripe; loss matches the 1-rank fp32 run loosely."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    gen = torch.Generator().manual_seed(0)
    for length in (70, 130, 45, 200, 90):
        builder.add_document(torch.randint(0, 100, (length,), generator=gen, dtype=torch.int32), [length])
    builder.finalize(prefix + ".idx")
    common = ["--data-path", prefix, "--vocab-size", "100", "--train-iters", "2"]
    out = torchrun(2, [*common, "--ring-degree", "2", "--usp-ring-impl", "stripe", "--bf16",
                       "--loss-csv", str(tmp_path / "bf16.csv")])
    assert "indexed dataset" in out and "bf16" in out, out
    torchrun(1, [*common, "--loss-csv", str(tmp_path / "fp32.csv")])
    bf16, fp32 = losses(tmp_path / "bf16.csv"), losses(tmp_path / "fp32.csv")
    assert abs(fp32[1] - np.log(100)) < 0.5, fp32  # an untrained model is near-uniform over the vocabulary
    for iteration in (1, 2):
        assert abs(bf16[iteration] - fp32[iteration]) < 0.05, (bf16, fp32)


def test_indexed_tokens_window_spans_documents(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    documents = [np.arange(start, start + length, dtype=np.int32) for start, length in ((0, 5), (100, 3), (200, 7))]
    for document in documents:
        builder.add_document(torch.from_numpy(document), [len(document)])
    builder.finalize(prefix + ".idx")
    stream = gpt_data.IndexedTokens(prefix)
    flat = np.concatenate(documents)
    assert len(stream) == len(flat) and stream.vocab_size == 207
    for start, length in ((0, 15), (3, 6), (4, 1), (5, 3), (7, 8)):
        np.testing.assert_array_equal(stream.window(start, length), flat[start:start + length])
    with pytest.raises(ValueError, match="not found"):
        gpt_data.IndexedTokens(str(tmp_path / "missing"))


def test_samples_are_deterministic_and_cover_each_window_once_per_epoch():
    corpus = gpt_data.ByteCorpus(max_bytes=20000)
    assert len(corpus) == 20000 and corpus.vocab_size == 256
    samples = gpt_data.GPTSamples(corpus, seq_length=64, seed=7)
    batch = samples.batch(10, 4)
    assert batch["tokens"].shape == (4, 64) and torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    again = gpt_data.GPTSamples(gpt_data.ByteCorpus(max_bytes=20000), seq_length=64, seed=7).batch(10, 4)
    assert torch.equal(batch["tokens"], again["tokens"])
    other_seed = gpt_data.GPTSamples(corpus, seq_length=64, seed=8).batch(10, 4)
    assert not torch.equal(batch["tokens"], other_seed["tokens"])
    epoch = [samples._window_index(i) for i in range(samples.num_windows)]
    assert sorted(epoch) == list(range(samples.num_windows))
    assert [samples._window_index(i) for i in range(samples.num_windows, 2 * samples.num_windows)] != epoch


def test_loss_parity_tool(tmp_path):
    for name, values in (("base", [5.0, 4.0, 3.0]), ("usp", [5.0, 4.0000004, 3.002])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["iteration", "loss"])
            writer.writerows((i + 1, v) for i, v in enumerate(values))
    base, usp = str(tmp_path / "base.csv"), str(tmp_path / "usp.csv")
    assert loss_parity.main([base, usp, "--out", str(tmp_path / "ok"), "--max-diff", "3e-3"]) == 0
    assert loss_parity.main([base, usp, "--out", str(tmp_path / "bad"), "--max-diff", "1e-3"]) == 1
    with open(tmp_path / "ok" / "loss.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["iteration", "loss_baseline", "loss_usp"]
    assert float(rows[2]["loss_usp"]) == 3.002 and (tmp_path / "ok" / "loss.png").stat().st_size > 10000
    with pytest.raises(ValueError, match="different iterations"):
        loss_parity.merge_losses({1: 1.0, 2: 1.0}, {1: 1.0})
