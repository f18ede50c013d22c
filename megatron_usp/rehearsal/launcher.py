"""The rehearsal's launcher: install the CPU stand-ins, then run a Megatron-LM script as ``__main__``.

    PYTHONPATH=MEGATRON_DIR:DEPS:REPO torchrun --nproc-per-node 4 -m megatron_usp.rehearsal \\
        MEGATRON_DIR/pretrain_gpt.py --distributed-backend gloo <megatron args>

Options before the script path give the baseline run (no USP) a reference attention (:mod:`.references`:
``--thd-reference-attention``, ``--mla-reference-attention``).

The launcher installs every stand-in (:func:`megatron_usp.megatron.cpu_standins.install`), then runs the script as
``__main__`` (``runpy``), so the training loop, DDP, optimizers, pipeline schedules, recompute and data pipeline are
Megatron-LM's own. It is a rehearsal for the GPU run, not a CPU backend: with CUDA available no stand-in is installed.
Rank 0 prints the stand-ins, the references and the probes' lines (:mod:`.probes`). ``tools/check_megatron_patch.py
MEGATRON_DIR --train`` drives it.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import List

from ..megatron import cpu_standins
from .probes import count_usp_attention_calls, report_max_attention_logit, usp_probe_line
from .references import REFERENCES


def _check_megatron_source(script: Path) -> None:
    """megatron.core and megatron.training must both come from the checkout that holds ``script``."""
    import megatron.core
    import megatron.training

    checkout = script.resolve().parent
    for module in (megatron.core, megatron.training):
        if checkout not in Path(module.__file__).resolve().parents:
            raise SystemExit(
                f"megatron_lm_cpu: {module.__name__} comes from {module.__file__}, not from {checkout}: put the "
                "checkout first on PYTHONPATH"
            )


def main(argv: List[str]) -> None:
    argv, references = list(argv), []
    while argv and argv[0] in REFERENCES:
        references.append(argv.pop(0))
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__.split("\n\n")[1])
    script = Path(argv[0])
    if str(script.parent.resolve()) not in sys.path:
        sys.path.insert(0, str(script.parent.resolve()))
    names = cpu_standins.install()
    _check_megatron_source(script)
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        print("megatron_lm_cpu stand-ins:" if names else "megatron_lm_cpu: CUDA available, no stand-ins",
              ", ".join(names), flush=True)
    for flag in references:
        REFERENCES[flag]()
        if rank0:
            print(f"megatron_lm_cpu: {flag} (baseline reference, not a stand-in)", flush=True)
    calls = count_usp_attention_calls()
    report_max_attention_logit()
    sys.argv = [str(script)] + list(argv[1:])
    cpu_standins.register_main_script(script)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:  # also when Megatron exits early (--exit-interval)
        if rank0:
            print(usp_probe_line(calls["forward"]), flush=True)
