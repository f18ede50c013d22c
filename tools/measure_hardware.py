#!/usr/bin/env python
"""Measure what one rank of this machine achieves, as a hardware file for ``tools/plan_usp.py --hardware FILE``.

    .venv/bin/python tools/measure_hardware.py --out runs/hardware_cpu.json            # CPU, 1 thread per rank
    .venv/bin/python tools/measure_hardware.py --device cuda --dtype bf16 --out h100.json

Each number the planner's time model uses is measured here by itself, never fitted to whole-job runs:

* ``gemm_tflops``: a [tokens, hidden] -> [tokens, 4 hidden] linear layer, forward + backward (the layer's GEMMs);
* ``fwd_tflops``, ``bwd_tflops``, ``half_efficiency_tokens``, ``kernel_overhead_us``: the attention kernel
  ``auto`` resolves to (the one the engine runs), square non-causal blocks of L = 128 ... 2048 rows, least squares
  of the relative error of ``t(L) = overhead + 4 h d L (L + L0) / TFLOPS`` (the planner's efficiency curve
  ``L / (L + L0)``); ``causal_fraction``: a causal L x L block's time over the full block's (ideal 0.5);
* ``memory_gbps``: what a layer's
  memory-bound work really achieves (on CPU its GELU / norms are compute-bound, far below a copy): a megatron-core
  GPT layer (3 layers minus 1, halved) at ``--layer-tokens``, less its GEMMs, attention and overhead predicted
  from the figures above, against ``ELEMENTWISE_PASSES`` x its saved activation bytes (megatron_usp.job_cost); a
  plain copy's rate is kept beside it for reference (``copy_gbps``);
* ``optimizer_ns_per_param``: one step of torch's AdamW over 4M fp32 parameters (megatron-core's optimizer without
  Apex / Transformer Engine);
* ``layer_overhead_us``: the same layer on 16 tokens: the framework's fixed cost per layer (module calls, small
  kernels);
* ``intra_node_gbps``, ``intra_latency_us``: two ranks of this machine (gloo on CPU, NCCL on GPU) running the
  collectives a job uses (send/recv, all-gather, reduce-scatter, all-to-all, all-reduce) at 256 KiB - 4 MiB per
  rank, one ``latency + bytes / bandwidth`` fitted to all of them; on CPU ``comm_overlaps_compute`` is false (gloo
  works on the rank's own core).

``--concurrent N`` runs N copies of the compute measurements at once: what one rank achieves while the machine's
other ranks work too (on this project's 2-core CPU, two busy cores are ~20-30 % slower each than one alone).
Times are medians of repeated calls after a warm-up; each field is the median of ``--rounds`` whole rounds (a shared
machine drifts by tens of percent between minutes; every round is kept in the file). On CPU, ``--threads``
(default 1) is what each rank uses.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_seconds(step, device: torch.device, repeats: int, warmup: int = 2) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_tflops(device, dtype, tokens: int, hidden: int, repeats: int) -> float:
    """A linear layer's forward and backward (3 GEMMs: x W, dy W^T, x^T dy), [tokens, hidden] -> 4 hidden."""
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(4 * hidden, hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, 4 * hidden, device=device, dtype=dtype)

    def step():
        torch.nn.functional.linear(x, weight).backward(dy)

    seconds = median_seconds(step, device, repeats)
    return 3 * 2.0 * tokens * hidden * 4 * hidden / seconds / 1e12


def least_squares(rows: list[list[float]], values: list[float]) -> list[float]:
    """Least squares of relative errors (each row divided by its value): small blocks count as much as big ones."""
    weights = torch.tensor(values, dtype=torch.float64).unsqueeze(1)
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64) / weights,
                                  torch.ones_like(weights)).solution
    return solution.squeeze(1).tolist()


def attention_fit(device, dtype, heads: int, head_dim: int, lengths: list[int], repeats: int) -> dict:
    """Fit ``t = overhead + b L^2 + c L`` to the forward and the backward of L x L blocks."""
    from megatron_usp.kernels import resolve_kernel

    kernel = resolve_kernel("auto", device, dtype, head_dim)
    scale = head_dim ** -0.5
    forward, backward = [], []
    for length in lengths:
        q, k, v = (torch.randn(1, length, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
        out, lse = kernel.forward(q, k, v, causal=False, softmax_scale=scale)
        dout = torch.randn_like(out)
        forward.append(median_seconds(lambda: kernel.forward(q, k, v, causal=False, softmax_scale=scale),
                                      device, repeats))
        backward.append(median_seconds(lambda: kernel.backward(dout, q, k, v, out, lse, causal=False,
                                                               softmax_scale=scale), device, repeats))
    rows = [[1.0, float(n * n), float(n)] for n in lengths]
    fwd_a, fwd_b, fwd_c = least_squares(rows, forward)
    bwd_a, bwd_b, bwd_c = least_squares(rows, backward)
    flops_per_square = 4.0 * heads * head_dim  # x L^2
    # a causal square against the full one, the largest size, forward + backward (ideal: 0.5)
    length = lengths[-1]
    q, k, v = (torch.randn(1, length, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    out, lse = kernel.forward(q, k, v, causal=True, softmax_scale=scale)
    dout = torch.randn_like(out)
    causal = median_seconds(lambda: kernel.forward(q, k, v, causal=True, softmax_scale=scale), device, repeats) + \
        median_seconds(lambda: kernel.backward(dout, q, k, v, out, lse, causal=True, softmax_scale=scale), device,
                       repeats)
    largest = flops_per_square * length * length
    if fwd_b <= 0 or bwd_b <= 0:  # blocks too small or timings too noisy to tell: the largest block's plain rate
        fwd_a = bwd_a = fwd_c = 0.0
        fwd_b, bwd_b = forward[-1] / (length * length), backward[-1] / (length * length)
    return {
        "kernel": kernel.name,
        "fwd_tflops": flops_per_square / fwd_b / 1e12,
        "bwd_tflops": 2.5 * flops_per_square / bwd_b / 1e12,  # the planner counts the backward as 2.5 x forward
        "half_efficiency_tokens": max(0.0, fwd_c / fwd_b),
        "kernel_overhead_us": max(0.0, (fwd_a + bwd_a) / 2 * 1e6),
        "largest_block_tflops": [largest / forward[-1] / 1e12, 2.5 * largest / backward[-1] / 1e12],
        # a causal square never needs more than the full block: a ratio above 1 is another process's load on a
        # shared machine, not the kernel; the planner gets at most 1 (the raw samples stay in "samples")
        "causal_fraction": min(1.0, causal / (forward[-1] + backward[-1])),
        "samples": {"lengths": lengths, "forward_s": forward, "backward_s": backward},
    }


def copy_gbps(device, repeats: int) -> float:
    source = torch.randn(32 << 20, device=device)  # 128 MiB
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def optimizer_ns_per_param(device, repeats: int) -> float:
    params = [torch.nn.Parameter(torch.randn(1024, 1024, device=device)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    seconds = median_seconds(optimizer.step, device, repeats)
    return seconds / sum(p.numel() for p in params) * 1e9


def layer_seconds(device, dtype, hidden: int, heads: int, token_counts: list[int], repeats: int) -> dict[int, float]:
    """Seconds of one megatron-core GPT layer (local spec, USP core attention, GELU MLP of 4 hidden, LayerNorm,
    biases), forward + backward, per sequence length: a GPTModel with 3 layers minus 1 layer, halved."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron_usp.megatron import (
        cpu_standins, destroy_model_parallel, get_gpt_layer_local_spec, initialize_model_parallel,
    )

    store = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)
    cpu_standins.install(megatron_lm=False)
    initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    per_layer = {}
    for count in token_counts:
        tokens = torch.randint(0, 128, (1, count), device=device)
        positions = torch.arange(count, device=device).unsqueeze(0)
        seconds = {}
        for layers in (1, 3):
            config = TransformerConfig(
                num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=4 * hidden,
                use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
                apply_rope_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
                persist_layer_norm=False, params_dtype=dtype, bf16=dtype == torch.bfloat16)
            model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=128,
                             max_sequence_length=count, position_embedding_type="rope").to(device)

            def step():
                model(tokens, positions, None, labels=tokens).sum().backward()

            seconds[layers] = median_seconds(step, device, repeats)
        per_layer[count] = max(0.0, (seconds[3] - seconds[1]) / 2)
    destroy_model_parallel()
    dist.destroy_process_group()
    return per_layer


def elementwise_gbps(hardware: dict, layer_s: float, tokens: int, hidden: int, heads: int, dtype) -> float:
    """What a layer's memory-bound work (norms, RoPE, activation, residuals) achieves, in the planner's terms:
    ELEMENTWISE_PASSES x the layer's saved activation bytes over the time the layer takes beyond its GEMMs,
    attention and fixed overhead (each predicted from the figures measured above)."""
    from dataclasses import replace

    from megatron_usp.job_cost import GPTShape, JobConfig, layer_activation_bytes, layer_parameter_count
    from megatron_usp.planner import BACKWARD_FLOPS_FACTOR, ELEMENTWISE_PASSES, PRESETS, step_compute_ms

    element = torch.empty((), dtype=dtype).element_size()
    shape = GPTShape(num_layers=1, hidden=hidden, heads=heads, kv_heads=heads, head_dim=hidden // heads,
                     ffn_hidden=4 * hidden, vocab=128, seq_len=tokens, dtype_bytes=element, gated_mlp=False,
                     rmsnorm=False, bias=True, fused_kernels=False)
    gemm = 3 * 2.0 * tokens * layer_parameter_count(shape, JobConfig(), norms=False) / (hardware["gemm_tflops"] * 1e12)
    # the planner's own kernel model for the layer's one causal block (u = r = 1)
    machine = replace(PRESETS["cpu"], **hardware)
    blocks, flops_per_pair = (((((tokens, tokens, True),), 1),),), 4.0 * hidden  # one step, one rank
    attention = (sum(step_compute_ms(blocks, flops_per_pair, machine.fwd_tflops, machine))
                 + sum(step_compute_ms(blocks, flops_per_pair * BACKWARD_FLOPS_FACTOR, machine.bwd_tflops, machine))) / 1e3
    rest = layer_s - gemm - attention - hardware["layer_overhead_us"] / 1e6
    saved = sum(layer_activation_bytes(shape, JobConfig()).values())
    return ELEMENTWISE_PASSES * saved / max(rest, 1e-6) / 1e9


LINK_SIZES = (1 << 18, 1 << 20, 1 << 22)  # bytes each rank moves: 256 KiB, 1 MiB, 4 MiB


def _link_worker(rank: int, world: int, backend: str, store: str, threads: int, result) -> None:
    """Time the collectives a job uses between 2 ranks; each call moves ``size`` bytes per rank one way."""
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    samples = []  # (kind, bytes moved per rank, seconds)
    for size in LINK_SIZES:
        piece = torch.randn(size // 4, device=device)
        pair = torch.randn(2 * size // 4, device=device)
        gathered, scattered, swapped = torch.empty_like(pair), torch.empty_like(piece), torch.empty_like(pair)

        def point_to_point():
            if rank == 0:
                dist.send(piece, 1)
                dist.recv(piece, 1)
            else:
                dist.recv(piece, 0)
                dist.send(piece, 0)

        calls = {
            "send/recv": (point_to_point, 2),  # a round trip: two one-way transfers
            "all_gather": (lambda: dist.all_gather_into_tensor(gathered, piece), 1),
            "reduce_scatter": (lambda: dist.reduce_scatter_tensor(scattered, pair), 1),
            "all_to_all": (lambda: dist.all_to_all_single(swapped, pair), 1),
            "all_reduce": (lambda: dist.all_reduce(piece), 1),  # 2 (n-1)/n x the tensor = the tensor
        }
        for kind, (call, transfers) in calls.items():
            dist.barrier()
            samples.append((kind, size, median_seconds(call, device, 7) / transfers))
    if rank == 0:
        result.put(samples)
    dist.destroy_process_group()


def link(device, threads: int) -> dict:
    context = mp.get_context("spawn")
    result = context.Queue()
    store = tempfile.NamedTemporaryFile(delete=False).name
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < 2:
        return {"skipped": "one GPU: no link to measure (keep the preset's NVLink figures)"}
    processes = [context.Process(target=_link_worker, args=(rank, 2, backend, store, threads, result))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    samples = result.get(timeout=5)
    # one latency + bandwidth for every collective, as the planner uses them: t = latency + bytes / bandwidth
    latency, seconds_per_byte = least_squares([[1.0, float(size)] for _, size, _ in samples],
                                              [seconds for _, _, seconds in samples])
    return {"intra_latency_us": max(0.0, latency * 1e6), "intra_node_gbps": 1 / seconds_per_byte / 1e9,
            "samples": samples}


def measure_compute(args: argparse.Namespace) -> dict:
    """The figures one rank measures by itself (kernels, GEMMs, optimizer, layer): ``{"hardware", "measured"}``."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    lengths = [int(x) for x in args.lengths.split(",")]
    attention = attention_fit(device, dtype, args.heads, args.head_dim, lengths, args.repeats)
    hardware = {
        "fwd_tflops": attention["fwd_tflops"],
        "bwd_tflops": attention["bwd_tflops"],
        "half_efficiency_tokens": attention["half_efficiency_tokens"],
        "kernel_overhead_us": attention["kernel_overhead_us"],
        "causal_fraction": attention["causal_fraction"],
        "gemm_tflops": gemm_tflops(device, dtype, args.tokens, args.hidden, args.repeats),
        "optimizer_ns_per_param": optimizer_ns_per_param(device, args.repeats),
    }
    layer_s = layer_seconds(device, dtype, args.hidden, args.heads, [16, args.layer_tokens], args.repeats)
    hardware["layer_overhead_us"] = layer_s[16] * 1e6
    hardware["memory_gbps"] = elementwise_gbps(hardware, layer_s[args.layer_tokens], args.layer_tokens, args.hidden,
                                               args.heads, dtype)
    return {"hardware": hardware, "measured": {"attention": attention, "copy_gbps": copy_gbps(device, args.repeats)}}


def _compute_worker(args: argparse.Namespace, start, result) -> None:
    start.wait()  # every copy works at once, as the job's ranks do
    result.put(measure_compute(args))


def measure_once(args: argparse.Namespace) -> dict:
    """One round of every measurement: ``{"hardware": fields, "measured": details}``. With ``--concurrent N`` N
    processes measure the compute figures at the same time (the job's ranks share the machine's memory system and
    caches) and each field is their median."""
    device = torch.device(args.device)
    if args.concurrent == 1:
        computed = [measure_compute(args)]
    else:
        context = mp.get_context("spawn")
        start, result = context.Barrier(args.concurrent), context.Queue()
        processes = [context.Process(target=_compute_worker, args=(args, start, result))
                     for _ in range(args.concurrent)]
        for process in processes:
            process.start()
        computed = [result.get(timeout=1800) for _ in processes]
        for process in processes:
            process.join(timeout=60)
    hardware = {key: statistics.median(c["hardware"][key] for c in computed) for key in computed[0]["hardware"]}
    measured = dict(computed[0]["measured"], copy_gbps=statistics.median(c["measured"]["copy_gbps"] for c in computed))
    linked = link(device, args.threads)
    if "skipped" not in linked:
        hardware.update(intra_latency_us=linked["intra_latency_us"], intra_node_gbps=linked["intra_node_gbps"],
                        inter_node_gbps=linked["intra_node_gbps"], inter_latency_us=linked["intra_latency_us"])
        if device.type == "cpu":  # gloo runs on the rank's own core: nothing it sends overlaps its compute
            hardware["comm_overlaps_compute"] = False
    return {"hardware": hardware, "measured": dict(measured, link=linked)}


def merge_rounds(rounds: list[dict], name: str, gpu_memory_gib: float, details: dict) -> dict:
    """The median of each field over the rounds (a shared machine drifts between them); every round kept."""
    fields = rounds[0]["hardware"].keys()
    hardware = {"name": name, "gpu_memory_gib": gpu_memory_gib}
    numeric = [key for key in fields if not isinstance(rounds[0]["hardware"][key], bool)]
    hardware.update({key: rounds[0]["hardware"][key] for key in fields if key not in numeric})
    hardware.update({key: statistics.median(r["hardware"][key] for r in rounds) for key in numeric})
    spread = {key: [min(r["hardware"][key] for r in rounds), max(r["hardware"][key] for r in rounds)]
              for key in numeric}
    return {"hardware": hardware, "measured": {**details, "rounds": len(rounds), "range": spread,
                                               "each": [r["hardware"] for r in rounds],
                                               "attention_samples": [r["measured"]["attention"]["samples"]
                                                                     for r in rounds],
                                               "copy_gbps": [r["measured"].get("copy_gbps") for r in rounds],
                                               "link_samples": [r["measured"].get("link", {}).get("samples")
                                                                for r in rounds]}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per rank (after TP and Ulysses)")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256, help="GEMM width")
    parser.add_argument("--tokens", type=int, default=2048, help="GEMM rows")
    parser.add_argument("--lengths", default="128,256,512,1024,2048", help="attention block sizes to fit")
    parser.add_argument("--layer-tokens", type=int, default=1024,
                        help="sequence of the GPT layer whose time beyond GEMMs and attention gives memory_gbps")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--rounds", type=int, default=3, help="whole measurement rounds (median per field)")
    parser.add_argument("--concurrent", type=int, default=1,
                        help="processes measuring at once: the ranks that will share this machine (CPU: its cores)")
    parser.add_argument("--gpu-memory-gib", type=float, default=64.0, help="memory per rank to plan with")
    parser.add_argument("--out", help="write the hardware JSON here (else print it)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rounds = [measure_once(args) for _ in range(args.rounds)]
    record = merge_rounds(rounds, f"measured-{args.device}", args.gpu_memory_gib, {
        "device": args.device, "dtype": args.dtype, "threads": args.threads,
        "seconds": time.perf_counter() - started, "command": " ".join(sys.argv)})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    for name, value in record["hardware"].items():
        low_high = record["measured"]["range"].get(name)
        print(f"  {name:<24} {value:.4g}" + (f"  (rounds {low_high[0]:.4g} .. {low_high[1]:.4g})" if low_high else "")
              if isinstance(value, float) else f"  {name:<24} {value}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
