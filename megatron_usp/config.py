"""USPConfig: what the attention layers of one ulysses x ring grid share, validated once, where it is built.

The standalone engine builds one per :func:`.usp.usp_attn` call (degrees from the groups it is handed); the
megatron-core grid builds one in :func:`.megatron.grid.initialize_model_parallel`, from keyword arguments, or from
Megatron's parsed flags through :meth:`USPConfig.from_args` (errors then name the flags); every ``USPAttention``
of the grid reads it. Nothing downstream validates these settings again.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from .groups import check_degree
from .kernels import check_backend_name
from .layout import RING_IMPL_TABLE, check_document_layout, check_ring_impl
from .mqsp import check_micro_q

# the Megatron / trainer flag of each field (from_args reports errors by them)
FLAGS = {"ulysses_degree": "--ulysses-degree", "ring_degree": "--ring-degree", "ring_impl": "--usp-ring-impl",
         "backend": "--usp-attn-backend", "micro_q": "--usp-micro-q", "ulysses_inner": "--usp-ring-inner",
         "check_every": "--usp-check", "document_layout": "--usp-document-layout"}


@dataclass(frozen=True)
class USPConfig:
    """``ulysses_degree`` x ``ring_degree`` ranks, ``ring_impl`` (:data:`.layout.RING_IMPL_TABLE`), the kernel
    ``backend`` name, ``micro_q`` (query rows per MQSP micro-chunk; None: all), ``ulysses_inner`` (Ulysses groups on
    adjacent ranks), ``check_every`` (``--usp-check``: None off, 0 each layer's first call, N also every N-th),
    ``document_layout`` of packed documents (``local``: whole on one ring rank where they fit, ``split``: cut over
    every rank; :mod:`.layout`)."""

    ulysses_degree: int = 1
    ring_degree: int = 1
    ring_impl: str = "zigzag"
    backend: str = "auto"
    micro_q: Optional[int] = None
    ulysses_inner: bool = True
    check_every: Optional[int] = None
    document_layout: str = "local"

    def __post_init__(self):
        check_degree("ulysses_degree", self.ulysses_degree)
        check_degree("ring_degree", self.ring_degree)
        check_ring_impl(self.ring_impl)
        check_backend_name(self.backend)
        check_micro_q(self.micro_q)
        check_document_layout(self.document_layout)
        if not isinstance(self.ulysses_inner, bool):
            raise TypeError(f"ulysses_inner must be a bool, got {type(self.ulysses_inner).__name__}")
        every = self.check_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise ValueError(f"check_every {every!r}: must be None (off), 0 (first call of each layer) or N >= 1 "
                             "(also every N-th call)")

    @property
    def sp_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @classmethod
    def from_args(cls, args: Any) -> "USPConfig":
        """From parsed Megatron-LM / trainer flags (``--ulysses-degree``, ``--ring-degree``, ``--usp-ring-impl``,
        ``--usp-attn-backend``, ``--usp-micro-q``, ``--usp-ring-inner``, ``--usp-check``, ``--usp-document-layout``;
        absent ones take the
        defaults); a bad value raises the dataclass's error with the field's name replaced by its flag."""
        defaults = {f.name: f.default for f in fields(cls)}
        values = dict(
            ulysses_degree=getattr(args, "ulysses_degree", defaults["ulysses_degree"]),
            ring_degree=getattr(args, "ring_degree", defaults["ring_degree"]),
            ring_impl=getattr(args, "usp_ring_impl", defaults["ring_impl"]),
            backend=getattr(args, "usp_attn_backend", defaults["backend"]),
            micro_q=getattr(args, "usp_micro_q", defaults["micro_q"]),
            ulysses_inner=not getattr(args, "usp_ring_inner", False),
            check_every=getattr(args, "usp_check", defaults["check_every"]),
            document_layout=getattr(args, "usp_document_layout", defaults["document_layout"]),
        )
        try:
            config = cls(**values)
        except (ValueError, TypeError) as error:
            message = str(error)
            for name, flag in FLAGS.items():
                if message.startswith(name):
                    message = flag + message[len(name):]
            raise type(error)(message) from None
        if config.micro_q is not None and RING_IMPL_TABLE[config.ring_impl].transport != "pass_q":
            raise ValueError(f"--usp-micro-q {config.micro_q}: needs --usp-ring-impl mqsp (it sets the query rows "
                             "MQSP processes at a time)")
        return config

