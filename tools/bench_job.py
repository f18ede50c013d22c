#!/usr/bin/env python
"""Measure whole-job iteration times of the trainer (python -m megatron_usp.train) for a set of parallel configurations, for the
whole-job planner's ranking check (``tools/plan_usp.py --compare RECORD``, mode "job").

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_job.py --world 2     # -> docs/bench/job_cpu_2r.json

``--world 2`` (default) gives each rank its own core on the project's 2-core machine, as the planner's model
assumes one processor per rank; ``--world 4`` reproduces the oversubscribed runs of docs/bench/job_cpu_4r.json.
Each configuration runs under ``torchrun --standalone --nproc-per-node WORLD`` (gloo on CPU) for ``--train-iters``
iterations with ``--log-interval`` = half of them; the record keeps the last window's "elapsed time per iteration
(ms)" (the first window holds the warm-up), the configuration and the command.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("measure_hardware", Path(__file__).resolve().parent / "measure_hardware.py")
measure_hardware = importlib.util.module_from_spec(_spec)  # the sibling script: the machine, measured between rounds
_spec.loader.exec_module(measure_hardware)
# the model of each world size's runs: long enough sequences that attention and GEMMs, not fixed costs, dominate
MODELS = {
    2: dict(num_layers=4, hidden=256, heads=8, kv_heads=8, seq_len=2048, ffn_hidden=1024, vocab=256),
    4: dict(num_layers=4, hidden=128, heads=8, kv_heads=8, seq_len=1024, ffn_hidden=512, vocab=256),
}
# (tp, pp, u, r, ring_impl, recompute, micro_batch, distributed_optimizer) + optional extras; global batch 4
CONFIGS = {
    # one rank per core: what the planner's model assumes
    2: [
        (1, 1, 1, 1, "zigzag", "none", 1, True),
        (1, 1, 2, 1, "zigzag", "none", 1, True),
        (1, 1, 1, 2, "zigzag", "none", 1, True),
        (1, 1, 1, 2, "stripe", "none", 1, True),
        (1, 1, 1, 2, "basic", "none", 1, True),
        (1, 1, 1, 2, "allgather", "none", 1, True),
        (1, 1, 1, 2, "mqsp", "none", 1, True),
        (1, 1, 1, 2, "mqsp", "none", 1, True, {"micro_q": 128}),
        (2, 1, 1, 1, "zigzag", "none", 1, True, {"sequence_parallel": True}),
        (1, 2, 1, 1, "zigzag", "none", 1, False),
        (1, 2, 1, 1, "zigzag", "none", 1, False, {"virtual_stages": 2}),
        (1, 1, 2, 1, "zigzag", "full", 1, True),
        (1, 1, 2, 1, "zigzag", "selective", 1, True),
        (1, 1, 2, 1, "zigzag", "none", 2, True),
    ],
    # 4 ranks on 2 cores (docs/bench/job_cpu_4r.json): oversubscribed, kept to show why that check failed
    4: [
        (1, 1, 4, 1, "zigzag", "none", 1, True),
        (1, 1, 1, 4, "zigzag", "none", 1, True),
        (1, 1, 1, 4, "basic", "none", 1, True),
        (1, 1, 2, 2, "zigzag", "none", 1, True),
        (1, 1, 2, 2, "allgather", "none", 1, True),
        (1, 1, 2, 2, "zigzag", "full", 1, True),
        (1, 1, 2, 2, "zigzag", "none", 2, True),
        (2, 1, 2, 1, "zigzag", "none", 1, True),
        (1, 2, 2, 1, "zigzag", "none", 1, False),
        (1, 1, 2, 1, "zigzag", "none", 1, True),
    ],
}
ELAPSED = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")


def unpack(cfg: tuple) -> dict:
    tp, pp, u, r, impl, recompute, mbs, distopt = cfg[:8]
    extra = cfg[8] if len(cfg) > 8 else {}
    return dict(tp=tp, pp=pp, ulysses_degree=u, ring_degree=r, ring_impl=impl, recompute=recompute,
                micro_batch=mbs, distributed_optimizer=distopt, micro_q=extra.get("micro_q"),
                sequence_parallel=extra.get("sequence_parallel", False),
                virtual_stages=extra.get("virtual_stages", 1))


def command(world: int, job: dict, global_batch: int, iters: int) -> list[str]:
    m = MODELS[world]
    cmd = ["torchrun", "--standalone", f"--nproc-per-node={world}", "-m", "megatron_usp.train",
           "--num-layers", str(m["num_layers"]), "--hidden-size", str(m["hidden"]),
           "--ffn-hidden-size", str(m["ffn_hidden"]), "--num-attention-heads", str(m["heads"]),
           "--seq-length", str(m["seq_len"]), "--vocab-size", str(m["vocab"]),
           "--tensor-model-parallel-size", str(job["tp"]), "--pipeline-model-parallel-size", str(job["pp"]),
           "--ulysses-degree", str(job["ulysses_degree"]), "--ring-degree", str(job["ring_degree"]),
           "--usp-ring-impl", job["ring_impl"],
           "--micro-batch-size", str(job["micro_batch"]), "--global-batch-size", str(global_batch),
           "--train-iters", str(iters), "--log-interval", str(iters // 2),
           "--use-distributed-optimizer" if job["distributed_optimizer"] else "--no-use-distributed-optimizer"]
    if job["recompute"] == "full":
        cmd += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif job["recompute"] == "selective":
        cmd += ["--recompute-granularity", "selective"]
    if job["micro_q"]:
        cmd += ["--usp-micro-q", str(job["micro_q"])]
    if job["sequence_parallel"]:
        cmd += ["--sequence-parallel"]
    if job["virtual_stages"] > 1:
        cmd += ["--num-layers-per-virtual-pipeline-stage", str(m["num_layers"] // (job["pp"] * job["virtual_stages"]))]
    return cmd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, choices=sorted(CONFIGS))
    parser.add_argument("--out", default=None, help="default: docs/bench/job_cpu_<world>r.json")
    parser.add_argument("--hardware-out", default=None,
                        help="with --rounds: the machine measured between rounds (default: docs/bench/hardware_cpu.json)")
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--train-iters", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, round-robin, and keep the median; after each "
                             "round tools/measure_hardware.py measures the machine once (median over the rounds)")
    args = parser.parse_args()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out_path = args.out or str(ROOT / f"docs/bench/job_cpu_{args.world}r.json")
    model = MODELS[args.world]
    runs: dict[int, list[dict]] = {}
    hardware_rounds = []
    for round_index in range(args.rounds):
        for index, cfg in enumerate(CONFIGS[args.world]):
            job = unpack(cfg)
            cmd = command(args.world, job, args.global_batch_size, args.train_iters)
            start = time.perf_counter()
            out = subprocess.run([torchrun] + cmd[1:], cwd=ROOT, env=env, capture_output=True, text=True)
            times = ELAPSED.findall(out.stdout + out.stderr)
            if out.returncode or not times:
                print(f"FAILED {cfg}: rc {out.returncode}\n{(out.stdout + out.stderr)[-2000:]}", file=sys.stderr)
                continue
            runs.setdefault(index, []).append({"time_ms": float(times[-1]), "windows_ms": [float(t) for t in times],
                                               "command": "OMP_NUM_THREADS=1 " + " ".join(cmd), "job": job})
            print(f"round {round_index + 1}: {cfg}: {float(times[-1]):.1f} ms/iter (windows {times}), run "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        if args.rounds > 1:
            hardware_rounds.append(measure_hardware.measure_once(measure_hardware.parse_args([
                "--concurrent", str(args.world), "--heads", str(model["heads"]),
                "--head-dim", str(model["hidden"] // model["heads"]), "--hidden", str(model["hidden"]),
                "--tokens", str(model["seq_len"])])))
            print(f"round {round_index + 1}: machine measured", flush=True)
    records = []
    for index, done in sorted(runs.items()):
        rec = {"mode": "job", "world_size": args.world, **model, "dtype": "fp32", "swiglu": False, "rmsnorm": False,
               "causal": True, **done[0]["job"], "recompute_method": "uniform", "recompute_num_layers": 1,
               "global_batch": args.global_batch_size,
               "time_ms": statistics.median(run["time_ms"] for run in done),
               "rounds_ms": [run["time_ms"] for run in done], "windows_ms": [run["windows_ms"] for run in done],
               "backend": "gloo", "omp_num_threads": 1, "command": done[0]["command"]}
        records.append(rec)
    Path(out_path).write_text(json.dumps({"records": records}, indent=1) + "\n")
    print(f"wrote {len(records)} records to {out_path}")
    if hardware_rounds:
        merged = measure_hardware.merge_rounds(hardware_rounds, "measured-cpu", 64.0, {
            "device": "cpu", "dtype": "fp32", "threads": 1,
            "command": f"tools/bench_job.py --world {args.world} --rounds {args.rounds} (between its rounds)"})
        hardware_path = args.hardware_out or str(ROOT / "docs/bench/hardware_cpu.json")
        Path(hardware_path).write_text(json.dumps(merged, indent=1) + "\n")
        print(f"wrote the machine's median figures over {len(hardware_rounds)} rounds to {hardware_path}")
    complete = all(len(runs.get(index, [])) == args.rounds for index in range(len(CONFIGS[args.world])))
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
