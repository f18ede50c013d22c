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
        assert "kv_lora_rank" not in shape or shape["kv_heads"] == shape["heads"], name  # MLA: no query groups


@pytest.mark.parametrize("argv,message", [
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--moe-topk", "2"], "without --num-experts"),
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--num-experts", "4", "--moe-topk", "8"],
     "exceeds --num-experts"),
    (["--heads", "8", "--seq-len", "4096", "--num-experts", "4"], "plans a whole job"),
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--ep", "2"], "without --num-experts"),
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--num-experts", "4", "--attention-only"],
     "plans a whole job"),
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--moe-shared-ffn-hidden", "64"],
     "without --num-experts"),
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--num-experts", "4", "--moe-dense-layers", "2"],
     "leaves no MoE layer"),
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--q-lora-rank", "64"], "without --kv-lora-rank"),
    (["--heads", "8", "--seq-len", "4096", "--num-layers", "2", "--v-head-dim", "64"], "without --kv-lora-rank"),
    (["--heads", "8", "--kv-heads", "2", "--seq-len", "4096", "--num-layers", "2", "--kv-lora-rank", "64"],
     "no query groups"),
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
    assert moe_dispatch_ms(gpt, cluster, H100, 2, 4, JobChoice(ep=1)) > 0  # TP
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


def _with_documents(shape, documents):
    from dataclasses import replace

    return replace(shape, documents=documents)


DENSE = plan.ModelShape(heads=32, kv_heads=8, head_dim=128, seq_len=32768)


@pytest.mark.parametrize("impl,layout", [("zigzag", "split"), ("zigzag", "local"), ("stripe", "split"),
                                         ("allgather", "split"), ("basic", "split")])
def test_one_document_spanning_the_row_is_the_dense_prediction(impl, layout):
    """The pieces cover each document's visible pairs exactly once; one document spanning the row moves what the
    dense sequence moves and computes the same pairs (in pieces split at the row's zigzag chunks: within 5 %)."""
    from megatron_usp.cost import block_pairs
    from megatron_usp.planner.layer import document_steps

    cluster = plan.Cluster(8, 2)
    config = plan.ParallelConfig(1, 4, 4, impl, document_layout=layout)
    dense = plan.predict(DENSE, cluster, H100, plan.ParallelConfig(1, 4, 4, impl), check=False)
    one = plan.predict(_with_documents(DENSE, ((0, 32768),)), cluster, H100, config, check=False)
    for name in ("ring_comm_ms", "a2a_ms"):
        assert getattr(one, name) == pytest.approx(getattr(dense, name), rel=1e-12), name
    assert one.compute_ms == pytest.approx(dense.compute_ms, rel=0.05)
    for cu in ((0, 32768), (0, 100, 5000, 5001, 32768)):
        steps, _ = document_steps(impl, 32768, 4, 4, True, None, cu, layout)
        pairs = sum(count * sum(block_pairs(*b) for b in blocks) for step in steps for blocks, count in step)
        assert pairs == sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu, cu[1:]))


def test_documents_take_the_pieces_of_each_rows_layout():
    from megatron_usp.document_mixes import packed_rows

    cluster = plan.Cluster(8, 2)
    rows = tuple(packed_rows("dcp", 65536, 3, 0))
    shape = plan.ModelShape(heads=32, kv_heads=8, head_dim=128, seq_len=65536, documents=rows)
    dense = plan.predict(_with_documents(shape, None), cluster, H100, plan.ParallelConfig(1, 1, 16, "zigzag"))
    refused = plan.predict(_with_documents(shape, None), cluster, H100,
                           plan.ParallelConfig(1, 1, 16, "zigzag", document_layout="local"))
    assert not refused.feasible and "needs packed documents" in refused.reason  # never silently ignored
    split = plan.predict(shape, cluster, H100, plan.ParallelConfig(1, 1, 16, "zigzag", document_layout="split"))
    local = plan.predict(shape, cluster, H100, plan.ParallelConfig(1, 1, 16, "zigzag", document_layout="local"))
    # documents of <= 8K tokens: a fraction of the causal square's pairs, but the split layout cuts each into 2r
    # pieces (small, slow kernel calls, one per piece); ring-local keeps most whole
    assert local.compute_ms < dense.compute_ms / 3 and local.compute_ms < split.compute_ms / 2.5
    assert local.ring_comm_ms < 0.8 * split.ring_comm_ms  # only the cut documents' K/V travel
    assert local.compute_worst_ms >= local.compute_ms + local.ring_exposed_ms - 1e-9
    # the mean over rows: each row alone, averaged
    alone = [plan.predict(_with_documents(shape, (cu,)), cluster, H100,
                          plan.ParallelConfig(1, 1, 16, "zigzag", document_layout="local")) for cu in rows]
    assert local.compute_ms == pytest.approx(sum(p.compute_ms for p in alone) / 3)
    assert local.compute_worst_ms == pytest.approx(max(p.compute_ms + p.ring_exposed_ms for p in alone))
    # (the bound with documents: tests/planner/test_plan_speed.py)


def test_the_70b_plan_with_and_without_documents(capsys):
    argv = ["--model", "llama3-70b", "--seq-len", "262144", "--nodes", "4", "--top", "3"]
    assert plan.main(argv) == 0
    dense = capsys.readouterr().out
    assert plan.main(argv + ["--documents", "dcp", "--document-rows", "2"]) == 0
    packed = capsys.readouterr().out
    assert "documents: Megatron-LM's dynamic-CP benchmark mix" in packed and "documents:" not in dense
    seconds = [float(out.split(" = ")[-1].split(" s")[0]) for out in (
        next(line for line in text.splitlines() if line.strip().startswith("iteration:")) for text in (dense, packed))]
    assert seconds[1] < seconds[0] / 2
    winner = packed.split("winner: ")[1].splitlines()[0]
    assert " local " in winner or " split " in winner
    with pytest.raises(SystemExit) as error:
        plan.main(argv + ["--documents", "/nonexistent/lengths.txt"])
    assert error.value.code == 2


def test_branch_and_bound_with_documents_ranks_as_the_exhaustive_search():
    from dataclasses import replace

    from megatron_usp.document_mixes import packed_rows

    shape = replace(plan.ModelShape(heads=32, kv_heads=8, head_dim=128, hidden=4096, seq_len=65536, num_layers=32,
                                    ffn_hidden=14336, vocab=128256), documents=tuple(packed_rows("lognormal", 65536, 2, 0)))
    cluster = plan.Cluster(8, 1)
    exhaustive, _ = plan.plan_job(shape, cluster, H100, tp_choices=[1, 2, 4], keep=None)
    bounded, _ = plan.plan_job(shape, cluster, H100, tp_choices=[1, 2, 4], keep=5)
    assert [(p.label(), p.iteration_s) for p in bounded[:5]] == [(p.label(), p.iteration_s) for p in exhaustive[:5]]
    assert not all(p.exact for p in bounded)


def test_mla_attention_is_the_padded_width_attention():
    """MLA's attention in the planner is what usp_attn runs: q, k, v padded to one width (here 128 + 64 = 192),
    heads = K/V heads; compute, all-to-all, ring traffic and memory equal a standard attention of that head dim."""
    mla = plan.ModelShape(heads=16, kv_heads=16, head_dim=128, hidden=2048, seq_len=32768, kv_lora_rank=512,
                          qk_rope_head_dim=64, v_head_dim=128)
    standard = plan.ModelShape(heads=16, kv_heads=16, head_dim=192, hidden=2048, seq_len=32768)
    assert mla.attention_head_dim == 192 and plan.gpt_shape(mla).attention_head_dim == 192
    for config in (plan.ParallelConfig(1, 4, 2, "zigzag"), plan.ParallelConfig(2, 2, 2, "mqsp", micro_q=4096),
                   plan.ParallelConfig(1, 1, 8, "allgather")):
        a, b = (plan.predict(shape, plan.Cluster(8, 1), H100, config) for shape in (mla, standard))
        assert (a.compute_ms, a.a2a_ms, a.ring_exposed_ms) == (b.compute_ms, b.a2a_ms, b.ring_exposed_ms), config
        assert plan.attention_transient_bytes(mla, config) == plan.attention_transient_bytes(standard, config)


def test_deepseek_v3_plans_with_mla_shared_experts_and_dense_layers(capsys):
    """DeepSeek-V3 at 128K on 256 H100: the plan fits, the Megatron-LM command builds that model (MLA, 256 routed
    experts top-8 + a shared expert, the first 3 layers dense), and the trainer, which builds none of them, is not
    offered."""
    import time

    start = time.perf_counter()
    assert plan.main(["--model", "deepseek-v3", "--seq-len", "131072", "--nodes", "32", "--top", "3"]) == 0
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    megatron = out.split("Megatron-LM: ")[1].splitlines()[0]
    for flags in ("--multi-latent-attention --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64 "
                  "--v-head-dim 128 --qk-layernorm --q-lora-rank 1536",
                  "--num-experts 256 --moe-router-topk 8 --moe-ffn-hidden-size 2048",
                  "--moe-shared-expert-intermediate-size 2048 --moe-layer-freq '([0]*3+[1]*58)'",
                  "--expert-model-parallel-size"):
        assert flags in megatron, flags
    assert "--group-query-attention" not in megatron
    assert "megatron_usp.train builds no multi-latent attention" in out
    assert seconds < 60, seconds  # ~6 s here


def test_dense_first_layers_sit_on_the_first_stages():
    """DeepSeek-V3's 3 dense layers: with 4 even stages of 15 + 16 ... layers all on stage 0; with 16 virtual
    chunks of 1 layer over 4 stages on stages 0, 1, 2; their experts are missing from those stages' parameters."""
    from megatron_usp.job_cost import GPTShape, parameter_count, stage_dense_layers

    v3 = GPTShape(num_layers=60, hidden=7168, heads=128, kv_heads=128, head_dim=128, ffn_hidden=18432, vocab=129280,
                  seq_len=4096, num_experts=256, moe_topk=8, moe_ffn_hidden=2048, moe_shared_ffn_hidden=2048,
                  moe_dense_layers=3, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128)
    assert [stage_dense_layers(v3, JobConfig(pp=4), stage) for stage in range(4)] == [3, 0, 0, 0]
    assert [stage_dense_layers(v3, JobConfig(pp=4, virtual_stages=15, micro_batches=4), stage)
            for stage in range(4)] == [1, 1, 1, 0]
    # a stage with 3 dense layers holds 3 layers' experts less (and 3 dense MLPs more)
    dense_mlp, expert = 3 * 7168 * 18432, 3 * 7168 * 2048
    stage0, stage1 = (parameter_count(v3, JobConfig(pp=4), stage) for stage in (0, 1))
    embedding = 129280 * 7168
    assert stage1 - (stage0 - embedding) == pytest.approx(3 * (256 * expert + 256 * 7168 + expert - dense_mlp))
