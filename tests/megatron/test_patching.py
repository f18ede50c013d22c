"""megatron_usp/patching.py: the one ledger of what megatron-usp replaces in other libraries."""
from __future__ import annotations

import types

from megatron_usp import patching


def test_wrap_once_mark_the_original_and_undo_per_owner(monkeypatch):
    monkeypatch.setattr(patching, "_LEDGER", [])
    module = types.SimpleNamespace(f=lambda x: x + 1, g=lambda x: x * 2)
    original_f, original_g = module.f, module.g
    double = lambda original: (lambda x: 2 * original(x))  # noqa: E731
    wrapped = patching.wrap(module, "f", double, owner="a")
    assert module.f(1) == 4 and patching.original_of(module.f) is original_f and patching.is_wrapped(module, "f")
    assert patching.wrap(module, "f", double, owner="a") is wrapped and module.f(1) == 4  # idempotent: not twice
    patching.wrap(module, "g", double, owner="b")
    patching.patch(module, "h", 3, owner="a")  # an attribute the holder lacked
    assert patching.patched("a") == [(module, "f"), (module, "h")]
    patching.undo_all(owner="a")
    assert module.f is original_f and not hasattr(module, "h") and module.g(1) == 4  # b's patch stays
    patching.undo_all()
    assert module.g is original_g and patching.patched() == []


def test_class_attributes_are_restored_to_inheritance(monkeypatch):
    monkeypatch.setattr(patching, "_LEDGER", [])

    class Base:
        def forward(self):
            return "base"

    class Child(Base):
        pass

    patching.wrap(Child, "forward", lambda original: (lambda self: "usp " + original(self)), owner="t")
    assert Child().forward() == "usp base" and Base().forward() == "base"
    patching.undo_all(owner="t")
    assert "forward" not in Child.__dict__ and Child().forward() == "base"


def test_undo_newer_than_restores_what_came_after_a_point(monkeypatch):
    monkeypatch.setattr(patching, "_LEDGER", [])
    module = types.SimpleNamespace(f=1, g=2)
    patching.patch(module, "f", 10, owner="a")
    point = len(patching.patched())
    patching.patch(module, "g", 20, owner="a")
    patching.patch(module, "f", 100, owner="b")
    patching.patch(module, "h", 3, owner="b")
    patching.undo_newer_than(point)
    assert (module.f, module.g, hasattr(module, "h")) == (10, 2, False)
    assert patching.patched() == [(module, "f")]
