"""Compare two ``iteration,loss`` CSVs (a run without SP and a USP run): merged CSV, plot, max difference.

    python tools/loss_parity.py runs/demo/loss_baseline.csv runs/demo/loss_usp.csv --out runs/demo --max-diff 1e-3

Writes ``OUT/loss.csv`` (``iteration,loss_baseline,loss_usp``) and ``OUT/loss.png``; exits 1 when the largest
absolute difference exceeds ``--max-diff``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_losses(path: str) -> dict[int, float]:
    with open(path, newline="") as file:
        return {int(row["iteration"]): float(row["loss"]) for row in csv.DictReader(file)}


def merge_losses(baseline: dict[int, float], usp: dict[int, float]) -> list[tuple[int, float, float]]:
    """Rows ``(iteration, loss_baseline, loss_usp)``; both runs must cover the same iterations."""
    if set(baseline) != set(usp):
        only = sorted(set(baseline) ^ set(usp))
        raise ValueError(f"the runs logged different iterations (e.g. {only[:5]}): train both for the same --train-iters")
    return [(iteration, baseline[iteration], usp[iteration]) for iteration in sorted(baseline)]


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["iteration", "loss_baseline", "loss_usp"])
        writer.writerows((iteration, repr(base), repr(usp)) for iteration, base, usp in rows)


def plot(rows, path: Path, baseline_label: str, usp_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = [row[0] for row in rows]
    figure, (losses, diffs) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    losses.plot(iterations, [row[1] for row in rows], label=baseline_label, linewidth=3, alpha=0.5)
    losses.plot(iterations, [row[2] for row in rows], label=usp_label, linewidth=1, linestyle="--")
    losses.set_ylabel("lm loss")
    losses.set_title("GPT training loss: USP vs no sequence parallelism (same seed and data)")
    losses.legend()
    losses.grid(alpha=0.3)
    diffs.plot(iterations, [abs(row[2] - row[1]) for row in rows], color="tab:red")
    diffs.set_ylabel("|difference|")
    diffs.set_xlabel("iteration")
    diffs.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    diffs.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("baseline_csv")
    parser.add_argument("usp_csv")
    parser.add_argument("--out", required=True, help="directory for loss.csv and loss.png")
    parser.add_argument("--max-diff", type=float, default=1e-3)
    parser.add_argument("--baseline-label", default="no SP, 1 rank")
    parser.add_argument("--usp-label", default="USP ulysses 2 x ring 2 (zigzag), 4 ranks")
    args = parser.parse_args(argv)
    rows = merge_losses(read_losses(args.baseline_csv), read_losses(args.usp_csv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "loss.csv")
    plot(rows, out / "loss.png", args.baseline_label, args.usp_label)
    worst = max(abs(usp - base) for _, base, usp in rows)
    first, last = rows[0], rows[-1]
    print(f"loss: iteration {first[0]} {first[1]:.4f} -> iteration {last[0]} {last[1]:.4f} (baseline); "
          f"{first[2]:.4f} -> {last[2]:.4f} (USP)")
    print(f"max |loss_usp - loss_baseline| over {len(rows)} iterations: {worst:.3e} (limit {args.max_diff:g})")
    print(f"wrote {out / 'loss.csv'} and {out / 'loss.png'}")
    if worst > args.max_diff:
        print("FAILED: the USP run diverged from the baseline", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
