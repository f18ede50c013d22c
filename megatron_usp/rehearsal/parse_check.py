"""The parse check (``tools/check_megatron_patch.py``): with a patched Megatron-LM checkout first on PYTHONPATH,
import its ``pretrain_gpt.py`` (module level) and run what its ``__main__`` runs before training: ``install()``,
Megatron-LM's ``parse_args`` with ``with_usp_args`` (no argparse conflicts), ``validate_usp_args`` (CP = u*r), then
Megatron-LM's own ``validate_args`` through the install() wrapper (DP = world / (TP*PP*CP)). Prints
``PARSE CHECK OK`` at the end.

    PYTHONPATH=MEGATRON_DIR:DEPS:REPO WORLD_SIZE=8 RANK=0 python -m megatron_usp.rehearsal.parse_check \\
        --ulysses-degree 2 --ring-degree 2 <megatron args>

Two CPU stand-ins, printed when used: ``batch_invariant_kernels`` (imports triton) is replaced by an empty module
when triton is absent, before anything imports Megatron; Megatron's ``get_device_arch_version`` (reads CUDA)
returns 9.
"""
import contextlib
import importlib.util
import io
import sys
import types


def main() -> None:
    if importlib.util.find_spec("triton") is None:
        name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
        stub = types.ModuleType(name)
        for fn in ("set_batch_invariant_mode", "is_batch_invariant_mode_enabled", "disable_batch_invariant_mode",
                   "enable_batch_invariant_mode"):
            setattr(stub, fn, lambda *a, **k: None)
        sys.modules[name] = stub
        print("stand-in: triton absent, batch_invariant_kernels replaced by an empty module")
    import megatron.core
    import megatron.training.arguments as arguments

    from megatron_usp.megatron import megatron_lm, validate_usp_args
    print("megatron.core from", megatron.core.__file__)
    print("megatron.training from", arguments.__file__)
    import pretrain_gpt  # the patched script's module level (its __main__ block does not run)
    assert pretrain_gpt.get_batch_on_this_cp_rank.__usp_original__ is not None
    print("import pretrain_gpt: ok, get_batch_on_this_cp_rank is the USP hook around",
          pretrain_gpt.get_batch_on_this_cp_rank.__usp_original__.__module__)
    sys.argv = ["pretrain_gpt.py"] + sys.argv[1:]
    print("argv:", " ".join(sys.argv[1:]))
    megatron_lm.install()
    args = arguments.parse_args(extra_args_provider=megatron_lm.with_usp_args(None))
    print("parse_args: ok, no argparse conflicts; ulysses", args.ulysses_degree, "ring", args.ring_degree,
          "ring impl", args.usp_ring_impl, "cp before validation", args.context_parallel_size)
    validate_usp_args(args)
    assert args.context_parallel_size == 4, args.context_parallel_size
    print("validate_usp_args(args).context_parallel_size =", args.context_parallel_size)
    arguments.get_device_arch_version = lambda: 9
    print("stand-in: get_device_arch_version() -> 9 (no CUDA here)")
    import megatron.training.initialize as initialize

    # the name initialize_megatron calls (Megatron-LM <= 0.16), else arguments' own (0.19: parse_and_validate_args)
    holder = initialize if callable(getattr(initialize, "validate_args", None)) else arguments
    with contextlib.redirect_stdout(io.StringIO()):  # Megatron prints every argument
        holder.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    print("Megatron-LM validate_args via install(): world", args.world_size, "cp", args.context_parallel_size,
          "dp", args.data_parallel_size)
    assert args.data_parallel_size == args.world_size // 4
    print("PARSE CHECK OK")


if __name__ == "__main__":
    main()
