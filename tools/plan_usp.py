#!/usr/bin/env python
"""Plan Unified Sequence Parallelism: which (TP, ulysses u, ring r, ring_impl) to use, or the whole Megatron job, from
a cost model.

The command line of the planner, ``megatron_usp.planner`` (its docstring describes the model; docs/planner.md shows
it at work): ``--heads`` and ``--seq-len`` plan the attention grid; with ``--ffn-hidden``, ``--vocab`` and
``--num-layers`` the whole job (PP, virtual stages, DP, recompute, the distributed optimizer, the micro-batch size);
``--compare RECORDS`` ranks the predictions against tools/bench_attention.py or tools/bench_job.py runs;
``--hardware FILE`` takes this machine's figures from tools/measure_hardware.py. ``--help`` lists every flag.
"""
from __future__ import annotations

import sys

from megatron_usp.planner.cli import main

if __name__ == "__main__":
    sys.exit(main())
