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

_pools: dict[tuple[int, bool], RankPool] = {}
ERROR_SUMMARY: dict[str, float] = {}


def _session_pool(world_size: int, isolated: bool) -> RankPool:
    if (world_size, isolated) not in _pools:
        _pools[world_size, isolated] = RankPool(world_size, isolated=isolated)
    return _pools[world_size, isolated]


@pytest.fixture(scope="session")
def rank_pool():
    """``rank_pool(world_size)`` -> a RankPool spawned once per world size for the whole session; cases may keep
    what they build (cached USP groups) for the next."""
    yield lambda world_size: _session_pool(world_size, isolated=False)
    for pool in _pools.values():
        pool.close()


@pytest.fixture(scope="session")
def isolated_rank_pool(rank_pool):  # rank_pool's teardown closes these pools too
    """``isolated_rank_pool(world_size)`` -> a session RankPool that undoes each case: the process groups it created
    are destroyed and its patches (CPU stand-ins, hooks) undone. For cases that rebuild megatron-core's parallel
    state: its destroy_model_parallel drops process groups without destroying them, and a pool that kept them
    would slow down with every case (measured: 2 s -> 280 s per case); spawning a fresh pool per test cost ~14 s."""
    return lambda world_size: _session_pool(world_size, isolated=True)


def record_error(key: str, value: float) -> None:
    ERROR_SUMMARY[key] = max(value, ERROR_SUMMARY.get(key, 0.0))


def pytest_terminal_summary(terminalreporter):
    if ERROR_SUMMARY:
        terminalreporter.section("worst relative error vs float64 reference")
        for key in sorted(ERROR_SUMMARY):
            terminalreporter.write_line(f"{key:40s} {ERROR_SUMMARY[key]:.3e}")
