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

Megatron-LM's training code imports a few small packages megatron-core does not need; install them aside, e.g.
``pip install --target /tmp/mlm-deps six regex pyyaml pydantic``, and pass ``--deps /tmp/mlm-deps``.
Exits non-zero when a step fails.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("megatron_dir", type=Path)
    parser.add_argument("--python", default=sys.executable, help="interpreter for py_compile and the parse check")
    parser.add_argument("--deps", help="folder with Megatron-LM's extra packages (pip install --target)")
    parser.add_argument("--world-size", type=int, default=8)
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
    path = [str(options.megatron_dir)] + ([options.deps] if options.deps else []) + [str(REPO)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), WORLD_SIZE=str(options.world_size), RANK="0",
               CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONWARNINGS="ignore")
    print(f"PYTHONPATH={env['PYTHONPATH']} WORLD_SIZE={options.world_size}")
    failures += run([options.python, "-c", PARSE_CHECK, *USP_ARGV], env=env, cwd="/") != 0
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
