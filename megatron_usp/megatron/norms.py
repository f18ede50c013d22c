"""Torch LayerNorm / RMSNorm for megatron-core's local spec that also work with Megatron's sequence parallelism.

megatron-core 0.16's ``WrappedTorchNorm`` refuses ``config.sequence_parallel`` ("sequence parallel not supported
by torch LayerNorm"). With sequence parallelism each TP rank normalises a different slice of the tokens, so the
norm's weight (and bias) gradients are partial sums: apex's ``FusedLayerNorm`` and Transformer Engine's norms mark
their parameters ``sequence_parallel = True`` and megatron-core's ``finalize_model_grads`` then all-reduces those
gradients over TP. :class:`SequenceParallelTorchNorm` is ``WrappedTorchNorm`` (same signature, same
``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` module, same state-dict keys) plus that marking.
"""
from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    """``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` (``config.normalization``) whose parameters carry
    ``sequence_parallel = config.sequence_parallel``, as Megatron's apex / TE norms do."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("zero_centered_gamma is not supported by the torch norms")
        if config.memory_efficient_layer_norm:
            raise ValueError("memory_efficient_layer_norm is not supported by the torch norms")
        if config.persist_layer_norm:
            raise ValueError("persist_layer_norm (an apex kernel) is not supported by the torch norms")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r}: only LayerNorm and RMSNorm")
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm
