"""megatron_usp.job_cost against reality: the activation bytes a megatron-core GPTModel (local spec, USP core
attention, CPU, gloo) saves for backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` per distinct
storage (parameters excluded), vs the memory model, under each recompute mode, TP, Ulysses and ring; +-10 %."""
from __future__ import annotations

from dataclasses import replace

import pytest

from job_memory_cases import SHAPE
from megatron_usp.job_cost import (GPTShape, JobConfig, job_memory, layer_active_parameter_count, layer_parameter_count,
                                   parameter_count, stage_activation_bytes, stage_memory, state_bytes)

NONE, SELECTIVE = {}, dict(recompute_granularity="selective")
FULL_UNIFORM = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
FULL_BLOCK = dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)
# (tp, u, r, ring_impl, [(gated SwiGLU + RMSNorm, megatron recompute kwargs)]); one 2-rank pool runs them all
GRIDS = [
    (1, 1, 1, "zigzag", [(False, NONE), (False, SELECTIVE), (False, FULL_UNIFORM), (True, NONE)]),
    (2, 1, 1, "zigzag", [(False, NONE), (True, SELECTIVE), (True, dict(SELECTIVE, sequence_parallel=True))]),
    (1, 2, 1, "zigzag", [(False, NONE), (False, FULL_BLOCK)]),
    (1, 1, 2, "zigzag", [(True, NONE)]),
    (1, 1, 2, "allgather", [(False, NONE)]),
    (1, 1, 2, "mqsp", [(False, SELECTIVE)]),
]
# measured once on 4 ranks (not in CI, 4 gloo ranks cost ~40 s of CPU): TP=1 u=2 r=2 zigzag 565824 B vs 562752
# predicted (-0.5 %); TP=2 u=2 r=1 (kv heads replicated) 802048 B vs 795776 (-0.8 %)


def report_and_check(capsys, title: str, rows: list, header: bool = False) -> None:
    """Print ``rows`` of (label, predicted, measured, relative error), then assert each error is within 10 %."""
    with capsys.disabled():
        print(title)
        if header:
            print(f"  {'configuration':<58} {'predicted':>10} {'measured':>10} {'error':>7}")
        for label, predicted, size, error in rows:
            print(f"  {label:<58} {predicted:>10.0f} {size:>10d} {error:>+7.2%}")
    for label, predicted, size, error in rows:
        assert abs(error) <= 0.10, f"{label}: predicted {predicted:.0f} B, measured {size} B ({error:+.1%})"


def predicted_bytes(tp: int, u: int, r: int, gated: bool, recompute: dict) -> float:
    shape = GPTShape(**SHAPE, dtype_bytes=4, gated_mlp=gated, rmsnorm=gated, bias=not gated,
                     fused_kernels=False)  # megatron-core's torch fallbacks on CPU
    config = JobConfig(tp=tp, ulysses=u, ring=r, recompute=recompute.get("recompute_granularity", "none"),
                       recompute_method=recompute.get("recompute_method") or "uniform",
                       recompute_num_layers=recompute.get("recompute_num_layers") or 1,
                       sequence_parallel=recompute.get("sequence_parallel", False))
    return sum(stage_activation_bytes(shape, config, 0).values())


def test_activation_memory_matches_saved_tensors(isolated_rank_pool, capsys):
    measured = isolated_rank_pool(2).run("job_memory_cases:saved_bytes", timeout=300, grids=GRIDS)
    assert measured[0] == measured[1]  # every rank of these grids holds the same shapes
    rows = []
    for (tp, u, r, impl, cases), sizes in zip(GRIDS, measured[0]):
        for (gated, recompute), size in zip(cases, sizes):
            mode = recompute.get("recompute_granularity", "none")
            if mode == "full":
                mode += f" {recompute['recompute_method']}"
            label = f"TP={tp} u={u} r={r} {impl} {'swiglu+rmsnorm' if gated else 'gelu+layernorm'} recompute {mode}"
            label += " SP" if recompute.get("sequence_parallel") else ""
            predicted = predicted_bytes(tp, u, r, gated, recompute)
            rows.append((label, predicted, size, (predicted - size) / size))
    report_and_check(capsys, "\nactivation bytes per rank, one micro-batch (predicted by megatron_usp.job_cost, "
                     "measured):", rows, header=True)


LLAMA70B = GPTShape(num_layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn_hidden=28672, vocab=128256,
                    seq_len=262144)


def test_states_hand_computed():
    # 70B-class on one stage, TP 8: bf16 params 2 B + fp32 grads 4 B + (master 4 + 2 moments 8) B sharded over DP x CP
    config = JobConfig(tp=8, ulysses=1, ring=4, distributed_optimizer=True)
    states = state_bytes(LLAMA70B, config, 0)
    params = states["params"] / 2
    layer = (8192 * (64 + 16) * 128 + 64 * 128 * 8192 + 8192 * 28672 * 3) / 8 + 2 * 8192
    assert params == pytest.approx(80 * layer + 2 * 128256 * 8192 / 8 + 8192)
    assert states["grads"] == 2 * states["params"]
    assert states["optimizer"] == pytest.approx(params * 12 / 4)
    off = state_bytes(LLAMA70B, JobConfig(tp=8, ring=4, distributed_optimizer=False), 0)
    assert off["optimizer"] == pytest.approx(params * 12)


def test_recompute_and_pipeline_shrink_activations():
    base = JobConfig(tp=8, pp=1, ulysses=1, ring=4, micro_batches=8)
    none = job_memory(LLAMA70B, base)
    full = job_memory(LLAMA70B, JobConfig(**{**base.__dict__, "recompute": "full"}))
    # full recompute, chunks of 1 layer: 80 layer inputs of 65536 tokens x 8192 bf16 (+ the head, rotary table)
    assert full.activations < none.activations / 5  # TP without sequence parallelism: norms replicated
    assert full.activations == pytest.approx(80 * 65536 * 8192 * 2, rel=0.25)
    pp4 = job_memory(LLAMA70B, JobConfig(**{**base.__dict__, "pp": 4, "recompute": "full"}))
    assert pp4.stage == 0 and pp4.in_flight == 4  # 1F1B: the first stage holds PP micro-batches
    assert pp4.params < none.params / 3


STATE_GRIDS = [(1, 1, 1, True), (1, 1, 1, False), (1, 2, 1, True), (2, 1, 1, True)]  # (tp, u, r, distributed opt)


def test_state_memory_matches_megatron_optimizer(isolated_rank_pool, capsys):
    """bf16 parameters, DDP's fp32 gradient buffers, get_megatron_optimizer's fp32 masters + Adam moments (sharded
    over DP x CP with the distributed optimizer) vs job_cost.state_bytes, on 2 ranks (the rest of the grid is DP)."""
    measured = isolated_rank_pool(2).run("job_memory_cases:state_bytes_measured", timeout=300, grids=STATE_GRIDS)
    shape = GPTShape(**SHAPE, dtype_bytes=2, gated_mlp=True, rmsnorm=True, bias=False, fused_kernels=False)
    rows = []
    for (tp, u, r, distributed), sizes in zip(STATE_GRIDS, measured[0]):
        config = JobConfig(tp=tp, ulysses=u, ring=r, dp=2 // (tp * u * r), distributed_optimizer=distributed)
        predicted = state_bytes(shape, config, 0)
        for part in ("params", "grads", "optimizer"):
            label = f"TP={tp} u={u} r={r} DP={config.dp} distopt={'on' if distributed else 'off'} {part}"
            rows.append((label, predicted[part], sizes[part], (predicted[part] - sizes[part]) / sizes[part]))
    report_and_check(capsys, "\nstate bytes per rank (predicted by megatron_usp.job_cost, measured on "
                     "megatron-core):", rows)


# (PP, virtual stages, micro-batches, first / last stage layers for uneven stages); 4 layers
PIPELINE_CASES = [(2, 1, 4, None, None), (2, 2, 4, None, None), (2, 2, 2, None, None), (2, 2, 6, None, None),
                  (2, 1, 4, 1, None), (2, 1, 4, None, 1)]


def test_pipeline_peak_matches_megatron_schedules(isolated_rank_pool, capsys):
    """Peak saved-for-backward bytes of each pipeline rank while megatron-core's own schedule runs (1F1B; interleaved
    with virtual stages) vs job_cost's in-flight count x one chunk's activations (+ the head once); +-10 %."""
    measured = isolated_rank_pool(2).run("job_memory_cases:pipeline_peak_bytes", timeout=300, cases=PIPELINE_CASES)
    shape = GPTShape(**dict(SHAPE, num_layers=2 * SHAPE["num_layers"]), dtype_bytes=4, gated_mlp=False,
                     rmsnorm=False, bias=True, fused_kernels=False)
    rows = []
    for index, (pp, virtual, micro_batches, first, last) in enumerate(PIPELINE_CASES):
        config = JobConfig(pp=pp, virtual_stages=virtual, micro_batches=micro_batches, first_stage_layers=first,
                           last_stage_layers=last)
        uneven = "" if first is None and last is None else f" first/last {first}/{last}"
        for stage in range(pp):
            memory = stage_memory(shape, config, stage)
            size = measured[stage][index]
            rows.append((f"PP={pp} V={virtual} m={micro_batches}{uneven} stage {stage} ({memory.in_flight} in flight)",
                         memory.activations, size, (memory.activations - size) / size))
    report_and_check(capsys, "\npeak activation bytes per pipeline rank under megatron-core's schedule (predicted, "
                     "measured):", rows)


MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=96, moe_router_load_balancing_type="aux_loss",
           moe_aux_loss_coeff=0.01)
SP = dict(sequence_parallel=True)
# (tp, u, r, EP, [(gated SwiGLU + RMSNorm, recompute kwargs, MoE settings)]); one 2-rank pool runs them all
MOE_GRIDS = [
    (1, 1, 1, 1, [(True, NONE, MOE), (True, SELECTIVE, MOE), (True, NONE, dict(MOE, moe_router_topk=1, moe_router_pre_softmax=True))]),
    (1, 1, 1, 2, [(True, NONE, MOE)]),
    (1, 2, 1, 2, [(True, NONE, MOE)]),
    (1, 1, 2, 1, [(True, NONE, dict(MOE, num_moe_experts=8, moe_router_topk=4))]),
    (2, 1, 1, 1, [(True, SP, MOE)]),
    # DeepSeek's layout: a shared expert beside the routed ones, the first layer dense (megatron-core's pattern)
    (1, 1, 1, 2, [(True, NONE, dict(MOE, moe_shared_expert_intermediate_size=64, moe_layer_freq=[0, 1]))]),
]


def moe_shape(dense: GPTShape, moe: dict) -> GPTShape:
    """job_cost's view of megatron-core's MoE settings ``moe`` on the ``dense`` model."""
    pattern = moe.get("moe_layer_freq", [1])
    return replace(dense, num_experts=moe["num_moe_experts"], moe_topk=moe["moe_router_topk"],
                   moe_ffn_hidden=moe["moe_ffn_hidden_size"],
                   moe_shared_ffn_hidden=moe.get("moe_shared_expert_intermediate_size") or 0,
                   moe_dense_layers=pattern.index(1) if isinstance(pattern, list) else 0)


def test_moe_activation_memory_matches_saved_tensors(isolated_rank_pool, capsys):
    """A megatron-core MoE layer (local spec, SequentialMLP experts, alltoall dispatcher) vs job_cost: bytes saved
    for backward summed over the ranks (over an EP group each rank's experts get what the routing sends them; the
    sum is what every rank sends: top-k of its tokens), against the model's per-rank figure x ranks; +-10 % for the
    whole model and for the MoE layers' own part (the MoE model minus the same model with a dense MLP)."""
    grids = [(tp, u, r, ep, [case for moe_case in cases for case in (moe_case, moe_case[:2])])
             for tp, u, r, ep, cases in MOE_GRIDS]  # each MoE case, then the same model dense
    measured = isolated_rank_pool(2).run("job_memory_cases:moe_saved_bytes", timeout=300, grids=grids)
    rows = []
    for index, (tp, u, r, ep, cases) in enumerate(MOE_GRIDS):
        for case, (gated, recompute, moe) in enumerate(cases):
            dense = GPTShape(**SHAPE, dtype_bytes=4, gated_mlp=gated, rmsnorm=gated, bias=not gated,
                             fused_kernels=False)
            shape = moe_shape(dense, moe)
            config = JobConfig(tp=tp, ulysses=u, ring=r, dp=2 // (tp * u * r), ep=ep,
                               recompute=recompute.get("recompute_granularity", "none"),
                               sequence_parallel=recompute.get("sequence_parallel", False))
            predicted = 2 * sum(stage_activation_bytes(shape, config, 0).values())
            predicted_dense = 2 * sum(stage_activation_bytes(dense, replace(config, ep=1), 0).values())
            size, size_dense = (measured[0][index][2 * case + i] + measured[1][index][2 * case + i] for i in (0, 1))
            label = (f"TP={tp} u={u} r={r} EP={ep} {moe['num_moe_experts']} experts top-{moe['moe_router_topk']} "
                     f"recompute {config.recompute}")
            if shape.moe_shared_ffn_hidden or shape.moe_dense_layers:
                label += f" +shared {shape.moe_shared_ffn_hidden} dense {shape.moe_dense_layers}"
            rows.append((label, predicted, size, (predicted - size) / size))
            rows.append(("  its MoE layers minus dense MLPs", predicted - predicted_dense, size - size_dense,
                         (predicted - predicted_dense - size + size_dense) / (size - size_dense)))
    report_and_check(capsys, "\nMoE model activation bytes, both ranks (predicted by megatron_usp.job_cost, "
                     "measured):", rows, header=True)


def test_moe_states_shard_experts_over_ep():
    shape = GPTShape(num_layers=4, hidden=1024, heads=8, kv_heads=8, head_dim=128, ffn_hidden=4096, vocab=1000,
                     seq_len=4096, num_experts=8, moe_topk=2, moe_ffn_hidden=512)
    one = 1024 * 512 * 3  # a SwiGLU expert: fc1 (2 x 512) + fc2
    dense = JobConfig(dp=8, ep=1)
    sharded = JobConfig(dp=8, ep=4)
    assert layer_parameter_count(shape, sharded) == pytest.approx(layer_parameter_count(shape, dense) - 6 * one)
    states, states_ep = state_bytes(shape, dense, 0), state_bytes(shape, sharded, 0)
    assert states["params"] - states_ep["params"] == pytest.approx(4 * 6 * one * 2)
    # the distributed optimizer shards expert states over DP x CP / EP = 2 instead of 8
    experts_ep = 4 * 2 * one
    rest = states_ep["params"] / 2 - experts_ep
    assert states_ep["optimizer"] == pytest.approx((rest / 8 + experts_ep / 2) * 12)
    assert layer_active_parameter_count(shape, sharded) == pytest.approx(
        layer_parameter_count(shape, sharded, norms=False, experts=False) + 2 * one)


# megatron-core's MLASelfAttention (local spec, q/kv norms): q/k heads 16 + 8 RoPE dims, v heads 12 (padded to 24 by
# usp_attn), with and without the query's low-rank path
MLA = dict(q_lora_rank=32, kv_lora_rank=24, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12)
MLA_GRIDS = [
    (1, 1, 1, [(NONE, MLA), (NONE, dict(MLA, q_lora_rank=None)), (SELECTIVE, MLA)]),
    (2, 1, 1, [(NONE, MLA)]),
    (1, 2, 1, [(NONE, MLA)]),
    (1, 1, 2, [(NONE, MLA)]),
]


def mla_shape(mla: dict) -> GPTShape:
    return GPTShape(**dict(SHAPE, kv_heads=SHAPE["heads"], head_dim=mla["qk_head_dim"]), dtype_bytes=4,
                    fused_kernels=False, q_lora_rank=mla["q_lora_rank"] or 0, kv_lora_rank=mla["kv_lora_rank"],
                    qk_rope_head_dim=mla["qk_pos_emb_head_dim"], v_head_dim=mla["v_head_dim"])


def test_mla_activation_memory_matches_saved_tensors(isolated_rank_pool, capsys):
    """The whole MLA model and its attention's own part (the MLA model minus the same model with megatron-core's
    standard attention) vs job_cost; +-10 %."""
    grids = [(tp, u, r, [case for mla_case in cases for case in (mla_case, (mla_case[0], None))])
             for tp, u, r, cases in MLA_GRIDS]  # each MLA case, then the same model with standard attention
    measured = isolated_rank_pool(2).run("job_memory_cases:mla_saved_bytes", timeout=300, grids=grids)
    rows = []
    for (tp, u, r, cases), sizes in zip(MLA_GRIDS, measured[0]):
        for case, (recompute, mla) in enumerate(cases):
            config = JobConfig(tp=tp, ulysses=u, ring=r, recompute=recompute.get("recompute_granularity", "none"))
            predicted = sum(stage_activation_bytes(mla_shape(mla), config, 0).values())
            predicted_standard = predicted_bytes(tp, u, r, True, recompute)
            size, size_standard = sizes[2 * case], sizes[2 * case + 1]
            label = (f"TP={tp} u={u} r={r} MLA q_lora {mla['q_lora_rank']} kv_lora {mla['kv_lora_rank']} "
                     f"recompute {config.recompute}")
            rows.append((label, predicted, size, (predicted - size) / size))
            rows.append(("  its attention minus standard attention", predicted - predicted_standard,
                         size - size_standard,
                         (predicted - predicted_standard - size + size_standard) / (size - size_standard)))
    report_and_check(capsys, "\nMLA model activation bytes per rank (predicted by megatron_usp.job_cost, measured):",
                     rows, header=True)


def test_mla_shared_expert_and_dense_layer_parameters_match_megatron(isolated_rank_pool):
    """job_cost's parameter count (TP = 1, where Transformer Engine's replicated MLA down projections and the local
    spec's agree) against megatron-core's GPTModel: MLA with and without the query's low-rank path, a MoE model
    with a shared expert and its first layer dense, both together."""
    moe = dict(MOE, moe_shared_expert_intermediate_size=64, moe_layer_freq=[0, 1])
    cases = [(None, MLA), (None, dict(MLA, q_lora_rank=None)), (moe, None), (moe, MLA)]
    measured = isolated_rank_pool(1).run("job_memory_cases:parameter_numels", timeout=300, cases=cases)[0]
    dense = GPTShape(**SHAPE, dtype_bytes=4)
    for (moe_settings, mla), count in zip(cases, measured):
        shape = mla_shape(mla) if mla else dense
        shape = moe_shape(shape, moe_settings) if moe_settings else shape
        assert parameter_count(shape, JobConfig(), 0) == count, (moe_settings, mla)
