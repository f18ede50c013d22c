"""--ulysses-degree / --ring-degree flags and USPAttention's construction checks (no processes needed)."""
from __future__ import annotations

import argparse

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

from megatron_usp.megatron import add_usp_args, validate_usp_args  # noqa: E402
from megatron_usp.config import USPConfig  # noqa: E402


def parse(*argv, **defaults):
    parser = add_usp_args(argparse.ArgumentParser())
    args = parser.parse_args(list(argv))
    base = dict(context_parallel_size=1, cp_comm_type=["p2p"], hierarchical_context_parallel_sizes=None,
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1, world_size=8,
                num_attention_heads=16, group_query_attention=True, num_query_groups=4, seq_length=4096)
    base.update(defaults)
    for key, value in base.items():
        setattr(args, key, value)
    return args


def test_defaults_and_flags_parse():
    args = parse()
    assert (args.ulysses_degree, args.ring_degree, args.usp_ring_impl, args.usp_attn_backend) == (1, 1, "zigzag", "auto")
    args = parse("--ulysses-degree", "2", "--ring-degree", "4", "--usp-ring-impl", "stripe", "--usp-attn-backend",
                 "torch", "--usp-ring-inner")
    assert validate_usp_args(args).context_parallel_size == 8 and args.usp_ring_inner
    args = parse("--ring-degree", "4", "--usp-ring-impl", "mqsp", "--usp-micro-q", "256")
    assert validate_usp_args(args).context_parallel_size == 4 and args.usp_micro_q == 256
    assert USPConfig.from_args(parse()).document_layout == "local"
    assert USPConfig.from_args(parse("--usp-document-layout", "split")).document_layout == "split"
    with pytest.raises(ValueError, match="--usp-document-layout"):
        USPConfig.from_args(argparse.Namespace(usp_document_layout="whole"))


def test_flags_are_an_extra_args_provider():
    with pytest.raises(SystemExit):
        add_usp_args(argparse.ArgumentParser()).parse_args(["--usp-ring-impl", "spiral"])


@pytest.mark.parametrize("argv", [["--ulysses-degree", "0"], ["--ring-degree", "-2"], ["--usp-micro-q", "0"],
                                  ["--usp-check", "-1"], ["--ulysses-degree", "x"]])
def test_numeric_usp_flags_are_refused_by_the_parser(argv, capsys):
    """Megatron-LM's parser gets the same checked types (extra_args_provider): exit 2 naming the flag."""
    with pytest.raises(SystemExit):
        add_usp_args(argparse.ArgumentParser()).parse_args(argv)
    assert f"argument {argv[0]}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,defaults,message",
    [
        (["--ulysses-degree", "2", "--ring-degree", "2"], dict(context_parallel_size=2), "drop --context-parallel-size"),
        (["--ulysses-degree", "2"], dict(cp_comm_type=["a2a+p2p"]), "drop --cp-comm-type"),
        (["--ring-degree", "2"], dict(hierarchical_context_parallel_sizes=[2, 1]), "hierarchical"),
        ([], dict(ulysses_degree=0), ">= 1"),  # set by a program: the flag itself refuses 0 (argparse)
        (["--ring-degree", "3"], dict(world_size=8), "not divisible by TP"),
        (["--ulysses-degree", "2"], dict(num_attention_heads=6, num_query_groups=6, tensor_model_parallel_size=2, world_size=4),
         "not divisible by ulysses_degree"),
        (["--ulysses-degree", "4"], dict(num_query_groups=3, num_attention_heads=12), "replicated"),
        (["--ulysses-degree", "2"], dict(num_attention_heads=16, num_query_groups=1, tensor_model_parallel_size=2),
         "divisible by --tensor-model-parallel-size"),
        (["--ulysses-degree", "2", "--ring-degree", "2"], dict(seq_length=4100), "--seq-length"),
        (["--ring-degree", "2", "--usp-ring-impl", "stripe"], dict(seq_length=4097), "multiple of ulysses_degree x ring_degree = 2"),
        (["--ring-degree", "2"], dict(attention_backend="local"), "--attention-backend auto"),
        (["--ring-degree", "2", "--usp-micro-q", "64"], {}, "--usp-ring-impl mqsp"),
        (["--ring-degree", "2", "--usp-ring-impl", "mqsp"], dict(usp_micro_q=0), "positive"),
    ],
)
def test_every_rejection_names_the_fix(argv, defaults, message):
    with pytest.raises(ValueError, match=message):
        validate_usp_args(parse(*argv, **defaults))


def test_megatron_attn_backend_enum_local_is_rejected():
    from megatron.core.transformer.enums import AttnBackend

    with pytest.raises(ValueError, match="attention-backend"):
        validate_usp_args(parse("--ulysses-degree", "2", attention_backend=AttnBackend.local))
    assert validate_usp_args(parse("--ulysses-degree", "2", attention_backend=AttnBackend.auto)).context_parallel_size == 2


def test_equal_explicit_context_parallel_size_is_accepted():
    args = parse("--ulysses-degree", "2", "--ring-degree", "2", context_parallel_size=4)
    assert validate_usp_args(args).context_parallel_size == 4


def test_core_attention_rejects_what_it_does_not_support(monkeypatch):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_usp import USPGroups
    from megatron_usp.megatron import attention, state
    from megatron_usp.config import USPConfig

    monkeypatch.setattr(state, "_STATE", state.USPState(USPGroups.single(), USPConfig(ring_impl="zigzag", backend="auto")))
    from megatron.core.transformer import TransformerConfig

    def make_config(dropout):
        return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, attention_dropout=dropout,
                                 use_cpu_initialization=True)

    config = make_config(0.0)
    with pytest.raises(ValueError, match="dropout"):
        attention.USPAttention(make_config(0.1), 1, AttnMaskType.causal)
    padded = attention.USPAttention(config, 1, AttnMaskType.padding)  # fine with packed_seq_params (cu_seqlens)
    with pytest.raises(ValueError, match="self-attention only"):
        attention.USPAttention(config, 1, AttnMaskType.causal, attention_type="cross")
    module = attention.USPAttention(config, 1, AttnMaskType.causal, softmax_scale=None, cp_comm_type=None,
                                    pg_collection=None)
    assert module.causal and module.softmax_scale == 16**-0.5
    import torch

    q = torch.randn(8, 1, 2, 16)
    with pytest.raises(ValueError, match="attention_bias"):
        module(q, q, q, None, attention_bias=torch.zeros(1))
    with pytest.raises(TypeError, match="PackedSeqParams"):
        module(q, q, q, None, packed_seq_params=object())
    assert module(q, q, q, None).shape == (8, 1, 32)
    with pytest.raises(ValueError, match="pass packed_seq_params"):  # a padding mask without cu_seqlens
        padded(q, q, q, None)


def test_specs_replace_core_attention(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_usp.megatron import USPAttention, get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=True)
    assert spec.submodules.self_attention.submodules.core_attention is USPAttention
    # TE is not installed here: check the TE path's substitution on the spec megatron would return
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda *a, **k: gpt_layer_specs.get_gpt_layer_local_spec())
    spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    assert spec.submodules.self_attention.submodules.core_attention is USPAttention


def test_usp_attention_checks_rank_agreement_on_its_first_call_only(monkeypatch):
    """Every rank makes a layer's first call, so checking there is the same choice on every rank (no hang); later
    calls skip the check (a host sync per layer per step)."""
    import torch
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_usp import USPGroups
    from megatron_usp.megatron import attention, state
    from megatron_usp.config import USPConfig

    monkeypatch.setattr(state, "_STATE", state.USPState(USPGroups.single(), USPConfig(ring_impl="zigzag", backend="auto")))
    seen = []
    real_attend = attention.attend

    def recording_attend(*args, check_agreement=None, **kwargs):
        seen.append(check_agreement)
        return real_attend(*args, check_agreement=check_agreement, **kwargs)

    monkeypatch.setattr(attention, "attend", recording_attend)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, attention_dropout=0.0,
                               use_cpu_initialization=True)
    module = attention.USPAttention(config, 1, AttnMaskType.causal)
    q = torch.randn(8, 1, 2, 16)
    for _ in range(3):
        module(q, q, q, None)
    assert seen == [None, False, False]  # None: attend's default (on unless turned off)


@pytest.mark.parametrize("flags, extra, conflict", [
    (("--usp-ring-impl", "stripe"), {}, "--usp-ring-impl stripe"),
    (("--usp-ring-impl", "basic"), {}, "--usp-ring-impl basic"),
    (("--usp-ring-inner",), {}, "--usp-ring-inner"),
    ((), {"reset_attention_mask": True}, "--reset-attention-mask"),
    ((), {"sft": True}, "--sft"),
])
def test_multi_token_prediction_needs_megatrons_layout(flags, extra, conflict):
    """MTP's roll across CP ranks assumes Megatron's zigzag layout: other USP layouts are refused, never silent."""
    with pytest.raises(ValueError, match=f"--mtp-num-layers with {conflict}"):
        validate_usp_args(parse("--ulysses-degree", "2", "--ring-degree", "2", *flags, mtp_num_layers=1,
                                calculate_per_token_loss=True, **extra))


@pytest.mark.parametrize("impl", ["zigzag", "allgather", "mqsp"])
def test_multi_token_prediction_with_the_zigzag_layout_is_accepted(impl):
    args = parse("--ulysses-degree", "2", "--ring-degree", "2", "--usp-ring-impl", impl, mtp_num_layers=1,
                 calculate_per_token_loss=True)
    assert validate_usp_args(args).context_parallel_size == 4
    assert validate_usp_args(parse("--usp-ring-impl", "stripe", mtp_num_layers=1)).context_parallel_size == 1


def test_multi_token_prediction_needs_per_token_loss():
    """Each rank divides its MTP loss by its own token count, which the roll makes uneven (rehearsal: 2.2e-6)."""
    with pytest.raises(ValueError, match="--mtp-num-layers without --calculate-per-token-loss"):
        validate_usp_args(parse("--ulysses-degree", "2", "--ring-degree", "2", mtp_num_layers=1))
    assert validate_usp_args(parse(mtp_num_layers=1)).context_parallel_size == 1  # no USP: Megatron's business


@pytest.mark.parametrize("extra, match", [
    ({"experimental_attention_variant": "dsa"}, "--experimental-attention-variant dsa"),
    ({"experimental_attention_variant": "gated_delta_net"}, "--experimental-attention-variant gated_delta_net"),
])
def test_attention_variants_usp_does_not_compute_are_refused(extra, match):
    with pytest.raises(ValueError, match=match):
        validate_usp_args(parse("--ulysses-degree", "2", **extra))
    assert validate_usp_args(parse(**extra)).context_parallel_size == 1
    for softmax_type in ("vanilla", "off-by-one", "learnable"):  # sinks: USPAttention computes them
        assert validate_usp_args(parse("--ulysses-degree", "2", softmax_type=softmax_type, qk_clip=True,
                                       experimental_attention_variant=None)).context_parallel_size == 2


def test_fused_mla_yarn_rope_is_refused_but_not_unfused_or_plain_rope():
    mla = dict(multi_latent_attention=True, position_embedding_type="rope", rope_type=None)
    with pytest.raises(ValueError, match="--multi-latent-attention with YaRN and RoPE fusion.*--no-rope-fusion"):
        validate_usp_args(parse("--ulysses-degree", "2", apply_rope_fusion=True, **mla))
    for extra in ({"apply_rope_fusion": False}, {"apply_rope_fusion": True, "rope_type": "rope"}):
        assert validate_usp_args(parse("--ulysses-degree", "2", **dict(mla, **extra))).context_parallel_size == 2
    assert validate_usp_args(parse("--ulysses-degree", "2", apply_rope_fusion=True,
                                   position_embedding_type="rope")).context_parallel_size == 2  # no MLA


def test_max_logit_flags_are_held_from_megatrons_te_check_under_usp():
    from megatron_usp.megatron import megatron_lm

    args = argparse.Namespace(qk_clip=True, log_max_attention_logit=True, qk_clip_alpha=0.5, qk_clip_threshold=100)
    held = megatron_lm.hold_max_logit_flags(args, te_reports=False)
    assert held == {"qk_clip": True, "log_max_attention_logit": True}
    assert not args.qk_clip and not args.log_max_attention_logit  # Megatron's validate_args skips its TE assert
    megatron_lm.restore_max_logit_flags(args, held)
    assert args.qk_clip and args.log_max_attention_logit
    assert megatron_lm.hold_max_logit_flags(args, te_reports=True) == {} and args.qk_clip  # TE >= 2.9: Megatron's
    assert megatron_lm.hold_max_logit_flags(argparse.Namespace(qk_clip=False), te_reports=False) == {}
    only_log = argparse.Namespace(qk_clip=False, log_max_attention_logit=True, qk_clip_alpha=2.0)
    assert megatron_lm.hold_max_logit_flags(only_log, te_reports=False) == {"log_max_attention_logit": True}


@pytest.mark.parametrize("alpha, threshold, message", [(1.0, 100, "--qk-clip-alpha"), (0.5, 0, "--qk-clip-threshold")])
def test_held_qk_clip_still_checks_alpha_and_threshold(alpha, threshold, message):
    from megatron_usp.megatron import megatron_lm

    args = argparse.Namespace(qk_clip=True, qk_clip_alpha=alpha, qk_clip_threshold=threshold)
    with pytest.raises(ValueError, match=message):
        megatron_lm.hold_max_logit_flags(args, te_reports=False)
    assert args.qk_clip  # nothing cleared


# --------------------------------------------------------------------------- the refusal table (issue 20 item 3)

from megatron_usp.megatron.refusals import REFUSALS  # noqa: E402

AUDIT = __import__("pathlib").Path(__file__).resolve().parents[2] / "docs" / "megatron_lm_audit.md"
# what triggers each row, on top of u=2 x r=2 (a row added to refusals.py without a trigger here fails the test)
TRIGGERS = {
    "--context-parallel-size": dict(context_parallel_size=2),
    "--cp-comm-type": dict(cp_comm_type=["a2a"]),
    "--hierarchical-context-parallel-sizes": dict(hierarchical_context_parallel_sizes=[2, 2]),
    "--use-legacy-models": dict(use_legacy_models=True),
    "--attention-backend local": dict(attention_backend="local"),
    "--reset-attention-mask / --sft / --dataloader-inter-document-masking with PP > 2 or virtual stages":
        dict(reset_attention_mask=True, pipeline_model_parallel_size=4),
    "--sft / --eod-mask-loss without --calculate-per-token-loss": dict(eod_mask_loss=True),
    "--mtp-num-layers with a layout other than Megatron's zigzag":
        dict(mtp_num_layers=1, calculate_per_token_loss=True, usp_ring_inner=True),
    "--mtp-num-layers without --calculate-per-token-loss": dict(mtp_num_layers=1),
    "--multi-latent-attention with YaRN RoPE and --apply-rope-fusion":
        dict(multi_latent_attention=True, apply_rope_fusion=True, position_embedding_type="rope", rope_type=None),
    "--experimental-attention-variant": dict(experimental_attention_variant="dsa"),
}


def _flags(text: str) -> list[str]:
    import re

    return re.findall(r"--[a-z][a-z0-9-]*", text)


@pytest.mark.parametrize("row", REFUSALS, ids=lambda row: row.flag)
def test_every_refusal_row_raises_naming_its_flag(row):
    trigger = TRIGGERS[row.flag]
    with pytest.raises(ValueError) as error:
        validate_usp_args(parse("--ulysses-degree", "2", "--ring-degree", "2", **trigger))
    assert any(flag in str(error.value) for flag in _flags(row.flag)), (row.flag, str(error.value))
    if row.with_usp_only:  # the same flags without sequence parallelism are Megatron's business
        assert validate_usp_args(parse(**dict(trigger, context_parallel_size=1))).context_parallel_size == 1


def test_the_refusal_table_and_the_audit_agree():
    """Each row's flags are in a **refused** line of docs/megatron_lm_audit.md, and each such line names a flag of
    some row: the table is the one place of the refusals the audit reports."""
    assert set(TRIGGERS) == {row.flag for row in REFUSALS}
    refused_lines = [line for line in AUDIT.read_text().splitlines() if line.startswith("|") and "**refused**" in line]
    table_flags = {flag for row in REFUSALS for flag in _flags(row.flag)}
    for row in REFUSALS:
        assert any(_flags(row.flag)[0] in line for line in refused_lines), row.flag
    for line in refused_lines:
        assert table_flags & set(_flags(line)), line
