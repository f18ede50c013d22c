"""Published shapes of well-known open models (``--model NAME``), and the named assumptions the whole-job planner
makes for model flags left out (printed with the plan).

Shapes from each model's released configuration (config.json): layers, hidden size, attention and K/V heads, head
dimension, MLP width (for MoE models: each expert's, the routed experts and top-k, the shared experts' width and the
first dense layers), vocabulary; for multi-latent attention (DeepSeek) its ranks and head dims.
"""
from __future__ import annotations

import math

# flag name (the planner's argparse dest) -> value
MODELS: dict[str, dict[str, int]] = {
    "llama3-8b": dict(num_layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn_hidden=14336, vocab=128256),
    "llama3-70b": dict(num_layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn_hidden=28672,
                       vocab=128256),
    "llama3-405b": dict(num_layers=126, hidden=16384, heads=128, kv_heads=8, head_dim=128, ffn_hidden=53248,
                        vocab=128256),
    "qwen2.5-7b": dict(num_layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, ffn_hidden=18944,
                       vocab=152064),
    "qwen2.5-72b": dict(num_layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn_hidden=29568,
                        vocab=152064),
    "mixtral-8x7b": dict(num_layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn_hidden=14336,
                         vocab=32000, num_experts=8, moe_topk=2, moe_ffn_hidden=14336),
    "mixtral-8x22b": dict(num_layers=56, hidden=6144, heads=48, kv_heads=8, head_dim=128, ffn_hidden=16384,
                          vocab=32768, num_experts=8, moe_topk=2, moe_ffn_hidden=16384),
    "qwen3-30b-a3b": dict(num_layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, ffn_hidden=6144,
                          vocab=151936, num_experts=128, moe_topk=8, moe_ffn_hidden=768),
    "qwen3-235b-a22b": dict(num_layers=94, hidden=4096, heads=64, kv_heads=4, head_dim=128, ffn_hidden=12288,
                            vocab=151936, num_experts=128, moe_topk=8, moe_ffn_hidden=1536),
    # multi-latent attention; the first layers dense, one (V3) or two (V2-Lite) shared experts; V3's multi-token
    # prediction module is not planned
    "deepseek-v2-lite": dict(num_layers=27, hidden=2048, heads=16, kv_heads=16, head_dim=128, kv_lora_rank=512,
                             qk_rope_head_dim=64, v_head_dim=128, ffn_hidden=10944, vocab=102400, num_experts=64,
                             moe_topk=6, moe_ffn_hidden=1408, moe_shared_ffn_hidden=2816, moe_dense_layers=1),
    "deepseek-v3": dict(num_layers=61, hidden=7168, heads=128, kv_heads=128, head_dim=128, q_lora_rank=1536,
                        kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128, ffn_hidden=18432, vocab=129280,
                        num_experts=256, moe_topk=8, moe_ffn_hidden=2048, moe_shared_ffn_hidden=2048,
                        moe_dense_layers=3),
}

DEFAULT_VOCAB = 128256  # Llama 3's
FFN_RATIO = 3.5  # ffn hidden / hidden of Llama 3 8B and 70B (SwiGLU)
DEFAULT_MOE_TOPK = 2
DEFAULT_QK_ROPE_HEAD_DIM = 64  # DeepSeek-V2 / V3's


def default_ffn_hidden(hidden: int) -> int:
    """``FFN_RATIO`` x hidden, rounded up to a multiple of 256 (as Llama's sizes are)."""
    return 256 * math.ceil(FFN_RATIO * hidden / 256)


def fill_model_flags(args) -> list[str]:
    """Apply ``--model`` (flags given on the command line win) and the defaults of a whole-job plan; returns the
    assumptions made, one line each, for the report."""
    notes: list[str] = []
    if args.model is not None:
        preset = MODELS[args.model]
        for name, value in preset.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        notes.append(f"--model {args.model}: " + " ".join(
            f"--{name.replace('_', '-')} {value}" for name, value in preset.items()))
    if args.num_layers is None or args.attention_only:
        return notes
    hidden = args.hidden or (args.heads or 0) * (args.head_dim or 128)
    if args.ffn_hidden is None:
        args.ffn_hidden = default_ffn_hidden(hidden)
        notes.append(f"assumed --ffn-hidden {args.ffn_hidden} ({FFN_RATIO} x hidden {hidden}, Llama 3's ratio, rounded "
                     "to 256; pass --ffn-hidden)")
    if args.vocab is None:
        args.vocab = DEFAULT_VOCAB
        notes.append(f"assumed --vocab {DEFAULT_VOCAB} (Llama 3's; pass --vocab)")
    if args.num_experts is not None:
        if args.moe_topk is None:
            args.moe_topk = DEFAULT_MOE_TOPK
            notes.append(f"assumed --moe-topk {DEFAULT_MOE_TOPK} (pass --moe-topk)")
        if args.moe_ffn_hidden is None:
            args.moe_ffn_hidden = args.ffn_hidden
            notes.append(f"assumed --moe-ffn-hidden {args.ffn_hidden} (= --ffn-hidden; pass --moe-ffn-hidden)")
    return notes


def check_mla_flags(args, parser) -> None:
    """Refuse MLA flags without --kv-lora-rank (they would be ignored) and query groups with MLA (it has none);
    default its RoPE dims (64, DeepSeek's) and value head dim (--head-dim)."""
    if args.kv_lora_rank is None:
        given = [flag for flag, value in (("--q-lora-rank", args.q_lora_rank), ("--qk-rope-head-dim",
                                                                                args.qk_rope_head_dim),
                                          ("--v-head-dim", args.v_head_dim)) if value is not None]
        if given:
            parser.error(f"{' and '.join(given)} given without --kv-lora-rank: pass --kv-lora-rank N for "
                         "multi-latent attention")
        return
    if args.kv_heads is not None and args.kv_heads != args.heads:
        parser.error(f"multi-latent attention has no query groups: --kv-heads {args.kv_heads} must equal --heads "
                     f"{args.heads} (or be left out)")
    if args.qk_rope_head_dim is None:
        args.qk_rope_head_dim = DEFAULT_QK_ROPE_HEAD_DIM
    if args.v_head_dim is None:
        args.v_head_dim = args.head_dim


def check_moe_flags(args, parser) -> None:
    """Refuse MoE flags without --num-experts (they would be ignored), a top-k above the experts, more dense
    layers than layers."""
    if args.num_experts is None:
        given = [flag for flag, value in (("--moe-topk", args.moe_topk), ("--moe-ffn-hidden", args.moe_ffn_hidden),
                                          ("--moe-shared-ffn-hidden", args.moe_shared_ffn_hidden),
                                          ("--moe-dense-layers", args.moe_dense_layers))
                 if value is not None]
        if args.ep != "auto":
            given.append("--ep")
        if given:
            parser.error(f"{' and '.join(given)} given without --num-experts: pass --num-experts N for a MoE model")
    elif args.moe_topk is not None and args.moe_topk > args.num_experts:
        parser.error(f"--moe-topk {args.moe_topk} exceeds --num-experts {args.num_experts}")
    elif args.moe_dense_layers and args.num_layers is not None and args.moe_dense_layers >= args.num_layers:
        parser.error(f"--moe-dense-layers {args.moe_dense_layers} leaves no MoE layer of --num-layers "
                     f"{args.num_layers}: drop --num-experts for a dense model")
    return None
