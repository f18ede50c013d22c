"""argparse ``type=`` functions for numeric command-line flags: a bad value (0 where it must be positive, a
negative, ``nan``, a non-number, an empty list) is refused by argparse itself, before anything runs, with a message
that names the flag ("argument --num-layers: must be a positive integer, got '0'") and exit status 2."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(text: str, kind: type, description: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
    return value


def _bounded(kind: type, description: str, accept: Callable) -> Callable[[str], object]:
    def parse(text: str):
        value = _number(text, kind, description)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
        return value

    parse.__name__ = description.replace(" ", "_")
    parse.accepts_zero = accept(kind(0))  # what tests/tools/test_flags.py reads to build its table of bad values
    return parse


positive_int = _bounded(int, "a positive integer", lambda value: value >= 1)
nonnegative_int = _bounded(int, "an integer >= 0", lambda value: value >= 0)
positive_float = _bounded(float, "a positive finite number", lambda value: value > 0)
nonnegative_float = _bounded(float, "a finite number >= 0", lambda value: value >= 0)
adam_beta = _bounded(float, "a number in [0, 1)", lambda value: 0 <= value < 1)


def _like(parse: Callable, item: Callable) -> Callable:
    """``parse`` marked as taking 0 exactly when ``item`` does (what the flag-table tests read)."""
    if hasattr(item, "accepts_zero"):
        parse.accepts_zero = item.accepts_zero
    return parse


def comma_list(item: Callable[[str], object]) -> Callable[[str], list]:
    """``a,b,c`` -> ``[item(a), item(b), item(c)]``; an empty list or an empty item is refused."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not text.strip() or any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of values, got {text!r}")
        return [item(part) for part in parts]

    parse.__name__ = f"list_of_{getattr(item, '__name__', 'values')}"
    return _like(parse, item)


def keyword_or(keyword: str, item: Callable[[str], object], value: object) -> Callable[[str], object]:
    """``keyword`` -> ``value``; anything else -> ``item(text)``."""

    def parse(text: str):
        if text.strip().lower() == keyword:
            return value
        try:
            return item(text)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(str(error).replace(", got", f" or '{keyword}', got", 1)) from None

    parse.__name__ = f"{keyword}_or_{getattr(item, '__name__', 'value')}"
    return _like(parse, item)


def auto_or(item: Callable[[str], object]) -> Callable[[str], object]:
    """``auto`` -> ``"auto"``; anything else -> ``item(text)``."""
    return keyword_or("auto", item, "auto")


def none_or(item: Callable[[str], object]) -> Callable[[str], object]:
    """``none`` -> None; anything else -> ``item(text)``."""
    return keyword_or("none", item, None)


def one_of(choices) -> Callable[[str], str]:
    """A name among ``choices`` (for items of a comma-separated list; a single flag uses argparse's choices)."""
    choices = tuple(choices)

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    parse.__name__ = "name"
    return parse
