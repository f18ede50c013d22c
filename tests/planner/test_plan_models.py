"""The planner plans whole jobs by default: --num-layers suffices (printed assumptions for the rest), --model
presets, --attention-only by name; MoE models with expert parallelism searched beside TP, PP, u, r and DP."""
from __future__ import annotations

import pytest

from megatron_usp import planner as plan
from megatron_usp.job_cost import JobConfig, state_bytes
from megatron_usp.planner.job import JobChoice, moe_dispatch_ms, predict_job
from megatron_usp.planner.models import MODELS, default_ffn_hidden

H100 = plan.PRESETS["h100"]
JOB_70B_BARE = ["--heads", "64", "--kv-heads", "8", "--head-dim", "128", "--hidden", "8192", "--num-layers", "80",
                "--seq-len", "262144", "--gpus-per-node", "8", "--nodes", "4", "--gpu", "h100", "--top", "3"]


def test_num_layers_alone_plans_the_whole_job_with_named_assumptions(capsys):
    assert plan.main(JOB_70B_BARE) == 0
    out = capsys.readouterr().out
    assert "assumed --ffn-hidden 28672 (3.5 x hidden 8192" in out and "assumed --vocab 128256" in out
    assert "Megatron-LM: torchrun" in out and "--pipeline-model-parallel-size" in out
    assert "no feasible configuration" not in out
    # the same job with the flags spelled out plans the same winner
    assert plan.main(JOB_70B_BARE + ["--ffn-hidden", "28672", "--vocab", "128256"]) == 0
    explicit = capsys.readouterr().out
    assert explicit.split("winner: ")[1].splitlines()[0] == out.split("winner: ")[1].splitlines()[0]
    assert "assumed" not in explicit


def test_attention_only_is_asked_for_by_name(capsys):
    assert plan.main(JOB_70B_BARE[:-2] + ["--attention-only", "--top", "3", "--nodes", "4"]) in (0, 1)
    out = capsys.readouterr().out
    assert "ms per layer" in out and "Megatron-LM:" not in out and "assumed" not in out


def test_model_presets_fill_the_flags_and_flags_given_win(capsys):
    assert default_ffn_hidden(4096) == 14336 and default_ffn_hidden(8192) == 28672
    assert plan.main(["--model", "llama3-70b", "--seq-len", "262144", "--nodes", "4", "--top", "3"]) == 0
    preset = capsys.readouterr().out
    assert "--model llama3-70b: --num-layers 80 --hidden 8192" in preset and "assumed" not in preset
    assert plan.main(JOB_70B_BARE + ["--ffn-hidden", "28672", "--vocab", "128256"]) == 0
    assert capsys.readouterr().out.split("winner: ")[1].splitlines()[0] == \
        preset.split("winner: ")[1].splitlines()[0]
    assert plan.main(["--model", "llama3-8b", "--num-layers", "4", "--seq-len", "32768", "--nodes", "1"]) == 0
    assert "GPT 4 layers, hidden 4096" in capsys.readouterr().out
    for name, shape in MODELS.items():
        assert shape["heads"] % shape["kv_heads"] == 0, name
        assert ("num_experts" in shape) == ("moe_topk" in shape) == ("moe_ffn_hidden" in shape), name


@pytest.mark.parametrize("argv,message", [
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--moe-topk", "2"], "without --num-experts"),
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--num-experts", "4", "--moe-topk", "8"],
     "exceeds --num-experts"),
    (["--heads", "8", "--seq-len", "4096", "--num-experts", "4"], "plans a whole job"),
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--num-experts", "4", "--attention-only"],
     "plans a whole job"),
])
def test_moe_flags_that_cannot_be_honoured_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        plan.main(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


MOE_SHAPE = plan.ModelShape(heads=32, kv_heads=4, head_dim=128, hidden=2048, seq_len=131072, num_layers=48,
                            ffn_hidden=6144, vocab=151936, num_experts=128, moe_topk=8, moe_ffn_hidden=768)


def test_moe_plan_searches_expert_parallelism(capsys):
    assert plan.main(["--model", "qwen3-30b-a3b", "--seq-len", "131072", "--nodes", "4", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "MoE 128 experts top-8 x ffn 768" in out and "(experts " in out
    megatron = out.split("Megatron-LM: ")[1].splitlines()[0]
    assert "--num-experts 128 --moe-router-topk 8 --moe-ffn-hidden-size 768" in megatron
    assert "--expert-model-parallel-size" in megatron
    ranked, _ = plan.plan_job(MOE_SHAPE, plan.Cluster(8, 4), H100, tp_choices=[1, 2], keep=None)
    assert len({p.job.ep for p in ranked}) > 2  # EP searched
    assert plan.main(["--model", "qwen3-30b-a3b", "--seq-len", "131072", "--nodes", "4", "--ep", "4"]) == 0
    out = capsys.readouterr().out
    assert "--expert-model-parallel-size 4" in out and " EP=4 " in out.split("winner: ")[1].splitlines()[0]


def test_expert_parallelism_shards_expert_memory_and_costs_dispatch_time():
    cluster, config = plan.Cluster(8, 4), plan.ParallelConfig(1, 4, 2, "zigzag")
    by_ep = {ep: predict_job(MOE_SHAPE, cluster, H100, config, JobChoice(pp=1, dp=4, global_batch=32, ep=ep))
             for ep in (1, 2, 8, 32)}
    assert all(p.feasible or p.reason.startswith("memory") for p in by_ep.values())
    # the experts' parameters split over EP; the rest stays
    gpt = plan.gpt_shape(MOE_SHAPE)
    assert by_ep[8].expert_params_gib == pytest.approx(by_ep[1].expert_params_gib / 8)
    assert by_ep[1].memory.params - by_ep[8].memory.params == pytest.approx(
        (by_ep[1].expert_params_gib - by_ep[8].expert_params_gib) * plan.GIB)
    # the distributed optimizer shards expert state over DP x CP / EP: E / EP experts / (DP x CP / EP) per rank,
    # the same at any EP (params and grads shrink, the optimizer state does not)
    distopt = state_bytes(gpt, plan.job_config(config, JobChoice(dp=4, ep=8)), 0)["optimizer"]
    assert distopt == pytest.approx(state_bytes(gpt, plan.job_config(config, JobChoice(dp=4, ep=1)), 0)["optimizer"])
    # dispatch: nothing to move at EP 1 and TP 1; inside a node over NVLink; across nodes over IB, slower
    assert by_ep[1].moe_comm_ms == 0.0
    assert 0 < by_ep[8].moe_comm_ms < by_ep[32].moe_comm_ms
    copies = 131072 / 8 * 8 * 2048 * 2  # tokens per CP rank x top-k x hidden x bf16
    expected = 4 * (H100.intra_latency_us / 1e3 + copies * 7 / 8 / (H100.intra_node_gbps * 1e9) * 1e3)
    assert by_ep[8].moe_comm_ms == pytest.approx(expected)
    assert moe_dispatch_ms(gpt, cluster, H100, plan.ParallelConfig(2, 4, 1, "zigzag"), JobChoice(ep=1)) > 0  # TP
    # the GEMMs count the top-k experts a token meets, not the experts a rank holds
    assert by_ep[1].gemm_ms == pytest.approx(by_ep[32].gemm_ms)


def test_moe_states_floor_takes_the_largest_ep():
    # a 128-expert model whose experts alone exceed one GPU fits once they split over EP
    huge = plan.ModelShape(heads=32, kv_heads=8, head_dim=128, hidden=4096, seq_len=8192, num_layers=32,
                           ffn_hidden=14336, vocab=32000, num_experts=128, moe_topk=2, moe_ffn_hidden=14336)
    floor = plan.states_floor(huge, plan.Cluster(8, 16))
    assert floor is not None and floor[0] < 40
    whole = state_bytes(plan.gpt_shape(huge), JobConfig(tp=8, pp=1), 0)
    assert (whole["params"] + whole["grads"]) / plan.GIB > 400  # EP 1: 5x an 80 GiB GPU
