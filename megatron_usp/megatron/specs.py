"""Megatron layer specs with ``core_attention`` replaced by :class:`USPAttention` (same signatures)."""
from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from .attention import USPAttention
from .norms import SequenceParallelTorchNorm


def use_usp_core_attention(spec: ModuleSpec) -> ModuleSpec:
    """Put USPAttention into a transformer-layer spec's self-attention (in place; returns the spec)."""
    try:
        attention = spec.submodules.self_attention.submodules
    except AttributeError as error:
        raise ValueError(f"spec has no self_attention.submodules.core_attention to replace: {error}") from None
    attention.core_attention = USPAttention
    return spec


def get_gpt_layer_local_spec(*args, **kwargs) -> ModuleSpec:
    """megatron-core's ``get_gpt_layer_local_spec`` (same arguments) with USP core attention, and its layer norms
    (``input_layernorm``, ``pre_mlp_layernorm``) replaced by :class:`SequenceParallelTorchNorm`: the same torch
    LayerNorm / RMSNorm, which also runs with ``config.sequence_parallel`` (Q/K norms are left as they are)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec as megatron_spec

    spec = use_usp_core_attention(megatron_spec(*args, **kwargs))
    spec.submodules.input_layernorm = SequenceParallelTorchNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return spec


def get_gpt_decoder_block_local_spec(config, vp_stage=None, pp_rank=None, **kwargs):
    """The whole decoder block for ``GPTModel(transformer_layer_spec=...)``: this pipeline stage's (``pp_rank``,
    default: this rank's) and virtual stage's layers from :func:`get_gpt_layer_local_spec` (``kwargs``) and a
    :class:`SequenceParallelTorchNorm` final norm. A layer spec alone would give ``TransformerBlock``
    megatron-core's default final norm (``WrappedTorchNorm`` without apex / TE), which refuses
    ``sequence_parallel``."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(**kwargs)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SequenceParallelTorchNorm)


def get_gpt_layer_with_transformer_engine_spec(*args, **kwargs) -> ModuleSpec:
    """megatron-core's Transformer Engine spec (same arguments) with USP core attention; TE imported lazily."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec as megatron_spec

    return use_usp_core_attention(megatron_spec(*args, **kwargs))
