"""Timing and peak memory of attention steps, read the same way by every benchmark and the GPU check.

Rounds interleave the steps (the monolithic step both first and last), so drift of a shared machine hits a round's
steps alike and per-round ratios cancel it; on a CPU, ``clock="cpu"`` with one thread counts the work done.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_rounds(steps: dict, repeats: int, warmup: int, device: torch.device, clock: str = "wall") -> list[dict]:
    """Seconds of each step per round. A round times every step once, round-robin, with the monolithic step
    both first and last (its two times are averaged): drift of a shared machine then hits a round's steps alike,
    and per-round ratios cancel it. ``clock="cpu"`` (CPU only) counts the process's CPU seconds instead of wall
    seconds: with one thread it is the work done, whatever share of the cores other processes take."""
    if clock == "cpu" and device.type == "cuda":
        raise ValueError("--clock cpu measures CPU work: use --clock wall on a GPU")
    return time_rounds_clocks(steps, repeats, warmup, device, (clock,))[clock]


def time_rounds_clocks(steps: dict, repeats: int, warmup: int, device: torch.device,
                       clocks=("wall", "cpu")) -> dict[str, list[dict]]:
    """:func:`time_rounds` read on several clocks at once (the same calls): ``{clock: rounds}``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(step) -> dict[str, float]:
        sync()
        start = {clock: CLOCKS[clock]() for clock in clocks}
        step()
        sync()
        return {clock: CLOCKS[clock]() - start[clock] for clock in clocks}

    for step in steps.values():
        for _ in range(warmup):
            step()
    rounds = {clock: [] for clock in clocks}
    for _ in range(repeats):
        first = seconds(steps["monolithic"])
        times = {name: seconds(step) for name, step in steps.items() if name != "monolithic"}
        last = seconds(steps["monolithic"])
        for clock in clocks:
            rounds[clock].append({name: spent[clock] for name, spent in times.items()})
            rounds[clock][-1]["monolithic"] = (first[clock] + last[clock]) / 2
    return rounds


def peak_memory(step: Callable[[], None], device: torch.device):
    """Peak bytes of ``step``: its inputs plus what it allocates while running; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before + step.input_bytes
