"""Crash-safe megatron-core ``dist_checkpointing`` checkpoints of the trainer (``--save`` / ``--load``): written
under ``iter_N.partial``, renamed when every rank is done, then named in the tracker file; reloadable under another
TP, PP, ulysses/ring degree or ring_impl (the model must match)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"
# Arguments that fix the model's parameters: a checkpoint only loads into the same values.
MODEL_SHAPE_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "vocab_size", "max_position_embeddings", "tensor_model_parallel_size", "swiglu", "normalization",
                    "disable_bias_linear", "num_experts", "moe_ffn_hidden_size")


def checkpoint_dir(directory: str, iteration: int) -> Path:
    return Path(directory) / f"iter_{iteration:07d}"


# The distributed optimizer's state in the checkpoint: one tensor per parameter in model space, so it reloads under
# another DP (u, r, TP and PP change DP too) and TP / PP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_keys(model: list) -> list[str]:
    """As Megatron-LM's checkpoints: "model", or "model0", "model1", ... for virtual pipeline chunks. The tensors'
    own keys are global (layer numbers included), so a checkpoint reloads across virtual stages too."""
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _sharded_state(model: list, optimizer, is_loading: bool) -> dict:
    state = {key: chunk.module.sharded_state_dict() for key, chunk in zip(_model_keys(model), model)}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return state


def save_checkpoint(args, iteration: int, model, optimizer, scheduler) -> None:
    """A megatron-core ``dist_checkpointing`` checkpoint (torch_dist: every rank writes its shards) in
    ``SAVE/iter_N``. Crash-safe: written under ``iter_N.partial``, renamed to ``iter_N`` once every rank is done,
    and only then named in the tracker file (replaced atomically): a run killed mid-write leaves the tracker on
    the last complete checkpoint."""
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(args.save, iteration)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing it
        partial.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state.update(iteration=iteration, scheduler=scheduler.state_dict(),
                 model_shape={name: getattr(args, name) for name in MODEL_SHAPE_ARGS},
                 grid={"ulysses_degree": args.ulysses_degree, "ring_degree": args.ring_degree,
                       "usp_ring_impl": args.usp_ring_impl, "tensor_model_parallel_size": args.tensor_model_parallel_size,
                       "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
                       "virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
                       "use_distributed_optimizer": args.use_distributed_optimizer})
    dist_checkpointing.save(state, str(partial), content_metadata=OPTIMIZER_METADATA)
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():  # the same iteration saved again: the new copy replaces it
            shutil.rmtree(final)
        os.replace(partial, final)
        tracker = Path(args.save) / CHECKPOINT_TRACKER
        tracker.with_suffix(".tmp").write_text(f"{iteration}\n")
        os.replace(tracker.with_suffix(".tmp"), tracker)
        print(f" saved checkpoint at iteration {iteration} to {args.save}", flush=True)
    dist.barrier()


def load_checkpoint(args, model, optimizer, scheduler) -> int:
    """Load the latest checkpoint under ``--load`` (or ``--ckpt-step``); returns its iteration, 0 when there is
    none yet. TP, PP, ulysses/ring degrees and ring_impl may differ from the saving run's; the model may not."""
    from megatron.core import dist_checkpointing

    tracker = Path(args.load) / CHECKPOINT_TRACKER
    if args.ckpt_step is not None:
        iteration = args.ckpt_step
    elif tracker.is_file():
        iteration = int(tracker.read_text().strip())
    else:  # as Megatron: --load with nothing saved yet (first run of a requeued job) starts from scratch
        if dist.get_rank() == 0:
            print(f" WARNING: --load {args.load} has no {CHECKPOINT_TRACKER}; starting from random weights",
                  flush=True)
        return 0
    directory = checkpoint_dir(args.load, iteration)
    # iter_N exists only once every rank finished writing it (renamed from iter_N.partial); its metadata.json is
    # dist_checkpointing's own mark of a checkpoint (common.pt is not: megatron-core 0.19 keeps the common state
    # elsewhere)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        raise ValueError(f"--load {args.load}: no complete checkpoint for iteration {iteration} ({directory})")
    common = dist_checkpointing.load_common_state_dict(str(directory))
    for name, saved in common["model_shape"].items():
        if name != "tensor_model_parallel_size" and getattr(args, name) != saved:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--load {args.load}: the checkpoint has {flag} {saved}, this run {getattr(args, name)}")
    grid = common["grid"]
    if grid["use_distributed_optimizer"] != args.use_distributed_optimizer:
        flag = "--use-distributed-optimizer" if grid["use_distributed_optimizer"] else "--no-use-distributed-optimizer"
        raise ValueError(f"--load {args.load}: the checkpoint's optimizer state was saved with {flag}; resume with it")
    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(directory))
    for key, chunk in zip(_model_keys(model), model):
        chunk.module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if dist.get_rank() == 0:
        print(f" loaded checkpoint at iteration {iteration} from {args.load} (saved with TP "
              f"{grid['tensor_model_parallel_size']} PP {grid['pipeline_model_parallel_size']} ulysses "
              f"{grid['ulysses_degree']} x ring {grid['ring_degree']} {grid['usp_ring_impl']})", flush=True)
    return iteration
