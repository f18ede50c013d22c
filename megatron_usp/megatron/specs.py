"""Megatron layer specs with ``core_attention`` replaced by :class:`USPAttention` (same signatures), and the one
substituter every path uses (megatron-core specs here, Megatron-LM's built specs through :mod:`.megatron_lm`)."""
from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec

from .attention import USPAttention
from .norms import SequenceParallelTorchNorm


def _substitute(node: Any, field_name: str, seen: set) -> int:
    if id(node) in seen:
        return 0
    seen.add(id(node))
    if isinstance(node, ModuleSpec):
        submodules = node.submodules
        if field_name == "self_attention":
            if submodules is None or not hasattr(submodules, "core_attention"):
                raise ValueError(
                    f"self-attention {node.module} has no core_attention that USP could replace: use an attention with "
                    "core_attention (the default GPT specs) or set --ulysses-degree 1 --ring-degree 1"
                )
            submodules.core_attention = USPAttention
            return 1
        return _substitute(submodules, "", seen) if submodules is not None else 0
    if isinstance(node, (list, tuple)):
        return sum(_substitute(item, field_name, seen) for item in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return sum(_substitute(getattr(node, f.name), f.name, seen) for f in dataclasses.fields(node))
    return 0


def substitute_core_attention(spec: Any) -> int:
    """Put :class:`USPAttention` into every ``self_attention`` of ``spec`` (a layer spec, a block spec with
    ``layer_specs``, an MTP block spec), in place. Returns how many self-attentions it replaced."""
    return _substitute(spec, "", set())


def use_usp_core_attention(spec: ModuleSpec) -> ModuleSpec:
    """Put USPAttention into a transformer-layer spec's self-attention (in place; returns the spec)."""
    if substitute_core_attention(spec) == 0:
        raise ValueError("spec has no self_attention.submodules.core_attention to replace")
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
