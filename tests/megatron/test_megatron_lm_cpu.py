"""The Megatron-LM CPU rehearsal without a Megatron-LM checkout: the harness's pure logic
(tools/check_megatron_patch.py --train, megatron_usp.rehearsal: cases, probes, references) and the stand-ins of
megatron_usp.megatron.cpu_standins."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from megatron_usp import patching
from megatron_usp.megatron import cpu_standins
from megatron_usp.rehearsal import probes, references
from megatron_usp.rehearsal.cases import (MAX_LOGIT_LINE, MOCK_DATA, MTP_LOCAL_NORMALIZATION_RTOL, CaseResult,
                                          TrainCase, TrainRun, distributed_optimizer_checkpoint, select_cases,
                                          train_cases, train_model_args, usp_flags)

TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_megatron_patch.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("check_megatron_patch", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


LOG = """\
megatron_lm_cpu stand-ins: cuda-to-cpu, tensor-type-names
 [2026-11-29 12:54:40.595928] iteration        1/       3 | consumed samples:            2 | elapsed time per \
iteration (ms): 303.9 | learning rate: 6.666667E-04 | global batch size:     2 | lm loss: 5.549841E+00 | loss \
scale: 1.0 | grad norm: 1.523 | number of skipped iterations:   0 | number of nan iterations:   0 |
[Rank 0] (after 1 iterations) memory (MB) | allocated: 0.00
 [2026-11-29 12:54:40.766608] iteration        2/       3 | consumed samples:            4 | lm loss: 5.471092E+00 | \
loss scale: 1.0 |
 [2026-11-29 12:54:40.942392] iteration       10/      10 | consumed samples:            6 | lm loss: nan | x |
megatron_lm_cpu: USP grid: u=2 r=2 ring_impl=zigzag; attention calls: 12
"""


def test_parse_losses_reads_every_logged_iteration_including_nan(tool):
    losses = tool.parse_losses(LOG)
    assert losses[1] == 5.549841 and losses[2] == 5.471092
    assert sorted(losses) == [1, 2, 10] and losses[10] != losses[10]


def test_parse_usp_probe(tool):
    assert tool.parse_usp_probe(LOG) == ("u=2 r=2 ring_impl=zigzag", 12)
    assert tool.parse_usp_probe("megatron_lm_cpu: USP grid: none; attention calls: 0") == ("none", 0)
    assert tool.parse_usp_probe("no probe") is None


def test_probe_line_format_is_what_the_harness_parses(tool):
    line = f"{probes.USP_PROBE_PREFIX} grid: u=1 r=4 ring_impl=stripe; attention calls: 3"
    assert tool.parse_usp_probe(line) == ("u=1 r=4 ring_impl=stripe", 3)
    assert tool.parse_usp_probe(probes.usp_probe_line(0)) == ("none", 0)  # no grid in this process


def test_compare_losses_ok_mismatch_missing_and_nan(tool):
    base = {1: 5.548004, 2: 5.552901, 3: 5.304918}
    ok = tool.compare_losses("c", base, {1: 5.548005, 2: 5.552901, 3: 5.304918}, 3, 2e-6)
    assert ok.status == "ok" and ok.worst_iteration == 1 and ok.max_rel == pytest.approx(1.8e-7, rel=0.01)
    bad = tool.compare_losses("c", base, {1: 5.548004, 2: 5.552901, 3: 5.304818}, 3, 2e-6)
    assert bad.status == "MISMATCH" and bad.worst_iteration == 3 and "iteration 3" in bad.note
    missing = tool.compare_losses("c", base, {1: 5.548004, 2: 5.552901}, 3, 2e-6)
    assert missing.status == "FAILED" and "USP has no lm loss for iterations [3]" in missing.note
    nan = tool.compare_losses("c", base, {1: 5.548004, 2: float("nan"), 3: 5.304918}, 3, 2e-6)
    assert nan.status == "MISMATCH" and nan.worst_iteration == 2


def test_relative_difference_at_seven_digits(tool):
    assert tool.relative_difference(4.985997, 4.985997) == 0.0
    assert tool.relative_difference(5.548004, 5.548005) < 2e-6  # one unit in the last printed digit passes
    assert tool.relative_difference(5.548004, 5.548016) > 2e-6  # twelve do not


def test_check_probe_requires_no_usp_in_the_baseline_and_the_grid_in_the_usp_run(tool):
    case = TrainCase("c", TrainRun(1), TrainRun(4, usp_flags(2, 2)), "u=2 r=2 ring_impl=zigzag")

    def result():
        return CaseResult("c", "ok")

    assert tool.check_probe(result(), case, ("none", 0), ("u=2 r=2 ring_impl=zigzag", 4)).status == "ok"
    for base, usp in ((("none", 0), ("u=2 r=2 ring_impl=zigzag", 0)),  # USP grid but no USP attention ran
                      (("none", 0), ("u=1 r=4 ring_impl=stripe", 4)),  # another grid
                      (("none", 0), None),  # no probe line
                      (("u=2 r=2 ring_impl=zigzag", 4), ("u=2 r=2 ring_impl=zigzag", 4))):  # baseline with USP
        assert tool.check_probe(result(), case, base, usp).status == "FAILED"


def test_cases_compare_like_with_like():
    cases = train_cases(Path("/fixture"))
    names = [case.name for case in cases]
    assert len(set(names)) == len(names) and not any("," in name for name in names)  # --cases splits on commas
    for name in ("u2 r2 zigzag", "u1 r4 stripe", "distributed optimizer u2 r2", "recompute full u2 r2", "PP=2 u2",
                 "reset-attention-mask u2 r2 zigzag", "THD --sft u2 r2 zigzag"):
        assert name in names
    for case in cases:
        if case.refused is not None:
            continue  # test_refused_cases
        assert case.skip is None and case.baseline.data == case.usp.data, case.name
        assert case.usp.launcher == () and case.baseline.launcher in ((), ("--thd-reference-attention",),
                                                                       ("--mla-reference-attention",))
        if case.pre is not None:
            continue  # test_resume_cases
        base, usp = list(case.baseline.args), list(case.usp.args)
        assert "--ulysses-degree" not in base and "--ring-degree" not in base
        i = usp.index("--ulysses-degree")
        u, r = int(usp[i + 1]), int(usp[usp.index("--ring-degree") + 1])
        rest = usp[:i] + usp[i + 6:]
        if case.name == "qk-clip bf16 u2 r2 vs no clip":  # the baseline's local attention cannot report max logits
            assert rest[1:3] == ["--qk-clip", "--log-max-attention-logit"] and case.expect == MAX_LOGIT_LINE
            rest = rest[:1] + rest[3:]
        data_parallel = 1
        if "hybrid CP" in case.name:  # Megatron's hybrid CP spans DP x CP: 2 DP replicas, flags only it reads
            hybrid = ["--hybrid-context-parallel", "--max-seqlen-per-dp-cp-rank", "32", "--dataloader-type", "single",
                      "--rerun-mode", "disabled"]
            assert rest[1:1 + len(hybrid)] == hybrid, case.name
            rest, data_parallel = rest[:1] + rest[1 + len(hybrid):], 2
        assert rest == base, case.name  # same Megatron flags apart from the USP ones
        assert case.baseline.without == case.usp.without, case.name
        assert f"u={u} r={r} ring_impl={usp[usp.index('--usp-ring-impl') + 1]}" == case.grid

        def size(flag, args):
            return int(args[args.index(flag) + 1]) if flag in args else 1

        model_parallel = size("--pipeline-model-parallel-size", usp) * size("--tensor-model-parallel-size", usp)
        base_parallel = size("--pipeline-model-parallel-size", base) * size("--tensor-model-parallel-size", base)
        # expert parallelism keeps its own expert init: its baseline is EP x DP (as many DP replicas) without SP
        base_parallel *= size("--expert-model-parallel-size", base)
        assert case.baseline.nproc == base_parallel and case.usp.nproc == model_parallel * u * r * data_parallel, \
            case.name


def test_resume_cases_save_half_way_at_u2_r2_and_load_elsewhere():
    resume = [case for case in train_cases(checkpoint=Path("/ck"), train_iters=6)
              if case.pre is not None and "--use-distributed-optimizer" not in case.pre.args]
    assert len(resume) == 2
    for case in resume:
        pre, usp = list(case.pre.args), list(case.usp.args)
        assert case.first_iteration == 4 and case.baseline == TrainRun(1)
        assert pre[:6] == list(usp_flags(2, 2)) and case.pre.nproc == 4
        assert pre[6:] == ["--save", "/ck", "--save-interval", "3", "--exit-interval", "3"]
        assert usp[:2] == ["--load", "/ck"] and "--save" not in usp
    assert [case.grid for case in resume] == ["u=1 r=4 ring_impl=stripe", "none"]
    assert resume[1].usp == TrainRun(1, ("--load", "/ck"))


def test_distributed_optimizer_resume_cases_save_and_load_with_it_in_their_own_folder():
    cases = [case for case in train_cases(checkpoint=Path("/ck"), train_iters=6)
             if case.pre is not None and "--use-distributed-optimizer" in case.pre.args]
    assert [case.name for case in cases] == ["distributed optimizer save u2 r2 -> load u1 r4 stripe",
                                             "distributed optimizer save u2 r2 -> load without SP"]
    assert distributed_optimizer_checkpoint(Path("/ck")) == Path("/ck-distributed-optimizer")
    for case in cases:
        pre, usp = list(case.pre.args), list(case.usp.args)
        assert pre[:6] == list(usp_flags(2, 2)) and case.pre.nproc == 4 and case.first_iteration == 4
        assert pre[pre.index("--save") + 1] == "/ck-distributed-optimizer" and "--exit-interval" in pre
        assert usp[:3] == ["--load", "/ck-distributed-optimizer", "--use-distributed-optimizer"]
        assert case.baseline == TrainRun(1, ("--use-distributed-optimizer",))
    assert [case.grid for case in cases] == ["u=1 r=4 ring_impl=stripe", "none"]
    assert cases[1].usp.nproc == 1 and "--ulysses-degree" not in cases[1].usp.args


def test_tensor_parallel_and_mtp_cases():
    cases = {case.name: case for case in train_cases()}
    tp = cases["TP=2 u2"]
    assert tp.baseline == TrainRun(2, ("--tensor-model-parallel-size", "2"))
    assert tp.usp.nproc == 4 and tp.grid == "u=2 r=1 ring_impl=zigzag"
    assert cases["TP=2 u2 cpu initialization"].baseline.nproc == 2  # 0.19's CPU init depends on TP
    mtp = cases["MTP u2 r2 zigzag"]
    assert mtp.refused is None and mtp.grid == "u=2 r=2 ring_impl=zigzag" and mtp.rtol is None
    for run in (mtp.baseline, mtp.usp):
        assert run.args[:3] == ("--mtp-num-layers", "1", "--calculate-per-token-loss")
    # a checkout whose MTP weighs each CP rank's tokens by its own count (0.19): looser for MTP only
    loose = {case.name: case for case in train_cases(mtp_rtol=MTP_LOCAL_NORMALIZATION_RTOL)}
    assert loose["MTP u2 r2 zigzag"].rtol == MTP_LOCAL_NORMALIZATION_RTOL and loose["u2 r2 zigzag"].rtol is None


def test_moe_and_refused_hybrid_cases():
    cases = {case.name: case for case in train_cases(Path("/fixture"))}
    for name in ("MoE u2 r2", "MoE per-token loss u2 r2", "MoE EP=2 u2 r2 vs EP=2 DP=2"):
        assert "--num-experts" in cases[name].usp.args and cases[name].grid == "u=2 r=2 ring_impl=zigzag"
    assert cases["MoE EP=2 u2 r2 vs EP=2 DP=2"].baseline.nproc == 2
    refused = {case.name: case for case in train_cases(Path("/fixture"), hybrid_refused="drop it")}
    for grid in ("u2 zigzag", "r2 stripe"):
        assert f"THD --sft hybrid CP {grid} x DP 2" not in refused
        case = refused[f"THD --sft hybrid CP {grid} x DP 2 refused"]
        assert case.baseline is None and case.refused == "drop it" and "--hybrid-context-parallel" in case.usp.args


def test_attention_feature_cases():
    cases = {case.name: case for case in train_cases()}
    for kind in ("learnable", "off-by-one"):
        case = cases[f"softmax-type {kind} u2 r2"]
        assert case.baseline == TrainRun(1, ("--softmax-type", kind)) and case.grid == "u=2 r=2 ring_impl=zigzag"
    mla = cases["MLA u2 r2"]
    for run in (mla.baseline, mla.usp):
        assert run.args[:2] == ("--multi-latent-attention", "--no-rope-fusion")
        assert run.without == ("--group-query-attention",)  # Megatron asserts MLA excludes GQA
    assert mla.baseline.launcher == ("--mla-reference-attention",)
    clip = cases["qk-clip bf16 u2 r2 vs no clip"]
    assert clip.baseline == TrainRun(1, ("--bf16",)) and "--qk-clip" in clip.usp.args and clip.expect
    assert clip.rtol == cases["bf16 u2 r2"].rtol


def test_launcher_command_leaves_out_the_runs_without_flags(tool):
    run = TrainRun(1, ("--x",), without=("--group-query-attention",))
    command = tool.launcher_command("/py", Path("/m/pretrain_gpt.py"), run, train_model_args())
    assert "--group-query-attention" not in command and "--num-query-groups" in command and command[-1] == "--x"


def test_expected_report_lines_are_counted(tool):
    line = "megatron_lm_cpu: max attention logit: {:.6E}\n"
    output = "".join(line.format(value) for value in (1.5, 2.25))
    ok = tool.check_expected(CaseResult("c", "ok"), MAX_LOGIT_LINE, output, 2)
    assert ok.status == "ok" and "2 lines" in ok.note and "2.250000E+00" in ok.note
    short = tool.check_expected(CaseResult("c", "ok"), MAX_LOGIT_LINE, output, 3)
    assert short.status == "FAILED" and "expected 3" in short.note


def test_max_logit_report_line_is_what_the_harness_parses():
    import re

    assert re.fullmatch(MAX_LOGIT_LINE, f"{probes.MAX_LOGIT_PREFIX}: 3.000000E+00")


def test_refused_cases_run_no_baseline_and_name_the_refusal():
    refused = {case.name: case for case in train_cases() if case.refused is not None}
    assert set(refused) == {"MTP u2 r2 stripe refused", "MTP u2 r2 basic refused",
                            "MTP u2 r2 zigzag without per-token loss refused"}
    for case in refused.values():
        assert case.baseline is None and case.pre is None and case.usp.nproc == 4
        assert "--mtp-num-layers" in case.usp.args
    stripe = refused["MTP u2 r2 stripe refused"]
    assert stripe.usp.args[stripe.usp.args.index("--usp-ring-impl") + 1] == "stripe"
    assert stripe.refused == "--mtp-num-layers with --usp-ring-impl stripe"
    assert "--calculate-per-token-loss" in stripe.usp.args  # refused for the layout, not the loss
    assert "--calculate-per-token-loss" not in refused["MTP u2 r2 zigzag without per-token loss refused"].usp.args


def test_refusal_is_judged_on_exit_code_message_and_no_training(tool):
    fragment = "--mtp-num-layers with --usp-ring-impl stripe"
    output = f"[rank0]: ValueError: {fragment}: multi-token prediction shifts tokens across ranks"
    ok = tool.judge_refusal("c", 1, output, fragment)
    assert ok.status == "ok" and "refused as expected" in ok.note
    assert tool.judge_refusal("c", 0, output, fragment).status == "FAILED"  # it ran through
    other = tool.judge_refusal("c", 1, "ValueError: something else", fragment)
    assert other.status == "FAILED" and "no '--mtp-num-layers with" in other.note
    trained = tool.judge_refusal("c", 1, output + "\n" + LOG, fragment)
    assert trained.status == "FAILED" and "it trained" in trained.note
    table = tool.format_table([ok], 2e-6)
    assert table.splitlines()[2].endswith("ok")


def test_distributed_optimizer_load_fixes_are_class_level_and_idempotent():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_usp.megatron.optimizer_load import drop_local_steps, fix_distributed_optimizer_load

    fix_distributed_optimizer_load()
    methods = (DistributedOptimizer.sharded_state_dict, DistributedOptimizer.load_state_dict,
               DistributedOptimizer.load_parameter_state_from_dp_reshardable)
    fix_distributed_optimizer_load()  # idempotent: not wrapped twice
    assert DistributedOptimizer._usp_load_fixed
    assert methods == (DistributedOptimizer.sharded_state_dict, DistributedOptimizer.load_state_dict,
                       DistributedOptimizer.load_parameter_state_from_dp_reshardable)
    first, second = {"param": 1, "exp_avg": 2, "step": 0}, {"param": 3, "padding": True}
    state = {"per_bucket_numel": {0: {torch.float32: [[5]]}}, "per_bucket_numel_unpadded": [4],
             0: {torch.float32: [[first, second]]}}
    assert drop_local_steps(state) == 1
    assert first == {"param": 1, "exp_avg": 2} and second == {"param": 3, "padding": True}
    assert state["per_bucket_numel"] == {0: {torch.float32: [[5]]}} and drop_local_steps(None) == 0


def test_compare_from_a_later_iteration_and_probe_without_usp(tool):
    base = {1: 5.0, 2: 4.0, 3: 3.0}
    assert tool.compare_losses("c", base, {2: 4.0, 3: 3.0}, 3, 2e-6, first=2).status == "ok"
    assert tool.compare_losses("c", base, {3: 3.0}, 3, 2e-6, first=2).status == "FAILED"
    case = TrainCase("c", TrainRun(1), TrainRun(1, ("--load", "/ck")), "none")
    assert tool.check_probe(CaseResult("c", "ok"), case, ("none", 0), ("none", 0)).status == "ok"
    bad = tool.check_probe(CaseResult("c", "ok"), case, ("none", 0), ("u=2 r=2 ring_impl=zigzag", 4))
    assert bad.status == "FAILED"


def test_only_bf16_has_its_own_looser_tolerance():
    cases = train_cases(Path("/fixture"))
    assert {case.name: case.rtol for case in cases if case.rtol is not None} == {
        "bf16 u2 r2": 1e-4, "qk-clip bf16 u2 r2 vs no clip": 1e-4}
    for bf16 in (case for case in cases if case.rtol is not None):
        assert "--bf16" in bf16.baseline.args and "--bf16" in bf16.usp.args


def test_undo_first_log_accumulation(tool):
    logged = {4: 5.164205, 5: (5.164205 + 5.046723) / 2, 6: 4.985997}  # Megatron: iteration 5 = mean of 4 and 5
    fixed = tool.undo_first_log_accumulation(logged, 4)
    assert fixed[4] == 5.164205 and fixed[5] == pytest.approx(5.046723) and fixed[6] == 4.985997
    assert tool.undo_first_log_accumulation({4: 1.0}, 4) == {4: 1.0}


def test_documents_cases_use_documents():
    cases = {case.name: case for case in train_cases(Path("/fixture"))}
    reset = cases["reset-attention-mask u2 r2 zigzag"]
    assert "--reset-attention-mask" in reset.baseline.args and "--reset-position-ids" in reset.baseline.args
    assert reset.baseline.data[-2:] == ("--vocab-size", "20")  # NullTokenizer's EOD every 21 mock tokens
    thd = cases["THD --sft u1 r4 stripe"]
    assert thd.baseline.launcher == ("--thd-reference-attention",)
    assert "--calculate-per-token-loss" in thd.baseline.args and "--calculate-per-token-loss" in thd.usp.args
    data = list(thd.usp.data)
    assert "--sft" in data and "--mock-data" not in data
    assert data[data.index("--data-path") + 1] == "/fixture/sft.jsonl"
    assert data[data.index("--micro-batch-size") + 1] == "1"


def test_thd_cases_skip_with_the_reason_without_a_fixture():
    thd = [case for case in train_cases(None, "no transformers") if case.name.startswith("THD")]
    assert thd and all(case.skip == "no transformers" for case in thd)
    assert all(case.skip is None for case in train_cases(None) if not case.name.startswith("THD"))


def test_select_cases():
    cases = train_cases()
    assert select_cases(cases, None) == cases
    assert [c.name for c in select_cases(cases, "PP=2 u2, U2 R2 zigzag")] == ["PP=2 u2", "u2 r2 zigzag"]
    with pytest.raises(SystemExit, match="unknown --cases"):
        select_cases(cases, "u3 r3")


def test_model_args_are_deterministic_fp32_mock_data_on_gloo():
    args = train_model_args(train_iters=6, seq_length=128)
    value = {name: args[i + 1] for i, name in enumerate(args[:-1]) if name.startswith("--")}
    assert value["--distributed-backend"] == "gloo" and value["--train-iters"] == "6"
    assert value["--seq-length"] == "128" and "--tokenizer-type" not in args  # the data flags come from the run
    assert MOCK_DATA[:3] == ("--mock-data", "--tokenizer-type", "NullTokenizer")
    assert value["--attention-dropout"] == "0" and value["--hidden-dropout"] == "0"
    assert "--bf16" not in args and "--fp16" not in args
    assert int(value["--eval-interval"]) > 6 and value["--eval-iters"] == "0"


def test_launcher_command_runs_the_script_through_the_stand_ins(tool):
    command = tool.launcher_command("/py", Path("/m/pretrain_gpt.py"), TrainRun(4, ("--x",)), ["--a", "1"])
    assert command[:6] == ["/py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    assert command[6:] == ["-m", "megatron_usp.rehearsal", "/m/pretrain_gpt.py", "--a", "1",
                           *MOCK_DATA, "--x"]
    run = TrainRun(1, ("--x",), ("--sft",), ("--thd-reference-attention",))
    command = tool.launcher_command("/py", Path("/m/pretrain_gpt.py"), run, ["--a"])
    assert command[6:] == ["-m", "megatron_usp.rehearsal", "--thd-reference-attention",
                           "/m/pretrain_gpt.py", "--a", "--sft", "--x"]


def test_format_table_lists_every_case_and_the_notes(tool):
    ok = tool.compare_losses("u2 r2 zigzag", {1: 5.0, 2: 4.0}, {1: 5.0, 2: 4.0}, 2, 2e-6)
    bad = tool.compare_losses("u1 r4 stripe", {1: 5.0, 2: 4.0}, {1: 5.0, 2: 4.1}, 2, 2e-6)
    skipped = CaseResult("thd", "SKIP", note="no dataset")
    table = tool.format_table([ok, bad, skipped], 2e-6)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["case", "iters"] and set(lines[1].replace(" ", "")) == {"-"}
    assert "5.000000E+00" in lines[2] and lines[2].endswith("ok")
    assert lines[3].endswith("MISMATCH") and "2.4e-02" in lines[3]
    assert lines[4].endswith("SKIP") and "thd: no dataset" in table


def test_cuda_devices_map_to_cpu_and_type_names_read_cuda():
    mode = cpu_standins.CudaToCpu()
    with mode:
        a = torch.ones(3, device="cuda")
        b = torch.empty(2, device=torch.device("cuda", 0))
        c = torch.zeros(2, device=0, pin_memory=True)
        d = a.cuda().to("cuda:0", non_blocking=True).to(0)
        e = torch.tensor([1.0], device="cuda").pin_memory()
        names = (a.type(), torch.ones(1, dtype=torch.bfloat16).type(), torch.ones(1, dtype=torch.half).type())
        converted = a.type(torch.float64)
    assert all(t.device.type == "cpu" for t in (a, b, c, d, e))
    assert names == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", "torch.cuda.HalfTensor")
    assert converted.dtype == torch.float64
    assert a.type() == "torch.FloatTensor"  # only inside the mode


def test_thd_reference_mask_is_causal_within_documents_and_trailing_tokens_form_one_more():
    visible = ~references.thd_reference_mask(torch.tensor([[0, 2, 5]], dtype=torch.int32), 7)[0, 0]
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for start, end in ((0, 2), (2, 5), (5, 7)):
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(visible, expected)


def test_install_is_a_no_op_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_standins.install() == []
    assert not cpu_standins._MODE and not patching.patched(owner=cpu_standins.__name__)


def test_every_stand_in_is_documented():
    doc = cpu_standins.__doc__
    for name in cpu_standins.STANDINS:
        assert f"``{name}``" in doc, name


def test_helpers_make_command_names_this_interpreter(monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        out = "-I/inc/python -I/inc/pybind11" if "pybind11" in command else ".cpython-311-x86_64-linux-gnu.so"
        return type("Done", (), {"stdout": out + "\n", "returncode": 0})()

    monkeypatch.setattr(cpu_standins.subprocess, "run", fake_run)
    command = cpu_standins.helpers_make_command("/m/megatron/core/datasets", python="/venv/bin/python")
    assert command == ["make", "-C", "/m/megatron/core/datasets", "CPPFLAGS=-I/inc/python -I/inc/pybind11",
                       "LIBEXT=.cpython-311-x86_64-linux-gnu.so"]
    assert all(call[0] == "/venv/bin/python" for call in calls)


def test_mla_without_te_only_when_telinear_is_a_placeholder(monkeypatch):
    from unittest import mock

    import megatron.core.transformer.multi_latent_attention as mla

    monkeypatch.setattr(patching, "_LEDGER", [])  # this test's patches only
    monkeypatch.setattr(mla, "HAVE_TE", True)
    monkeypatch.setattr(mla, "TELinear", type("TELinear", (), {}))  # a real TE class: left alone
    assert not cpu_standins._mla_without_te() and mla.HAVE_TE
    monkeypatch.setattr(mla, "TELinear", mock.MagicMock())  # megatron-core's placeholder without TE
    assert cpu_standins._mla_without_te() and mla.HAVE_TE is False
    assert patching.patched(owner=cpu_standins.__name__) == [(mla, "HAVE_TE")]
    patching.undo_all(owner=cpu_standins.__name__)  # what uninstall() does: it puts it back
    assert mla.HAVE_TE is True


def test_mla_reference_lets_local_attention_take_mlas_head_dims(monkeypatch):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    seen = {}

    def fake_init(self, *args, **kwargs):
        seen.update(kwargs)
        self.num_attention_heads_per_partition, self.hidden_size_per_partition = 4, 4 * 24

    monkeypatch.setattr(DotProductAttention, "__init__", fake_init)
    references.install_mla_reference_attention()
    attention = DotProductAttention.__new__(DotProductAttention)
    DotProductAttention.__init__(attention, softmax_scale=0.3, k_channels=24, v_channels=16)
    assert seen == {"softmax_scale": 0.3} and attention.hidden_size_per_partition == 4 * 16
    with pytest.raises(NotImplementedError, match="softmax_scale"):
        DotProductAttention.__init__(attention, k_channels=24, v_channels=16)
    assert references.MLA_REFERENCE_FLAG in references.REFERENCES
