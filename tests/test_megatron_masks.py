"""Masks in the Megatron layer without processes: document ids from cu_seqlens, packed_seq_params checks,
window_size per layer, the batch hook's pass-through and the THD RoPE hook vs megatron-core's own THD RoPE."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-usp[megatron])")

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from megatron_usp.groups import USPGroups  # noqa: E402
from megatron_usp.megatron import attention, batch as batch_mod, document_ids_from_cu_seqlens, packed_document_ids  # noqa: E402
from megatron_usp.sharding import positions  # noqa: E402


def fake_groups(u: int, r: int, ulysses_rank: int, ring_rank: int) -> USPGroups:
    return USPGroups(None, None, u, r, ulysses_rank, ring_rank, tuple(range(r)))


def test_document_ids_from_cu_seqlens():
    assert document_ids_from_cu_seqlens(torch.tensor([0, 3, 5]), 8).tolist() == [[0, 0, 0, 2, 2, 3, 3, 3]]
    assert document_ids_from_cu_seqlens([0, 3, 3, 6], 6).tolist() == [[0, 0, 0, 4, 4, 4]]  # empty document 1
    assert document_ids_from_cu_seqlens(torch.tensor([[0, 2, 4]]), 4).tolist() == [[0, 0, 2, 2]]  # [1, n+1]
    padded = document_ids_from_cu_seqlens(torch.tensor([0, 2, 5]), 4, batch=2, cu_seqlens_padded=torch.tensor([0, 4, 7]))
    assert padded.tolist() == [[0, 0, 1, 1], [2, 2, 2, 3]]  # padded slots and trailing padding: odd ids


@pytest.mark.parametrize("cu,padded,batch,match", [
    ([1, 4], None, 1, "start at 0"),
    ([0, 5, 4], None, 1, "non-decreasing"),
    ([0, 4, 12], None, 1, "global"),  # a shard's length, not the global one
    ([0, 4, 8], [0, 3, 8], 1, "padded slots"),
    ([0, 4, 8], [0, 4], 1, "same documents"),
    ([0, 3, 8], None, 2, "crosses the boundary"),
    (torch.tensor([0.0, 8.0]), None, 1, "integer"),
])
def test_cu_seqlens_rejections(cu, padded, batch, match):
    with pytest.raises(ValueError, match=match):
        document_ids_from_cu_seqlens(cu, 8 // batch, batch, padded)


def _params(fmt, cu, cu_kv=None, padded=None):
    cu = torch.tensor(cu)
    return PackedSeqParams(qkv_format=fmt, cu_seqlens_q=cu, cu_seqlens_kv=cu if cu_kv is None else torch.tensor(cu_kv),
                           cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded)


def test_packed_document_ids_formats_and_rejections():
    thd_query = torch.zeros(4, 2, 8)  # [t_local, heads, d] on a grid of 2
    assert packed_document_ids(_params("thd", [0, 5, 8]), thd_query, 2).tolist() == [[0] * 5 + [2] * 3]
    sbhd_query = torch.zeros(2, 2, 2, 8)  # [s_local, b, heads, d]: per-row valid lengths 4 and 3
    assert packed_document_ids(_params("sbhd", [0, 4, 7]), sbhd_query, 2).tolist() == [[0] * 4, [0] * 3 + [1]]
    assert packed_document_ids(_params("sbhd", [0, 4, 8]), sbhd_query, 2) is None  # no padding: no mask
    for params, query, match in (
        (_params("bshd", [0, 8]), thd_query, "qkv_format"),
        (_params("thd", [0, 4, 8], cu_kv=[0, 8]), thd_query, "must be equal"),
        (_params("thd", [0, 4, 16]), thd_query, "global"),
        (_params("thd", [0, 8]), sbhd_query, r"\[tokens, heads, head_dim\]"),
        (_params("sbhd", [0, 3, 5, 8]), sbhd_query, "batch \\+ 1"),
        (PackedSeqParams(qkv_format="thd"), thd_query, "cu_seqlens_q is None"),
    ):
        with pytest.raises(ValueError, match=match):
            packed_document_ids(params, query, 2)


def test_window_size_per_layer_and_mask_types():
    config = SimpleNamespace(window_size=(8, 0), window_attn_skip_freq=2)
    assert attention._layer_window(config, 1) == (8, 0) and attention._layer_window(config, 2) is None
    with pytest.raises(ValueError, match="window_size"):
        attention._layer_window(SimpleNamespace(window_size=(8, -2), window_attn_skip_freq=None), 1)
    assert attention._effective_window((8, 4), causal=True) == (8, 0)  # TE: causal keeps the left side only
    assert attention._effective_window((8, 4), causal=False) == (8, 4)
    assert attention._effective_window((-1, 5), causal=True) is None
    assert attention._effective_window((-1, -1), causal=False) is None
    assert attention._is_causal(AttnMaskType.padding_causal, packed=True)
    with pytest.raises(ValueError, match="packed_seq_params"):
        attention._is_causal(AttnMaskType.padding_causal)


def test_batch_hook_shards_tokens_and_passes_cu_seqlens(monkeypatch):
    groups = fake_groups(2, 2, 1, 0)
    seq = 16
    full = {"tokens": torch.arange(seq)[None], "position_ids": torch.tensor([[0, 1, 2, 3, 4] * 3 + [0]]),
            "cu_seqlens": torch.tensor([0, 5, 10, 15]), "cu_seqlens_padded": None, "max_seqlen": torch.tensor([5]),
            "packed_seq_params": "kept"}
    local = batch_mod.get_batch_on_this_usp_rank(full, groups, "zigzag")
    held = positions(seq, groups, ring_impl="zigzag")
    assert torch.equal(local["tokens"][0], held) and torch.equal(local["position_ids"], full["position_ids"][:, held])
    for key in ("cu_seqlens", "max_seqlen", "packed_seq_params"):
        assert local[key] is full[key]
    with pytest.raises(ValueError, match="global"):
        batch_mod.get_batch_on_this_usp_rank({**full, "cu_seqlens": torch.tensor([0, 5, 17])}, groups, "zigzag")


@pytest.mark.parametrize("ring_impl", ["zigzag", "stripe"])
@pytest.mark.parametrize("exact", [False, True], ids=["per-document", "exact-mapping"])
def test_thd_rope_hook_matches_megatron_single_rank(monkeypatch, ring_impl, exact):
    """Every rank's RoPE'd shard equals megatron-core's own THD RoPE on one rank at the positions held there."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    seq, u, r = 32, 2, 2
    cu = torch.tensor([0, 7, 20, 24, 32], dtype=torch.int32)
    config = SimpleNamespace(rotary_interleaved=False, multi_latent_attention=False)
    freqs = torch.randn(seq if exact else 13, 1, 1, 8)
    t = torch.randn(seq, 3, 8)
    one_rank = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    expected = _apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=one_rank)
    monkeypatch.setattr(batch_mod, "get_usp_ring_impl", lambda: ring_impl)
    for ring_rank in range(r):
        for ulysses_rank in range(u):
            groups = fake_groups(u, r, ulysses_rank, ring_rank)
            monkeypatch.setattr(batch_mod, "get_usp_groups", lambda g=groups: g)
            held = positions(seq, groups, ring_impl=ring_impl)
            out = batch_mod.usp_apply_rotary_pos_emb_thd(t[held], freqs, config, cu)
            torch.testing.assert_close(out, expected[held], rtol=0, atol=1e-6)


def test_apply_rope_hook_falls_back_without_usp(monkeypatch):
    """megatron-core's modules call apply_rotary_pos_emb by their own name: after the hook they reach the USP THD
    RoPE only with cu_seqlens while USP is initialized, else megatron-core's function."""
    import importlib

    batch_mod.install_rope_hook()
    for module_name in batch_mod._APPLY_ROPE_MODULES:  # imported after the hook: they take the hooked name
        importlib.import_module(module_name)
    batch_mod.install_rope_hook()  # idempotent
    calls = []
    monkeypatch.setattr(batch_mod, "usp_apply_rotary_pos_emb_thd", lambda *args: calls.append("usp") or "usp")
    for module_name in batch_mod._APPLY_ROPE_MODULES:
        module = importlib.import_module(module_name)
        original = module.apply_rotary_pos_emb.usp_original
        assert original.__module__ == "megatron.core.models.common.embeddings.rope_utils", module_name
        monkeypatch.setattr(batch_mod, "usp_is_initialized", lambda: True)
        assert module.apply_rotary_pos_emb("t", "freqs", "config", cu_seqlens="cu") == "usp"
        monkeypatch.setattr(batch_mod, "usp_is_initialized", lambda: False)
        t, freqs = torch.randn(4, 1, 2, 8), torch.randn(4, 1, 1, 8)
        config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
        one_rank = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
        torch.testing.assert_close(module.apply_rotary_pos_emb(t, freqs, config, cp_group=one_rank),
                                   original(t, freqs, config, cp_group=one_rank))
    assert calls == ["usp"] * len(batch_mod._APPLY_ROPE_MODULES)
