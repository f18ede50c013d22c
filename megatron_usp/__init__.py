"""megatron-usp: Unified Sequence Parallelism (Ulysses x Ring attention) for Megatron-core."""
from .groups import USPGroups, init_groups
from .layout import RING_IMPLS
from .sharding import positions, shard, unshard
from .usp import usp_attn

__version__ = "0.1.0"

__all__ = ["USPGroups", "init_groups", "usp_attn", "shard", "unshard", "positions", "RING_IMPLS"]
