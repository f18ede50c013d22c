import importlib.util
import sys
from pathlib import Path

import pytest

from rank_pool import RankPool  # pytest puts this folder (it has no __init__.py) on the path for its conftest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """The script ``tools/<name>.py`` as a module (once; registered as ``name``), without touching ``sys.path``."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]

_pools: dict[int, RankPool] = {}
ERROR_SUMMARY: dict[str, float] = {}


@pytest.fixture(scope="session")
def rank_pool():
    """``rank_pool(world_size)`` -> a RankPool spawned once per world size for the whole session."""

    def get(world_size: int) -> RankPool:
        if world_size not in _pools:
            _pools[world_size] = RankPool(world_size)
        return _pools[world_size]

    yield get
    for pool in _pools.values():
        pool.close()


@pytest.fixture
def fresh_rank_pool():
    """``fresh_rank_pool(world_size)`` -> a RankPool used by one test only. For cases that rebuild megatron-core's
    parallel state: its destroy_model_parallel drops process groups without destroying them, so a long-lived pool
    accumulates gloo groups and every later initialize slows down (measured: 2 s -> 280 s per case)."""
    pools = []

    def get(world_size: int) -> RankPool:
        pools.append(RankPool(world_size))
        return pools[-1]

    yield get
    for pool in pools:
        pool.close()


def record_error(key: str, value: float) -> None:
    ERROR_SUMMARY[key] = max(value, ERROR_SUMMARY.get(key, 0.0))


def pytest_terminal_summary(terminalreporter):
    if ERROR_SUMMARY:
        terminalreporter.section("worst relative error vs float64 reference")
        for key in sorted(ERROR_SUMMARY):
            terminalreporter.write_line(f"{key:40s} {ERROR_SUMMARY[key]:.3e}")
