"""USPConfig (megatron_usp/config.py): the one place the USP settings are validated."""
from __future__ import annotations

import argparse

import pytest

from megatron_usp.config import USPConfig


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(ulysses_degree=0), ValueError, "ulysses_degree must be >= 1"),
    (dict(ring_degree=2.0), TypeError, "ring_degree must be an int"),
    (dict(ring_impl="spiral"), ValueError, "unknown ring_impl"),
    (dict(backend="cuda_magic"), ValueError, "unknown attention backend"),
    (dict(micro_q=0), ValueError, "micro_q must be a positive int"),
    (dict(ulysses_inner="yes"), TypeError, "ulysses_inner must be a bool"),
    (dict(check_every=-1), ValueError, "check_every -1"),
    (dict(check_every=True), ValueError, "check_every True"),
])
def test_bad_settings_are_refused_where_they_are_built(kwargs, error, words):
    with pytest.raises(error, match=words):
        USPConfig(**kwargs)


def test_from_args_names_the_flags():
    args = argparse.Namespace(ulysses_degree=2, ring_degree=2, usp_ring_impl="mqsp", usp_attn_backend="auto",
                              usp_micro_q=64, usp_ring_inner=True, usp_check=0)
    assert USPConfig.from_args(args) == USPConfig(2, 2, "mqsp", "auto", 64, False, 0)
    assert USPConfig.from_args(argparse.Namespace()) == USPConfig()  # flags absent: the defaults
    for change, words in ((dict(ulysses_degree=0), "--ulysses-degree must be >= 1"),
                          (dict(usp_micro_q=0), "--usp-micro-q must be a positive int"),
                          (dict(usp_check=-1), "--usp-check -1"),
                          (dict(usp_ring_impl="zigzag"), "--usp-micro-q 64: needs --usp-ring-impl mqsp")):
        with pytest.raises(ValueError, match=words):
            USPConfig.from_args(argparse.Namespace(**{**vars(args), **change}))
