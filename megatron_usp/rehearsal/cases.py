"""The rehearsal's cases (``tools/check_megatron_patch.py --train``): for every case a run without SP (the baseline)
and a USP run with the same Megatron flags, mock data, fp32, dropout 0, on Megatron-LM's own ``pretrain_gpt.py``
through the launcher (:mod:`megatron_usp.rehearsal.launcher`).

:func:`train_cases` is the table; :func:`train_model_args` the flags every run shares; :class:`TrainRun` one torchrun
of the launcher, :class:`TrainCase` a comparison, :class:`CaseResult` its verdict (the harness judges it). The resume
cases save half-way at u=2 r=2 and load on another grid and without SP; TP=2 cases run USP beside tensor
parallelism; MTP cases run multi-token prediction; a *refused* case runs only the USP run, which must stop before
training with the given message; the packed THD (``--sft``) cases read the fixture :mod:`.sft_fixture` makes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .sft_fixture import LEGACY_MARK

MOCK_DATA = ("--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128")


def train_model_args(train_iters: int = 6, seq_length: int = 64) -> List[str]:
    """Megatron flags of every --train run: a tiny GPT (2 layers, hidden 64, 4 heads in 2 query groups, RoPE),
    fp32, dropout 0, 2 micro-batches of 2 per iteration, no evaluation, on gloo. The data flags come from the run
    (:data:`MOCK_DATA` unless a case says otherwise); a flag given again later wins (argparse)."""
    return [
        "--distributed-backend", "gloo", "--transformer-impl", "local",
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2",
        "--seq-length", str(seq_length), "--max-position-embeddings", str(seq_length),
        "--position-embedding-type", "rope", "--no-rope-fusion",
        "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", str(train_iters), "--lr", "1e-3", "--lr-warmup-iters", "1", "--seed", "1234",
        "--log-interval", "1", "--eval-iters", "0", "--eval-interval", str(train_iters + 1),
        "--num-workers", "0",
        "--attention-dropout", "0", "--hidden-dropout", "0",
        "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
        "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
    ]


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """One torchrun of the launcher: ``nproc`` ranks; ``data`` then ``args`` after :func:`train_model_args`;
    ``launcher``: options of the launcher itself (before the script path); ``without``: valueless flags of
    :func:`train_model_args` this run leaves out (a store_true flag cannot be unset later)."""

    nproc: int
    args: Tuple[str, ...] = ()
    data: Tuple[str, ...] = MOCK_DATA
    launcher: Tuple[str, ...] = ()
    without: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainCase:
    name: str
    baseline: Optional[TrainRun]  # None for a refused case
    usp: TrainRun
    grid: str  # what the USP run's probe line must report, e.g. "u=2 r=2 ring_impl=zigzag"; "none": no USP
    skip: Optional[str] = None  # a reason not to run it
    pre: Optional[TrainRun] = None  # runs before ``usp`` (e.g. saves the checkpoint it loads); compared too
    first_iteration: int = 1  # the first iteration ``usp`` logs (after --load: the one after the checkpoint)
    rtol: Optional[float] = None  # this case's tolerance instead of --rtol (bf16)
    refused: Optional[str] = None  # the USP run must stop before training with this in its output; no baseline
    expect: Optional[str] = None  # a regex the USP run's output must match once per compared iteration at least


@dataclasses.dataclass
class CaseResult:
    """A case's verdict and both runs' losses by iteration (the harness fills it in)."""

    name: str
    status: str  # "ok", "MISMATCH", "FAILED" or "SKIP"
    baseline: Dict[int, float] = dataclasses.field(default_factory=dict)
    usp: Dict[int, float] = dataclasses.field(default_factory=dict)
    max_rel: Optional[float] = None
    worst_iteration: Optional[int] = None
    note: str = ""


def usp_flags(ulysses: int, ring: int, ring_impl: str = "zigzag") -> Tuple[str, ...]:
    return ("--ulysses-degree", str(ulysses), "--ring-degree", str(ring), "--usp-ring-impl", ring_impl)


def sft_data_args(fixture: Path) -> Tuple[str, ...]:
    """Megatron-LM's packed THD path: --sft on the fixture's jsonl and tokenizer (see :mod:`.sft_fixture`), rows of
    128 tokens, one row per micro-batch (Megatron packs only with micro-batch 1); SFTTokenizer is a legacy tokenizer
    where the fixture found it there (Megatron-LM <= 0.18)."""
    legacy = ("--legacy-tokenizer",) if (fixture / LEGACY_MARK).exists() else ()
    return ("--sft", *legacy, "--tokenizer-type", "SFTTokenizer", "--tokenizer-model", str(fixture / "tokenizer"),
            "--data-path", str(fixture / "sft.jsonl"), "--split", "100,0,0", "--seq-length", "128",
            "--max-position-embeddings", "128", "--micro-batch-size", "1", "--no-create-attention-mask-in-dataloader")


MTP_LOCAL_NORMALIZATION_RTOL = 1e-5
"""The MTP case's tolerance where Megatron-LM weighs each CP rank's MTP tokens by its own ``original / rolled``
token count (0.19's ``process_mtp_loss`` under --calculate-per-token-loss): the rank holding the sequence's end
lost one token to the roll, so its tokens weigh ``T_local / (T_local - 1)`` where one rank weighs all
``T / (T - 1)``; stock CP differs from 1 rank the same way (measured under USP: 3.3e-6 by iteration 6; 2e-7 on
0.16.1, which normalizes globally)."""


def train_cases(sft_fixture: Optional[Path] = None, sft_skip: str = "no SFT fixture",
                checkpoint: Path = Path("checkpoint"), train_iters: int = 6,
                mtp_rtol: Optional[float] = None, hybrid_refused: Optional[str] = None) -> List[TrainCase]:
    """Baseline (no SP) vs USP with the same Megatron flags; every USP run uses 4 ranks. The packed THD (--sft) cases
    need ``sft_fixture`` (made by :mod:`.sft_fixture`), else they are skipped with ``sft_skip``. The resume
    cases save to ``checkpoint`` at u=2 r=2 after half the iterations and load it on another grid and without SP:
    every later iteration must equal the uninterrupted 1-rank run."""
    recompute_full = ("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1")
    cases = [
        TrainCase("u2 r2 zigzag", TrainRun(1), TrainRun(4, usp_flags(2, 2)), "u=2 r=2 ring_impl=zigzag"),
        TrainCase("u1 r4 stripe", TrainRun(1), TrainRun(4, usp_flags(1, 4, "stripe")), "u=1 r=4 ring_impl=stripe"),
    ]
    for name, flags in (
        ("distributed optimizer u2 r2", ("--use-distributed-optimizer",)),
        ("recompute full u2 r2", recompute_full),
        ("recompute selective u2 r2", ("--recompute-granularity", "selective")),
        ("cpu initialization u2 r2", ("--use-cpu-initialization",)),  # weights from the CPU generator
    ):
        cases.append(TrainCase(name, TrainRun(1, flags), TrainRun(4, flags + usp_flags(2, 2)),
                               "u=2 r=2 ring_impl=zigzag"))
    pp2 = ("--pipeline-model-parallel-size", "2")
    cases.append(TrainCase("PP=2 u2", TrainRun(2, pp2), TrainRun(4, pp2 + usp_flags(2, 1)), "u=2 r=1 ring_impl=zigzag"))
    # interleaved 1F1B: 4 layers, 2 virtual stages of 1 layer per pipeline rank (2 micro-batches, a multiple of PP)
    vpp = pp2 + ("--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1")
    cases.append(TrainCase("PP=2 x2 virtual stages u2", TrainRun(2, vpp), TrainRun(4, vpp + usp_flags(2, 1)),
                           "u=2 r=1 ring_impl=zigzag"))
    # Documents: the mock tokens cycle through 1..V and NullTokenizer's EOD is V, so --vocab-size 20 puts an EOD
    # every 21 tokens (3 documents per 64-token row); the baseline takes the dense per-document mask Megatron builds.
    reset = ("--reset-attention-mask", "--reset-position-ids")
    data = MOCK_DATA[:-1] + ("20",)
    grids = (("u2 r2 zigzag", (2, 2, "zigzag")), ("u1 r4 stripe", (1, 4, "stripe")))
    for grid, (u, r, impl) in grids:
        cases.append(TrainCase(f"reset-attention-mask {grid}", TrainRun(1, reset, data),
                               TrainRun(4, reset + usp_flags(u, r, impl), data), f"u={u} r={r} ring_impl={impl}"))
    # Packed THD rows (--sft): the baseline's local attention gets the per-document mask from the launcher's
    # --thd-reference-attention (Megatron's THD attention needs Transformer Engine).
    # SFT masks prompts and padding, so CP ranks hold different numbers of loss tokens: without
    # --calculate-per-token-loss Megatron weights each rank's tokens by 1 / its own count (stock CP as well), and the
    # gradients differ from the 1-rank run's from the second step on (measured: 4.1e-3 by iteration 5).
    sft = sft_data_args(sft_fixture) if sft_fixture is not None else ()
    per_token = ("--calculate-per-token-loss",)
    for grid, (u, r, impl) in grids:
        cases.append(TrainCase(f"THD --sft {grid}", TrainRun(1, per_token, sft, ("--thd-reference-attention",)),
                               TrainRun(4, per_token + usp_flags(u, r, impl), sft), f"u={u} r={r} ring_impl={impl}",
                               skip=None if sft_fixture is not None else sft_skip))
    # Megatron's hybrid (dynamic) CP on 4 ranks = CP 2 x DP 2: each packed row's conversations (40-56 tokens) are
    # rerouted over DP x CP and run on CP groups of 2 or 4 (--max-seqlen-per-dp-cp-rank 32), USP on each group's
    # sub-grid; the baseline runs the same rows on 1 rank
    # (Megatron-LM 0.16's hybrid data iterator is not a RerunDataIterator: its rerun machine must be off)
    hybrid = per_token + ("--hybrid-context-parallel", "--max-seqlen-per-dp-cp-rank", "32", "--dataloader-type",
                          "single", "--rerun-mode", "disabled")
    for grid, (u, r, impl) in (("u2 zigzag", (2, 1, "zigzag")), ("r2 stripe", (1, 2, "stripe"))):
        if hybrid_refused:  # a checkout whose hybrid CP shards by get_batch_on_this_cp_rank(is_hybrid_cp=...)
            cases.append(TrainCase(f"THD --sft hybrid CP {grid} x DP 2 refused", None,
                                   TrainRun(4, hybrid + usp_flags(u, r, impl), sft), "none", refused=hybrid_refused,
                                   skip=None if sft_fixture is not None else sft_skip))
            continue
        cases.append(TrainCase(f"THD --sft hybrid CP {grid} x DP 2",
                               TrainRun(1, per_token, sft, ("--thd-reference-attention",)),
                               TrainRun(4, hybrid + usp_flags(u, r, impl), sft), f"u={u} r={r} ring_impl={impl}",
                               skip=None if sft_fixture is not None else sft_skip))
    # bf16: measured 1.3e-5 relative (u2 r2 vs 1 rank, 6 iterations); layout bugs show 1e-3 and more
    cases.append(TrainCase("bf16 u2 r2", TrainRun(1, ("--bf16",)), TrainRun(4, ("--bf16",) + usp_flags(2, 2)),
                           "u=2 r=2 ring_impl=zigzag", rtol=1e-4))
    half = train_iters // 2
    save = TrainRun(4, usp_flags(2, 2) + ("--save", str(checkpoint), "--save-interval", str(half),
                                          "--exit-interval", str(half)))
    load = ("--load", str(checkpoint))
    cases.append(TrainCase("save u2 r2 -> load u1 r4 stripe", TrainRun(1), TrainRun(4, load + usp_flags(1, 4, "stripe")),
                           "u=1 r=4 ring_impl=stripe", pre=save, first_iteration=half + 1))
    cases.append(TrainCase("save u2 r2 -> load without SP", TrainRun(1), TrainRun(1, load), "none", pre=save,
                           first_iteration=half + 1))
    cases += distributed_optimizer_resume_cases(distributed_optimizer_checkpoint(checkpoint), train_iters)
    cases += tensor_parallel_cases() + mtp_cases(mtp_rtol) + attention_feature_cases()
    return cases


def distributed_optimizer_checkpoint(checkpoint: Path) -> Path:
    """Where the distributed-optimizer resume cases save (beside the plain resume cases' ``checkpoint``)."""
    return checkpoint.with_name(checkpoint.name + "-distributed-optimizer")


def distributed_optimizer_resume_cases(checkpoint: Path, train_iters: int = 6) -> List[TrainCase]:
    """The resume cases with megatron-core's distributed optimizer: saved at u=2 r=2 (its state sharded over the 4
    ranks of DP x CP) in Megatron-LM's default format (``--ckpt-format torch_dist``, ``dp_reshardable``), loaded at
    u=1 r=4 (sharded over 4 again, another CP layout) and on 1 rank (not sharded). Needs megatron_usp's
    ``fix_distributed_optimizer_load`` (the launcher applies it): megatron-core 0.16 cannot load its distributed
    optimizer over torch's Adam (no TE / apex here) otherwise."""
    half = train_iters // 2
    distopt = ("--use-distributed-optimizer",)
    save = TrainRun(4, usp_flags(2, 2) + distopt + ("--save", str(checkpoint), "--save-interval", str(half),
                                                    "--exit-interval", str(half)))
    load = ("--load", str(checkpoint)) + distopt
    return [
        TrainCase("distributed optimizer save u2 r2 -> load u1 r4 stripe", TrainRun(1, distopt),
                  TrainRun(4, load + usp_flags(1, 4, "stripe")), "u=1 r=4 ring_impl=stripe", pre=save,
                  first_iteration=half + 1),
        TrainCase("distributed optimizer save u2 r2 -> load without SP", TrainRun(1, distopt), TrainRun(1, load),
                  "none", pre=save, first_iteration=half + 1),
    ]


CPU_INIT = ("--use-cpu-initialization",)


def tensor_parallel_cases() -> List[TrainCase]:
    """USP beside Megatron's tensor parallelism (4 heads in 2 query groups: 2 heads and 1 kv head per TP rank, which
    u=2 replicates), on 4 ranks (TP=2 x u=2).

    * Against TP=2 without SP on 2 ranks, with Megatron's default (GPU-style) initialisation: TP=2 draws each
      partition from its TP rank's model-parallel RNG (seed + 2718 + TP rank), so TP=2 and TP=1 start from different
      weights (stock Megatron: ~3e-2 apart within 6 iterations). Megatron's --sequence-parallel cannot run here: the
      local spec's torch LayerNorm refuses it ("sequence parallel not supported by torch LayerNorm"; TE or apex).
    * Against 1 rank with --use-cpu-initialization: every rank draws each full weight from the CPU generator and
      keeps its TP partition (``_initialize_affine_weight_cpu``), so the weights do not depend on TP; the row-parallel
      sums over 2 partitions happen to round alike here (measured 0.0 over 6 iterations)."""
    tp2 = ("--tensor-model-parallel-size", "2")
    return [
        TrainCase("TP=2 u2", TrainRun(2, tp2), TrainRun(4, tp2 + usp_flags(2, 1)), "u=2 r=1 ring_impl=zigzag"),
        # Megatron-LM 0.16's CPU initialization gives TP=2 the 1-rank weights, 0.19's does not (TP=2 without USP
        # differs from 1 rank there too): the baseline is TP=2 without USP
        TrainCase("TP=2 u2 cpu initialization", TrainRun(2, tp2 + CPU_INIT),
                  TrainRun(4, tp2 + CPU_INIT + usp_flags(2, 1)), "u=2 r=1 ring_impl=zigzag"),
    ]


MTP = ("--mtp-num-layers", "1", "--calculate-per-token-loss")


def mtp_cases(rtol: Optional[float] = None) -> List[TrainCase]:
    """Multi-token prediction (one MTP layer): megatron-core's ``roll_tensor`` shifts labels and tokens across CP
    ranks assuming Megatron's zigzag layout. u=2 r=2 zigzag has it and must match the 1-rank run; stripe and basic do
    not, and validate_usp_args refuses them before training (measured before the refusal: stripe differed by 1.4e-4,
    basic by 4.0e-6). The rolled loss mask drops the row's last token on one rank, and without
    --calculate-per-token-loss every rank divides its MTP loss by its own token count (stock CP alike): 2.2e-6 by
    iteration 6, so validate_usp_args asks for per-token loss with MTP (then 2.0e-7). Megatron's logged "mtp_1 loss"
    is a mean of per-rank means either way (2e-5 from 1 rank at iteration 1): logging only, not compared."""
    refusal = "--mtp-num-layers with --usp-ring-impl {}"
    without_per_token = MTP[:2] + usp_flags(2, 2)
    return [
        TrainCase("MTP u2 r2 zigzag", TrainRun(1, MTP), TrainRun(4, MTP + usp_flags(2, 2)), "u=2 r=2 ring_impl=zigzag",
                  rtol=rtol),
        TrainCase("MTP u2 r2 stripe refused", None, TrainRun(4, MTP + usp_flags(2, 2, "stripe")), "none",
                  refused=refusal.format("stripe")),
        TrainCase("MTP u2 r2 basic refused", None, TrainRun(4, MTP + usp_flags(2, 2, "basic")), "none",
                  refused=refusal.format("basic")),
        TrainCase("MTP u2 r2 zigzag without per-token loss refused", None, TrainRun(4, without_per_token), "none",
                  refused="--mtp-num-layers without --calculate-per-token-loss"),
    ]


# Multi-latent attention, small: q/k heads of 16 (no RoPE) + 8 (RoPE) dims, v heads of 16 (!= 24: MLA's own v dim),
# both low-rank paths (the q one is optional in Megatron). MLA excludes --group-query-attention (Megatron asserts).
MLA = ("--multi-latent-attention", "--no-rope-fusion", "--q-lora-rank", "32", "--kv-lora-rank", "16",
       "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16")
# the line the launcher prints after every step (probes.MAX_LOGIT_PREFIX)
MAX_LOGIT_LINE = r"megatron_lm_cpu: max attention logit: (?P<value>[-+0-9.eE]+)"


def attention_feature_cases() -> List[TrainCase]:
    """Issue 13: attention features USPAttention computes itself, turned on by Megatron-LM's own flags.

    * Attention sinks (``--softmax-type off-by-one|learnable``): the baseline's local DotProductAttention adds
      ``softmax_offset`` in its torch softmax (``SoftmaxOne``); USPAttention owns the same parameter.
    * Multi-latent attention (``--multi-latent-attention``, YaRN RoPE unfused): megatron-core's MLASelfAttention
      with USPAttention as core attention (v head dim 16, q/k head dim 24). The baseline's local DotProductAttention
      takes neither of the head-dim keywords MLA builds it with (TE's): the launcher's --mla-reference-attention
      lets it (its forward already handles a v head dim of its own).
    * ``--qk-clip --log-max-attention-logit``, in bf16: Megatron's ``clip_qk`` finds the layers at
      ``model.module.module`` (DDP over Float16Module), which fp32 runs do not have (AttributeError). Megatron-LM asserts Transformer Engine >= 2.9 for them, because TE's
      core attention is the one that reports the max logits (the baseline's local one cannot: no baseline with the
      flags); under USP, USPAttention reports them and megatron_lm's validate_args wrapper lets them through. The
      baseline runs without the flags, a valid comparison while no head's max logit reaches --qk-clip-threshold
      (default 100): Megatron's ``clip_qk`` then leaves the weights alone and the max-logit reduction does not touch
      the forward. ``expect``: the launcher prints the max logit ``clip_qk`` returns after every step (every step's
      ``clip_qk`` also fails unless each layer's core attention reported per-head logits)."""
    zigzag = usp_flags(2, 2)
    cases = [TrainCase(f"softmax-type {kind} u2 r2", TrainRun(1, ("--softmax-type", kind)),
                       TrainRun(4, ("--softmax-type", kind) + zigzag), "u=2 r=2 ring_impl=zigzag")
             for kind in ("learnable", "off-by-one")]
    no_gqa = ("--group-query-attention",)  # MLA excludes it (Megatron asserts)
    cases.append(TrainCase("MLA u2 r2", TrainRun(1, MLA, launcher=("--mla-reference-attention",), without=no_gqa),
                           TrainRun(4, MLA + zigzag, without=no_gqa), "u=2 r=2 ring_impl=zigzag"))
    # MoE (top-2 of 4 experts, alltoall dispatcher, load-balancing loss): routing is per token, the router's
    # statistics are summed over the tp_cp group (the USP grid); with --calculate-per-token-loss megatron-core 0.16
    # scales the router losses 1 / CP (megatron_usp.megatron.moe fixes it). EP 2 keeps its own expert init, so its
    # baseline is EP 2 x DP 2 without SP.
    moe = ("--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
           "--moe-aux-loss-coeff", "1e-2", "--disable-bias-linear")
    per_token_loss = ("--calculate-per-token-loss",)
    ep2 = ("--expert-model-parallel-size", "2")
    cases += [
        TrainCase("MoE u2 r2", TrainRun(1, moe), TrainRun(4, moe + zigzag), "u=2 r=2 ring_impl=zigzag"),
        TrainCase("MoE per-token loss u2 r2", TrainRun(1, moe + per_token_loss),
                  TrainRun(4, moe + per_token_loss + zigzag), "u=2 r=2 ring_impl=zigzag"),
        TrainCase("MoE EP=2 u2 r2 vs EP=2 DP=2", TrainRun(2, moe + ep2), TrainRun(4, moe + ep2 + zigzag),
                  "u=2 r=2 ring_impl=zigzag"),
    ]
    qk_clip = ("--qk-clip", "--log-max-attention-logit")
    bf16 = ("--bf16",)  # Megatron's clip_qk reaches the layers through model.module.module (Float16Module)
    cases.append(TrainCase("qk-clip bf16 u2 r2 vs no clip", TrainRun(1, bf16), TrainRun(4, bf16 + qk_clip + zigzag),
                           "u=2 r=2 ring_impl=zigzag", rtol=1e-4, expect=MAX_LOGIT_LINE))
    return cases


def select_cases(cases: Sequence[TrainCase], names: Optional[str]) -> List[TrainCase]:
    """``names``: comma-separated case names (case-insensitive) or None for all; unknown names are an error."""
    if not names:
        return list(cases)
    wanted = [name.strip().lower() for name in names.split(",") if name.strip()]
    known = {case.name.lower(): case for case in cases}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"unknown --cases {unknown}; known: {', '.join(case.name for case in cases)}")
    return [known[name] for name in wanted]
