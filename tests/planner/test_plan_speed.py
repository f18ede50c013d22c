"""The planner answers in seconds: every shortcut it takes gives what the exhaustive computation gives.

O(r) ring-step classes = the r schedules of the library; MQSP plans sharing one rank's positions = plans built
alone; job memory from three stages = from every stage; the O(1) attention bound <= the exact prediction; the
branch-and-bound ranking = the exhaustive ranking; the 405B / 128K / 128 H100 job answers in a generous bound.
"""
from __future__ import annotations

import time
from dataclasses import replace

import pytest

from megatron_usp import planner as plan
from megatron_usp.job_cost import JobConfig, job_memory, stage_memory
from megatron_usp.mqsp import MQSPPlan
from megatron_usp.plan import attention_plan
from megatron_usp.planner.layer import _shapes, _step_work

H100 = plan.PRESETS["h100"]
LLAMA70B = plan.ModelShape(heads=64, kv_heads=8, head_dim=128, hidden=8192, seq_len=262144, num_layers=80,
                           ffn_hidden=28672, vocab=128256)
LLAMA8B = plan.ModelShape(heads=32, kv_heads=8, head_dim=128, hidden=4096, seq_len=131072, num_layers=32,
                          ffn_hidden=14336, vocab=128256)
LLAMA405B = plan.ModelShape(heads=128, kv_heads=8, head_dim=128, hidden=16384, seq_len=131072, num_layers=126,
                            ffn_hidden=53248, vocab=128256)


def _exhaustive_steps(impl: str, seq_len: int, u: int, r: int, causal: bool):
    schedules = [attention_plan(seq_len, u, r, rank, impl, causal, None, None).schedule for rank in range(r)]
    if schedules[0].transport == "allgather":
        return (_step_work(tuple(x for step in s.steps for x in _shapes(step.blocks)) for s in schedules),)
    return tuple(_step_work(_shapes(s.steps[index].blocks) for s in schedules) for index in range(len(schedules[0].steps)))


@pytest.mark.parametrize("impl", ["basic", "zigzag", "stripe", "allgather"])
@pytest.mark.parametrize("ring", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_step_classes_are_the_schedules_of_every_rank(impl, ring, causal):
    for u in (1, 2):
        seq_len = 2 * ring * u * 6
        fast = plan.schedule_blocks(impl, seq_len, u, ring, causal)
        assert [sorted(step) for step in fast] == [sorted(step) for step in _exhaustive_steps(impl, seq_len, u, ring,
                                                                                              causal)]
        assert all(sum(count for _, count in step) == ring for step in fast)


@pytest.mark.parametrize("ring,micro_q", [(2, None), (4, 8), (5, 6)])
def test_mqsp_plans_sharing_positions_are_the_plans_built_alone(ring, micro_q):
    seq_len = 2 * ring * 2 * 12
    first = MQSPPlan(seq_len, 2, ring, 0, True, micro_q)
    for rank in range(ring):
        alone = MQSPPlan(seq_len, 2, ring, rank, True, micro_q)
        shared = MQSPPlan(seq_len, 2, ring, rank, True, micro_q, shared=first)
        assert shared.blocks == alone.blocks
        assert all((a == b).all() for a, b in zip(shared.gathered_positions, alone.gathered_positions))


@pytest.mark.parametrize("pp,first,last,vpp,recompute", [
    (1, None, None, 1, "none"), (2, None, None, 1, "full"), (4, None, None, 2, "selective"), (8, None, None, 1, "none"),
    (5, 9, 7, 1, "none"), (6, 4, 4, 1, "full"), (3, 1, None, 1, "none"), (16, None, None, 5, "none"),
])
@pytest.mark.parametrize("micro_batches", [1, 3, 64])
def test_job_memory_from_three_stages_is_the_max_over_every_stage(pp, first, last, vpp, recompute, micro_batches):
    gpt = plan.gpt_shape(replace(LLAMA70B, seq_len=32768))
    job = JobConfig(tp=2, pp=pp, ulysses=2, ring=2, dp=2, recompute=recompute, micro_batches=micro_batches,
                    sequence_parallel=True, virtual_stages=vpp, first_stage_layers=first, last_stage_layers=last)
    every = max((stage_memory(gpt, job, stage) for stage in range(pp)), key=lambda memory: memory.total)
    assert job_memory(gpt, job) == every


@pytest.mark.parametrize("hardware", ["h100", "cpu", "low-fraction"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_len", [65536, 4096])
def test_the_attention_bound_is_below_every_exact_prediction(hardware, causal, seq_len):
    machine = replace(H100, causal_fraction=0.3) if hardware == "low-fraction" else plan.PRESETS[hardware]
    shape = plan.ModelShape(heads=32, kv_heads=8, head_dim=128, seq_len=seq_len, causal=causal)
    cluster = plan.Cluster(8, 4)
    configs = plan.enumerate_configs(cluster, [1, 2, 8], plan.RING_IMPLS, 1, (True, False), (None, 4096))
    assert len(configs) > 40
    ratios = []
    for config in configs:
        if plan.feasibility_reason(shape, cluster, config):
            continue
        exact = plan.predict(shape, cluster, machine, config, check=False)
        bound = plan.predict(shape, cluster, machine, config, check=False, bound=True)
        assert not bound.exact and exact.exact
        for name in ("compute_ms", "a2a_ms", "ring_exposed_ms", "tp_ms", "total_ms"):
            assert getattr(bound, name) <= getattr(exact, name) * (1 + 1e-12) + 1e-12, (config, name)
        assert bound.memory_gib == exact.memory_gib
        ratios.append(bound.total_ms / exact.total_ms)
    assert sorted(ratios)[len(ratios) // 2] > 0.75  # tight enough to prune: a bound of 0 would prune nothing


@pytest.mark.parametrize("shape,nodes,seq_len,documents", [
    (LLAMA70B, 4, 262144, None),
    (LLAMA70B, 8, 65536, None),
    (LLAMA8B, 2, 131072, None),
    (LLAMA8B, 2, 524288, None),
    (LLAMA8B, 2, 32768, "dcp"),  # coarse bounds of ring-local documents refined before the exact prediction
])
def test_branch_and_bound_ranks_as_the_exhaustive_search(shape, nodes, seq_len, documents):
    from megatron_usp.document_mixes import packed_rows

    shape, cluster = replace(shape, seq_len=seq_len), plan.Cluster(8, nodes)
    if documents:
        shape = replace(shape, documents=tuple(packed_rows(documents, seq_len, 2, 5)))
    search = dict(tp_choices=[1, 2, 4, 8], micro_qs=(None, 8192))
    exhaustive, infeasible = plan.plan_job(shape, cluster, H100, keep=None, **search)
    exact_of = {p.label(): p for p in exhaustive}
    assert len(exhaustive) > 5
    for keep in (3, 10):
        bounded, infeasible_bounded = plan.plan_job(shape, cluster, H100, keep=keep, **search)
        assert len(bounded) == len(exhaustive)
        top = [(p.label(), p.iteration_s, p.memory_gib) for p in exhaustive[:keep]]
        assert [(p.label(), p.iteration_s, p.memory_gib) for p in bounded[:keep]] == top
        assert all(p.exact for p in bounded[:keep])
        if keep == 3:  # the bound prunes: some jobs were never predicted exactly
            assert not all(p.exact for p in bounded)
            if documents:  # some ring-local grids never had their layout solved
                assert any(p.attention.coarse for p in bounded)
        # the rest carry lower bounds of their exact times, and the same memory
        for p in bounded[keep:]:
            assert p.iteration_s <= exact_of[p.label()].iteration_s * (1 + 1e-12)
            assert p.memory_gib == exact_of[p.label()].memory_gib
        assert sorted(p.reason for p in infeasible) == sorted(p.reason for p in infeasible_bounded)


def test_the_405b_job_on_128_h100_answers_in_seconds(capsys):
    start = time.perf_counter()
    status = plan.main(["--heads", "128", "--kv-heads", "8", "--head-dim", "128", "--hidden", "16384",
                        "--num-layers", "126", "--ffn-hidden", "53248", "--vocab", "128256", "--seq-len", "131072",
                        "--gpus-per-node", "8", "--nodes", "16", "--gpu", "h100"])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert elapsed < 60, f"{elapsed:.1f} s"  # ~4 s on this 2-core machine; 300 s without an answer before
    assert status == 1 and "no feasible configuration" in out and "fits with 32 nodes" in out


@pytest.mark.parametrize("impl,layout", [("zigzag", "local"), ("zigzag", "split"), ("stripe", "split"),
                                         ("stripe", "local"), ("basic", "local"), ("allgather", "split"),
                                         ("mqsp", "split")])
def test_document_steps_on_shared_positions_are_each_ranks_own_plan(impl, layout):
    """The planner's document steps (built on one plan's positions, once for impls with the same document plans:
    stripe's are zigzag's) equal each rank's own plan of ``impl``."""
    from megatron_usp.document_mixes import packed_rows
    from megatron_usp.planner.layer import document_steps

    seq_len, u, ring = 4096, 2, 4
    for cu in packed_rows("dcp", seq_len, 2, 3):
        plans = [attention_plan(seq_len, u, ring, rank, impl, True, None, cu, layout) for rank in range(ring)]
        if impl == "mqsp":
            alone = tuple(_step_work(_shapes(p.mqsp.blocks[c]) for p in plans) for c in range(len(plans[0].mqsp.chunks)))
        elif impl == "allgather":
            alone = (_step_work(tuple(b for step in p.schedule.steps for b in _shapes(step.blocks)) for p in plans),)
        else:
            alone = tuple(_step_work(_shapes(p.schedule.steps[s].blocks) for p in plans) for s in range(ring))
        steps, travel = document_steps(impl, seq_len, u, ring, True, None, cu, layout)
        assert [sorted(step) for step in steps] == [sorted(step) for step in alone]
        if layout == "local":
            assert travel == max(len(rows) for rows in plans[0].schedule.travel) / (seq_len // ring) < 1
        else:
            assert travel == 1.0


@pytest.mark.parametrize("source", ["dcp", "lognormal", "stdlib"])
def test_the_attention_bound_with_documents_is_below_every_exact_prediction(source):
    """With packed documents, every grid, impl and layout (u > 1 included; documents shorter than their chunk
    count included): the bound never exceeds the exact prediction, and for the split layout (documents cut over
    every rank: calls per document and step counted; ring-local: the cut documents' calls from the solver's layout)
    it stays close (the search predicts few grids exactly)."""
    from megatron_usp.document_mixes import packed_rows

    base = plan.ModelShape(heads=32, kv_heads=8, head_dim=128, seq_len=16384)
    shape = replace(base, documents=tuple(packed_rows(source, 16384, 2, 5)))
    cluster = plan.Cluster(8, 2)
    ratios = {"split": [], "local": []}
    for config in plan.enumerate_configs(cluster, [1, 2], plan.RING_IMPLS, 1, (True, False), (None, 4096), shape):
        if plan.feasibility_reason(shape, cluster, config):
            continue
        exact = plan.predict(shape, cluster, H100, config, check=False)
        bound = plan.predict(shape, cluster, H100, config, check=False, bound=True)
        coarse = plan.predict(shape, cluster, H100, config, check=False, bound=True, coarse=True)
        with pytest.raises(ValueError, match="pass bound=True"):  # never ignored
            plan.predict(shape, cluster, H100, config, check=False, coarse=True)
        assert coarse.coarse == (config.ring > 1 and config.document_layout == "local")
        for name in ("compute_ms", "ring_exposed_ms", "total_ms"):
            assert getattr(bound, name) <= getattr(exact, name) * (1 + 1e-12) + 1e-12, (config, name)
            assert getattr(coarse, name) <= getattr(bound, name) * (1 + 1e-12) + 1e-12, (config, name)
        if config.ring > 1 and config.ring_impl in ("basic", "zigzag", "stripe"):
            ratios[config.document_layout].append(bound.compute_ms / exact.compute_ms)
    for layout, values in ratios.items():  # (here 0.83-0.93; without the calls counted 0.18-0.60)
        assert values and sorted(values)[len(values) // 2] > 0.7, (layout, sorted(values))


@pytest.mark.parametrize("shape,nodes", [(replace(LLAMA70B, seq_len=32768), 4), (plan.ModelShape(
    heads=32, kv_heads=4, head_dim=128, hidden=2048, seq_len=65536, num_layers=48, ffn_hidden=6144, vocab=151936,
    num_experts=128, moe_topk=8, moe_ffn_hidden=768), 2)])
def test_jobs_too_large_for_any_grid_are_listed_once_and_no_fitting_job_is_lost(shape, nodes):
    """plan_job skips, after listing it once, a job whose parameters, gradients and optimizer states alone exceed
    the budget; every job predict_job finds feasible on every grid is still in the ranking, with the same time."""
    from megatron_usp.planner.job import expert_parallel_sizes, job_choices, states_gib
    from megatron_usp.planner.search import _divisors, document_layouts, impl_variants

    cluster, search = plan.Cluster(8, nodes), dict(tp_choices=[1, 2, 4, 8], micro_qs=(None,))
    ranked, infeasible = plan.plan_job(shape, cluster, H100, keep=None, **search)
    times = {p.label(): p.iteration_s for p in ranked}
    budget = H100.gpu_memory_gib - plan.DEFAULT_RESERVE_GIB
    fitting, too_large = {}, 0
    for tp in search["tp_choices"]:
        for sp in _divisors(cluster.world // tp):
            rest = cluster.world // (tp * sp)
            choices = job_choices(shape, rest, pp_choices=None, recomputes=plan.RECOMPUTE_CHOICES,
                                  distributed_optimizers=(True, False), micro_batches=(1,),
                                  global_batch=cluster.world)
            jobs = [replace(c, ep=ep) for c in choices for ep in expert_parallel_sizes(shape, c.dp * sp)]
            for u in _divisors(sp):
                for impl, micro_q in impl_variants(plan.RING_IMPLS, sp // u, (None,)):
                    for layout in document_layouts(shape, impl, sp // u):
                        config = plan.ParallelConfig(tp, u, sp // u, impl, 1, True, micro_q, layout)
                        if plan.feasibility_reason(shape, cluster, replace(config, dp=rest)):
                            continue
                        for choice in jobs:
                            p = plan.predict_job(shape, cluster, H100, config, choice)
                            if p.feasible:
                                fitting[p.label()] = p.iteration_s
                            elif p.memory is not None and states_gib(plan.gpt_shape(shape), plan.job_config(
                                    config, choice)) > budget:
                                too_large += 1
    assert fitting and too_large > len(fitting)  # the shortcut matters here
    assert times == fitting
    listed = sum(p.memory is not None and states_gib(plan.gpt_shape(shape), plan.job_config(p.config, p.job)) > budget
                 for p in infeasible)
    assert 0 < listed < too_large / 4


QWEN30B_A3B = plan.ModelShape(heads=32, kv_heads=4, head_dim=128, hidden=2048, seq_len=65536, num_layers=48,
                              ffn_hidden=6144, vocab=151936, num_experts=128, moe_topk=8, moe_ffn_hidden=768)


@pytest.mark.parametrize("shape,nodes", [(replace(LLAMA70B, seq_len=131072), 64), (QWEN30B_A3B, 4)])
def test_the_ranking_past_the_exact_jobs_is_built_only_when_asked_for(shape, nodes):
    """plan_job computes the memory of the jobs it ranks exactly and few others; the rest of its ranking, its
    infeasible jobs and ``first`` (the first job of a kind, e.g. another recompute) are what ranking every job
    gives, in the same order."""
    from megatron_usp.planner import job as job_module

    cluster, search = plan.Cluster(8, nodes), dict(tp_choices=[1, 2, 4, 8])
    full, full_infeasible = plan.plan_job(shape, cluster, H100, keep=3, **search)
    entries = [(p.label(), p.iteration_s, p.memory_gib, p.exact) for p in full]  # every job ranked, one by one
    assert len(full) == len(entries) > 1000 and [p.label() for p in full_infeasible]
    tail = [entry[1] for entry in entries if not entry[3]]
    assert all(earlier <= later for earlier, later in zip(tail, tail[1:]))  # lower bounds, in their order

    job_module._job_figures.cache_clear()
    lazy, lazy_infeasible = plan.plan_job(shape, cluster, H100, keep=3, **search)
    assert [(p.label(), p.iteration_s, p.memory_gib, p.exact) for p in lazy[:3]] == entries[:3]
    assert job_module._job_figures.cache_info().misses < len(entries) / 4  # most jobs' memory never computed
    kinds = [lambda choice: choice.recompute == "selective", lambda choice: choice.recompute == "full",
             lambda choice: choice.recompute == "none" and choice.pp > 1, lambda choice: choice.dp > 64]
    for wanted in kinds:
        expected = next((entry for p, entry in zip(full, entries) if wanted(p.job)), None)
        found = lazy.first(wanted)
        assert (found and (found.label(), found.iteration_s, found.memory_gib, found.exact)) == expected
    # asking for those left the order as it was: the whole ranking, then every infeasible job in search order
    assert [(p.label(), p.iteration_s, p.memory_gib, p.exact) for p in lazy] == entries
    assert lazy[-1].label() == entries[-1][0] and lazy[5:9] == list(full)[5:9] and bool(lazy)
    assert [p.reason for p in lazy_infeasible] == [p.reason for p in full_infeasible]
