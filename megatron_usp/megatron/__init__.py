"""megatron-core integration: grid, USP core attention, layer specs, batch hook, documents, RoPE hooks, flags."""
from .args import add_usp_args, validate_usp_args
from .attention import USPAttention, packed_document_ids
from .batch import get_batch_on_this_usp_rank
from .cpu_standins import enable_cpu_mode
from .documents import document_ids_from_cu_seqlens
from .grid import (
    destroy_model_parallel,
    get_usp_attn_backend,
    get_usp_groups,
    get_usp_micro_q,
    get_usp_ring_impl,
    initialize_model_parallel,
    usp_is_initialized,
)
from . import megatron_lm  # glue for patched Megatron-LM checkouts (patches/)
from .rope import install_rope_hook
from .specs import get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec, use_usp_core_attention

__all__ = [
    "USPAttention",
    "add_usp_args",
    "destroy_model_parallel",
    "document_ids_from_cu_seqlens",
    "enable_cpu_mode",
    "get_batch_on_this_usp_rank",
    "get_gpt_layer_local_spec",
    "get_gpt_layer_with_transformer_engine_spec",
    "get_usp_attn_backend",
    "get_usp_groups",
    "get_usp_micro_q",
    "get_usp_ring_impl",
    "initialize_model_parallel",
    "install_rope_hook",
    "megatron_lm",
    "packed_document_ids",
    "use_usp_core_attention",
    "usp_is_initialized",
]
