"""Benchmark the combination matrix: combinations per second for both tiers, median render and train time.

Not a test (no timed assertions): it prints figures to compare runner changes on the same machine.

    python benchmarks/matrix_bench.py                  # both tiers, the exhaustive one sampled (--limit 64)
    python benchmarks/matrix_bench.py --limit 0        # both tiers in full
    python benchmarks/matrix_bench.py --tier pairwise --workers 1
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from matrix import run_matrix, tier_combinations  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=("pairwise", "exhaustive", "both"), default="both")
    parser.add_argument(
        "--limit", type=int, default=64, help="sample at most N combinations per tier, evenly spread (0: all)"
    )
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    args = parser.parse_args(argv)
    tiers = ("pairwise", "exhaustive") if args.tier == "both" else (args.tier,)
    for tier in tiers:
        combos = tier_combinations(tier)
        total = len(combos)
        if args.limit and total > args.limit:
            step = total / args.limit
            combos = [combos[int(i * step)] for i in range(args.limit)]
        workers = args.workers or os.cpu_count() or 1
        result = run_matrix(combos, tier, workers)
        rate = len(combos) / result.wall_s
        # Steady state: the workers' start-up (importing torch) is paid once per run, not per combination.
        busy = sum(outcome.render_s + outcome.train_s for outcome in result.outcomes) / len(combos)
        steady = workers / busy
        print(
            f"{tier:<10} {len(combos):>5}/{total} combinations in {result.wall_s:7.1f}s: "
            f"{rate:5.2f} combinations/s ({steady:5.2f}/s steady state), median render "
            f"{result.median_render_s():.3f}s, median train {result.median_train_s():.3f}s, "
            f"{len(result.failures)} failed; full tier extrapolated {total / steady:7.0f}s plus start-up"
        )


if __name__ == "__main__":
    main()
