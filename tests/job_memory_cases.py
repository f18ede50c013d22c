"""Bodies for tests/planner/test_job_memory.py, run on every rank of an isolated RankPool: the bytes a megatron-core GPTModel
(local spec, USP core attention) saves for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``."""
from __future__ import annotations

import torch

# small but activation-dominated: the memory model's terms are all visible at this size
SHAPE = dict(num_layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn_hidden=192, vocab=128, seq_len=256,
             micro_batch=1)


def _model_config(shape: dict, tp: int, cp: int, gated: bool, recompute: dict, sequence_parallel: bool = False,
                  moe: dict = None, mla: dict = None):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    extra = dict(gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False) \
        if gated else {}
    config_class = MLATransformerConfig if mla else TransformerConfig
    return config_class(
        num_layers=shape["num_layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        num_query_groups=shape["heads"] if mla else shape["kv_heads"], kv_channels=shape["head_dim"], ffn_hidden_size=shape["ffn_hidden"],
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, tensor_model_parallel_size=tp,
        context_parallel_size=cp, sequence_parallel=sequence_parallel, **extra, **recompute,
        **(dict(moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, **moe) if moe else {}),
        **(dict(multi_latent_attention=True, rope_type="rope", qk_layernorm=True, **mla) if mla else {}))


def moe_saved_bytes(rank, world_size, grids) -> list[list[int]]:
    """:func:`saved_bytes` for grids ``(tp, ulysses, ring, expert_parallel, cases)`` whose cases carry a third entry,
    megatron-core's MoE settings (``num_moe_experts``, ``moe_router_topk``, ``moe_ffn_hidden_size``, ...)."""
    return [_saved_bytes(tp, u, r, "zigzag", cases, ep) for tp, u, r, ep, cases in grids]


def mla_saved_bytes(rank, world_size, grids) -> list[list[int]]:
    """:func:`saved_bytes` of megatron-core's multi-latent attention (MLASelfAttention, local spec) for grids
    ``(tp, ulysses, ring, cases)``, each case ``(recompute kwargs, MLA settings)`` (``q_lora_rank`` (None: no
    query compression), ``kv_lora_rank``, ``qk_head_dim``, ``qk_pos_emb_head_dim``, ``v_head_dim``) on a gated
    RMSNorm model."""
    return [_saved_bytes(tp, u, r, "zigzag", [(True, recompute, None, mla) for recompute, mla in cases])
            for tp, u, r, cases in grids]


def saved_bytes(rank, world_size, grids) -> list[list[int]]:
    """For each grid ``(tp, ulysses, ring, ring_impl, cases)`` and each case ``(gated, recompute kwargs)`` (a
    ``"sequence_parallel": True`` entry in the kwargs turns on Megatron's sequence parallelism): bytes of
    distinct storages saved for backward on this rank during one forward (parameters and tensors sharing a
    parameter's storage excluded). Grids smaller than the pool leave the other ranks as data-parallel replicas."""
    return [_saved_bytes(tp, u, r, impl, cases) for tp, u, r, impl, cases in grids]


def _gpt_model(tp, cp, gated, recompute, moe=None, mla=None, expert_parallel: int = 1):
    """SHAPE's GPTModel (local spec, USP core attention) with these settings; ``moe["moe_layer_freq"]`` a list:
    megatron-core's pattern, 0 = a dense MLP in that layer."""
    from megatron.core.models.gpt import GPTModel

    from megatron_usp.megatron.specs import get_gpt_decoder_block_local_spec

    recompute = dict(recompute)
    config = _model_config(SHAPE, tp, cp, gated, recompute, recompute.pop("sequence_parallel", False),
                           dict(moe, expert_model_parallel_size=expert_parallel) if moe else None, mla)
    spec = dict(num_experts=moe["num_moe_experts"], moe_grouped_gemm=False) if moe else {}
    if mla:
        spec.update(multi_latent_attention=True, qk_layernorm=True)
    block = get_gpt_decoder_block_local_spec(config, **spec)
    if mla and mla["q_lora_rank"] is None:  # no compressed query, no query norm (megatron-core 0.19 refuses one)
        from megatron.core.transformer.identity_op import IdentityOp

        for layer in block.layer_specs:
            layer.submodules.self_attention.submodules.q_layernorm = IdentityOp
    pattern = (moe or {}).get("moe_layer_freq")
    if isinstance(pattern, list):
        dense = get_gpt_decoder_block_local_spec(config, **{key: value for key, value in spec.items()
                                                            if key not in ("num_experts", "moe_grouped_gemm")})
        block.layer_specs = [(block if moe_layer else dense).layer_specs[index]
                             for index, moe_layer in enumerate(pattern)]
    return GPTModel(config=config, transformer_layer_spec=block, vocab_size=SHAPE["vocab"],
                    max_sequence_length=SHAPE["seq_len"], position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)


def parameter_numels(rank, world_size, cases) -> list[int]:
    """Parameters of SHAPE's GPTModel for each case ``(moe settings or None, MLA settings or None)``, TP = 1."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_usp.megatron import cpu_standins, destroy_model_parallel, initialize_model_parallel

    cpu_standins.install(megatron_lm=False)
    initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    model_parallel_cuda_manual_seed(1234)
    counts = [sum(p.numel() for p in _gpt_model(1, 1, True, {}, moe, mla).parameters()) for moe, mla in cases]
    destroy_model_parallel()
    return counts


def _saved_bytes(tp, ulysses_degree, ring_degree, ring_impl, cases, expert_parallel: int = 1) -> list[int]:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_usp.megatron import cpu_standins, destroy_model_parallel, initialize_model_parallel

    cpu_standins.install(megatron_lm=False)  # megatron-core's CUDA RNG calls (recompute) -> CPU
    initialize_model_parallel(tp, 1, ulysses_degree=ulysses_degree, ring_degree=ring_degree, ring_impl=ring_impl,
                              create_gloo_process_groups=False, expert_model_parallel_size=expert_parallel)
    model_parallel_cuda_manual_seed(1234)
    cp = ulysses_degree * ring_degree
    shape = SHAPE
    local = shape["seq_len"] // cp
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, shape["vocab"], (shape["micro_batch"], local), generator=gen)
    positions = torch.arange(local).expand(shape["micro_batch"], local).contiguous()  # sizes only matter here
    measured = []
    for gated, recompute, *extra in cases:
        torch.manual_seed(1)
        model = _gpt_model(tp, cp, gated, recompute, *extra, expert_parallel=expert_parallel)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if not isinstance(t, torch.nn.Parameter) and ptr not in params:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, positions, None, labels=tokens)
        loss.sum().backward()  # the saved tensors really serve a backward
        measured.append(sum(seen.values()))
    destroy_model_parallel()
    return measured


def state_bytes_measured(rank, world_size, grids) -> list[dict]:
    """For each grid ``(tp, ulysses, ring, distributed_optimizer)``: bytes of a bf16 GPTModel's parameters, of
    megatron-core DDP's fp32 gradient buffers, and of its optimizer's fp32 master weights + Adam moments after one
    step (``get_megatron_optimizer``, on this rank)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_usp.megatron import (
        cpu_standins, destroy_model_parallel, get_gpt_layer_local_spec, initialize_model_parallel,
    )

    cpu_standins.install(megatron_lm=False)
    results = []
    for tp, u, r, distributed in grids:
        initialize_model_parallel(tp, 1, ulysses_degree=u, ring_degree=r, create_gloo_process_groups=False)
        model_parallel_cuda_manual_seed(1234)
        config = _model_config(SHAPE, tp, u * r, True, {})
        config.bf16, config.params_dtype = True, torch.bfloat16
        torch.manual_seed(1)
        model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=SHAPE["vocab"],
                         max_sequence_length=SHAPE["seq_len"], position_embedding_type="rope",
                         share_embeddings_and_output_weights=False)
        model = DistributedDataParallel(config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed), model)
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=distributed),
            [model], use_gloo_process_groups=False)
        for param in model.parameters():
            param.main_grad.fill_(1e-3)
        optimizer.step()
        inner = [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
        masters = [p for opt in inner for group in opt.param_groups for p in group["params"]]
        moments = [t for opt in inner for p in masters if p in opt.state for t in opt.state[p].values()
                   if torch.is_tensor(t) and t.numel() > 1]
        results.append({
            "params": sum(p.numel() * p.element_size() for p in model.parameters()),
            "grads": sum(buffer.grad_data.numel() * buffer.grad_data.element_size() for buffer in model.buffers),
            "optimizer": sum(t.numel() * t.element_size() for t in masters + moments),
        })
        destroy_model_parallel()
    return results


class _Saved:
    """What the pack hook returns: freed (and counted out) when autograd frees the graph that saved it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def pipeline_peak_bytes(rank, world_size, cases) -> list[int]:
    """For each case ``(pp, virtual_stages, micro_batches, first, last)`` (PP = the pool's world size; first / last:
    uneven stages' layers or None): the peak bytes of distinct
    storages saved for backward and not yet freed on this rank while megatron-core's pipeline schedule (1F1B, or
    interleaved with virtual stages) runs one iteration of a GPTModel (fp32, local spec, layers = SHAPE's x 2)."""
    import weakref

    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_usp.megatron import (
        cpu_standins, destroy_model_parallel, get_gpt_layer_local_spec, initialize_model_parallel,
    )

    cpu_standins.install(megatron_lm=False)
    shape = dict(SHAPE, num_layers=2 * SHAPE["num_layers"])
    peaks = []
    for pp, virtual_stages, micro_batches, first, last in cases:
        initialize_model_parallel(1, pp, virtual_pipeline_model_parallel_size=virtual_stages if virtual_stages > 1
                                  else None, create_gloo_process_groups=False)
        model_parallel_cuda_manual_seed(1234)
        config = _model_config(shape, 1, 1, False, {})
        config.pipeline_model_parallel_size = pp
        config.pipeline_dtype = torch.float32
        # uneven stages: read by megatron-core's get_num_layers_to_build and layer offsets
        config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage = first, last
        if virtual_stages > 1:
            config.virtual_pipeline_model_parallel_size = virtual_stages
            config.microbatch_group_size_per_vp_stage = pp
        chunks = []
        for vp_stage in range(virtual_stages):
            vp = vp_stage if virtual_stages > 1 else None
            torch.manual_seed(1)
            chunks.append(GPTModel(
                config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=shape["vocab"],
                max_sequence_length=shape["seq_len"], position_embedding_type="rope",
                share_embeddings_and_output_weights=False, vp_stage=vp,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)))
        params = {p.untyped_storage().data_ptr() for chunk in chunks for p in chunk.parameters()}
        live: dict[int, list[int]] = {}  # storage -> [references, bytes]
        state = {"now": 0, "peak": 0}

        def release(ptr):
            entry = live[ptr]
            entry[0] -= 1
            if entry[0] == 0:
                state["now"] -= entry[1]
                del live[ptr]

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if isinstance(t, torch.nn.Parameter) or ptr in params:
                return t
            if ptr in live:
                live[ptr][0] += 1
            else:
                live[ptr] = [1, t.untyped_storage().nbytes()]
                state["now"] += live[ptr][1]
                state["peak"] = max(state["peak"], state["now"])
            saved = _Saved(t)
            weakref.finalize(saved, release, ptr)
            return saved

        def unpack(saved):
            return saved.tensor if isinstance(saved, _Saved) else saved

        gen = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, shape["vocab"], (shape["micro_batch"], shape["seq_len"]), generator=gen)
        positions = torch.arange(shape["seq_len"]).expand(shape["micro_batch"], -1).contiguous()

        def forward_step(data_iterator, model):
            next(data_iterator)
            output = model(tokens, positions, None, labels=tokens)
            return output, lambda out: (out.float().mean(), {})

        iterators = [iter(range(micro_batches)) for _ in chunks]
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterators if virtual_stages > 1 else iterators[0],
                model=chunks if virtual_stages > 1 else chunks[0], num_microbatches=micro_batches,
                seq_length=shape["seq_len"], micro_batch_size=shape["micro_batch"], forward_only=False)
        assert state["now"] == 0, f"{state['now']} saved bytes outlive the iteration"
        peaks.append(state["peak"])
        destroy_model_parallel()
    return peaks
