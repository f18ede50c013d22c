"""Opt-in shim so a megatron-core GPTModel runs on CPU/gloo. Does nothing when CUDA is available.

megatron-core assumes CUDA in a few spots on the training path; each is handled here and nowhere else:

* RotaryEmbedding moves ``inv_freq`` to ``torch.cuda.current_device()`` on first use (in ``get_emb`` from 0.14,
  in ``forward`` before): during that call the current device reads as ``"cpu"``.
* ``get_pos_emb_on_this_cp_rank`` pins memory and calls ``.cuda()``: replaced by the USP RoPE hook
  (``rope.install_rope_hook``), which ``initialize_model_parallel`` installs on every device.
* Megatron's local ``DotProductAttention`` allocates CUDA buffers: USP specs replace it.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from ..patching import undo_all, wrap


@contextlib.contextmanager
def _current_cuda_device_is_cpu():
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = original


def _on_cpu(original):
    @functools.wraps(original)
    def on_cpu(self, *args, **kwargs):
        with _current_cuda_device_is_cpu():
            return original(self, *args, **kwargs)

    return on_cpu


def enable_cpu_mode() -> bool:
    """Apply the CPU patches (idempotent; :func:`disable_cpu_mode` undoes them). Returns True when they are active,
    False on a CUDA machine."""
    if torch.cuda.is_available():
        return False
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    method = "get_emb" if hasattr(RotaryEmbedding, "get_emb") else "forward"  # feature, not version
    wrap(RotaryEmbedding, method, _on_cpu, owner=__name__)
    return True


def disable_cpu_mode() -> None:
    """Undo :func:`enable_cpu_mode`."""
    undo_all(owner=__name__)
