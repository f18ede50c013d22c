"""Opt-in shim so a megatron-core GPTModel runs on CPU/gloo. Does nothing when CUDA is available.

megatron-core assumes CUDA in a few spots on the training path; each is patched here and nowhere else:
``RotaryEmbedding.get_emb`` moves ``inv_freq`` to ``torch.cuda.current_device()``; the CUDA RNG tracker's
``fork()`` raises when no CUDA state was added (we add a CPU-backed state).
"""
from __future__ import annotations

import torch

_enabled = False


def enable_cpu_mode() -> bool:
    """Apply the CPU patches (idempotent). Returns True if patches are active."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    original_get_emb = RotaryEmbedding.get_emb

    def get_emb_on_cpu(self, max_seq_len, offset=0):
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]

    get_emb_on_cpu.__wrapped__ = original_get_emb
    RotaryEmbedding.get_emb = get_emb_on_cpu
    _enabled = True
    return True
