"""Rehearse a Megatron-LM checkout's ``pretrain_gpt.py`` on CPU/gloo: every CUDA stand-in in this one module.

    PYTHONPATH=MEGATRON_DIR:DEPS:REPO torchrun --nproc-per-node 4 -m megatron_usp.megatron.megatron_lm_cpu \\
        MEGATRON_DIR/pretrain_gpt.py --distributed-backend gloo <megatron args>

Not stand-ins and not here: megatron-core's distributed-optimizer load gaps (over torch's Adam, which CPU runs use, and
in fp32) are closed by ``megatron_lm.install()``, which the patched script calls, on every device
(:mod:`.optimizer_load`).

``--thd-reference-attention`` before the script path gives a run *without* USP a THD (packed, ``--sft``) attention
on CPU (:func:`install_thd_reference_attention`: a reference for baselines, not a stand-in);
``--mla-reference-attention`` lets Megatron's local attention take multi-latent attention's q/k and v head dims
(:func:`install_mla_reference_attention`, likewise).

The launcher installs the stand-ins (:func:`install`), then runs the script as ``__main__`` (``runpy``), so the
training loop, DDP, optimizers, pipeline schedules, recompute and data pipeline are Megatron-LM's own. It is a
rehearsal for the GPU run, not a CPU backend: nothing here is used when CUDA is available (:func:`install` returns
``[]`` and changes nothing). ``tools/check_megatron_patch.py MEGATRON_DIR --train`` drives it.

The stand-ins (:data:`STANDINS` holds the same list, printed by the launcher). None changes what the model computes
from its inputs and weights: each maps a device, a stream, an event, a memory query, a compiler or an RNG *location*
to the CPU. (Random draws come from one CPU generator where a GPU run has a CPU and a CUDA one: the initial weights
are not a GPU run's, but they are the same in every CPU run compared.)

``cuda-to-cpu``
    A ``torch.overrides.TorchFunctionMode`` (the whole run is inside it): ``device="cuda"`` / ``"cuda:N"`` / an int
    index / ``torch.device("cuda")`` in any torch call and ``Tensor.to(...)`` become the CPU, so does the device of
    a ``with torch.device(torch.cuda.current_device()):`` block; ``Tensor.cuda()``
    and ``Tensor.pin_memory()`` return the tensor; ``pin_memory=True`` becomes ``False``. Megatron allocates on
    ``torch.cuda.current_device()`` everywhere.
``tensor-type-names``
    ``Tensor.type()`` (no argument) answers ``torch.cuda.FloatTensor`` etc. for CPU tensors: ``clip_grads.py`` and
    the mixed-precision / distributed optimizers assert or branch on those names.
``torch.cuda-runtime``
    ``current_device`` → 0, ``set_device`` / ``synchronize`` / ``empty_cache`` no-ops, ``Stream`` / ``Event`` /
    ``current_stream`` / ``default_stream`` / ``stream(...)`` inert objects (one CPU stream: everything is already
    ordered), memory queries → 0. Megatron calls them on the training path (timers, DDP buckets, logging).
``cuda-rng-is-cpu-rng``
    ``torch.cuda.{manual_seed, get_rng_state, set_rng_state}`` and megatron-core's ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state`` act on the CPU generator (where the tensors are drawn), so the RNG tracker's
    ``add``/``fork`` (weight init, recompute) swap real states instead of queueing lazy CUDA calls that never run.
    The tracker's warning "CPU RNG state changed within GPU RNG context" is filtered: it is by construction here.
``initialize-without-cuda``
    ``initialize_megatron(allow_no_cuda=True)``; inside ``_initialize_distributed`` and ``_set_random_seed``
    ``torch.cuda.device_count()`` reads 1, so Megatron builds its model-parallel groups (the USP grid, through the
    patch) and the RNG tracker, which it skips when no GPU is counted.
``device-arch``
    ``get_device_arch_version()`` → 9 (Hopper): ``validate_args`` reads it whenever TP or CP > 1.
    ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is set (default) for the same check.
``no-kernel-compilation``
    ``fused_kernels.load`` (runs ``nvcc``) is a no-op; ``torch.compile`` (Megatron's ``jit_fuser``) is off
    (``torch._dynamo.config.disable``, ``megatron.core.jit.disable_jit_fuser``), eager kernels compute the same ops.
``warmup-jit-rng``
    ``_warmup_jit_function`` runs under ``torch.random.fork_rng``: it draws tensors of ``seq_length / CP`` rows
    right after seeding, from the CUDA generator on a GPU; here that is the CPU generator, from which
    ``--use-cpu-initialization`` draws the weights, so they would depend on CP (measured without this stand-in:
    u=2 r=2 vs 1 rank differ by 3.4e-3 at iteration 1).
``triton-absent``
    Without triton (CPU wheels), ``megatron.core.transformer.custom_layers.batch_invariant_kernels`` (imported by
    ``megatron.training.initialize``, used only with ``--batch-invariant-mode``) is an empty module.
``spawn-children``
    Processes started with ``spawn`` (``dist_checkpointing``'s async writer starts a ``Manager`` even for a
    synchronous ``--save``) do not re-run the script as ``__mp_main__``: it runs under ``runpy``, so the child would
    import Megatron-LM without the stand-ins (and fail on triton); the Manager only serves a queue.
``mla-without-te``
    megatron-core 0.16 without Transformer Engine puts ``MagicMock`` placeholders where TE's classes are, so
    ``multi_latent_attention.py`` imports them and sets ``HAVE_TE = True``; MLASelfAttention's
    ``isinstance(self.linear_proj, TELinear)`` then raises TypeError. When ``TELinear`` is not a type its
    ``HAVE_TE`` becomes False (the local spec builds no TE layer; the branch only concerns TE fp8 / fp4).
``helpers-cpp-build``
    ``compile_helpers`` runs Megatron's ``make`` with this interpreter's pybind11 includes and extension suffix
    (the Makefile calls ``python3``, which pyenv may resolve to the checkout's ``.python-version``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from torch.overrides import TorchFunctionMode

from ..patching import patch, undo_all

STANDINS: Dict[str, str] = {
    "cuda-to-cpu": "device='cuda'/int/torch.device('cuda') -> cpu in every torch call; Tensor.cuda()/pin_memory() "
                   "return the tensor; pin_memory=True -> False; torch.cuda.current_device() is the CPU during "
                   "backward (the mode is off there)",
    "tensor-type-names": "Tensor.type() answers 'torch.cuda.*Tensor' (clip_grads and optimizers check the names)",
    "torch.cuda-runtime": "current_device -> 0; set_device/synchronize/empty_cache no-ops; inert Stream/Event; "
                          "memory queries -> 0",
    "cuda-rng-is-cpu-rng": "torch.cuda manual_seed/get_rng_state/set_rng_state and megatron-core's "
                           "_get/_set_cuda_rng_state act on the CPU generator",
    "initialize-without-cuda": "initialize_megatron(allow_no_cuda=True); device_count() reads 1 inside "
                               "_initialize_distributed and _set_random_seed (groups + RNG tracker get built)",
    "device-arch": "get_device_arch_version() -> 9; CUDA_DEVICE_MAX_CONNECTIONS=1",
    "no-kernel-compilation": "fused_kernels.load no-op; torch.compile / jit_fuser off",
    "warmup-jit-rng": "_warmup_jit_function under torch.random.fork_rng (its draws would make init depend on CP)",
    "triton-absent": "batch_invariant_kernels (imports triton; --batch-invariant-mode only) is an empty module",
    "spawn-children": "spawned children (dist_checkpointing's Manager) do not re-run the script without the stand-ins",
    "mla-without-te": "multi_latent_attention.HAVE_TE = False when its TELinear is a MagicMock placeholder (no TE): "
                      "isinstance(linear_proj, TELinear) would raise",
    "helpers-cpp-build": "compile_helpers runs make with this interpreter's pybind11 includes and suffix",
}

_SCRIPTS: List[str] = []  # the script main() runs as __main__
_MODE: List[TorchFunctionMode] = []
_LM_INSTALLED: List[bool] = []


# ---------------------------------------------------------------------------------------------- cuda-to-cpu


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # an index means a CUDA device


def _cuda_type_name(name: str) -> str:
    return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)


@contextlib.contextmanager
def _current_device_is_cpu():
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.current_device = current_device


class CudaToCpu(TorchFunctionMode):
    """The ``cuda-to-cpu`` and ``tensor-type-names`` stand-ins."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            # a mode is off while its handler runs, so the whole backward pass runs without it: backward functions
            # that allocate on torch.cuda.current_device() (sequence parallelism's gather buffers) get the CPU
            with _current_device_is_cpu():
                return func(*args, **kwargs)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cuda_type_name(func(*args))
        if func is torch.device and args and _is_cuda_device(args[0]):  # ``with torch.device(0):`` (YaRN RoPE)
            return torch.device("cpu")
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- torch.cuda


class _Stream:
    """One CPU stream: work is already ordered, so waiting and recording do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _noop(*args, **kwargs):
    return None


def _returns(value: Any) -> Callable:
    """A new function object per stand-in: torch._dynamo's trace rules reject one object under two torch names."""

    def stand_in(*args, **kwargs):
        return value() if callable(value) else value

    return stand_in


_CUDA_RUNTIME: Dict[str, Callable[[], Any]] = {
    "current_device": lambda: _returns(0),
    "set_device": lambda: _returns(None),
    "synchronize": lambda: _returns(None),
    "empty_cache": lambda: _returns(None),
    "Stream": lambda: type("Stream", (_Stream,), {}),
    "Event": lambda: type("Event", (_Event,), {}),
    "current_stream": lambda: _returns(_Stream),
    "default_stream": lambda: _returns(_Stream),
    "stream": lambda: _returns(contextlib.nullcontext),
    "memory_allocated": lambda: _returns(0),
    "max_memory_allocated": lambda: _returns(0),
    "memory_reserved": lambda: _returns(0),
    "max_memory_reserved": lambda: _returns(0),
    "reset_peak_memory_stats": lambda: _returns(None),
    "reset_max_memory_allocated": lambda: _returns(None),
    "memory_stats": lambda: _returns(dict),
}


class _SameGeneratorWarning(logging.Filter):
    """The tracker warns when the CPU state moves inside ``fork()``; here the CUDA generator *is* the CPU one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_get_rng_state(device: Any = "cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))  # not torch.manual_seed: that calls torch.cuda.manual_seed_all


_CUDA_RNG: Dict[str, Any] = {
    "manual_seed": _cpu_manual_seed,
    "get_rng_state": _cpu_get_rng_state,
    "set_rng_state": _cpu_set_rng_state,
}


# ---------------------------------------------------------------------------------------------- installing


def _patch(holder: Any, name: str, value: Any) -> None:
    patch(holder, name, value, owner=__name__)


def _device_count_reads_one(original: Callable) -> Callable:
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        saved = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.device_count = saved

    return wrapper


def _under_fork_rng(original: Callable) -> Callable:
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return original(*args, **kwargs)

    return wrapper


def _allow_no_cuda(original: Callable) -> Callable:
    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    return initialize_megatron


def helpers_make_command(datasets_dir: str, python: str = sys.executable) -> List[str]:
    """``make`` for megatron/core/datasets/helpers_cpp with ``python``'s pybind11 includes and extension suffix."""
    includes = subprocess.run([python, "-m", "pybind11", "--includes"], capture_output=True, text=True, check=True)
    suffix = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            capture_output=True, text=True, check=True)
    return ["make", "-C", datasets_dir, f"CPPFLAGS={includes.stdout.strip()}", f"LIBEXT={suffix.stdout.strip()}"]


def _compile_helpers() -> None:
    import megatron.core.datasets.utils as dataset_utils

    datasets_dir = os.path.dirname(os.path.abspath(dataset_utils.__file__))
    if subprocess.run(helpers_make_command(datasets_dir)).returncode != 0:
        sys.exit("megatron_lm_cpu: building megatron/core/datasets/helpers_cpp failed (pip install pybind11?)")


def _children_skip_the_script(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_preparation_data(name):
        data = original(name)
        path = data.get("init_main_from_path")
        if path is not None and os.path.abspath(path) in _SCRIPTS:
            del data["init_main_from_path"]
        return data

    return get_preparation_data


CORE_STANDINS = ("cuda-to-cpu", "tensor-type-names", "torch.cuda-runtime", "cuda-rng-is-cpu-rng",
                 "no-kernel-compilation", "mla-without-te")
"""The stand-ins megatron-core alone needs (its DDP, optimizers, pipeline schedules, RNG tracker, checkpointing):
what the trainer (``megatron_usp.train``) installs. The others concern Megatron-LM's ``megatron.training``."""


def install(megatron_lm: bool = True) -> List[str]:
    """Install the stand-ins (idempotent): all of them, or with ``megatron_lm=False`` only :data:`CORE_STANDINS`
    (a megatron-core install has no ``megatron.training`` / ``megatron.legacy``). Returns their names, or ``[]``
    when CUDA is available."""
    if torch.cuda.is_available():
        return []
    if not _MODE:
        _install_core()
    if megatron_lm and not _LM_INSTALLED:
        _install_megatron_lm()
        _LM_INSTALLED.append(True)
    return list(STANDINS) if _LM_INSTALLED else list(CORE_STANDINS)


def _install_core() -> None:
    # no-kernel-compilation: the dynamo switch covers functions torch.compile already wrapped (this package imports
    # megatron.core first), disable_jit_fuser the ones Megatron decorates from now on
    torch._dynamo.config.disable = True
    import megatron.core.jit as jit

    jit.disable_jit_fuser()
    # torch.cuda-runtime and cuda-rng-is-cpu-rng
    for name, make in _CUDA_RUNTIME.items():
        _patch(torch.cuda, name, make())
    for name, value in _CUDA_RNG.items():
        _patch(torch.cuda, name, value)
        _patch(torch.cuda.random, name, value)
    import megatron.core.tensor_parallel.random as tp_random

    _patch(tp_random, "_get_cuda_rng_state", _cpu_get_rng_state)
    _patch(tp_random, "_set_cuda_rng_state", _cpu_set_rng_state)
    logging.getLogger(tp_random.__name__).addFilter(_SameGeneratorWarning())
    # mla-without-te (megatron-core's MLA: the trainer and the tests build it too)
    _mla_without_te()
    # cuda-to-cpu, tensor-type-names
    mode = CudaToCpu()
    mode.__enter__()
    _MODE.append(mode)


def _install_megatron_lm() -> None:
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # triton-absent (before megatron.training imports it)
    if importlib.util.find_spec("triton") is None:
        name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
        stub = types.ModuleType(name)
        for fn in ("set_batch_invariant_mode", "is_batch_invariant_mode_enabled", "disable_batch_invariant_mode",
                   "enable_batch_invariant_mode"):
            setattr(stub, fn, _noop)
        sys.modules.setdefault(name, stub)
    import megatron.legacy.fused_kernels as fused_kernels

    _patch(fused_kernels, "load", _noop)
    # initialize-without-cuda, warmup-jit-rng
    import megatron.training.initialize as initialize
    import megatron.training.training as training

    _patch(initialize, "initialize_megatron", _allow_no_cuda(initialize.initialize_megatron))
    if getattr(training, "initialize_megatron", None) is not None:
        _patch(training, "initialize_megatron", initialize.initialize_megatron)
    for name in ("_initialize_distributed", "_set_random_seed"):
        _patch(initialize, name, _device_count_reads_one(getattr(initialize, name)))
    _patch(initialize, "_warmup_jit_function", _under_fork_rng(initialize._warmup_jit_function))
    # device-arch
    import megatron.training.arguments as arguments
    import megatron.training.utils as training_utils

    for holder in (arguments, training_utils):
        _patch(holder, "get_device_arch_version", lambda: 9)
    # spawn-children
    import multiprocessing.spawn as mp_spawn

    _patch(mp_spawn, "get_preparation_data", _children_skip_the_script(mp_spawn.get_preparation_data))
    # helpers-cpp-build
    import megatron.core.datasets.utils as dataset_utils

    _patch(dataset_utils, "compile_helpers", _compile_helpers)


def _mla_without_te() -> bool:
    """The ``mla-without-te`` stand-in; True when it applied (``TELinear`` a placeholder, not a class)."""
    import megatron.core.transformer.multi_latent_attention as mla

    if getattr(mla, "HAVE_TE", False) and not isinstance(getattr(mla, "TELinear", None), type):
        _patch(mla, "HAVE_TE", False)
        return True
    return False


def uninstall() -> None:
    """Undo :func:`install` (for tests); torch.compile stays off and the triton stand-in module stays."""
    while _MODE:
        _MODE.pop().__exit__(None, None, None)
    _LM_INSTALLED.clear()
    undo_all(owner=__name__)


# ---------------------------------------------------------------------------------------------- launcher


def _check_megatron_source(script: Path) -> None:
    """megatron.core and megatron.training must both come from the checkout that holds ``script``."""
    import megatron.core
    import megatron.training

    checkout = script.resolve().parent
    for module in (megatron.core, megatron.training):
        if checkout not in Path(module.__file__).resolve().parents:
            raise SystemExit(
                f"megatron_lm_cpu: {module.__name__} comes from {module.__file__}, not from {checkout}: put the "
                "checkout first on PYTHONPATH"
            )


# ---------------------------------------------------------------------------------------------- baseline reference

THD_REFERENCE_FLAG = "--thd-reference-attention"


def thd_reference_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, 1, total, total]`` bool mask, True where a query may NOT see a key: other document or a later token.
    Tokens past ``cu_seqlens[-1]`` form one more document."""
    bounds = cu_seqlens.reshape(-1).to(torch.long)
    document = torch.bucketize(torch.arange(total), bounds[1:], right=True)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    same = document[:, None] == document[None, :]
    return ~(causal & same)[None, None]


def install_thd_reference_attention() -> None:
    """NOT a stand-in: a reference for the baseline run of the packed (THD, ``--sft``) case only.

    Megatron's local ``DotProductAttention`` refuses ``packed_seq_params`` (THD needs Transformer Engine, which does
    not run on CPU). Here a THD call ``[t, heads, d]`` becomes one sbhd row ``[t, 1, heads, d]`` with the dense
    per-document causal mask built from ``cu_seqlens_q`` (:func:`thd_reference_mask`): what TE's THD attention
    computes. Refused while USP is active, so it can never serve the run it is compared with. Also hands
    ``get_thd_batch_on_this_cp_rank`` 1-D ``cu_seqlens`` (below)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from . import grid

    original = DotProductAttention.forward

    @functools.wraps(original)
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return original(self, query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        if grid.usp_is_initialized() and grid.get_usp_groups().sp_size > 1:
            raise RuntimeError(f"{THD_REFERENCE_FLAG} is for runs without USP (the baseline)")
        if packed_seq_params.cu_seqlens_q_padded is not None and not torch.equal(
                packed_seq_params.cu_seqlens_q_padded, packed_seq_params.cu_seqlens_q):
            raise NotImplementedError(f"{THD_REFERENCE_FLAG}: padded cu_seqlens")
        mask = thd_reference_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
        out = original(self, query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask, attn_mask_type,
                       attention_bias, None)
        return out.reshape(query.shape[0], -1)  # [t, 1, heads*d] -> [t, heads*d], as the THD path expects

    DotProductAttention.forward = forward

    # Megatron-LM 0.16 hands get_thd_batch_on_this_cp_rank the collated cu_seqlens ([1, documents + 1] at micro-batch
    # 1); its non-fused THD RoPE (rope_utils: ``freqs.size(0) == cu_seqlens[-1]``) needs them 1-D.
    import megatron.core.utils as core_utils

    original_thd_batch = core_utils.get_thd_batch_on_this_cp_rank

    @functools.wraps(original_thd_batch)
    def get_thd_batch_on_this_cp_rank(batch, cu_seqlens, cu_seqlens_padded, max_seqlen, *args, **kwargs):
        def flat(offsets):
            return None if offsets is None else offsets.reshape(-1)

        return original_thd_batch(batch, flat(cu_seqlens), flat(cu_seqlens_padded), max_seqlen, *args, **kwargs)

    core_utils.get_thd_batch_on_this_cp_rank = get_thd_batch_on_this_cp_rank


MLA_REFERENCE_FLAG = "--mla-reference-attention"


def install_mla_reference_attention() -> None:
    """NOT a stand-in: a reference for the baseline run of the multi-latent-attention case only.

    MLASelfAttention builds its core attention with TE's keywords ``k_channels`` (q/k head dim) and ``v_channels``
    (v head dim); megatron-core 0.16's local ``DotProductAttention`` takes neither (TypeError) and sizes its output
    ``kv_channels x heads``. Its forward is already per-head-dim agnostic (``baddbmm`` over q/k's dim, ``bmm`` over
    v's) apart from that output view, and MLA passes its own ``softmax_scale`` (YaRN mscale). Here ``__init__`` takes
    the two keywords and sizes the output ``v_channels x heads``: what TE's attention computes. Refused while USP is
    active, so it can never serve the run it is compared with."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from . import grid

    original = DotProductAttention.__init__

    @functools.wraps(original)
    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        if grid.usp_is_initialized() and grid.get_usp_groups().sp_size > 1:
            raise RuntimeError(f"{MLA_REFERENCE_FLAG} is for runs without USP (the baseline)")
        original(self, *args, **kwargs)
        if k_channels is not None and kwargs.get("softmax_scale") is None:
            raise NotImplementedError(f"{MLA_REFERENCE_FLAG}: k_channels without softmax_scale")
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    DotProductAttention.__init__ = __init__


REFERENCES = {THD_REFERENCE_FLAG: install_thd_reference_attention, MLA_REFERENCE_FLAG: install_mla_reference_attention}
"""Launcher options (before the script path) that give a baseline run (no USP) a reference where Megatron's local
attention has none on CPU."""


USP_PROBE_PREFIX = "megatron_lm_cpu: USP"


def _count_usp_attention_calls() -> Dict[str, int]:
    """Probe (not a stand-in): count USPAttention forwards, so a harness can tell USP really ran."""
    from .attention import USPAttention

    calls = {"forward": 0}
    original = USPAttention.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        calls["forward"] += 1
        return original(self, *args, **kwargs)

    USPAttention.forward = forward
    return calls


MAX_LOGIT_PREFIX = "megatron_lm_cpu: max attention logit"


def _report_max_attention_logit() -> None:
    """Probe (not a stand-in): Megatron-LM sends the max attention logit of --qk-clip / --log-max-attention-logit only
    to TensorBoard / W&B; print what ``clip_qk`` returns after every step (rank 0), so a harness can see it."""
    import megatron.training.training as training

    original = getattr(training, "clip_qk", None)
    if original is None:
        return

    @functools.wraps(original)
    def clip_qk(model, *args, **kwargs):
        value = original(model, *args, **kwargs)
        if os.environ.get("RANK", "0") == "0":
            print(f"{MAX_LOGIT_PREFIX}: {value:.6E}", flush=True)
        return value

    _patch(training, "clip_qk", clip_qk)


def usp_probe_line(calls: int) -> str:
    """One line saying whether USP ran on this rank and on which grid."""
    from . import grid

    if not grid.usp_is_initialized():
        return f"{USP_PROBE_PREFIX} grid: none; attention calls: {calls}"
    groups = grid.get_usp_groups()
    return (f"{USP_PROBE_PREFIX} grid: u={groups.ulysses_degree} r={groups.ring_degree} "
            f"ring_impl={grid.get_usp_ring_impl()}; attention calls: {calls}")


def main(argv: List[str]) -> None:
    argv, references = list(argv), []
    while argv and argv[0] in REFERENCES:
        references.append(argv.pop(0))
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__.split("\n\n")[1])
    script = Path(argv[0])
    if str(script.parent.resolve()) not in sys.path:
        sys.path.insert(0, str(script.parent.resolve()))
    names = install()
    _check_megatron_source(script)
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        print("megatron_lm_cpu stand-ins:" if names else "megatron_lm_cpu: CUDA available, no stand-ins",
              ", ".join(names), flush=True)
    for flag in references:
        REFERENCES[flag]()
        if rank0:
            print(f"megatron_lm_cpu: {flag} (baseline reference, not a stand-in)", flush=True)
    calls = _count_usp_attention_calls()
    _report_max_attention_logit()
    sys.argv = [str(script)] + list(argv[1:])
    _SCRIPTS.append(os.path.abspath(script))
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:  # also when Megatron exits early (--exit-interval)
        if rank0:
            print(usp_probe_line(calls["forward"]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
