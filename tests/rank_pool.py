"""A pool of gloo ranks spawned once and reused by many test cases (spawning torch processes is slow).

``pool.run("module:function", timeout=..., **kwargs)`` calls ``function(rank, world_size, **kwargs)`` on every
rank and returns the per-rank results. A rank's exception fails the case with its traceback; a case that does
not finish in time (a deadlock) fails with TimeoutError. After either, the pool is torn down and respawned
for the next case, since its process groups may be left mid-collective.
"""
from __future__ import annotations

import importlib
import os
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, commands, results, test_dir: str, isolated: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, test_dir)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    while True:
        command = commands.get()
        if command is None:
            break
        target, kwargs = command
        groups, patches = set(_process_groups()), _patch_count()
        try:
            module_name, function_name = target.split(":")
            function = getattr(importlib.import_module(module_name), function_name)
            results.put((rank, True, function(rank, world_size, **kwargs)))
        except BaseException:  # report everything, including assertion failures, to the parent
            results.put((rank, False, traceback.format_exc()))
        else:
            if isolated:
                _destroy_groups_except(groups)
                _undo_patches_newer_than(patches)
    dist.destroy_process_group()


def _patch_count() -> int:
    patching = sys.modules.get("megatron_usp.patching")
    return len(patching.patched()) if patching else 0


def _undo_patches_newer_than(count: int) -> None:
    # what a case patched (CPU stand-ins, hooks) must not reach the next case run by these processes
    cpu_standins = sys.modules.get("megatron_usp.megatron.cpu_standins")
    if cpu_standins is not None:
        cpu_standins.uninstall()  # its torch function mode and bookkeeping besides its patches
    patching = sys.modules.get("megatron_usp.patching")
    if patching is not None:
        patching.undo_newer_than(count)


def _process_groups() -> list:
    from torch.distributed import distributed_c10d

    return list(distributed_c10d._world.pg_map)


def _destroy_groups_except(kept: set) -> None:
    """Destroy the process groups a case created. megatron-core's destroy_model_parallel only drops its references:
    a pool that kept them would pile up gloo groups, and every later group creation slows down (measured: 2 s ->
    280 s per Megatron case); a failed case tears the pool down instead, as its groups may be mid-collective."""
    import torch.distributed as dist

    for group in _process_groups():
        if group not in kept:
            dist.destroy_process_group(group)


class _RankDied(TimeoutError):
    pass


class RankPool:
    """``isolated``: every case starts from the state the processes had before it (its process groups destroyed,
    its patches undone) -- for cases that build and drop megatron-core's parallel state. Otherwise cases may keep
    what they build (e.g. cached USP groups) for the next."""

    def __init__(self, world_size: int, isolated: bool = False):
        self.world_size = world_size
        self.isolated = isolated
        self._processes = []

    def _start(self) -> None:
        context = mp.get_context("spawn")
        port = _free_port()
        self._results = context.Queue()
        self._commands = [context.Queue() for _ in range(self.world_size)]
        test_dir = os.path.dirname(os.path.abspath(__file__))
        self._processes = [
            context.Process(
                target=_worker,
                args=(rank, self.world_size, port, self._commands[rank], self._results, test_dir, self.isolated),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for process in self._processes:
            process.start()

    def close(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join(timeout=5)
        self._processes = []

    def run(self, target: str, timeout: float = 120, **kwargs) -> list:
        fresh = not self._processes or not all(p.is_alive() for p in self._processes)
        if fresh:
            self.close()
            self._start()
        try:
            return self._run(target, timeout, **kwargs)
        except _RankDied:
            if not fresh:
                raise
            # a fresh pool can lose the race for its rendezvous port (EADDRINUSE): start over once
            self._start()
            return self._run(target, timeout, **kwargs)

    def _run(self, target: str, timeout: float, **kwargs) -> list:
        for commands in self._commands:
            commands.put((target, kwargs))
        results, failures = [None] * self.world_size, []
        deadline = time.monotonic() + timeout
        while len(failures) + sum(r is not None for r in results) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [i for i, p in enumerate(self._processes) if not p.is_alive()]
                if dead or time.monotonic() > deadline or (failures and time.monotonic() > failed_at + 10):
                    self.close()
                    if failures:
                        break
                    if dead:
                        raise _RankDied(f"{target} on {self.world_size} ranks: rank(s) {dead} died")
                    raise TimeoutError(f"{target} on {self.world_size} ranks: did not finish within {timeout}s (deadlock?)")
                continue
            if not ok and not failures:
                failed_at = time.monotonic()
            if ok:
                results[rank] = value
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
        if failures:
            self.close()
            raise AssertionError(f"{target} failed on {len(failures)} rank(s):\n" + "\n".join(failures))
        return results
