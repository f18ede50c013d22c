"""Rank-pool cases of test_megatron_adapter.py: USPAttention and the process groups megatron-core hands it."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _config():
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, attention_dropout=0.0,
                             use_cpu_initialization=True)


def _refusal(make) -> str:
    try:
        make()
    except ValueError as error:
        return str(error)
    return ""


def pg_collection_cases(rank, world_size) -> dict:
    """On 4 ranks: u1 x r2 (DP 2: CP groups [0, 1], [2, 3]), then u2 x r2 (ulysses inner, megatron-core's whole
    collection). USPAttention built with a pg_collection whose cp group is the grid's (megatron-core's own, or
    another group of the same ranks) uses the grid's groups and computes what the layer without one does; a cp group
    of other ranks or another size raises ValueError at construction, before any collective."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_usp.megatron import USPAttention, destroy_model_parallel, get_usp_groups, initialize_model_parallel

    result = {}
    config = _config()
    initialize_model_parallel(1, 1, ulysses_degree=1, ring_degree=2, ring_impl="zigzag",
                              create_gloo_process_groups=False)
    try:
        same_ranks = None
        for ranks in ([0, 1], [2, 3]):  # every rank creates every group, in the same order
            group = dist.new_group(ranks)
            same_ranks = group if rank in ranks else same_ranks
        plain = USPAttention(config, 1, AttnMaskType.causal)
        mpu = USPAttention(config, 1, AttnMaskType.causal,
                           pg_collection=ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"]))
        fresh = USPAttention(config, 1, AttnMaskType.causal,
                             pg_collection=ProcessGroupCollection(tp=parallel_state.get_tensor_model_parallel_group(),
                                                                  cp=same_ranks))
        result["same_groups"] = plain.groups is get_usp_groups() and mpu.groups is plain.groups and fresh.groups is plain.groups
        generator = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(8, 2, 4, 8, generator=generator) for _ in range(3))
        outs = [module(q, k, v, None) for module in (plain, mpu, fresh)]
        result["same_outputs"] = all(torch.equal(outs[0], out) for out in outs[1:])
        dp_group = parallel_state.get_data_parallel_group()  # ranks [0, 2] / [1, 3]: size 2, other members
        result["other_members"] = _refusal(lambda: USPAttention(
            config, 1, AttnMaskType.causal, pg_collection=ProcessGroupCollection(cp=dp_group)))
        result["other_size"] = _refusal(lambda: USPAttention(
            config, 1, AttnMaskType.causal, model_comm_pgs=ProcessGroupCollection(cp=dist.group.WORLD)))
    finally:
        destroy_model_parallel()
    initialize_model_parallel(1, 1, ulysses_degree=2, ring_degree=2, ring_impl="zigzag",
                              create_gloo_process_groups=False)
    try:
        everything = ProcessGroupCollection.use_mpu_process_groups()  # cp and hcp = [ulysses, ring]
        module = USPAttention(config, 1, AttnMaskType.causal, pg_collection=everything)
        groups = get_usp_groups()
        result["whole_collection"] = module.groups is groups
    finally:
        destroy_model_parallel()
    return result
