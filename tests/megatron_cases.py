"""Megatron GPTModel parity bodies, run on every rank of a RankPool."""
from __future__ import annotations

import torch
import torch.distributed as dist

import megatron_usp as usp
from reference import relative_error

VOCAB, SEQ, BATCH = 64, 48, 2


def build_gpt(spec_fn, tp_size: int, seed: int = 1234, **config_overrides):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    config = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, tensor_model_parallel_size=tp_size,
        context_parallel_size=config_overrides.pop("context_parallel_size", 1),
    )
    config_class = config_overrides.pop("config_class", TransformerConfig)
    config.update(config_overrides)
    torch.manual_seed(seed)
    model = GPTModel(
        config=config_class(**config), transformer_layer_spec=spec_fn(), vocab_size=VOCAB,
        max_sequence_length=SEQ, position_embedding_type="rope", share_embeddings_and_output_weights=False,
    )
    return model


def make_batch(seed: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(BATCH, SEQ),
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
        "attention_mask": None,
    }


def reference_run(rank, world_size):
    """TP=1, CP=1: per-token losses and every parameter gradient for the full sequence. (On a 1 x 1 grid
    USPAttention is plain single-device attention; megatron's local DotProductAttention needs CUDA buffers.)"""
    from megatron_usp.megatron import (
        destroy_model_parallel, enable_cpu_mode, get_gpt_layer_local_spec, initialize_model_parallel,
    )

    enable_cpu_mode()
    initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    model = build_gpt(get_gpt_layer_local_spec, 1)
    batch = make_batch()
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    losses.sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    partition = {name: getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1
                 for name, p in model.named_parameters()}
    destroy_model_parallel()
    return losses.detach(), grads, partition, weights


def gpt_parity(rank, world_size, tp, ulysses_degree, ring_degree, ring_impls, ulysses_inner=True,
               micro_q=None) -> list[dict]:
    """USP GPTModel (local spec, RoPE, GQA) vs the TP=1, CP=1 reference with the same weights."""
    from megatron.core import parallel_state

    from megatron_usp.megatron import (
        destroy_model_parallel, get_batch_on_this_usp_rank, get_gpt_layer_local_spec, get_usp_groups,
        initialize_model_parallel,
    )

    ref_losses, ref_grads, partition, _ = reference_run(rank, world_size)
    report = []
    for ring_impl in ring_impls:
        initialize_model_parallel(tp, 1, ulysses_degree=ulysses_degree, ring_degree=ring_degree, ring_impl=ring_impl,
                                  ulysses_inner=ulysses_inner, micro_q=micro_q, create_gloo_process_groups=False)
        groups = get_usp_groups()
        model = build_gpt(get_gpt_layer_local_spec, tp, context_parallel_size=ulysses_degree * ring_degree)
        batch = get_batch_on_this_usp_rank(make_batch())
        losses = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        losses.sum().backward()
        full_losses = usp.unshard(losses.detach(), groups, dim=1, ring_impl=ring_impl)
        errors = {"loss": relative_error(full_losses, ref_losses)}
        dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        worst_grad = 0.0
        for name, param in model.named_parameters():
            grad = param.grad.detach().clone()
            dist.all_reduce(grad, group=dp_cp)  # what Megatron's DDP does: sum over dp x cp
            grad /= dp_size  # every DP replica saw the same batch here
            expected = ref_grads[name]
            if partition[name] >= 0 and tp > 1:
                expected = expected.chunk(tp, dim=partition[name])[tp_rank]
            err = relative_error(grad, expected)
            assert err <= 1e-5, f"{ring_impl} grad {name}: relative error {err:.2e}"
            worst_grad = max(worst_grad, err)
        errors["grad"] = worst_grad
        assert errors["loss"] <= 1e-5, f"{ring_impl} loss relative error {errors['loss']:.2e}"
        report.append({"ring_impl": ring_impl, **errors})
        destroy_model_parallel()
    return report


def gpt_pipeline_parity(rank, world_size, ulysses_degree, ring_degree, ring_impl="zigzag") -> dict:
    """PP=2 x USP: stage 0 holds the embedding and layer 1, stage 1 layer 2 and the head, run by megatron-core's
    own 1F1B schedule (``get_forward_backward_func``: its p2p activations and gradients) through the CPU stand-ins
    of ``megatron_usp.megatron.cpu_standins`` (an isolated rank pool undoes them after the case)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_usp.megatron import (
        cpu_standins, destroy_model_parallel, get_batch_on_this_usp_rank, get_gpt_layer_local_spec, get_usp_groups,
        initialize_model_parallel,
    )

    cpu_standins.install(megatron_lm=False)
    ref_losses, ref_grads, _, ref_weights = reference_run(rank, world_size)
    initialize_model_parallel(1, 2, ulysses_degree=ulysses_degree, ring_degree=ring_degree, ring_impl=ring_impl,
                              create_gloo_process_groups=False)
    groups = get_usp_groups()
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    sp_size = ulysses_degree * ring_degree
    from megatron.core.models.gpt import GPTModel

    config = build_gpt(get_gpt_layer_local_spec, 1, context_parallel_size=sp_size,
                       pipeline_model_parallel_size=2, pipeline_dtype=torch.float32).config
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False, pre_process=first, post_process=last)
    global_layer = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(model.decoder.layers)}
    assert len(global_layer) == 1 and global_layer["0"] == ("0" if first else "1"), global_layer

    def global_name(name):  # this stage's decoder.layers.0 is layer 1 (first stage) or layer 2 (last stage)
        if name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers."):].split(".", 1)
            return f"decoder.layers.{global_layer[index]}.{rest}"
        return name

    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(ref_weights[global_name(name)])
    batch = get_batch_on_this_usp_rank(make_batch())
    model.config.calculate_per_token_loss = True  # the loss is the plain sum, as the reference's

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        output = model(micro["tokens"], micro["position_ids"], None, labels=micro["labels"])
        return output, lambda losses: (losses.sum(), torch.tensor(losses.numel()), {"losses": losses.detach()})

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=SEQ, micro_batch_size=BATCH, forward_only=False,
    )
    assert get_forward_backward_func().__name__ == "forward_backward_pipelining_without_interleaving"
    errors = {}
    if last:
        losses = outputs[0]["losses"]
        errors["loss"] = relative_error(usp.unshard(losses, groups, dim=1, ring_impl=ring_impl), ref_losses)
        assert errors["loss"] <= 1e-5, errors
    worst = 0.0
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        dist.all_reduce(grad, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        err = relative_error(grad, ref_grads[global_name(name)])
        assert err <= 1e-5, f"stage {'first' if first else 'last'} grad {name}: {err:.2e}"
        worst = max(worst, err)
    errors["grad"] = worst
    destroy_model_parallel()
    return errors


# ---- masks: packed documents (THD) and sliding window ----------------------------------------------------------

# One packed THD row of 2 x SEQ tokens: documents of real lengths 20, 16, 8 | 10, 22, 12; the third document is
# padded to 12 slots (cu_seqlens_padded), and 4 padding tokens trail the last document.
PACKED_CU = [0, 20, 36, 44, 54, 76, 88]
PACKED_CU_PADDED = [0, 20, 36, 48, 58, 80, 92]
PACKED_LEN = 2 * SEQ
PACKED_MAX_SEQLEN = 22


def make_packed_batch(seed: int = 7) -> dict:
    """A Megatron THD batch: ``tokens [1, PACKED_LEN]`` plus global ``cu_seqlens`` / ``cu_seqlens_padded``."""
    from megatron_usp.megatron import document_ids_from_cu_seqlens
    from megatron_usp.megatron.documents import in_document_positions

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (1, PACKED_LEN + 1), generator=gen)
    ids = document_ids_from_cu_seqlens(torch.tensor(PACKED_CU), PACKED_LEN, 1, torch.tensor(PACKED_CU_PADDED))
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": (ids % 2 == 0).float(),  # padding (odd ids) carries no loss
        "position_ids": in_document_positions(PACKED_CU_PADDED, PACKED_LEN)[None],
        "attention_mask": None,
        "cu_seqlens": torch.tensor(PACKED_CU, dtype=torch.int32),
        "cu_seqlens_padded": torch.tensor(PACKED_CU_PADDED, dtype=torch.int32),
        "max_seqlen": torch.tensor([PACKED_MAX_SEQLEN], dtype=torch.int32),
    }


def packed_seq_params_of(batch: dict):
    """What a Megatron-LM get_batch builds for THD data (global offsets; USP never shards them)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    max_seqlen = int(batch["max_seqlen"][0])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch["cu_seqlens"], cu_seqlens_kv=batch["cu_seqlens"],
                           cu_seqlens_q_padded=batch["cu_seqlens_padded"],
                           cu_seqlens_kv_padded=batch["cu_seqlens_padded"], max_seqlen_q=max_seqlen,
                           max_seqlen_kv=max_seqlen)


def _run_gpt(model, batch: dict, packed: bool) -> torch.Tensor:
    """Per-token losses ``[b, s_local]``; backward of the loss-masked sum."""
    losses = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   packed_seq_params=packed_seq_params_of(batch) if packed else None)
    (losses * batch["loss_mask"]).sum().backward()
    return losses.detach()


def _grads(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def masked_reference(packed: bool, **config_overrides) -> tuple[torch.Tensor, dict]:
    """TP=1, CP=1 (a 1 x 1 USP grid, nothing sharded): losses and grads of the packed or plain batch."""
    from megatron_usp.megatron import (
        destroy_model_parallel, enable_cpu_mode, get_gpt_layer_local_spec, initialize_model_parallel,
    )

    enable_cpu_mode()
    initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    model = build_gpt(get_gpt_layer_local_spec, 1, **config_overrides)
    losses = _run_gpt(model, make_packed_batch() if packed else make_batch(), packed)
    grads = _grads(model)
    destroy_model_parallel()
    return losses, grads


def per_document_reference() -> tuple[torch.Tensor, dict]:
    """Independent reference: every document through the plain model on its own (no packing, no masks, RoPE
    from 0); losses scattered back to their packed positions (padding stays 0), grads summed over documents."""
    from megatron_usp.megatron import (
        destroy_model_parallel, enable_cpu_mode, get_gpt_layer_local_spec, initialize_model_parallel,
    )

    enable_cpu_mode()
    initialize_model_parallel(1, 1, ring_impl="basic", create_gloo_process_groups=False)
    model = build_gpt(get_gpt_layer_local_spec, 1)
    batch = make_packed_batch()
    losses = torch.zeros(1, PACKED_LEN)
    for i in range(len(PACKED_CU) - 1):
        start, length = PACKED_CU_PADDED[i], PACKED_CU[i + 1] - PACKED_CU[i]
        doc = {key: batch[key][:, start:start + length] for key in ("tokens", "labels", "loss_mask")}
        doc.update(position_ids=torch.arange(length)[None], attention_mask=None)
        losses[:, start:start + length] = _run_gpt(model, doc, packed=False)
    grads = _grads(model)
    destroy_model_parallel()
    return losses, grads


def _usp_run(ulysses_degree, ring_degree, ring_impl, packed, **config_overrides):
    from megatron.core import parallel_state

    from megatron_usp.megatron import (
        destroy_model_parallel, get_batch_on_this_usp_rank, get_gpt_layer_local_spec, get_usp_groups,
        initialize_model_parallel,
    )

    initialize_model_parallel(1, 1, ulysses_degree=ulysses_degree, ring_degree=ring_degree, ring_impl=ring_impl,
                              create_gloo_process_groups=False)
    model = build_gpt(get_gpt_layer_local_spec, 1, context_parallel_size=ulysses_degree * ring_degree,
                      **config_overrides)
    batch = get_batch_on_this_usp_rank(make_packed_batch() if packed else make_batch())
    layout = None
    if packed:  # the balanced document layout; its offsets (padding folded in as documents) replace cu_seqlens
        from megatron_usp.megatron.documents import layout_cu_seqlens

        layout = layout_cu_seqlens(PACKED_CU, PACKED_LEN, PACKED_CU_PADDED)
        assert tuple(batch["cu_seqlens"].tolist()) == layout and batch["cu_seqlens_padded"] is None
        assert torch.equal(batch["tokens"], usp.shard(make_packed_batch()["tokens"], get_usp_groups(),
                                                      ring_impl=ring_impl, cu_seqlens=layout))
    losses = usp.unshard(_run_gpt(model, batch, packed), get_usp_groups(), dim=1, ring_impl=ring_impl,
                         cu_seqlens=layout)
    grads = {}
    for name, param in model.named_parameters():
        grads[name] = param.grad.detach().clone()
        dist.all_reduce(grads[name], group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    destroy_model_parallel()
    return losses, grads


def _compare(label: str, losses, grads, ref_losses, ref_grads, tol: float = 1e-5) -> dict:
    errors = {"loss": relative_error(losses, ref_losses),
              "grad": max(relative_error(grads[name], ref_grads[name]) for name in ref_grads)}
    for key, err in errors.items():
        assert err <= tol, f"{label} {key}: relative error {err:.2e}"
    return errors


def gpt_packed_parity(rank, world_size, ulysses_degree, ring_degree, ring_impls, window_impls=(),
                      per_document=True) -> list[dict]:
    """Packed THD documents: USP GPTModel vs the 1 x 1 packed reference (same document mask, nothing sharded),
    which itself matches per-document forward passes of the plain model (``per_document``; it does not depend
    on the grid). Optionally window_size=(8, 0) too."""
    ref_losses, ref_grads = masked_reference(packed=True)
    report = []
    if per_document:
        doc_losses, doc_grads = per_document_reference()
        real = make_packed_batch()["loss_mask"].bool()
        report.append({"ring_impl": "1x1 vs per-document",
                       **_compare("1x1 packed vs per-document", ref_losses * real, ref_grads, doc_losses, doc_grads)})
    real = make_packed_batch()["loss_mask"]  # padding outputs are not defined (TE leaves them unwritten)
    for ring_impl in ring_impls:
        losses, grads = _usp_run(ulysses_degree, ring_degree, ring_impl, packed=True)
        report.append({"ring_impl": ring_impl,
                       **_compare(f"packed {ring_impl}", losses * real, grads, ref_losses * real, ref_grads)})
    if window_impls:
        window = dict(window_size=(8, 0))
        win_losses, win_grads = masked_reference(packed=False, **window)
        plain_losses, _ = masked_reference(packed=False)
        assert relative_error(win_losses, plain_losses) > 1e-3, "window_size had no effect on the reference"
        for ring_impl in window_impls:
            losses, grads = _usp_run(ulysses_degree, ring_degree, ring_impl, packed=False, **window)
            report.append({"ring_impl": f"window {ring_impl}",
                           **_compare(f"window {ring_impl}", losses, grads, win_losses, win_grads)})
    return report


# ---- --reset-attention-mask batches: documents at EOD tokens, Megatron's dense mask as the reference -------------

EOD = 3
RESET_EODS = ([9, 20, 21, 35], [4, 30, 46])  # per row: two adjacent EODs make a one-token document


def make_reset_batch(batch_size: int, seed: int = 11) -> dict:
    """Rows with EOD tokens and Megatron's own dataloader masks (--reset-attention-mask --reset-position-ids)."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(EOD + 1, VOCAB, (batch_size, SEQ + 1), generator=gen)
    for row in range(batch_size):
        text[row, RESET_EODS[row]] = EOD
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    masks = [_get_ltor_masks_and_position_ids(row, EOD, True, True, False, True) for row in tokens]
    return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(batch_size, SEQ),
            "attention_mask": torch.stack([m for m, _, _ in masks]), "position_ids": torch.stack([p for _, _, p in masks])}


def dense_mask_reference(batch_size: int) -> tuple[torch.Tensor, dict]:
    """TP=1, CP=1 with megatron-core's own local spec: DotProductAttention applies the dense [b, 1, s, s] mask."""
    import contextlib

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec as megatron_local_spec
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_usp.megatron import destroy_model_parallel, enable_cpu_mode, initialize_model_parallel
    from megatron_usp.megatron.cpu_standins import _current_cuda_device_is_cpu

    enable_cpu_mode()
    initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    tracker = get_cuda_rng_tracker()
    fork = tracker.fork
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()  # dropout 0: no CUDA RNG state needed
    try:
        with _current_cuda_device_is_cpu():  # its softmax buffers ask for the current CUDA device
            model = build_gpt(megatron_local_spec, 1)
            batch = make_reset_batch(batch_size)
            losses = _run_gpt(model, batch, packed=False)
            plain = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
            with torch.no_grad():
                plain_losses = model(batch["tokens"], batch["position_ids"], plain, labels=batch["labels"])
    finally:
        tracker.fork = fork
    assert relative_error(losses, plain_losses) > 1e-3, "the document mask had no effect on the reference"
    grads = _grads(model)
    destroy_model_parallel()
    return losses, grads


def gpt_reset_mask_parity(rank, world_size, ulysses_degree, ring_degree, ring_impls, batch_size,
                          from_eod=False) -> list[dict]:
    """USP GPTModel on --reset-attention-mask batches (through get_batch_on_this_usp_rank: the dense mask, or EOD
    tokens with ``from_eod``) vs the 1 x 1 megatron-core model with the dense mask. Micro-batch 1: the balanced
    document layout; 2 (rows with different documents): the row layout with document ids."""
    from megatron.core import parallel_state

    from megatron_usp.megatron import (
        destroy_model_parallel, get_batch_on_this_usp_rank, get_gpt_layer_local_spec, get_usp_groups,
        initialize_model_parallel,
    )
    from megatron_usp.megatron import documents

    ref_losses, ref_grads = dense_mask_reference(batch_size)
    report = []
    for ring_impl in ring_impls:
        initialize_model_parallel(1, 1, ulysses_degree=ulysses_degree, ring_degree=ring_degree, ring_impl=ring_impl,
                                  create_gloo_process_groups=False)
        model = build_gpt(get_gpt_layer_local_spec, 1, context_parallel_size=ulysses_degree * ring_degree)
        full = make_reset_batch(batch_size)
        if from_eod:
            batch = get_batch_on_this_usp_rank({**full, "attention_mask": None}, eod_token=EOD)
        else:
            batch = get_batch_on_this_usp_rank(full)
        layout = documents.shared_cu_seqlens(batch["attention_mask"])  # the layout the hook sharded with
        assert (layout is not None) == (batch_size == 1), layout
        losses = usp.unshard(_run_gpt(model, batch, packed=False), get_usp_groups(), dim=1, ring_impl=ring_impl,
                             cu_seqlens=layout)
        grads = {}
        for name, param in model.named_parameters():
            grads[name] = param.grad.detach().clone()
            dist.all_reduce(grads[name], group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        destroy_model_parallel()
        label = f"reset-mask b{batch_size} {ring_impl}{' eod' if from_eod else ''}"
        report.append({"ring_impl": label, **_compare(label, losses, grads, ref_losses, ref_grads)})
    return report


def gpt_mask_refusal(rank, world_size) -> list[str]:
    """A dense attention_mask handed straight to the USP model (not through the batch hook) raises ValueError on
    every rank before usp_attn runs (so before any collective): the ranks then meet at a barrier, no hang."""
    from megatron_usp.megatron import (
        attention, destroy_model_parallel, enable_cpu_mode, get_batch_on_this_usp_rank, get_gpt_layer_local_spec,
        initialize_model_parallel,
    )

    enable_cpu_mode()
    initialize_model_parallel(1, 1, ulysses_degree=2, ring_degree=2, create_gloo_process_groups=False)
    model = build_gpt(get_gpt_layer_local_spec, 1, context_parallel_size=4)
    full = make_reset_batch(1)
    batch = get_batch_on_this_usp_rank({**full, "attention_mask": None})
    calls = []
    original = attention.attend
    attention.attend = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    messages = []
    try:
        for mask in (full["attention_mask"], full["attention_mask"][:, :, :SEQ // 4], torch.zeros(1, SEQ).float()):
            try:
                model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
            except ValueError as error:
                messages.append(str(error))
    finally:
        attention.attend = original
    assert calls == [] and len(messages) == 3, (calls, messages)
    dist.barrier()
    destroy_model_parallel()
    return messages


def gpt_reset_mask_cases(rank, world_size) -> list[dict]:
    """The --reset-attention-mask matrix in one pool run (u2 x r2): micro-batch 1 from the dense mask (zigzag) and
    from EOD tokens (stripe), micro-batch 2 (zigzag); then the refusal of a mask handed straight to the model."""
    import time

    report = []
    for batch_size, ring_impl, from_eod in ((1, "zigzag", False), (1, "stripe", True), (2, "zigzag", False)):
        start = time.perf_counter()
        report += gpt_reset_mask_parity(rank, world_size, 2, 2, [ring_impl], batch_size, from_eod)
        report[-1]["seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    report.append({"refusals": gpt_mask_refusal(rank, world_size), "seconds": time.perf_counter() - start})
    return report


# ---- activation recompute: full (uniform, block) and selective (core attention) --------------------------------

RECOMPUTE = {  # megatron-core TransformerConfig overrides; selective recomputes recompute_modules ["core_attn"]
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
}
# USPAttention calls in one forward + backward of the 2-layer model: recomputation runs it again in the backward
# (block with recompute_num_layers=1 recomputes the first layer only), so a mode that silently did not recompute
# fails here rather than passing as plain parity.
RECOMPUTE_ATTENTION_CALLS = {"full-uniform": 4, "full-block": 3, "selective": 4}


def gpt_recompute_parity(rank, world_size, ulysses_degree, ring_degree, ring_impl, modes, packed_modes=()) -> list:
    """Activation recompute under USP: losses and gradients of the USP GPTModel with each recompute mode vs the
    1 x 1 model without recompute (plain causal batch; packed THD documents for ``packed_modes``)."""
    import megatron.core.tensor_parallel.random as tp_random

    from megatron_usp.megatron import cpu_standins
    from megatron_usp.megatron.attention import USPAttention

    calls = []
    original = USPAttention.forward
    # megatron-core's CheckpointFunction saves and restores the CUDA RNG state: on CPU that is the CPU generator
    # (the stand-in the Megatron-LM CPU rehearsal uses; enable_cpu_mode leaves it out)
    rng_fns = tp_random._get_cuda_rng_state, tp_random._set_cuda_rng_state
    if not torch.cuda.is_available():
        tp_random._get_cuda_rng_state = cpu_standins._cpu_get_rng_state
        tp_random._set_cuda_rng_state = cpu_standins._cpu_set_rng_state

    def counted(self, *args, **kwargs):
        calls.append(self.layer_number)
        return original(self, *args, **kwargs)

    report = []
    USPAttention.forward = counted
    try:
        for packed, names in ((False, modes), (True, packed_modes)):
            if not names:
                continue
            ref_losses, ref_grads = masked_reference(packed=packed)
            real = make_packed_batch()["loss_mask"] if packed else 1.0
            for name in names:
                calls.clear()
                losses, grads = _usp_run(ulysses_degree, ring_degree, ring_impl, packed, **RECOMPUTE[name])
                label = f"{name}{' packed' if packed else ''} {ring_impl}"
                assert len(calls) == RECOMPUTE_ATTENTION_CALLS[name], (label, calls)
                report.append({"ring_impl": label,
                               **_compare(label, losses * real, grads, ref_losses * real, ref_grads)})
    finally:
        USPAttention.forward = original
        tp_random._get_cuda_rng_state, tp_random._set_cuda_rng_state = rng_fns
    return report


# ---- today's attention features in the GPTModel: MLA, attention sinks, max-logit reporting -------------------------

FEATURES = {
    # MLA: q/k head dim 8 + 4 RoPE dims, v head dim 8 (!= 12), LoRA ranks; YaRN RoPE through the USP hook, unfused
    "mla": dict(config=dict(multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=16, qk_head_dim=8,
                            qk_pos_emb_head_dim=4, v_head_dim=8, rope_type="yarn", rotary_scaling_factor=2.0,
                            original_max_position_embeddings=16, normalization="RMSNorm"),
                spec=dict(multi_latent_attention=True)),
    "sinks": dict(config=dict(softmax_type="learnable"), spec={}),
    "qk_clip": dict(config=dict(qk_clip=True), spec={}),
}


def _feature_gpt(feature: str, tp_size: int, context_parallel_size: int = 1):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_usp.megatron import get_gpt_layer_local_spec

    spec = FEATURES[feature]
    overrides = dict(spec["config"])
    if overrides.get("multi_latent_attention"):
        overrides["config_class"] = MLATransformerConfig
    return build_gpt(lambda: get_gpt_layer_local_spec(**spec["spec"]), tp_size,
                     context_parallel_size=context_parallel_size, **overrides)


def _scaled_causal_max(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """``[s, b, h, d]`` / ``[s, b, kv_h, d]`` of the whole sequence -> per-head max causal scaled logit (float64)."""
    q, k = query.double(), key.double().repeat_interleave(query.shape[2] // key.shape[2], dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    causal = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3))


def gpt_feature_parity(rank, world_size, features, tp, ulysses_degree, ring_degree, ring_impls) -> list[dict]:
    """:func:`feature_parity` for each of ``features`` in one pool run."""
    return [dict(entry, feature=feature) for feature in features
            for entry in feature_parity(feature, tp, ulysses_degree, ring_degree, ring_impls)]


def feature_parity(feature, tp, ulysses_degree, ring_degree, ring_impls) -> list[dict]:
    """An MLA model, a model with learnable attention sinks, or QK-clip max-logit reporting: USP (TP x u x r) vs the
    same model at the same TP without SP (the reference grid: TP x DP, every replica the same batch), same weights;
    loss and every gradient (the sink's included) within 1e-5; with qk_clip, each layer's current_max_attn_logits
    equals the max causal logit computed from the reference layer's q and k. (Against TP=1 instead, megatron-core's
    local-spec MLA at TP=2 itself differs in the input layernorm's gradient, 5e-4, without any SP.)"""
    from megatron.core import parallel_state

    from megatron_usp.megatron import (
        cpu_standins, destroy_model_parallel, get_batch_on_this_usp_rank, get_usp_groups,
        initialize_model_parallel,
    )

    # MLASelfAttention allocates on torch.cuda.current_device() and, without TE, needs the mla-without-te stand-in
    cpu_standins.install(megatron_lm=False)
    initialize_model_parallel(tp, 1, create_gloo_process_groups=False)
    reference = _feature_gpt(feature, tp)
    seen = {}

    def capture(module, args, kwargs):
        query, key = args[:2]
        seen[module.layer_number] = _scaled_causal_max(query, key, module.softmax_scale)

    hooks = [layer.self_attention.core_attention.register_forward_pre_hook(capture, with_kwargs=True)
             for layer in reference.decoder.layers]
    batch = make_batch()
    ref_losses = reference(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    ref_losses.sum().backward()
    for hook in hooks:
        hook.remove()
    ref = {name: (p.detach().clone(), p.grad.detach().clone()) for name, p in reference.named_parameters()}
    destroy_model_parallel()
    report = []
    for ring_impl in ring_impls:
        initialize_model_parallel(tp, 1, ulysses_degree=ulysses_degree, ring_degree=ring_degree, ring_impl=ring_impl,
                                  create_gloo_process_groups=False)
        groups = get_usp_groups()
        model = _feature_gpt(feature, tp, ulysses_degree * ring_degree)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(ref[name][0])
        usp_batch = get_batch_on_this_usp_rank(make_batch())
        losses = model(usp_batch["tokens"], usp_batch["position_ids"], usp_batch["attention_mask"],
                       labels=usp_batch["labels"])
        losses.sum().backward()
        errors = {"loss": relative_error(usp.unshard(losses.detach(), groups, dim=1, ring_impl=ring_impl),
                                         ref_losses.detach())}
        dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        dp_size = parallel_state.get_data_parallel_world_size()
        worst = 0.0
        for name, param in model.named_parameters():
            grad = param.grad.detach().clone()
            dist.all_reduce(grad, group=dp_cp)  # Megatron's DDP: every replicated parameter's shares summed
            grad /= dp_size  # every DP replica saw the same batch
            err = relative_error(grad, ref[name][1])
            assert err <= 1e-5, f"{feature} {ring_impl} grad {name}: {err:.2e}"
            worst = max(worst, err)
            if name.endswith("softmax_offset"):
                errors["sink grad"] = err
        errors["grad"] = worst
        if feature == "qk_clip":
            worst = 0.0
            for layer in model.decoder.layers:
                reported = layer.self_attention.core_attention.current_max_attn_logits
                expected = seen[layer.layer_number]
                assert reported is not None and reported.shape == expected.shape, (reported, expected)
                worst = max(worst, relative_error(reported, expected))
            assert worst <= 1e-5, f"max logit {worst:.2e}"
            errors["max logit"] = worst
        assert errors["loss"] <= 1e-5, f"{feature} {ring_impl} loss {errors['loss']:.2e}"
        report.append({"ring_impl": ring_impl, **errors})
        destroy_model_parallel()
    return report


def gpt_hybrid_cp_parity(rank, world_size, ulysses_degree, ring_degree) -> dict:
    """megatron-core's hybrid CP (``hybrid_context_parallel``): a sample handed its own CP group
    (``PackedSeqParams(qkv_format="sbhd", local_cp_size, cp_group)``, as ``get_batch_on_this_hybrid_cp_rank``
    builds it) runs USP on that group's sub-grid: on the whole DP x CP group (4 ranks) and on each hybrid group of 2
    (each half of the ranks runs the sample), losses and gradients equal the 1 x 1 model's."""
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_usp.megatron import (
        destroy_model_parallel, get_batch_on_this_usp_rank, get_gpt_layer_local_spec, initialize_model_parallel,
    )
    from megatron_usp.megatron.grid import usp_groups_of_cp_group

    ref_losses, ref_grads, _, _ = reference_run(rank, world_size)
    initialize_model_parallel(1, 1, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                              create_gloo_process_groups=False, hybrid_context_parallel=True)
    model = build_gpt(get_gpt_layer_local_spec, 1, context_parallel_size=ulysses_degree * ring_degree)
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    report = {}
    for local_cp_size in (dist.get_world_size(dp_cp), 2):
        model.zero_grad(set_to_none=True)
        cp_group = parallel_state.get_hybrid_data_context_parallel_groups(group_size=local_cp_size)
        groups = usp_groups_of_cp_group(cp_group)
        full = make_batch()
        batch = get_batch_on_this_usp_rank(full, groups)
        offsets = torch.tensor([0, SEQ, 2 * SEQ], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=offsets, cu_seqlens_kv=offsets,
                                 cu_seqlens_q_padded=offsets, cu_seqlens_kv_padded=offsets, max_seqlen_q=SEQ,
                                 max_seqlen_kv=SEQ, local_cp_size=local_cp_size, cp_group=cp_group)
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=params)
        losses.sum().backward()
        full_losses = usp.unshard(losses.detach(), groups, dim=1)
        copies = dist.get_world_size(dp_cp) // local_cp_size  # each hybrid group of this size ran the sample
        worst = 0.0
        for name, param in model.named_parameters():
            grad = param.grad.detach().clone()
            dist.all_reduce(grad, group=dp_cp)  # what Megatron's DDP does with hybrid CP: sum over dp x cp
            worst = max(worst, relative_error(grad / copies, ref_grads[name]))
        report[local_cp_size] = {"loss": relative_error(full_losses, ref_losses), "grad": worst,
                                 "degrees": (groups.ulysses_degree, groups.ring_degree)}
        assert report[local_cp_size]["loss"] <= 1e-5 and worst <= 1e-5, report
    destroy_model_parallel()
    return report


def expert_groups_with_and_without_usp(rank, world_size, ulysses_degree, ring_degree, expert_model_parallel_size):
    """The expert-parallel groups megatron-core builds under the USP grid and with its own CP of the same size:
    ``{name: (this rank's group ranks, ...)}`` for both."""
    from megatron.core import parallel_state

    from megatron_usp.megatron import destroy_model_parallel, initialize_model_parallel

    def groups() -> dict:
        return {name: tuple(dist.get_process_group_ranks(getter()))
                for name, getter in (("ep", parallel_state.get_expert_model_parallel_group),
                                     ("expert_dp", parallel_state.get_expert_data_parallel_group),
                                     ("expert_tp_ep", parallel_state.get_expert_tensor_and_model_parallel_group))}

    initialize_model_parallel(1, 1, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                              expert_model_parallel_size=expert_model_parallel_size, create_gloo_process_groups=False)
    usp = groups()
    destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=ulysses_degree * ring_degree,
                                             expert_model_parallel_size=expert_model_parallel_size,
                                             create_gloo_process_groups=False)
    megatron = groups()
    parallel_state.destroy_model_parallel()
    return {"usp": usp, "megatron": megatron}
