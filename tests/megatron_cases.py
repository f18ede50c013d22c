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
    config.update(config_overrides)
    torch.manual_seed(seed)
    model = GPTModel(
        config=TransformerConfig(**config), transformer_layer_spec=spec_fn(), vocab_size=VOCAB,
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


def gpt_parity(rank, world_size, tp, ulysses_degree, ring_degree, ring_impls, ulysses_inner=True) -> list[dict]:
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
                                  ulysses_inner=ulysses_inner, create_gloo_process_groups=False)
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
    """PP=2 x USP: stage 0 holds the embedding and layer 1, stage 1 layer 2 and the head; activations and their
    gradients cross the stage boundary by send/recv (Megatron's schedules need CUDA buffers on this path)."""
    from megatron.core import parallel_state

    from megatron_usp.megatron import (
        destroy_model_parallel, get_batch_on_this_usp_rank, get_gpt_layer_local_spec, get_usp_groups,
        initialize_model_parallel,
    )

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
    peer = rank + sp_size if first else rank - sp_size  # same CP rank on the other stage
    if first:
        hidden = model(batch["tokens"], batch["position_ids"], None)
        dist.send(hidden.detach().contiguous(), peer)
        grad = torch.empty_like(hidden)
        dist.recv(grad, peer)
        hidden.backward(grad)
    else:
        hidden = torch.empty(SEQ // sp_size, BATCH, model.config.hidden_size)
        dist.recv(hidden, peer)
        hidden.requires_grad_()
        model.set_input_tensor(hidden)
        losses = model(None, batch["position_ids"], None, labels=batch["labels"])
        losses.sum().backward()
        dist.send(hidden.grad.contiguous(), peer)
    errors = {}
    if last:
        errors["loss"] = relative_error(usp.unshard(losses.detach(), groups, dim=1, ring_impl=ring_impl), ref_losses)
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
