"""CPU stand-ins for the CUDA calls of megatron-core and Megatron-LM: every one in this module.

Nothing here is used when CUDA is available (:func:`install` returns ``[]``, :func:`enable_cpu_mode` ``False``, and
neither changes anything). Two sets:

* :func:`install` (:data:`STANDINS`, below): what Megatron-LM's training loop needs on CPU/gloo; the rehearsal
  (:mod:`megatron_usp.rehearsal`: Megatron-LM's ``pretrain_gpt.py`` on CPU) installs all of them, the trainer
  (``megatron_usp.train``) and CPU tests only :data:`CORE_STANDINS` (``install(megatron_lm=False)``).
* :func:`enable_cpu_mode` (opt-in, public as ``megatron_usp.megatron.enable_cpu_mode``; :func:`disable_cpu_mode`
  undoes it): just enough for a megatron-core GPTModel built from the USP specs to run on CPU/gloo.
  RotaryEmbedding moves ``inv_freq`` to ``torch.cuda.current_device()`` on first use (in ``get_emb`` from 0.14, in
  ``forward`` before): during that call the current device reads as the CPU. ``get_pos_emb_on_this_cp_rank`` pins
  memory and calls ``.cuda()``: replaced by the USP RoPE hook (``rope.install_rope_hook``), which
  ``initialize_model_parallel`` installs on every device. Megatron's local ``DotProductAttention`` allocates CUDA
  buffers: USP specs replace it.

Not stand-ins and not here: megatron-core's distributed-optimizer load gaps (over torch's Adam, which CPU runs use, and
in fp32) are closed by ``megatron_lm.install()``, which the patched script calls, on every device
(:mod:`.optimizer_load`); the rehearsal's baseline references (:mod:`megatron_usp.rehearsal.references`).

The stand-ins of :func:`install` (:data:`STANDINS` holds the same list, printed by the rehearsal's launcher). None
changes what the model computes from its inputs and weights: each maps a device, a stream, an event, a memory query,
a compiler or an RNG *location* to the CPU. (Random draws come from one CPU generator where a GPU run has a CPU and a
CUDA one: the initial weights are not a GPU run's, but they are the same in every CPU run compared.)

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
``moe-router-without-te``
    megatron-core's MoE router gating (``moe_utils.RouterGatingLinearFunction``, 0.16) tests
    ``te_general_gemm is not None``, a name ``moe_utils`` binds only when Transformer Engine imports: without TE
    every MoE forward raises ``NameError``. Where the name is missing it is bound to None, so the router takes its
    own torch matmul path (the same math).
``inference-linears-without-te``
    Megatron-LM main's ``tensor_parallel.inference_layers`` subclasses TE's linears, placeholders without TE, so
    ``is_inference_column_parallel_linear`` (called by MTP's constructor) raises in ``isinstance``; without TE no
    such layer exists, and it answers False.
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
import subprocess
import sys
import types
from typing import Any, Callable, Dict, List

import torch
from torch.overrides import TorchFunctionMode

from ..patching import patch, undo_all, wrap

STANDINS: Dict[str, str] = {
    "cuda-to-cpu": "device='cuda'/int/torch.device('cuda') -> cpu in every torch call; Tensor.cuda()/pin_memory() "
                   "return the tensor; pin_memory=True -> False; torch.cuda.current_device() is the CPU during "
                   "backward (the mode is off there); all_to_all_single split sizes given as tensors -> lists "
                   "(MoE's dispatcher makes them numpy only off CUDA tensors)",
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
    "moe-router-without-te": "moe_utils.te_general_gemm = None where TE never bound it: the MoE router's "
                             "`te_general_gemm is not None` test raised NameError; it takes its torch matmuls",
    "inference-linears-without-te": "is_inference_column_parallel_linear -> False where the inference linears "
                                    "subclass TE placeholders (Megatron-LM main; MTP's constructor calls it)",
    "helpers-cpp-build": "compile_helpers runs make with this interpreter's pybind11 includes and suffix",
}

_SCRIPTS: List[str] = []  # the scripts the rehearsal's launcher runs as __main__ (register_main_script)
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
def _current_cuda_device_is_cpu():
    """``torch.cuda.current_device()`` reads as the CPU while the block runs."""
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.current_device = original


class CudaToCpu(TorchFunctionMode):
    """The ``cuda-to-cpu`` and ``tensor-type-names`` stand-ins."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            # a mode is off while its handler runs, so the whole backward pass runs without it: backward functions
            # that allocate on torch.cuda.current_device() (sequence parallelism's gather buffers) get the CPU
            with _current_cuda_device_is_cpu():
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


def _split_sizes_as_lists(original: Callable) -> Callable:
    """``all_to_all_single`` taking tensor split sizes: MoE's alltoall dispatcher keeps them as tensors and makes
    them numpy arrays only off CUDA tensors (``moe_utils.maybe_move_tensor_to_cpu``); a CPU tensor is no list of
    ints for c10d. Patched on ``torch.distributed`` (the backward runs outside the mode)."""
    @functools.wraps(original)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if torch.is_tensor(output_split_sizes):
            output_split_sizes = output_split_sizes.tolist()
        if torch.is_tensor(input_split_sizes):
            input_split_sizes = input_split_sizes.tolist()
        return original(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    return all_to_all_single


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


def register_main_script(path: str | os.PathLike) -> None:
    """``path`` runs as ``__main__`` under ``runpy`` (the rehearsal's launcher): spawned children do not re-run it
    (``spawn-children``)."""
    _SCRIPTS.append(os.path.abspath(path))


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
                 "no-kernel-compilation", "mla-without-te", "moe-router-without-te", "inference-linears-without-te")
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
    _moe_router_without_te()
    _inference_linears_without_te()
    # cuda-to-cpu, tensor-type-names
    _patch(torch.distributed, "all_to_all_single", _split_sizes_as_lists(torch.distributed.all_to_all_single))
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
    try:
        import megatron.legacy.fused_kernels as fused_kernels
    except ImportError:  # Megatron-LM 0.19+ has no megatron.legacy: nothing to build
        fused_kernels = None
    if fused_kernels is not None:
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


def _moe_router_without_te() -> bool:
    """The ``moe-router-without-te`` stand-in; True when it applied. megatron-core's MoE router gating
    (``moe_utils.RouterGatingLinearFunction``) tests ``te_general_gemm is not None``, a name bound only when
    Transformer Engine imports (``NameError`` without TE): bound to None, the router takes its own torch matmuls."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if "te_general_gemm" in vars(moe_utils):
        return False
    _patch(moe_utils, "te_general_gemm", None)
    return True


def _inference_linears_without_te() -> bool:
    """The ``inference-linears-without-te`` stand-in; True when it applied. Where megatron-core has
    ``tensor_parallel.inference_layers`` (Megatron-LM main, 0.20 dev) its inference linears subclass TE's, which are
    placeholders without TE, and ``is_inference_column_parallel_linear`` (MTP's constructor calls it) raises in
    ``isinstance``: without TE no such layer can exist, so it answers False (patched where MTP imported it too)."""
    try:
        import megatron.core.tensor_parallel.inference_layers as layers
    except ImportError:
        return False
    name = "is_inference_column_parallel_linear"
    classes = [getattr(layers, cls, None) for cls in ("InferenceColumnParallelLinear",
                                                     "InferenceLayerNormColumnParallelLinear")]
    if not hasattr(layers, name) or all(isinstance(cls, type) for cls in classes):
        return False
    import megatron.core.transformer.multi_token_prediction as mtp

    for holder in (layers, mtp):
        if hasattr(holder, name):
            _patch(holder, name, lambda module: False)
    return True


def uninstall() -> None:
    """Undo :func:`install` (for tests); torch.compile stays off and the triton stand-in module stays."""
    while _MODE:
        _MODE.pop().__exit__(None, None, None)
    _LM_INSTALLED.clear()
    undo_all(owner=__name__)


# ---------------------------------------------------------------------------------------------- enable_cpu_mode

_CPU_MODE_OWNER = f"{__name__}.enable_cpu_mode"  # not install()'s: each undoes only its own patches


def _on_cpu(original):
    @functools.wraps(original)
    def on_cpu(self, *args, **kwargs):
        with _current_cuda_device_is_cpu():
            return original(self, *args, **kwargs)

    return on_cpu


def enable_cpu_mode() -> bool:
    """Apply the CPU patches a megatron-core GPTModel needs (idempotent; :func:`disable_cpu_mode` undoes them).
    Returns True when they are active, False on a CUDA machine."""
    if torch.cuda.is_available():
        return False
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    method = "get_emb" if hasattr(RotaryEmbedding, "get_emb") else "forward"  # feature, not version
    wrap(RotaryEmbedding, method, _on_cpu, owner=_CPU_MODE_OWNER)
    return True


def disable_cpu_mode() -> None:
    """Undo :func:`enable_cpu_mode`."""
    undo_all(owner=_CPU_MODE_OWNER)
