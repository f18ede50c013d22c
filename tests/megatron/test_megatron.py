"""megatron-core GPTModel with USP vs the TP=1, CP=1 model with the same weights (CPU, gloo, 4 ranks)."""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-usp[megatron])")

from conftest import record_error  # noqa: E402

from megatron_usp.patching import original_of  # noqa: E402

IMPLS = ["zigzag", "stripe", "basic", "allgather"]


@pytest.mark.parametrize(
    "tp,ulysses_degree,ring_degree,ulysses_inner",
    [(1, 2, 2, True), (1, 4, 1, True), (1, 1, 4, True), (2, 2, 1, True), (2, 1, 2, True), (1, 2, 2, False),
     (1, 2, 1, True), (1, 1, 2, False)],  # the last two: DP=2 beside SP
    ids=lambda v: str(v),
)
def test_gpt_losses_and_gradients_match_reference(isolated_rank_pool, tp, ulysses_degree, ring_degree, ulysses_inner):
    reports = isolated_rank_pool(4).run(
        "megatron_cases:gpt_parity",
        timeout=300,
        tp=tp,
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        ring_impls=IMPLS,
        ulysses_inner=ulysses_inner,
    )
    for rank_report in reports:
        for entry in rank_report:
            label = f"gpt tp{tp} u{ulysses_degree} r{ring_degree} {entry['ring_impl']}"
            record_error(label + " loss", entry["loss"])
            record_error(label + " grad", entry["grad"])


@pytest.mark.parametrize("grid", [(1, 2, 2), (2, 1, 2)], ids=["tp1-u2-r2", "tp2-u1-r2"])
def test_gpt_with_mqsp_matches_reference(isolated_rank_pool, grid):
    """ring_impl mqsp (pass Q) inside the GPTModel, without and with micro-chunks of 5 query rows."""
    tp, ulysses_degree, ring_degree = grid
    for micro_q in (None, 5):
        reports = isolated_rank_pool(4).run("megatron_cases:gpt_parity", timeout=300, tp=tp, ulysses_degree=ulysses_degree,
                                         ring_degree=ring_degree, ring_impls=["mqsp"], micro_q=micro_q)
        for rank_report in reports:
            for entry in rank_report:
                label = f"gpt tp{tp} u{ulysses_degree} r{ring_degree} mqsp micro_q {micro_q}"
                record_error(label + " loss", entry["loss"])
                record_error(label + " grad", entry["grad"])


@pytest.mark.parametrize("ring_impl", ["zigzag", "stripe"])
def test_pipeline_parallel_with_usp(isolated_rank_pool, ring_impl):
    results = isolated_rank_pool(4).run("megatron_cases:gpt_pipeline_parity", timeout=300, ulysses_degree=1, ring_degree=2,
                               ring_impl=ring_impl)
    for result in results:
        for key, value in result.items():
            record_error(f"gpt pp2 r2 {ring_impl} {key}", value)


def test_rope_hook_covers_every_rotary_module(monkeypatch):
    """RoPE, multimodal RoPE and YaRN each call get_pos_emb_on_this_cp_rank through their own module's name; all
    must follow the USP layout once USP is initialized, and Megatron's own slicing otherwise."""
    import importlib

    from megatron_usp.megatron import rope

    calls = []
    monkeypatch.setattr(rope, "usp_pos_emb_on_this_rank", lambda emb, dim, group=None: calls.append(dim) or "usp")
    rope.install_rope_hook()
    rope.install_rope_hook()  # idempotent: the original stays the one megatron-core shipped
    for module_name in rope._ROPE_MODULES:
        module = importlib.import_module(module_name)
        monkeypatch.setattr(rope, "usp_is_initialized", lambda: True)
        assert module.get_pos_emb_on_this_cp_rank("emb", 0) == "usp", module_name
        monkeypatch.setattr(rope, "usp_is_initialized", lambda: False)
        original = original_of(module.get_pos_emb_on_this_cp_rank)
        assert getattr(original, "__module__", "").startswith("megatron.core"), original
    assert calls == [0] * len(rope._ROPE_MODULES)


@pytest.mark.parametrize(
    "ulysses_degree,ring_degree,ring_impls,window_impls,per_document",
    [(2, 2, ["zigzag", "stripe", "allgather"], ["zigzag", "stripe"], True), (1, 4, ["zigzag", "stripe"], [], False)],
    ids=["u2r2", "u1r4"],
)
def test_gpt_packed_documents_and_window_match_reference(isolated_rank_pool, ulysses_degree, ring_degree, ring_impls,
                                                          window_impls, per_document):
    """THD packed documents (straddling ranks, padded slots, trailing padding) and window_size=(8, 0): USP vs the
    unsharded model with the same mask, which matches per-document forward passes of the plain model."""
    reports = isolated_rank_pool(4).run("megatron_cases:gpt_packed_parity", timeout=300, ulysses_degree=ulysses_degree,
                                     ring_degree=ring_degree, ring_impls=ring_impls, window_impls=window_impls,
                                     per_document=per_document)
    for rank_report in reports:
        for entry in rank_report:
            label = f"gpt masks u{ulysses_degree} r{ring_degree} {entry['ring_impl']}"
            record_error(label + " loss", entry["loss"])
            record_error(label + " grad", entry["grad"])


def test_gpt_reset_attention_mask_matches_megatron_dense_mask_and_refuses_raw_masks(isolated_rank_pool):
    """--reset-attention-mask batches (documents from Megatron's dense mask or from EOD tokens) on u2 x r2 vs the
    1 x 1 megatron-core model applying the dense mask: micro-batch 1 in the balanced document layout, micro-batch 2
    (rows with different documents) in the row layout. A mask handed to the model without the batch hook raises
    on every rank before any collective."""
    reports = isolated_rank_pool(4).run("megatron_cases:gpt_reset_mask_cases", timeout=300)
    for rank_report in reports:
        *parity, refusal = rank_report
        for entry in parity:
            record_error(f"gpt u2 r2 {entry['ring_impl']} loss", entry["loss"])
            record_error(f"gpt u2 r2 {entry['ring_impl']} grad", entry["grad"])
        assert all("get_batch_on_this_usp_rank" in message for message in refusal["refusals"][:2]), refusal


def test_gpt_activation_recompute_matches_reference(isolated_rank_pool):
    """recompute_granularity full (uniform, block) and selective (core attention) on u2 x r2 zigzag, the last also
    with packed THD documents: losses and grads equal the 1 x 1 model without recompute, and the attention really
    ran again in the backward."""
    reports = isolated_rank_pool(4).run("megatron_cases:gpt_recompute_parity", timeout=300, ulysses_degree=2,
                                     ring_degree=2, ring_impl="zigzag",
                                     modes=["full-uniform", "full-block", "selective"], packed_modes=["selective"])
    for rank_report in reports:
        assert len(rank_report) == 4, rank_report
        for entry in rank_report:
            record_error(f"gpt recompute u2 r2 {entry['ring_impl']} loss", entry["loss"])
            record_error(f"gpt recompute u2 r2 {entry['ring_impl']} grad", entry["grad"])


@pytest.mark.parametrize("grid, ring_impls", [((1, 2, 2), ["zigzag", "stripe", "mqsp"]), ((2, 1, 2), ["zigzag", "mqsp"])],
                         ids=["tp1-u2-r2", "tp2-u1-r2"])
def test_gpt_mla_sinks_and_max_logit_match_reference(isolated_rank_pool, grid, ring_impls):
    """megatron-core's MLASelfAttention (v head dim != q/k head dim, YaRN RoPE), learnable attention sinks
    (softmax_type="learnable": USPAttention owns softmax_offset) and qk_clip's current_max_attn_logits, under USP."""
    tp, ulysses_degree, ring_degree = grid
    reports = isolated_rank_pool(4).run("megatron_cases:gpt_feature_parity", timeout=400,
                                     features=["mla", "sinks", "qk_clip"], tp=tp, ulysses_degree=ulysses_degree,
                                     ring_degree=ring_degree, ring_impls=ring_impls)
    for rank_report in reports:
        assert {entry["feature"] for entry in rank_report} == {"mla", "sinks", "qk_clip"}
        for entry in rank_report:
            for name, value in entry.items():
                if name not in ("ring_impl", "feature"):
                    record_error(f"gpt {entry['feature']} tp{tp} u{ulysses_degree} r{ring_degree} "
                                 f"{entry['ring_impl']} {name}", value)


def test_sequence_parallel_torch_norm_marks_its_weights():
    """The local spec's norms (layers and the decoder's final norm) are torch LayerNorm / RMSNorm that accept
    sequence_parallel and mark their weights so finalize_model_grads sums their gradients over TP."""
    import torch
    from megatron.core.transformer import TransformerConfig

    from megatron_usp.megatron.norms import SequenceParallelTorchNorm
    from megatron_usp.megatron.specs import get_gpt_decoder_block_local_spec, get_gpt_layer_local_spec

    for normalization, module, names in (("LayerNorm", torch.nn.LayerNorm, ["weight", "bias"]),
                                         ("RMSNorm", torch.nn.RMSNorm, ["weight"])):
        for sequence_parallel in (True, False):
            config = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2, normalization=normalization,
                                       tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
            norm = SequenceParallelTorchNorm(config, 8, eps=1e-6)
            assert type(norm) is module and norm.eps == 1e-6
            assert [name for name, _ in norm.named_parameters()] == names
            assert all(param.sequence_parallel is sequence_parallel for param in norm.parameters())
    layer = get_gpt_layer_local_spec().submodules
    assert layer.input_layernorm is layer.pre_mlp_layernorm is SequenceParallelTorchNorm
    block = get_gpt_decoder_block_local_spec(TransformerConfig(num_layers=3, hidden_size=8, num_attention_heads=2),
                                             pp_rank=0)
    assert block.layer_norm is SequenceParallelTorchNorm and len(block.layer_specs) == 3
    assert block.layer_specs[0].submodules.input_layernorm is SequenceParallelTorchNorm


@pytest.mark.parametrize("ulysses_degree,ring_degree", [(2, 1), (1, 2)])
def test_hybrid_context_parallel_samples_run_on_their_groups_sub_grid(isolated_rank_pool, ulysses_degree, ring_degree):
    """megatron-core's hybrid CP on 4 ranks (CP 2 x DP 2): a sample handed the whole DP x CP group runs on a 4-rank
    sub-grid, one handed a hybrid group of 2 on that pair; both equal the 1 x 1 model."""
    reports = isolated_rank_pool(4).run("megatron_cases:gpt_hybrid_cp_parity", timeout=300,
                                     ulysses_degree=ulysses_degree, ring_degree=ring_degree)
    for size, entry in reports[0].items():
        record_error(f"gpt hybrid CP u{ulysses_degree} r{ring_degree} group {size} loss", entry["loss"])
        record_error(f"gpt hybrid CP u{ulysses_degree} r{ring_degree} group {size} grad", entry["grad"])
    # Ulysses inner as far as the grid's degree goes, the rest a ring
    assert reports[0][4]["degrees"] == (ulysses_degree, 4 // ulysses_degree)
    assert reports[0][2]["degrees"] == (ulysses_degree, 2 // ulysses_degree)
