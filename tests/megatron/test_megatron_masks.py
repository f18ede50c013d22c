"""Masks in the Megatron layer without processes: document ids from cu_seqlens, packed_seq_params checks,
window_size per layer, the batch hook's pass-through and the THD RoPE hook vs megatron-core's own THD RoPE."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-usp[megatron])")

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from megatron_usp.groups import USPGroups
from megatron_usp.patching import original_of  # noqa: E402
from megatron_usp.config import USPConfig  # noqa: E402
from megatron_usp.megatron import attention, batch as batch_mod, document_ids_from_cu_seqlens, packed_document_ids  # noqa: E402
from megatron_usp.megatron import batch_record, documents, rope as rope_mod, state  # noqa: E402
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


def test_layout_cu_seqlens_folds_padding_into_documents():
    layout = documents.layout_cu_seqlens
    assert layout(torch.tensor([0, 5, 10, 15]), 16) == (0, 5, 10, 15, 16)  # trailing tokens: one more document
    assert layout([0, 5, 10, 16], 16) == (0, 5, 10, 16)
    # documents of 3 and 2 real tokens padded to 4 slots each, then 2 trailing: padding never joins a document
    assert layout([0, 3, 5], 10, [0, 4, 8]) == (0, 3, 4, 6, 8, 10)
    assert layout([0, 4, 4, 8], 8) == (0, 4, 8)  # empty documents dropped
    assert layout(torch.tensor([[0, 3, 5]]), 10, torch.tensor([[0, 4, 8]])) == (0, 3, 4, 6, 8, 10)  # [1, n+1]
    for cu, padded in (([0, 5, 10, 15], None), ([0, 3, 5], [0, 4, 8]), ([0, 16], None)):
        once = layout(cu, 16, padded)
        assert layout(list(once), 16) == once  # a fixed point: handing it on keeps the layout


def _thd_batch(seq, cu, padded=None):
    return {"tokens": torch.arange(seq)[None], "position_ids": torch.arange(seq)[None] % 5,
            "cu_seqlens": torch.tensor([cu], dtype=torch.int32), "max_seqlen": torch.tensor([5]),
            "cu_seqlens_padded": None if padded is None else torch.tensor([padded], dtype=torch.int32)}


@pytest.mark.parametrize("ring_impl", ["zigzag", "stripe", "basic"])
@pytest.mark.parametrize("cu,padded", [([0, 5, 10, 15], None), ([0, 3, 9, 12], [0, 4, 11, 14]), ([0, 32], None)],
                         ids=["trailing", "padded", "one-document"])
def test_batch_hook_shards_thd_rows_with_the_document_layout(ring_impl, cu, padded):
    """Every rank's THD shard = usp.shard with the layout offsets; together the ranks hold the row once; the batch
    hands on those offsets (cu_seqlens_padded None) so PackedSeqParams built from it describe the layout."""
    seq, u, r = 32, 2, 2
    full = _thd_batch(seq, cu, padded)
    expected_cu = documents.layout_cu_seqlens(cu, seq, padded)
    seen = []
    for ring_rank in range(r):
        for ulysses_rank in range(u):
            groups = fake_groups(u, r, ulysses_rank, ring_rank)
            local = batch_mod.get_batch_on_this_usp_rank(full, groups, ring_impl)
            held = positions(seq, groups, ring_impl=ring_impl, cu_seqlens=expected_cu)
            assert torch.equal(local["tokens"][0], held)
            assert torch.equal(local["position_ids"], full["position_ids"][:, held])
            assert tuple(local["cu_seqlens"][0].tolist()) == expected_cu and local["cu_seqlens"].dtype == torch.int32
            assert local["cu_seqlens_padded"] is None and local["max_seqlen"] is full["max_seqlen"]
            seen.append(held)
    assert sorted(torch.cat(seen).tolist()) == list(range(seq))
    if padded is None and cu[-1] == seq:  # nothing to fold in: the metadata pass through as they are
        assert local["cu_seqlens"] is full["cu_seqlens"]


@pytest.mark.parametrize("document_layout", ["local", "split"])
def test_batch_hook_follows_the_grids_document_layout(monkeypatch, document_layout):
    """The grid's --usp-document-layout decides how the hook shards documents (and the record RoPE reads): short
    documents of a THD row stay on one ring rank with local, are cut over every rank with split."""
    seq, u, r = 32, 1, 2
    cu = [0, 5, 10, 15, 32]
    full = _thd_batch(seq, cu)
    for ring_rank in range(r):
        groups = fake_groups(u, r, 0, ring_rank)
        monkeypatch.setattr(state, "_STATE", state.USPState(groups, USPConfig(u, r, "zigzag", "torch",
                                                                              document_layout=document_layout)))
        local = batch_mod.get_batch_on_this_usp_rank(full, groups, "zigzag")
        held = positions(seq, groups, ring_impl="zigzag", cu_seqlens=cu, document_layout=document_layout)
        assert torch.equal(local["tokens"][0], held)
        record = state.get_batch_records().find(local["cu_seqlens"], None)
        assert torch.equal(record.held_positions(groups, "zigzag", document_layout, torch.device("cpu")), held)
        whole = [d for d in range(len(cu) - 1) if set(range(cu[d], cu[d + 1])) <= set(held.tolist())]
        assert (len(whole) > 0) == (document_layout == "local"), (document_layout, held.tolist())
        other = "split" if document_layout == "local" else "local"
        with pytest.raises(ValueError, match="initialize_model_parallel"):  # never a layout RoPE would not follow
            batch_mod.get_batch_on_this_usp_rank(full, groups, "zigzag", document_layout=other)


def test_batch_hook_thd_rejections():
    groups = fake_groups(2, 2, 1, 0)
    full = _thd_batch(16, [0, 5, 10, 15])
    with pytest.raises(ValueError, match="global"):
        batch_mod.get_batch_on_this_usp_rank({**full, "cu_seqlens": torch.tensor([0, 5, 17])}, groups, "zigzag")
    with pytest.raises(ValueError, match="one packed row"):
        batch_mod.get_batch_on_this_usp_rank({**full, "tokens": torch.zeros(2, 8)}, groups, "zigzag")
    with pytest.raises(ValueError, match="drop the attention_mask"):
        batch_mod.get_batch_on_this_usp_rank({**full, "attention_mask": torch.ones(1, 1, 16, 16).bool()}, groups,
                                             "zigzag")


def _megatron_masks(tokens: torch.Tensor, eod: int):
    """Megatron's own dataloader masks (--reset-attention-mask --reset-position-ids) for rows of tokens."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    rows = [_get_ltor_masks_and_position_ids(row, eod, True, True, False, True) for row in tokens]
    return torch.stack([m for m, _, _ in rows]).view(len(rows), 1, tokens.shape[1], -1), torch.stack([p for _, _, p in rows])


def test_documents_from_megatron_masks_and_eod():
    eod, seq = 7, 12
    tokens = torch.tensor([[1, 2, 7, 3, 4, 5, 7, 1, 7, 2, 3, 7], [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]])
    mask, _ = _megatron_masks(tokens, eod)
    ids = documents.documents_from_dense_mask(mask)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3], [0] * seq]  # an EOD ends its document
    assert torch.equal(documents.documents_from_eod(tokens, eod), ids)
    assert documents.documents_from_dense_mask(mask[1:]) is None  # plain causal
    assert documents.documents_from_eod(tokens[1:], eod) is None
    assert documents.shared_cu_seqlens(ids[:1].expand(3, seq)) == (0, 3, 7, 9, 12)
    assert documents.shared_cu_seqlens(ids) is None  # rows differ: per-row document ids
    assert documents.shared_cu_seqlens(torch.tensor([[0, 0, 1, 1, 0]])) is None  # a label that is not one run


@pytest.mark.parametrize("name", ["window", "padding", "float", "shape", "blind row"])
def test_dense_masks_that_are_not_causal_documents_are_refused(name, monkeypatch):
    seq = 8
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
    masks = {
        "window": causal | torch.tril(torch.ones(seq, seq, dtype=torch.bool), -3),
        "padding": causal | (torch.arange(seq) >= 6)[None, :],
        "float": (~causal).float(),
        "shape": causal[None],
        "blind row": causal | torch.eye(seq, dtype=torch.bool),
    }
    mask = masks[name] if name == "shape" else masks[name][None, None]
    monkeypatch.setattr(documents, "_CHECK_ELEMENTS", 16)  # several row blocks
    with pytest.raises(ValueError, match="attention_mask"):
        batch_mod.get_batch_on_this_usp_rank({"tokens": torch.zeros(1, seq, dtype=torch.long), "attention_mask": mask},
                                             fake_groups(2, 1, 0, 0), "zigzag")


@pytest.mark.parametrize("ring_impl", ["zigzag", "stripe"])
def test_batch_hook_reset_attention_mask_layouts(monkeypatch, ring_impl):
    """Rows with the same documents: the balanced document layout, attention_mask -> document ids; rows that differ:
    the row layout. Dense mask and EOD tokens give the same batch; the hook's record (found by the ids and the
    sharded tokens it returned) holds the layout."""
    eod, seq, u, r = 7, 16, 2, 2
    row = torch.tensor([[1, 2, 3, 7, 4, 5, 6, 1, 2, 3, 7, 5, 4, 3, 2, 1]])
    for tokens in (row, torch.cat([row, row.flip(1)])):
        mask, position_ids = _megatron_masks(tokens, eod)
        full = {"tokens": tokens, "labels": tokens + 100, "loss_mask": torch.ones(tokens.shape),
                "attention_mask": mask, "position_ids": position_ids}
        for ring_rank in range(r):
            for ulysses_rank in range(u):
                groups = fake_groups(u, r, ulysses_rank, ring_rank)
                monkeypatch.setattr(state, "_STATE", state.USPState(groups, USPConfig(u, r, ring_impl, "torch")))
                local = batch_mod.get_batch_on_this_usp_rank(full, groups, ring_impl)
                cu = (0, 4, 11, 16) if tokens.shape[0] == 1 else None
                held = positions(seq, groups, ring_impl=ring_impl, cu_seqlens=cu)
                assert torch.equal(local["tokens"], tokens[:, held]) and torch.equal(local["labels"], tokens[:, held] + 100)
                assert torch.equal(local["position_ids"], position_ids[:, held])
                assert torch.equal(local["attention_mask"], documents.documents_from_eod(tokens, eod))
                records = state.get_batch_records()
                record = records.find(local["attention_mask"])
                assert record is records.find(local["tokens"]) and record.cu_seqlens == cu and record.seq_len == seq
                by_eod = batch_mod.get_batch_on_this_usp_rank({**full, "attention_mask": None}, groups, ring_impl,
                                                              eod_token=eod)
                assert all(torch.equal(by_eod[k], local[k]) for k in local)
    plain = batch_mod.get_batch_on_this_usp_rank({**full, "attention_mask": _megatron_masks(tokens[:, :6], 99)[0]},
                                                 fake_groups(2, 1, 0, 0), ring_impl)  # plain causal: dropped
    assert plain["attention_mask"] is None and state.get_batch_records().find(plain["tokens"]).cu_seqlens is None


def _attention_documents(mask, query, sp_size=4, params=None):
    return attention._cached_documents(params, mask, query, sp_size)


@pytest.fixture
def records(monkeypatch):
    """A 2 x 2 grid's state (no processes): the batch records the hook writes and the attention reads."""
    monkeypatch.setattr(state, "_STATE", state.USPState(fake_groups(2, 2, 0, 0), USPConfig(2, 2, "zigzag", "torch")))
    return state.get_batch_records()


def test_attention_refuses_masks_it_cannot_honour_and_stale_documents(records):
    """Local checks in USPAttention (before usp_attn, so before any collective): a dense mask is refused per layer,
    documents must be those the hook recorded and, in the document layout, a model forward must have run with
    them (RoPE followed them); THD padding must be folded in."""
    seq, batch = 16, 1
    query = torch.zeros(seq // 4, batch, 2, 8)
    dense = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None]
    with pytest.raises(ValueError, match="get_batch_on_this_usp_rank"):
        _attention_documents(dense, query)
    ids = torch.tensor([[0] * 5 + [1] * 11])
    record = records.add(batch_record.BatchRecord(seq, (0, 5, 16)), ids)
    with pytest.raises(ValueError, match="not those of the batch"):
        _attention_documents(ids, query)  # the hook made them, but no model forward built their rotary table
    with records.model_forward(record):
        pass
    assert _attention_documents(ids, query) == (None, (0, 5, 16))
    assert _attention_documents(ids.detach(), query) == (None, (0, 5, 16))  # recomputation detaches
    with pytest.raises(ValueError, match="not those of the batch"):
        _attention_documents(ids.clone(), query)  # documents the hook never saw: RoPE used the row layout
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        _attention_documents(ids[:, :8], query)
    ids.add_(0)  # modified in place after the hook recorded it: stale
    with pytest.raises(ValueError, match="not those of the batch"):
        _attention_documents(ids, query)
    per_row = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    records.add(batch_record.BatchRecord(seq, None), per_row)
    got = _attention_documents(per_row, torch.zeros(seq // 4, 2, 2, 8))
    assert got[0] is per_row and got[1] is None  # the row layout: no model forward needed
    assert _attention_documents(ids.clone(), torch.zeros(seq, batch, 2, 8), sp_size=1) == (None, (0, 5, 16))  # derived
    thd_query = torch.zeros(4, 2, 8)
    padded = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 3, 9]), cu_seqlens_kv=torch.tensor([0, 3, 9]),
                             cu_seqlens_q_padded=torch.tensor([0, 4, 16]), cu_seqlens_kv_padded=torch.tensor([0, 4, 16]))
    with pytest.raises(ValueError, match="padded slots inside documents"):
        _attention_documents(None, thd_query, params=padded)
    assert _attention_documents(None, torch.zeros(16, 2, 8), sp_size=1, params=padded) == (None, (0, 3, 4, 10, 16))
    with pytest.raises(ValueError, match="not both"):
        _attention_documents(ids, thd_query, params=padded)


def test_recomputation_finds_the_documents_of_its_own_batch(records):
    """Activation recomputation runs attention inside backward, after the hook moved on to later micro-batches
    (pipeline schedules): the detached documents find the record of their own batch, whatever came later."""
    seq = 16
    query = torch.zeros(seq // 4, 1, 2, 8)
    older = torch.tensor([[0] * 5 + [1] * 11])
    with records.model_forward(records.add(batch_record.BatchRecord(seq, (0, 5, 16)), older)):
        pass
    later = torch.tensor([[0] * 9 + [1] * 7])
    with records.model_forward(records.add(batch_record.BatchRecord(seq, (0, 9, 16)), later)):
        pass
    seen = []

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(_attention_documents(older.detach(), query))
            seen.append(_attention_documents(None, query))  # a batch without documents, recomputed
            with pytest.raises(ValueError, match="not those of the batch"):
                _attention_documents(older.clone(), query)
            return grad

    Recompute.apply(torch.ones(1, requires_grad=True)).sum().backward()
    assert seen == [(None, (0, 5, 16)), (None, None)]
    assert _attention_documents(later, query) == (None, (0, 9, 16))


def test_model_forward_runs_under_the_record_of_its_mask(records):
    """The model-forward hook: the rotary table of a forward is built for the batch whose mask the model is handed
    (a batch hooked earlier runs with its own layout); tokens sharded in the document layout without their
    documents raise before the model runs."""
    seen = []
    forward = rope_mod._hook_model_forward(
        lambda self, input_ids, position_ids, attention_mask, packed_seq_params=None: seen.append(records.running))
    first, second = torch.tensor([[0] * 5 + [1] * 11]), torch.tensor([[0] * 9 + [1] * 7])
    tokens = torch.arange(4)[None]
    a = records.add(batch_record.BatchRecord(16, (0, 5, 16)), first)
    records.add(a, tokens)
    b = records.add(batch_record.BatchRecord(16, (0, 9, 16)), second)
    forward(None, tokens, None, first)
    forward(None, None, None, second)
    forward(None, None, None, None)
    assert seen == [a, b, None] and a.model_ran and b.model_ran and records.running is None
    for mask in (None, second, torch.zeros(1, 16)):
        with pytest.raises(ValueError, match="get_batch_on_this_usp_rank returned"):
            forward(None, tokens, None, mask)
    forward(None, tokens, None, None, packed_seq_params=object())  # THD: documents travel in packed_seq_params
    assert len(seen) == 4


class _FakeGroup:
    def __init__(self, size: int):
        self.size = lambda: size


def test_sbhd_rope_follows_the_document_layout_of_the_batch(monkeypatch):
    """megatron-core caches the sliced rotary table per length; for a batch in the document layout the rotary
    forward hands on the rows of the positions held there (row positions, as megatron-core's sbhd RoPE)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    seq, u, r = 16, 2, 2
    rope_mod.install_rope_hook()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    cu = (0, 5, 16)
    for ring_rank in range(r):
        for ulysses_rank in range(u):
            groups = fake_groups(u, r, ulysses_rank, ring_rank)
            monkeypatch.setattr(state, "_STATE", state.USPState(groups, USPConfig(u, r, "zigzag", "torch")))
            full = rope.get_emb(seq)
            cp_group = _FakeGroup(u * r)  # hashable: megatron-core's rotary forward is lru_cached
            row_layout = rope(seq, cp_group=cp_group)
            assert torch.equal(row_layout, full[positions(seq, groups, ring_impl="zigzag")])
            records = state.get_batch_records()
            with records.model_forward(batch_record.BatchRecord(seq, cu)):
                held = positions(seq, groups, ring_impl="zigzag", cu_seqlens=cu)
                assert torch.equal(rope(seq, cp_group=cp_group), full[held])
                assert torch.equal(rope_mod.document_layout_rows(row_layout.clone()), row_layout)  # not ours: as is
            with records.model_forward(batch_record.BatchRecord(seq, None)):
                assert rope(seq, cp_group=cp_group) is row_layout  # the row layout: megatron-core's table
            assert rope(seq, cp_group=cp_group) is row_layout  # megatron-core's cached table again
            rope.forward.cache_clear()  # YaRN calls it on the instance


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
    for ring_rank in range(r):
        for ulysses_rank in range(u):
            groups = fake_groups(u, r, ulysses_rank, ring_rank)
            monkeypatch.setattr(state, "_STATE", state.USPState(groups, USPConfig(u, r, ring_impl, "torch")))
            held = positions(seq, groups, ring_impl=ring_impl, cu_seqlens=cu)  # THD rows: the document layout
            out = rope_mod.usp_apply_rotary_pos_emb_thd(t[held], freqs, config, cu)
            torch.testing.assert_close(out, expected[held], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mla", [False, True], ids=["rope", "mla-interleaved"])
def test_thd_rope_hook_interleaves_as_mla_asks(monkeypatch, mla):
    """MLA's RoPE interleaves: megatron-core 0.19 says so per call (``mla_rotary_interleaved=True``), older releases
    through ``config.multi_latent_attention``; the USP THD RoPE gives what the release's own function gives on one
    rank (on 0.19 the config says the opposite, so only the argument can make it right)."""
    import inspect

    from megatron.core.models.common.embeddings import rope_utils

    original = original_of(rope_utils.apply_rotary_pos_emb)
    per_call = "mla_rotary_interleaved" in inspect.signature(original).parameters
    kwargs = {"mla_rotary_interleaved": mla} if per_call else {}
    config = SimpleNamespace(rotary_interleaved=False, multi_latent_attention=(not mla) if per_call else mla,
                             apply_rope_fusion=False)
    seq, u, r = 32, 2, 2
    cu = torch.tensor([0, 7, 20, 24, 32], dtype=torch.int32)
    freqs, t = torch.randn(13, 1, 1, 8), torch.randn(seq, 3, 8)
    one_rank = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    expected = original(t, freqs, config, cu_seqlens=cu, cp_group=one_rank, **kwargs)
    hooked = rope_mod._hook_apply_rotary_pos_emb(original)
    monkeypatch.setattr(rope_mod, "usp_is_initialized", lambda: True)
    for ring_rank in range(r):
        for ulysses_rank in range(u):
            groups = fake_groups(u, r, ulysses_rank, ring_rank)
            monkeypatch.setattr(state, "_STATE", state.USPState(groups, USPConfig(u, r, "zigzag", "torch")))
            held = positions(seq, groups, ring_impl="zigzag", cu_seqlens=cu)
            out = hooked(t[held], freqs, config, cu_seqlens=cu, cp_group=one_rank, **kwargs)
            torch.testing.assert_close(out, expected[held], rtol=0, atol=1e-6)


def test_apply_rope_hook_falls_back_without_usp(monkeypatch):
    """megatron-core's modules call apply_rotary_pos_emb by their own name: after the hook they reach the USP THD
    RoPE only with cu_seqlens while USP is initialized, else megatron-core's function."""
    import importlib

    rope_mod.install_rope_hook()
    for module_name in rope_mod._APPLY_ROPE_MODULES:  # imported after the hook: they take the hooked name
        importlib.import_module(module_name)
    rope_mod.install_rope_hook()  # idempotent
    calls = []
    monkeypatch.setattr(rope_mod, "usp_apply_rotary_pos_emb_thd", lambda *args: calls.append("usp") or "usp")
    for module_name in rope_mod._APPLY_ROPE_MODULES:
        module = importlib.import_module(module_name)
        original = original_of(module.apply_rotary_pos_emb)
        assert original.__module__ == "megatron.core.models.common.embeddings.rope_utils", module_name
        monkeypatch.setattr(rope_mod, "usp_is_initialized", lambda: True)
        assert module.apply_rotary_pos_emb("t", "freqs", "config", cu_seqlens="cu") == "usp"
        monkeypatch.setattr(rope_mod, "usp_is_initialized", lambda: False)
        t, freqs = torch.randn(4, 1, 2, 8), torch.randn(4, 1, 1, 8)
        config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
        one_rank = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
        torch.testing.assert_close(module.apply_rotary_pos_emb(t, freqs, config, cp_group=one_rank),
                                   original(t, freqs, config, cp_group=one_rank))
    assert calls == ["usp"] * len(rope_mod._APPLY_ROPE_MODULES)


def test_rotary_table_refuses_a_cp_group_that_is_not_the_grid(monkeypatch):
    """megatron-core hands get_pos_emb_on_this_cp_rank its CP group; the USP slicing follows the grid, so a CP group
    of another size (a model built before or beside the USP grid) is an error, not silently ignored."""
    groups = fake_groups(2, 2, 1, 0)
    monkeypatch.setattr(state, "_STATE", state.USPState(groups, USPConfig(2, 2, "zigzag", "torch")))
    table = torch.arange(16.0).view(16, 1, 1, 1)
    grid_group, other_group = SimpleNamespace(size=lambda: 4), SimpleNamespace(size=lambda: 2)
    held = rope_mod.usp_pos_emb_on_this_rank(table, 0, grid_group)
    assert held.flatten().tolist() == [2.0, 3.0, 12.0, 13.0]  # CP rank 1 of 4 in zigzag: chunks 1 and 6 of 8
    with pytest.raises(ValueError, match="CP group has 2 ranks"):
        rope_mod.usp_pos_emb_on_this_rank(table, 0, other_group)
