"""megatron_usp.megatron.megatron_lm: the glue a patched Megatron-LM pretrain_gpt.py calls.

Megatron-LM's ``megatron.training`` is not in the megatron-core pip package: its pieces are faked here with the
same call shapes (validate_args(args, defaults), get_args()). Specs are real megatron-core specs.
"""
import argparse
import dataclasses
import inspect
import sys
import types

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_usp.groups import USPGroups
from megatron_usp.config import USPConfig
from megatron_usp.megatron import USPAttention, grid, megatron_lm, state
from megatron_usp.patching import original_of

MEGATRON_ARGV = ["--num-attention-heads", "4", "--seq-length", "64", "--world-size", "8"]


def megatron_like_parser() -> argparse.ArgumentParser:
    """The Megatron flags that validate_usp_args reads, with Megatron's names and defaults."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--context-parallel-size", type=int, default=1)
    parser.add_argument("--cp-comm-type", nargs="+", default=["p2p"])
    parser.add_argument("--num-attention-heads", type=int)
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--sft", action="store_true")
    parser.add_argument("--reset-attention-mask", action="store_true")
    parser.add_argument("--eod-mask-loss", action="store_true")
    parser.add_argument("--calculate-per-token-loss", action="store_true")
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    return parser


def parse(argv, chained=None) -> argparse.Namespace:
    return megatron_lm.with_usp_args(chained)(megatron_like_parser()).parse_args(MEGATRON_ARGV + argv)


@pytest.fixture
def fake_megatron_lm(monkeypatch):
    """Fake megatron.training{,.arguments,.initialize}; Megatron's validate_args derives the DP size from CP."""
    calls = []

    def validate_args(args, defaults={}):
        calls.append(args.context_parallel_size)
        model = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
        args.data_parallel_size = args.world_size // model
        return args

    training = types.ModuleType("megatron.training")
    arguments = types.ModuleType("megatron.training.arguments")
    initialize = types.ModuleType("megatron.training.initialize")
    arguments.validate_args = validate_args
    initialize.validate_args = validate_args  # 0.16 imports it by name into initialize
    for module in (training, arguments, initialize):
        monkeypatch.setitem(sys.modules, module.__name__, module)

    recorded = {"megatron_core": []}

    def megatron_core_initialize(*args, **kwargs):
        recorded["megatron_core"].append((args, kwargs))

    megatron_core_initialize.__signature__ = inspect.signature(parallel_state.initialize_model_parallel)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", megatron_core_initialize)
    yield types.SimpleNamespace(arguments=arguments, initialize=initialize, calls=calls, recorded=recorded,
                                original_validate=validate_args, original_init=megatron_core_initialize)
    megatron_lm.uninstall()


@pytest.fixture
def usp_grid_up(monkeypatch):
    """USP state of CP rank 1 of u=2 x r=2 (ulysses rank 1, ring rank 0), without process groups."""
    groups = USPGroups(None, None, 2, 2, 1, 0, (0, 2))
    monkeypatch.setattr(state, "_STATE", state.USPState(groups, USPConfig(2, 2, "zigzag", "torch")))
    monkeypatch.setattr(megatron_lm, "_get_megatron_args", lambda: types.SimpleNamespace())  # Megatron-LM's defaults
    return groups


# ---------------------------------------------------------------------------------------------- flags


def test_provider_adds_usp_flags_then_runs_the_chained_provider():
    def chained(parser):
        parser.add_argument("--modelopt-flag", type=int, default=0)
        return parser

    args = parse(["--ulysses-degree", "2", "--ring-degree", "4", "--modelopt-flag", "7"], chained)
    assert (args.ulysses_degree, args.ring_degree, args.modelopt_flag) == (2, 4, 7)
    assert args.usp_ring_impl == "zigzag" and args.usp_ring_inner is False


def test_provider_is_idempotent_on_one_parser():
    parser = megatron_lm.extra_args_provider(megatron_lm.extra_args_provider(megatron_like_parser()))
    assert parser.parse_args(MEGATRON_ARGV + ["--ring-degree", "2"]).ring_degree == 2


# ---------------------------------------------------------------------------------------------- validate_args


@pytest.mark.parametrize("module", ["arguments", "initialize"])
def test_usp_validation_runs_before_megatron_derives_the_data_parallel_size(fake_megatron_lm, module):
    megatron_lm.install(get_args=lambda: None)
    args = parse(["--ulysses-degree", "2", "--ring-degree", "2"])
    getattr(fake_megatron_lm, module).validate_args(args, {})
    assert fake_megatron_lm.calls == [4]  # Megatron saw CP = u*r
    assert (args.context_parallel_size, args.data_parallel_size) == (4, 2)


@pytest.mark.parametrize("batch_path", ["cp_group per sample", "is_hybrid_cp flag"])
def test_hybrid_context_parallel_is_refused_where_batches_take_the_is_hybrid_cp_flag(fake_megatron_lm, monkeypatch,
                                                                                      batch_path):
    """--hybrid-context-parallel: core_v0.16.1 hands each sample its cp_group (USP runs it on a sub-grid); later
    releases shard by get_batch_on_this_cp_rank(is_hybrid_cp=...), refused before Megatron validates (found by the
    function's signature)."""
    import megatron.core.utils as core_utils

    def per_sample(batch, cp_group=None):
        return batch

    def by_flag(batch, is_hybrid_cp, cp_group=None, hybrid_cp_group_func=None, use_per_sequence_balancing=False):
        return batch

    monkeypatch.setattr(core_utils, "get_batch_on_this_cp_rank", per_sample if batch_path.startswith("cp") else by_flag)
    megatron_lm.install(get_args=lambda: None)
    args = parse(["--ulysses-degree", "2", "--ring-degree", "2"])
    args.hybrid_context_parallel = True
    if batch_path.startswith("cp"):
        fake_megatron_lm.arguments.validate_args(args, {})
        assert fake_megatron_lm.calls == [4]
        return
    with pytest.raises(ValueError, match="drop --hybrid-context-parallel"):
        fake_megatron_lm.arguments.validate_args(args, {})
    assert fake_megatron_lm.calls == []  # before Megatron's own validation


def test_install_is_idempotent_and_uninstall_restores(fake_megatron_lm):
    megatron_lm.install(get_args=lambda: None)
    wrapped = fake_megatron_lm.arguments.validate_args
    megatron_lm.install(get_args=lambda: None)
    assert fake_megatron_lm.arguments.validate_args is wrapped
    assert parallel_state.initialize_model_parallel.__usp_original__ is fake_megatron_lm.original_init
    fake_megatron_lm.arguments.validate_args(parse(["--ulysses-degree", "2"]), {})
    assert fake_megatron_lm.calls == [2]  # one wrapper, one Megatron validation
    megatron_lm.uninstall()
    assert fake_megatron_lm.arguments.validate_args is fake_megatron_lm.original_validate
    assert fake_megatron_lm.initialize.validate_args is fake_megatron_lm.original_validate
    assert parallel_state.initialize_model_parallel is fake_megatron_lm.original_init


def test_without_usp_flags_megatron_context_parallelism_is_untouched(fake_megatron_lm):
    megatron_lm.install(get_args=lambda: None)
    args = parse(["--context-parallel-size", "2"])
    fake_megatron_lm.arguments.validate_args(args, {})
    assert fake_megatron_lm.calls == [2] and args.data_parallel_size == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reset-attention-mask", "--pipeline-model-parallel-size", "3"], "--reset-attention-mask with USP needs"),
        (["--sft", "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
         "--sft with USP needs"),
        (["--context-parallel-size", "2"], "--context-parallel-size 2 conflicts"),
        (["--cp-comm-type", "a2a"], "--cp-comm-type"),
        (["--sft"], "--sft masks loss tokens unevenly.*add --calculate-per-token-loss"),
        (["--eod-mask-loss"], "--eod-mask-loss masks loss tokens unevenly"),
    ],
)
def test_usp_conflicts_are_rejected_before_megatron_validates(fake_megatron_lm, argv, message):
    megatron_lm.install(get_args=lambda: None)
    with pytest.raises(ValueError, match=message):
        fake_megatron_lm.initialize.validate_args(parse(["--ulysses-degree", "2", "--ring-degree", "2"] + argv), {})
    assert fake_megatron_lm.calls == []


@pytest.mark.parametrize("argv", [["--sft", "--calculate-per-token-loss"],
                                  ["--eod-mask-loss", "--calculate-per-token-loss"],
                                  ["--reset-attention-mask", "--pipeline-model-parallel-size", "2"]])
def test_packed_and_document_masked_training_is_accepted(fake_megatron_lm, argv):
    megatron_lm.install(get_args=lambda: None)
    fake_megatron_lm.initialize.validate_args(parse(["--ulysses-degree", "2", "--ring-degree", "2"] + argv), {})
    assert fake_megatron_lm.calls == [4]


def test_install_without_megatron_lm_names_the_fix(monkeypatch):
    for name in megatron_lm.VALIDATE_ARGS_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(RuntimeError, match="Megatron-LM checkout"):
        megatron_lm.install()


# ---------------------------------------------------------------------------------------------- grid


def megatron_lm_style_init_keywords() -> dict:
    """What this megatron-core's initialize_model_parallel accepts beyond the old keywords (Megatron-LM of the same
    release passes it)."""
    import inspect

    return ({"hybrid_context_parallel": False} if "hybrid_context_parallel" in inspect.signature(
        getattr(parallel_state.initialize_model_parallel, "__wrapped__", parallel_state.initialize_model_parallel)
    ).parameters else {})


def megatron_lm_style_init():
    """The call megatron.training.initialize makes (positional TP, PP, VPP; keywords for the rest)."""
    extra = megatron_lm_style_init_keywords()
    parallel_state.initialize_model_parallel(
        2, 1, None, context_parallel_size=4, hierarchical_context_parallel_sizes=None,
        order="tp-cp-ep-dp-pp", create_gloo_process_groups=True, **extra,
    )


def test_megatron_lm_init_builds_the_usp_grid(fake_megatron_lm, monkeypatch):
    args = parse(["--ulysses-degree", "2", "--ring-degree", "2", "--usp-ring-inner", "--usp-ring-impl", "stripe"])
    grid_calls = []

    def usp_grid(tp, pp, **kwargs):
        grid_calls.append((tp, pp, kwargs))
        original_of(parallel_state.initialize_model_parallel)(tp, pp, context_parallel_size=4)  # as the grid does

    monkeypatch.setattr(grid, "initialize_model_parallel", usp_grid)
    megatron_lm.install(get_args=lambda: args)
    megatron_lm_style_init()
    assert grid_calls == [(2, 1, dict(
        config=USPConfig(ulysses_degree=2, ring_degree=2, ring_impl="stripe", ulysses_inner=False, backend="auto",
                         micro_q=None, check_every=None),
        virtual_pipeline_model_parallel_size=None, order="tp-cp-ep-dp-pp", create_gloo_process_groups=True,
        **megatron_lm_style_init_keywords(),  # forwarded to the grid, which hands it to megatron-core
    ))]
    # the grid's own megatron-core call reaches megatron-core, not the wrapper again
    assert fake_megatron_lm.recorded["megatron_core"] == [((2, 1), {"context_parallel_size": 4})]


def test_megatron_lm_init_without_usp_goes_to_megatron_core(fake_megatron_lm, monkeypatch):
    monkeypatch.setattr(grid, "initialize_model_parallel", lambda *a, **k: pytest.fail("USP grid built"))
    args = parse([])
    megatron_lm.install(get_args=lambda: args)
    parallel_state.initialize_model_parallel(2, 1, None, context_parallel_size=4)
    assert fake_megatron_lm.recorded["megatron_core"] == [((2, 1, None), {"context_parallel_size": 4})]


def test_megatron_lm_init_with_unvalidated_cp_names_the_fix(fake_megatron_lm, monkeypatch):
    monkeypatch.setattr(grid, "initialize_model_parallel", lambda *a, **k: pytest.fail("USP grid built"))
    args = parse(["--ulysses-degree", "2", "--ring-degree", "4"])  # CP 8, but Megatron is told 4
    megatron_lm.install(get_args=lambda: args)
    with pytest.raises(ValueError, match="validate_usp_args did not run"):
        megatron_lm_style_init()


# ---------------------------------------------------------------------------------------------- layer spec


def core_attention_of(layer_spec: ModuleSpec):
    return layer_spec.submodules.self_attention.submodules.core_attention


def test_layer_spec_is_unchanged_without_the_usp_grid():
    spec = get_gpt_layer_local_spec()
    assert megatron_lm.usp_layer_spec(spec) is spec
    assert core_attention_of(spec) is DotProductAttention


def test_layer_and_block_and_mtp_specs_get_usp_attention(usp_grid_up):
    layer = get_gpt_layer_local_spec()
    assert core_attention_of(megatron_lm.usp_layer_spec(layer)) is USPAttention
    block = TransformerBlockSubmodules(layer_specs=[get_gpt_layer_local_spec(), get_gpt_layer_local_spec()])
    megatron_lm.usp_layer_spec(block)
    assert [core_attention_of(spec) for spec in block.layer_specs] == [USPAttention, USPAttention]
    # an MTP block: ModuleSpec(MTP layer) whose submodules dataclass holds a transformer layer spec
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlockSubmodules,
        MultiTokenPredictionLayer,
        MultiTokenPredictionLayerSubmodules,
    )

    fields = MultiTokenPredictionLayerSubmodules.__dataclass_fields__
    field = next(f for f in fields if "layer" in f and "norm" not in f)  # transformer_layer / mtp_model_layer
    required = {name: None for name, f in fields.items()  # 0.19 makes its norms required fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    mtp = MultiTokenPredictionBlockSubmodules(layer_specs=[ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(**{**required, field: get_gpt_layer_local_spec()}),
    )])
    assert megatron_lm.substitute_core_attention(mtp) == 1
    assert core_attention_of(getattr(mtp.layer_specs[0].submodules, field)) is USPAttention
    assert megatron_lm.usp_layer_spec(None) is None


def test_empty_pipeline_stage_and_attention_without_core_attention(usp_grid_up):
    empty = TransformerBlockSubmodules(layer_specs=[])
    assert megatron_lm.usp_layer_spec(empty) is empty
    layer = get_gpt_layer_local_spec()
    layer.submodules.self_attention = ModuleSpec(module=torch.nn.Identity)  # e.g. a linear-attention variant
    with pytest.raises(ValueError, match="no core_attention"):
        megatron_lm.usp_layer_spec(layer)


# ---------------------------------------------------------------------------------------------- batch


def test_batch_hook_passes_through_without_the_usp_grid():
    seen = []

    def megatron_fn(batch, is_hybrid_cp, cp_group=None):
        seen.append((batch, is_hybrid_cp, cp_group))
        return "megatron"

    hook = megatron_lm.wrap_get_batch_on_this_cp_rank(megatron_fn)
    assert hook({"tokens": 1}, is_hybrid_cp=False, cp_group="g") == "megatron"
    assert seen == [({"tokens": 1}, False, "g")]


def test_batch_hook_gives_megatron_zigzag_chunks_and_keeps_metadata(usp_grid_up):
    hook = megatron_lm.wrap_get_batch_on_this_cp_rank(lambda batch, is_hybrid_cp=False: pytest.fail("Megatron's"))
    tokens = torch.arange(16).view(1, 16)
    batch = {"attention_mask": None, "cu_seqlens": None, "labels": tokens + 100, "max_seqlen": None,
             "tokens": tokens, "position_ids": tokens.clone()}
    out = hook(batch, is_hybrid_cp=False)
    assert list(out) == list(batch)  # key order kept: Megatron unpacks by position
    # CP rank 1 of 4 holds chunks 1 and 6 of 8 (Megatron's get_batch_on_this_cp_rank)
    assert out["tokens"].tolist() == [[2, 3, 12, 13]]
    assert out["labels"].tolist() == [[102, 103, 112, 113]]
    assert out["cu_seqlens"] is None and out["max_seqlen"] is None


def test_batch_hook_rejects_hybrid_batches(usp_grid_up):
    hook = megatron_lm.wrap_get_batch_on_this_cp_rank(lambda batch, is_hybrid_cp=False: None)
    with pytest.raises(ValueError, match="hybrid"):
        hook({"tokens": torch.arange(16).view(1, 16)}, True)


def test_batch_hook_shards_megatron_019_thd_batches_with_the_document_layout(usp_grid_up):
    """megatron-core 0.19's get_batch_on_this_cp_rank gets THD rows with cu_seqlens [1, n]: the document layout,
    cu_seqlens -> the layout offsets (forward_step builds PackedSeqParams from them), cu_seqlens_padded -> None."""
    from megatron_usp.megatron.documents import layout_cu_seqlens
    from megatron_usp.sharding import positions

    hook = megatron_lm.wrap_get_batch_on_this_cp_rank(lambda *a, **k: pytest.fail("Megatron's"))
    tokens = torch.arange(32).view(1, 32)
    batch = {"attention_mask": None, "cu_seqlens": torch.tensor([[0, 3, 9]], dtype=torch.int32),
             "cu_seqlens_padded": torch.tensor([[0, 4, 16]], dtype=torch.int32), "hybrid_cp_group": None,
             "labels": tokens + 100, "local_cp_size": None, "loss_mask": torch.ones(1, 32),
             "max_seqlen": torch.tensor([6], dtype=torch.int32), "position_ids": tokens % 16, "tokens": tokens}
    out = hook(batch, is_hybrid_cp=False, cp_group=None, use_per_sequence_balancing=True)
    assert list(out) == list(batch)
    layout = layout_cu_seqlens([0, 3, 9], 32, [0, 4, 16])
    held = positions(32, usp_grid_up, ring_impl="zigzag", cu_seqlens=layout)
    assert out["tokens"].tolist() == [held.tolist()] and torch.equal(out["labels"], tokens[:, held] + 100)
    assert tuple(out["cu_seqlens"][0].tolist()) == layout and out["cu_seqlens_padded"] is None
    assert out["max_seqlen"] is batch["max_seqlen"]


def test_thd_hook_replaces_transformer_engine_partitioning(usp_grid_up):
    """Megatron-LM <= 0.16 sends --sft batches to get_thd_batch_on_this_cp_rank (Transformer Engine's indices):
    under USP the document layout and PackedSeqParams with the layout offsets; Megatron's function otherwise."""
    import megatron.core.utils as core_utils

    if not hasattr(core_utils, "get_thd_batch_on_this_cp_rank"):
        pytest.skip("this megatron-core has no get_thd_batch_on_this_cp_rank: its THD batches go through "
                    "get_batch_on_this_cp_rank with cu_seqlens in the batch (the hook tested above)")
    get_thd_batch_on_this_cp_rank = core_utils.get_thd_batch_on_this_cp_rank

    from megatron_usp.sharding import positions

    hook = megatron_lm.wrap_get_thd_batch_on_this_cp_rank(get_thd_batch_on_this_cp_rank)
    tokens = torch.arange(32).view(1, 32)
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(1, 32), "attention_mask": None,
             "position_ids": tokens % 8}
    cu = torch.tensor([[0, 8, 20, 32]], dtype=torch.int32)
    out, params = hook(dict(batch), cu, None, torch.tensor([12], dtype=torch.int32))
    held = positions(32, usp_grid_up, ring_impl="zigzag", cu_seqlens=(0, 8, 20, 32))
    assert list(out) == list(batch) and out["tokens"].tolist() == [held.tolist()]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 8, 20, 32]
    assert params.cu_seqlens_kv is params.cu_seqlens_q and params.cu_seqlens_q_padded is None
    assert (params.max_seqlen_q, params.max_seqlen_kv) == (12, 12)


def test_thd_hook_passes_through_without_the_usp_grid():
    hook = megatron_lm.wrap_get_thd_batch_on_this_cp_rank(lambda *args, **kwargs: ("megatron", args, kwargs))
    assert hook({"tokens": 1}, "cu", None, "max", cp_size=1) == ("megatron", ({"tokens": 1}, "cu", None, "max"),
                                                                {"cp_size": 1})


def test_batch_hook_takes_reset_attention_mask_documents_from_eod(usp_grid_up, monkeypatch):
    """--reset-attention-mask --no-create-attention-mask-in-dataloader: documents from the tokenizer's EOD; with
    the dataloader's dense mask, from the mask (the EOD is then not needed)."""
    from megatron_usp.sharding import positions

    training = types.ModuleType("megatron.training")
    training.get_tokenizer = lambda: types.SimpleNamespace(eod=7)
    monkeypatch.setitem(sys.modules, "megatron.training", training)
    monkeypatch.setattr(megatron_lm, "_get_megatron_args", lambda: types.SimpleNamespace(reset_attention_mask=True))
    tokens = torch.tensor([[1, 2, 3, 7, 4, 5, 6, 1, 2, 3, 7, 5, 4, 3, 2, 1]])
    hook = megatron_lm.wrap_get_batch_on_this_cp_rank(lambda *a, **k: pytest.fail("Megatron's"))
    out = hook({"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(1, 16), "attention_mask": None,
                "position_ids": tokens}, is_hybrid_cp=False)
    held = positions(16, usp_grid_up, ring_impl="zigzag", cu_seqlens=(0, 4, 11, 16))
    assert out["tokens"].tolist() == [tokens[0, held].tolist()]
    assert out["attention_mask"].tolist() == [[0] * 4 + [1] * 7 + [2] * 5]
    assert state.get_batch_records().find(out["attention_mask"]).cu_seqlens == (0, 4, 11, 16)
