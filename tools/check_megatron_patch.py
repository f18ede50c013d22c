#!/usr/bin/env python3
"""Verify megatron-usp's patch on a real Megatron-LM checkout (not part of CI: it needs the checkout).

    python tools/check_megatron_patch.py MEGATRON_DIR [--python PY] [--deps DIR] [--world-size 8]

1. tools/apply_megatron_patch.py: apply, then --check (must say applied), then apply again (idempotent).
2. ``PY -m py_compile`` on every file the patch set touches.
3. When PY imports torch (e.g. the project's .venv with megatron-core 0.16.1, Python 3.11): with the checkout first
   on PYTHONPATH (so megatron.training AND megatron.core come from the checkout), import the patched
   pretrain_gpt.py (module level), then run what its ``__main__`` runs before training: ``install()``, Megatron-LM's ``parse_args`` with ``with_usp_args``
   (no argparse conflicts), ``validate_usp_args`` (CP = u*r), then Megatron-LM's own ``validate_args`` through the
   install() wrapper (DP = world / (TP*PP*CP)). Two CPU stand-ins, printed when used: Megatron's
   ``get_device_arch_version`` (reads CUDA) returns 9, and ``batch_invariant_kernels`` (imports triton) is
   replaced by an empty module when triton is absent.

4. ``--train``: Megatron-LM's own ``pretrain_gpt.py`` (patched) trains a tiny GPT on CPU/gloo under torchrun
   through ``megatron_usp.megatron.megatron_lm_cpu`` (the CUDA stand-ins): for every case of :func:`train_cases`
   a run without SP and a USP run with the same Megatron flags, mock data, fp32, dropout 0. Every iteration's lm
   loss must agree (relative difference <= ``--rtol``, default 2e-6: Megatron prints 7 digits), the baseline must
   not have USP and the USP run must report its grid and attention calls. Prints the commands, a table, and exits
   non-zero on any mismatch. ``--cases`` picks cases by name; ``--logs DIR`` keeps every run's output.
   The resume cases save at u=2 r=2 half-way (``--exit-interval``) and ``--load`` at u=1 r=4 and without SP, with
   Megatron's own optimizer and with ``--use-distributed-optimizer``. TP=2 cases run USP beside tensor parallelism;
   MTP cases run multi-token prediction. A *refused* case (``TrainCase.refused``) runs only the USP run, which must
   stop before training with the given message (validate_usp_args refusing a combination), and has no baseline.
   The packed THD cases (``--sft``) make a tiny chat dataset and character tokenizer locally (no download) and need
   transformers<5, datasets and jinja2 (``pip install --target /tmp/mlm-sft-deps "transformers<5" datasets
   jinja2``, ``--sft-deps /tmp/mlm-sft-deps``); without them they are skipped, with the reason in the table.

Megatron-LM's training code imports a few small packages megatron-core does not need; install them aside, e.g.
``pip install --target /tmp/mlm-deps six regex pyyaml pydantic pybind11 psutil``, and pass ``--deps /tmp/mlm-deps``
(pybind11 builds Megatron's dataset helpers for ``--train``).
Exits non-zero when a step fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
USP_ARGV = ["--ulysses-degree", "2", "--ring-degree", "2", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
            "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]

PARSE_CHECK = r'''
import importlib.util, sys, types
if importlib.util.find_spec("triton") is None:
    name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
    stub = types.ModuleType(name)
    for fn in ("set_batch_invariant_mode", "is_batch_invariant_mode_enabled", "disable_batch_invariant_mode",
               "enable_batch_invariant_mode"):
        setattr(stub, fn, lambda *a, **k: None)
    sys.modules[name] = stub
    print("stand-in: triton absent, batch_invariant_kernels replaced by an empty module")
import megatron.core, megatron.training.arguments as arguments
from megatron_usp.megatron import megatron_lm, validate_usp_args
print("megatron.core from", megatron.core.__file__)
print("megatron.training from", arguments.__file__)
import pretrain_gpt  # the patched script's module level (its __main__ block does not run)
assert pretrain_gpt.get_batch_on_this_cp_rank.__usp_original__ is not None
print("import pretrain_gpt: ok, get_batch_on_this_cp_rank is the USP hook around",
      pretrain_gpt.get_batch_on_this_cp_rank.__usp_original__.__module__)
sys.argv = ["pretrain_gpt.py"] + sys.argv[1:]
print("argv:", " ".join(sys.argv[1:]))
megatron_lm.install()
args = arguments.parse_args(extra_args_provider=megatron_lm.with_usp_args(None))
print("parse_args: ok, no argparse conflicts; ulysses", args.ulysses_degree, "ring", args.ring_degree,
      "ring impl", args.usp_ring_impl, "cp before validation", args.context_parallel_size)
validate_usp_args(args)
assert args.context_parallel_size == 4, args.context_parallel_size
print("validate_usp_args(args).context_parallel_size =", args.context_parallel_size)
arguments.get_device_arch_version = lambda: 9
print("stand-in: get_device_arch_version() -> 9 (no CUDA here)")
import contextlib, io
import megatron.training.initialize as initialize
with contextlib.redirect_stdout(io.StringIO()):  # Megatron prints every argument
    initialize.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
print("Megatron-LM validate_args via install(): world", args.world_size, "cp", args.context_parallel_size,
      "dp", args.data_parallel_size)
assert args.data_parallel_size == args.world_size // 4
print("PARSE CHECK OK")
'''


def run(command, **kwargs) -> int:
    shown = ["<PARSE_CHECK script>" if part == PARSE_CHECK else str(part) for part in command]
    print("$", " ".join(shown), flush=True)
    result = subprocess.run(command, text=True, capture_output=True, **kwargs)
    output = (result.stdout + result.stderr).strip()
    print("\n".join(line for line in output.splitlines() if "warn" not in line.lower()))
    print(f"(exit {result.returncode})", flush=True)
    return result.returncode


def touched_files(megatron_dir: Path) -> list:
    out = subprocess.run([sys.executable, str(REPO / "tools" / "apply_megatron_patch.py"), str(megatron_dir),
                          "--check"], capture_output=True, text=True).stdout
    patch_set = Path(re.search(r"patch set (\S+)", out).group(1))
    files = []
    for patch in sorted(patch_set.glob("*.patch")):
        numstat = subprocess.run(["git", "apply", "--numstat", str(patch)], capture_output=True, text=True).stdout
        files += [line.split("\t")[2] for line in numstat.splitlines()]
    return files


# ---------------------------------------------------------------------------------------------- --train

LAUNCHER = "megatron_usp.megatron.megatron_lm_cpu"
USP_PROBE = re.compile(r"megatron_lm_cpu: USP grid: (?P<grid>.*?); attention calls: (?P<calls>\d+)")
LOSS_LINE = re.compile(r"iteration\s+(?P<it>\d+)/\s*\d+ \|.*?\| lm loss: (?P<loss>[-+0-9.eEnaNiIf]+) \|")


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


def usp_flags(ulysses: int, ring: int, ring_impl: str = "zigzag") -> Tuple[str, ...]:
    return ("--ulysses-degree", str(ulysses), "--ring-degree", str(ring), "--usp-ring-impl", ring_impl)


def sft_data_args(fixture: Path) -> Tuple[str, ...]:
    """Megatron-LM's packed THD path: --sft on the fixture's jsonl and tokenizer (see SFT_FIXTURE), rows of 128
    tokens, one row per micro-batch (Megatron packs only with micro-batch 1); SFTTokenizer is a legacy tokenizer."""
    return ("--sft", "--legacy-tokenizer", "--tokenizer-type", "SFTTokenizer", "--tokenizer-model", str(fixture / "tokenizer"),
            "--data-path", str(fixture / "sft.jsonl"), "--split", "100,0,0", "--seq-length", "128",
            "--max-position-embeddings", "128", "--micro-batch-size", "1", "--no-create-attention-mask-in-dataloader")


def train_cases(sft_fixture: Optional[Path] = None, sft_skip: str = "no SFT fixture",
                checkpoint: Path = Path("checkpoint"), train_iters: int = 6) -> List[TrainCase]:
    """Baseline (no SP) vs USP with the same Megatron flags; every USP run uses 4 ranks. The packed THD (--sft) cases
    need ``sft_fixture`` (made by :func:`make_sft_fixture`), else they are skipped with ``sft_skip``. The resume
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
    cases += tensor_parallel_cases() + mtp_cases() + attention_feature_cases()
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
        TrainCase("TP=2 u2 vs 1 rank cpu initialization", TrainRun(1, CPU_INIT),
                  TrainRun(4, tp2 + CPU_INIT + usp_flags(2, 1)), "u=2 r=1 ring_impl=zigzag"),
    ]


MTP = ("--mtp-num-layers", "1", "--calculate-per-token-loss")


def mtp_cases() -> List[TrainCase]:
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
        TrainCase("MTP u2 r2 zigzag", TrainRun(1, MTP), TrainRun(4, MTP + usp_flags(2, 2)), "u=2 r=2 ring_impl=zigzag"),
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


def launcher_command(python: str, script: Path, run: TrainRun, model_args: Sequence[str]) -> List[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(run.nproc),
            "-m", LAUNCHER, *run.launcher, str(script), *[arg for arg in model_args if arg not in run.without],
            *run.data, *run.args]


# A tiny chat dataset for Megatron-LM's --sft loader, made locally (no download): a character-level HF tokenizer with
# the special tokens of SFTTokenizer's nemotron-h-aligned template, and jsonl rows of 2-4 conversations. Every
# conversation is a multiple of 8 tokens long (EOD included) and a row at most 128: Megatron's SFTDataset pads each
# conversation to a multiple of 2 x CP when CP > 1 and truncates long rows, which would make the baseline's rows
# (CP = 1) differ from the USP run's (CP = 4).
SFT_FIXTURE = r"""
import importlib.util, json, random, sys, types
from pathlib import Path
out, seq = Path(sys.argv[1]), int(sys.argv[2])
if importlib.util.find_spec("triton") is None:  # megatron.training imports it for --batch-invariant-mode only
    stub = types.ModuleType("batch_invariant_kernels")
    stub.enable_batch_invariant_mode = lambda *a, **k: None
    sys.modules["megatron.core.transformer.custom_layers.batch_invariant_kernels"] = stub
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
special = ["<unk>", "<eos>", "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<SPECIAL_233>"]
vocab = {token: i for i, token in enumerate(special + [chr(c) for c in range(32, 127)] + [chr(10)])}
tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
tokenizer.add_special_tokens(special)
PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>",
                        pad_token="<SPECIAL_233>").save_pretrained(out / "tokenizer")
from megatron.training.tokenizer.sft_tokenizer import SFTTokenizer
sft = SFTTokenizer(str(out / "tokenizer"), "nemotron-h-aligned")
rng = random.Random(1234)
def words(n):  # no spaces: the template strips the content
    return "".join(rng.choice("abcdefghijklmnopqrst") for _ in range(n))
def conversation(length):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": words(rng.randint(1, 6))},
                {"role": "assistant", "content": "a"}]
    short = len(sft.tokenize_conversation(messages, return_target=False, add_generation_prompt=False)) + 1
    messages[2]["content"] = words(length - short + 1)
    assert len(sft.tokenize_conversation(messages, return_target=False, add_generation_prompt=False)) + 1 == length
    return messages
rows = []
for _ in range(8):
    lengths = []
    while True:
        length = rng.choice([40, 48, 56])  # a conversation with an empty answer has 31-36 tokens
        if sum(lengths) + length > seq or len(lengths) == 4:
            break
        lengths.append(length)
    rows.append({"messages": [m for length in lengths for m in conversation(length)]})
    print("row of conversations with", lengths, "tokens")
(out / "sft.jsonl").write_text("".join(json.dumps(row) + chr(10) for row in rows))
print("SFT FIXTURE OK", out)
"""


def make_sft_fixture(python: str, folder: Path, env: Dict[str, str]) -> Tuple[Optional[Path], str]:
    """Make the --sft tokenizer and jsonl in ``folder`` with ``python``; (folder, "") or (None, why not)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([python, "-c", SFT_FIXTURE, str(folder), "128"], env=env, text=True, capture_output=True)
    if result.returncode != 0 or "SFT FIXTURE OK" not in result.stdout:
        last = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
        return None, ("the --sft fixture needs transformers<5 (SFTTokenizer indexes apply_chat_template's result), "
                      f"datasets and jinja2 (pass --sft-deps): {last[0]}")
    print(result.stdout.strip(), flush=True)
    return folder, ""


def parse_losses(output: str) -> Dict[int, float]:
    """``{iteration: lm loss}`` from Megatron's training log lines (``... | lm loss: 5.549841E+00 | ...``)."""
    return {int(m.group("it")): float(m.group("loss")) for m in LOSS_LINE.finditer(output)}


def undo_first_log_accumulation(losses: Dict[int, float], first: int) -> Dict[int, float]:
    """Megatron-LM (<= 0.16 at least) logs a process's first iteration without resetting its loss accumulator
    (``training_log(is_first_iteration=True)``), so with --log-interval 1 the next line prints the mean of both
    iterations. Every fresh run does it at iteration 2 alike; a run resumed at ``first`` does it at ``first + 1``,
    which this undoes (``2 * logged - logged[first]``) to compare it with an uninterrupted run."""
    fixed = dict(losses)
    if first in losses and first + 1 in losses:
        fixed[first + 1] = 2 * losses[first + 1] - losses[first]
    return fixed


def parse_usp_probe(output: str) -> Optional[Tuple[str, int]]:
    """(grid, attention calls) from the launcher's probe line; grid is "none" without USP."""
    match = USP_PROBE.search(output)
    return (match.group("grid"), int(match.group("calls"))) if match else None


@dataclasses.dataclass
class CaseResult:
    name: str
    status: str  # "ok", "MISMATCH", "FAILED" or "SKIP"
    baseline: Dict[int, float] = dataclasses.field(default_factory=dict)
    usp: Dict[int, float] = dataclasses.field(default_factory=dict)
    max_rel: Optional[float] = None
    worst_iteration: Optional[int] = None
    note: str = ""


def relative_difference(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def compare_losses(name: str, baseline: Dict[int, float], usp: Dict[int, float], train_iters: int,
                   rtol: float, first: int = 1) -> CaseResult:
    """Every iteration first..train_iters must be in both logs and agree within ``rtol`` (NaN never agrees)."""
    result = CaseResult(name, "ok", baseline, usp)
    expected = set(range(first, train_iters + 1))
    for label, losses in (("baseline", baseline), ("USP", usp)):
        missing = sorted(expected - set(losses))
        if missing:
            result.status, result.note = "FAILED", f"{label} has no lm loss for iterations {missing}"
            return result
    worst, worst_it = 0.0, None
    for it in sorted(expected):
        diff = relative_difference(baseline[it], usp[it])
        if diff != diff:  # NaN
            diff = float("inf")
        if worst_it is None or diff > worst:
            worst, worst_it = diff, it
    result.max_rel, result.worst_iteration = worst, worst_it
    if worst > rtol:
        result.status = "MISMATCH"
        result.note = (f"iteration {worst_it}: baseline {baseline[worst_it]:.6E} vs USP {usp[worst_it]:.6E} "
                       f"(relative {worst:.2e} > {rtol:.0e})")
    return result


def check_probe(result: CaseResult, case: TrainCase, baseline_probe, usp_probe) -> CaseResult:
    """The baseline must run without USP, the USP run on the case's grid with USP attention calls (none when the
    case's grid is "none")."""
    problems = []
    if baseline_probe is None or baseline_probe[0] != "none" or baseline_probe[1] != 0:
        problems.append(f"baseline probe {baseline_probe} (expected no USP grid and 0 attention calls)")
    if case.grid == "none":
        if usp_probe != ("none", 0):
            problems.append(f"probe {usp_probe} (expected no USP grid and 0 attention calls)")
    elif usp_probe is None or usp_probe[0] != case.grid or usp_probe[1] <= 0:
        problems.append(f"USP probe {usp_probe} (expected grid {case.grid!r} and attention calls)")
    if problems:
        result.status = "FAILED"
        result.note = "; ".join(filter(None, [result.note] + problems))
    return result


def check_expected(result: CaseResult, pattern: str, output: str, iterations: int) -> CaseResult:
    """The USP run's output must match ``pattern`` at least ``iterations`` times; the note shows the last match
    (its ``value`` group when it has one)."""
    matches = list(re.finditer(pattern, output))
    if len(matches) < iterations:
        result.status = "FAILED"
        result.note = "; ".join(filter(None, [result.note, f"{len(matches)} lines match {pattern!r}, expected "
                                              f"{iterations}"]))
        return result
    last = matches[-1].groupdict().get("value") or matches[-1].group(0)
    result.note = "; ".join(filter(None, [result.note, f"{len(matches)} lines match the expected report, last {last}"]))
    return result


def judge_refusal(name: str, returncode: int, output: str, fragment: str) -> CaseResult:
    """A refused case passes when the run failed, its output has ``fragment`` (the refusal's message) and it logged
    no lm loss (it stopped before training)."""
    problems = []
    if returncode == 0:
        problems.append("the run succeeded")
    if fragment not in output:
        problems.append(f"no {fragment!r} in its output")
    if parse_losses(output):
        problems.append("it trained (logged lm loss)")
    if problems:
        return CaseResult(name, "FAILED", note=f"expected a refusal before training with {fragment!r}: "
                          + "; ".join(problems))
    return CaseResult(name, "ok", note=f"refused as expected ({fragment!r}, exit {returncode})")


def format_table(results: Sequence[CaseResult], rtol: float) -> str:
    """One row per case: the first and last losses of both runs, the largest relative difference, the verdict."""
    header = ("case", "iters", "baseline first", "baseline last", "USP first", "USP last", "max rel diff", "result")
    rows = [header]
    for r in results:
        def pick(losses: Dict[int, float], last: bool) -> str:
            return f"{losses[max(losses) if last else min(losses)]:.6E}" if losses else "-"

        rows.append((r.name, str(len(r.usp) if r.usp else len(r.baseline)),
                     pick(r.baseline, False), pick(r.baseline, True), pick(r.usp, False), pick(r.usp, True),
                     "-" if r.max_rel is None else f"{r.max_rel:.1e}", r.status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    notes = [f"  {r.name}: {r.note}" for r in results if r.note]
    footer = [f"tolerance: relative {rtol:.0e} per iteration (Megatron prints 7 digits)"]
    return "\n".join(lines + footer + notes)


def per_iteration_table(result: CaseResult) -> str:
    lines = [f"{result.name}:", "  iter  baseline       USP            rel diff"]
    for it in sorted(set(result.baseline) | set(result.usp)):
        base, usp = result.baseline.get(it), result.usp.get(it)
        diff = "-" if base is None or usp is None else f"{relative_difference(base, usp):.1e}"
        lines.append(f"  {it:<5} {'-' if base is None else f'{base:.6E}':<14} {'-' if usp is None else f'{usp:.6E}':<14} "
                     f"{diff}")
    return "\n".join(lines)


def run_training(command: List[str], env: Dict[str, str], cwd: Path, log: Path) -> Tuple[int, str]:
    print("$", " ".join(shlex.quote(part) for part in command), flush=True)
    result = subprocess.run(command, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log.write_text(result.stdout)
    print(f"  (exit {result.returncode}, log {log})", flush=True)
    if result.returncode != 0:
        errors = [line for line in result.stdout.splitlines() if "Error" in line or "error:" in line]
        print("\n".join("  " + line for line in errors[-5:]), flush=True)
    return result.returncode, result.stdout


def train(options, env: Dict[str, str]) -> int:
    """Run the --train cases; print the table; return the number of cases that did not pass."""
    script = options.megatron_dir.resolve() / "pretrain_gpt.py"
    logs = Path(options.logs or tempfile.mkdtemp(prefix="megatron-usp-train-")).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    model_args = train_model_args(options.train_iters, options.seq_length)
    env = dict(env, OMP_NUM_THREADS="1")  # same threads in every run; ranks share few cores
    checkpoint = logs / "checkpoint"
    for folder in (checkpoint, distributed_optimizer_checkpoint(checkpoint)):
        shutil.rmtree(folder, ignore_errors=True)  # the resume cases load what this run saves

    def all_cases(fixture: Optional[Path] = None, why: str = "no SFT fixture") -> List[TrainCase]:
        return train_cases(fixture, why, checkpoint, options.train_iters)

    cases = select_cases(all_cases(), options.cases)
    sft_env = env
    if any(case.name.startswith("THD") for case in cases):
        sft_env = dict(env, HF_DATASETS_CACHE=str(logs / "hf-datasets"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        if options.sft_deps:
            sft_env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"].split(os.pathsep)[0],
                                                     str(Path(options.sft_deps).resolve()), env["PYTHONPATH"]])
        fixture, why = make_sft_fixture(options.python, logs / "sft", sft_env)
        chosen = [case.name for case in cases]
        cases = [case for case in all_cases(fixture, why) if case.name in chosen]
    outputs: Dict[TrainRun, Tuple[int, str]] = {}

    def output_of(run: TrainRun, env: Dict[str, str]) -> Tuple[int, str]:
        if run not in outputs:  # baselines shared by several cases run once
            outputs[run] = run_training(launcher_command(options.python, script, run, model_args), env, logs,
                                        logs / f"run{len(outputs):02d}-np{run.nproc}.log")
        return outputs[run]

    results = []
    for case in cases:
        print(f"== {case.name}", flush=True)
        if case.skip:
            results.append(CaseResult(case.name, "SKIP", note=case.skip))
            continue
        run_env = sft_env if case.name.startswith("THD") else env
        if case.refused is not None:
            usp_rc, usp_out = output_of(case.usp, run_env)
            result = judge_refusal(case.name, usp_rc, usp_out, case.refused)
            print(f"  {result.status}: {result.note}", flush=True)
            results.append(result)
            continue
        base_rc, base_out = output_of(case.baseline, run_env)
        pre_note = ""
        if case.pre is not None:
            pre_rc, pre_out = output_of(case.pre, run_env)
            last = case.first_iteration - 1
            pre = compare_losses(case.name, parse_losses(base_out), parse_losses(pre_out), last, options.rtol)
            print(per_iteration_table(dataclasses.replace(pre, name=f"{case.name} (run before)")), flush=True)
            if pre_rc or pre.status != "ok":
                pre_note = f"run before (iterations 1-{last}): exit {pre_rc}, {pre.status} {pre.note}".strip()
        usp_rc, usp_out = output_of(case.usp, run_env)
        rtol = case.rtol if case.rtol is not None else options.rtol
        usp_losses = parse_losses(usp_out)
        if case.first_iteration > 1:
            usp_losses = undo_first_log_accumulation(usp_losses, case.first_iteration)
        result = compare_losses(case.name, parse_losses(base_out), usp_losses, options.train_iters,
                                rtol, case.first_iteration)
        if case.rtol is not None:
            result.note = "; ".join(filter(None, [f"tolerance {rtol:.0e} for this case", result.note]))
        early = sorted(it for it in usp_losses if it < case.first_iteration)
        if early:  # a --load run that logs iterations before the checkpoint's did not resume
            pre_note = "; ".join(filter(None, [pre_note, f"did not resume: logged iterations {early}"]))
        if base_rc or usp_rc or pre_note:
            result.status = "FAILED"
            result.note = "; ".join(filter(None, [result.note, pre_note] +
                                           ([f"exit codes: baseline {base_rc}, USP {usp_rc}"] if base_rc or usp_rc
                                            else [])))
        result = check_probe(result, case, parse_usp_probe(base_out), parse_usp_probe(usp_out))
        if case.expect is not None:
            result = check_expected(result, case.expect, usp_out, options.train_iters - case.first_iteration + 1)
        print(per_iteration_table(result), flush=True)
        results.append(result)
    print(f"\nMegatron-LM pretrain_gpt.py on CPU/gloo, baseline (no SP) vs USP (logs in {logs}):")
    print(format_table(results, options.rtol), flush=True)
    return sum(result.status not in ("ok", "SKIP") for result in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("megatron_dir", type=Path)
    parser.add_argument("--python", default=sys.executable, help="interpreter for py_compile and the parse check")
    parser.add_argument("--deps", help="folder with Megatron-LM's extra packages (pip install --target)")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--train", action="store_true", help="also train baseline vs USP and compare losses")
    parser.add_argument("--cases", help="--train: comma-separated case names (default: all)")
    parser.add_argument("--train-iters", type=int, default=6)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--rtol", type=float, default=2e-6)
    parser.add_argument("--logs", help="--train: folder for every run's output (default: a new temporary folder)")
    parser.add_argument("--sft-deps", help="--train: folder with transformers<5, datasets and jinja2 for the THD "
                        "(--sft) cases (pip install --target); without them those cases are skipped")
    options = parser.parse_args()
    if os.sep in options.python:  # the parse check runs from another folder
        options.python = str(Path(options.python).absolute())
    tool = [sys.executable, str(REPO / "tools" / "apply_megatron_patch.py"), str(options.megatron_dir)]
    failures = 0
    failures += run(tool) != 0
    failures += run(tool + ["--check"]) != 0
    failures += run(tool) != 0
    files = [str(options.megatron_dir / name) for name in touched_files(options.megatron_dir)]
    failures += run([options.python, "-m", "py_compile", *files]) != 0
    has_torch = subprocess.run([options.python, "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        print(f"parse check skipped: {options.python} has no torch (py_compile only)")
        return int(failures > 0)
    path = [str(options.megatron_dir.resolve())] + ([str(Path(options.deps).resolve())] if options.deps else []) + [str(REPO)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), WORLD_SIZE=str(options.world_size), RANK="0",
               CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONWARNINGS="ignore")
    print(f"PYTHONPATH={env['PYTHONPATH']} WORLD_SIZE={options.world_size}")
    failures += run([options.python, "-c", PARSE_CHECK, *USP_ARGV], env=env, cwd="/") != 0
    if options.train:
        failures += train(options, env)
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
