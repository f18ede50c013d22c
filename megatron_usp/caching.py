"""What the engine keeps between calls: layouts, schedules, index tensors, built once and shared.

A cached value outlives the call that built it, so it must not carry that call's autograd state: a tensor made
under ``torch.inference_mode()`` (an evaluation loop) cannot be saved for backward by a later training call
("Inference tensors cannot be saved for backward"), and one made with grad on would join the caller's graph. Every
cached value is therefore built with inference mode and grad mode off (:func:`plain_tensors`), whatever mode the
call that first needs it runs in.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def plain_tensors() -> Iterator[None]:
    """Tensors made inside are ordinary tensors: not inference tensors, not part of any autograd graph."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def built_plain(function: Callable[..., T]) -> Callable[..., T]:
    """``function`` run under :func:`plain_tensors` (for builders whose result is kept)."""

    @functools.wraps(function)
    def build(*args, **kwargs):
        with plain_tensors():
            return function(*args, **kwargs)

    return build


class cached_plain_property(functools.cached_property):
    """``functools.cached_property`` whose value is built under :func:`plain_tensors`."""

    def __init__(self, function):
        super().__init__(built_plain(function))


def plain_lru_cache(maxsize: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """``functools.lru_cache(maxsize)`` whose entries are built under :func:`plain_tensors`."""
    return lambda function: functools.lru_cache(maxsize=maxsize)(built_plain(function))


def layout_cache(function: Callable[..., T]) -> Callable[..., T]:
    """Memoize a layout / schedule builder with a positional argument ``cu_seqlens`` (a tuple, or None): layouts
    depend only on the grid and length, so they are built once, not once per layer per step. Keys with packed
    documents change with every batch and their schedules hold per-piece indices: only the last few batches' are
    kept (a batch's layers share one; a pipeline has a few micro-batches in flight). ``cache_clear()`` empties
    both."""
    rows = plain_lru_cache(256)(function)
    documents = plain_lru_cache(8)(function)
    where = list(inspect.signature(function).parameters).index("cu_seqlens")

    @functools.wraps(function)
    def cached(*args):
        return (rows if args[where] is None else documents)(*args)

    def cache_clear() -> None:
        rows.cache_clear()
        documents.cache_clear()

    cached.cache_clear = cache_clear
    return cached
