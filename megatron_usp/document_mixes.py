"""Document length mixes for packed rows: where benchmarks, the GPU check and the planner get realistic rows.

A source samples document lengths: ``stdlib`` (the Python standard library's ``.py`` files, bytes / 4 tokens: a
heavy-tailed mix of real documents), ``lognormal`` (median 1000, sigma 1.5), ``dcp`` (Megatron-LM's dynamic-CP
benchmark mix: lognormal, mean 1024, sigma 1.5, clipped to 128..8192), ``uniform`` (1..8192) or a file of lengths,
one per line. A packed row is ``cu_seqlens`` of ``seq_len`` tokens filled with random documents (the last
one truncated), seeded so every grid sees the same rows.
"""
from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path
from typing import Callable

LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA = 1000, 1.5  # tokens; mean = median * exp(sigma^2 / 2) ~ 3,080
UNIFORM_RANGE = (1, 8192)  # tokens, both ends included
# Megatron-LM's dynamic-CP benchmark (examples/dynamic_context_parallel): lognormal with this mean and sigma
# (mu = ln(mean) - sigma^2 / 2, as its generate_lognormal_samples), clipped to [min, max], truncated to int
DCP_MEAN, DCP_SIGMA, DCP_RANGE = 1024, 1.5, (128, 8192)


def stdlib_document_lengths() -> list[int]:
    """Token lengths (bytes / 4, at least 1) of the Python standard library's ``.py`` files, site-packages
    excluded, in sorted path order (a heavy-tailed mix of real documents)."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    lengths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__"))
        lengths += [max(1, os.path.getsize(os.path.join(folder, f)) // 4) for f in sorted(files) if f.endswith(".py")]
    return lengths


def document_source(name: str) -> Callable[[random.Random], int]:
    """A sampler of document lengths: ``stdlib``, ``lognormal`` (median 1000, sigma 1.5), ``dcp``, ``uniform``
    (1..8192) or a path to a file of lengths, one per line (drawn uniformly with replacement)."""
    if name == "lognormal":
        mu = math.log(LOGNORMAL_MEDIAN)
        return lambda rng: max(1, round(rng.lognormvariate(mu, LOGNORMAL_SIGMA)))
    if name == "dcp":
        mu = math.log(DCP_MEAN) - DCP_SIGMA ** 2 / 2
        return lambda rng: int(min(max(rng.lognormvariate(mu, DCP_SIGMA), DCP_RANGE[0]), DCP_RANGE[1]))
    if name == "uniform":
        return lambda rng: rng.randint(*UNIFORM_RANGE)
    if name == "stdlib":
        pool = stdlib_document_lengths()
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"document source {name!r}: not stdlib, lognormal, dcp, uniform or a file of lengths")
        try:
            pool = [int(line) for line in path.read_text().split() if line.strip()]
        except ValueError:
            pool = []
        if not pool or min(pool) < 1:
            raise ValueError(f"document source {name}: needs positive integer lengths, one per line")
    return lambda rng: rng.choice(pool)


def source_label(name: str) -> str:
    return name if name in ("stdlib", "lognormal", "dcp", "uniform") else Path(name).name


def source_detail(name: str) -> str:
    if name == "lognormal":
        return f"lognormal lengths, median {LOGNORMAL_MEDIAN}, sigma {LOGNORMAL_SIGMA} (at least 1)"
    if name == "dcp":
        return (f"Megatron-LM's dynamic-CP benchmark mix: lognormal, mean {DCP_MEAN}, sigma {DCP_SIGMA}, clipped to "
                f"{DCP_RANGE[0]}..{DCP_RANGE[1]}")
    if name == "uniform":
        return f"uniform lengths {UNIFORM_RANGE[0]}..{UNIFORM_RANGE[1]}"
    if name == "stdlib":
        return (f"{len(stdlib_document_lengths())} .py files of Python {sys.version.split()[0]}'s standard library "
                "(site-packages excluded), bytes / 4 tokens")
    return f"{len(Path(name).read_text().split())} lengths from {name}"


def packed_row(sample: Callable[[random.Random], int], seq_len: int, seed: str) -> tuple[int, ...]:
    """cu_seqlens of one row of ``seq_len`` tokens packed from random documents; the last one is truncated."""
    rng = random.Random(seed)
    offsets = [0]
    while offsets[-1] < seq_len:
        offsets.append(min(seq_len, offsets[-1] + sample(rng)))
    return tuple(offsets)


def packed_rows(source: str, seq_len: int, rows: int, seed: int) -> list[tuple[int, ...]]:
    """The same rows for every grid: row ``i`` is seeded by (seed, source, seq_len, i)."""
    sample = document_source(source)
    return [packed_row(sample, seq_len, f"{seed}:{source_label(source)}:{seq_len}:{i}") for i in range(rows)]
