"""The one ledger of what megatron-usp replaces inside other libraries (megatron-core, Megatron-LM, torch).

Every replacement goes through :func:`patch` (set a value) or :func:`wrap` (replace a function by a wrapper of its
original); each is recorded under its owner so :func:`undo_all` restores exactly what that owner changed, newest
first. A wrapper carries its original under one marker attribute, ``__usp_original__`` (:func:`original_of`), so a
second install wraps the original again instead of wrapping the wrapper, and tests can reach what was replaced.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

MARKER = "__usp_original__"
_MISSING = object()
_LEDGER: list[tuple[str, Any, str, Any]] = []  # (owner, holder, attribute, previous value or _MISSING)


def original_of(function: Any) -> Any:
    """What ``function`` wraps (itself when it is not a megatron-usp wrapper)."""
    while hasattr(function, MARKER):
        function = getattr(function, MARKER)
    return function


def mark(wrapper: Callable, original: Callable) -> Callable:
    """Record on ``wrapper`` the ``original`` it replaces (returns ``wrapper``)."""
    setattr(wrapper, MARKER, original)
    return wrapper


def is_wrapped(holder: Any, name: str) -> bool:
    return hasattr(getattr(holder, name, None), MARKER)


def patch(holder: Any, name: str, value: Any, *, owner: str) -> None:
    """``holder.name = value``, recorded for :func:`undo_all` (an attribute ``holder`` lacked is deleted again)."""
    _LEDGER.append((owner, holder, name, holder.__dict__.get(name, _MISSING) if isinstance(holder, type)
                    else getattr(holder, name, _MISSING)))
    setattr(holder, name, value)


def wrap(holder: Any, name: str, make: Callable[[Callable], Callable], *, owner: str) -> Callable:
    """Replace ``holder.name`` by ``make(original)`` (marked with its original), once: an attribute already wrapped
    is left as it is. Returns the attribute now in place."""
    current = getattr(holder, name)
    if hasattr(current, MARKER):
        return current
    wrapper = mark(make(current), current)
    patch(holder, name, wrapper, owner=owner)
    return wrapper


def undo_all(owner: Optional[str] = None) -> None:
    """Restore what ``owner`` (None: every owner) patched, newest first."""
    kept = []
    while _LEDGER:
        entry = _LEDGER.pop()
        who, holder, name, previous = entry
        if owner is not None and who != owner:
            kept.append(entry)
            continue
        _restore(holder, name, previous)
    _LEDGER.extend(reversed(kept))


def undo_newer_than(count: int) -> None:
    """Restore every patch made after the first ``count`` live ones (``len(patched())`` taken before), newest first:
    a process that runs one case after another (a test's rank pool) starts each from the same state."""
    while len(_LEDGER) > count:
        _restore(*_LEDGER.pop()[1:])


def _restore(holder: Any, name: str, previous: Any) -> None:
    if previous is _MISSING:
        if hasattr(holder, name):
            delattr(holder, name)
    else:
        setattr(holder, name, previous)


def patched(owner: Optional[str] = None) -> list[tuple[Any, str]]:
    """``(holder, attribute)`` of every live patch of ``owner`` (None: all), oldest first."""
    return [(holder, name) for who, holder, name, _ in _LEDGER if owner is None or who == owner]
