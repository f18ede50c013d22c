#!/usr/bin/env python
"""Measure whole-job iteration times of examples/pretrain_gpt_usp.py for a set of parallel configurations, for the
whole-job planner's ranking check (``tools/plan_usp.py --compare RECORD``, mode "job").

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_job.py --out docs/bench/job_cpu_4r.json

Each configuration runs under ``torchrun --standalone --nproc-per-node WORLD`` (gloo on CPU) for ``--train-iters``
iterations with ``--log-interval`` = half of them; the record keeps the last window's "elapsed time per iteration
(ms)" (the first window holds the warm-up), the configuration and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(num_layers=4, hidden=128, heads=8, kv_heads=8, seq_len=1024, ffn_hidden=512, vocab=256)
# (tp, pp, u, r, ring_impl, recompute, micro_batch, distributed_optimizer); global batch 4 on 4 ranks
CONFIGS = [
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
]
ELAPSED = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")


def command(world: int, cfg: tuple, global_batch: int, iters: int) -> list[str]:
    tp, pp, u, r, impl, recompute, mbs, distopt = cfg
    m = MODEL
    cmd = ["torchrun", "--standalone", f"--nproc-per-node={world}", "examples/pretrain_gpt_usp.py",
           "--num-layers", str(m["num_layers"]), "--hidden-size", str(m["hidden"]),
           "--ffn-hidden-size", str(m["ffn_hidden"]), "--num-attention-heads", str(m["heads"]),
           "--seq-length", str(m["seq_len"]), "--vocab-size", str(m["vocab"]),
           "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
           "--ulysses-degree", str(u), "--ring-degree", str(r), "--usp-ring-impl", impl,
           "--micro-batch-size", str(mbs), "--global-batch-size", str(global_batch),
           "--train-iters", str(iters), "--log-interval", str(iters // 2),
           "--use-distributed-optimizer" if distopt else "--no-use-distributed-optimizer"]
    if recompute == "full":
        cmd += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    return cmd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs/bench/job_cpu_4r.json"))
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--train-iters", type=int, default=6)
    args = parser.parse_args()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    records = []
    for cfg in CONFIGS:
        cmd = command(args.world, cfg, args.global_batch_size, args.train_iters)
        start = time.perf_counter()
        out = subprocess.run([torchrun] + cmd[1:], cwd=ROOT, env=env, capture_output=True, text=True)
        times = ELAPSED.findall(out.stdout + out.stderr)
        if out.returncode or not times:
            print(f"FAILED {cfg}: rc {out.returncode}\n{(out.stdout + out.stderr)[-2000:]}", file=sys.stderr)
            continue
        tp, pp, u, r, impl, recompute, mbs, distopt = cfg
        rec = {"mode": "job", "world_size": args.world, **MODEL, "dtype": "fp32", "swiglu": False, "rmsnorm": False,
               "causal": True, "tp": tp, "pp": pp, "ulysses_degree": u, "ring_degree": r, "ring_impl": impl,
               "recompute": recompute, "recompute_method": "uniform", "recompute_num_layers": 1,
               "distributed_optimizer": distopt, "micro_batch": mbs, "global_batch": args.global_batch_size,
               "time_ms": float(times[-1]), "windows_ms": [float(t) for t in times],
               "backend": "gloo", "omp_num_threads": 1, "command": "OMP_NUM_THREADS=1 " + " ".join(cmd)}
        records.append(rec)
        print(f"{cfg}: {rec['time_ms']:.1f} ms/iter (windows {times}), run {time.perf_counter() - start:.0f} s",
              flush=True)
    Path(args.out).write_text(json.dumps({"records": records}, indent=1) + "\n")
    print(f"wrote {len(records)} records to {args.out}")
    return 0 if len(records) == len(CONFIGS) else 1


if __name__ == "__main__":
    sys.exit(main())
