"""Megatron layer specs with ``core_attention`` replaced by :class:`USPAttention` (same signatures)."""
from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from .attention import USPAttention


def use_usp_core_attention(spec: ModuleSpec) -> ModuleSpec:
    """Put USPAttention into a transformer-layer spec's self-attention (in place; returns the spec)."""
    try:
        attention = spec.submodules.self_attention.submodules
    except AttributeError as error:
        raise ValueError(f"spec has no self_attention.submodules.core_attention to replace: {error}") from None
    attention.core_attention = USPAttention
    return spec


def get_gpt_layer_local_spec(*args, **kwargs) -> ModuleSpec:
    """megatron-core's ``get_gpt_layer_local_spec`` (same arguments) with USP core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec as megatron_spec

    return use_usp_core_attention(megatron_spec(*args, **kwargs))


def get_gpt_layer_with_transformer_engine_spec(*args, **kwargs) -> ModuleSpec:
    """megatron-core's Transformer Engine spec (same arguments) with USP core attention; TE imported lazily."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec as megatron_spec

    return use_usp_core_attention(megatron_spec(*args, **kwargs))
