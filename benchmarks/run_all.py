"""Run every benchmark and print Markdown tables (``make bench``).

python benchmarks/run_all.py                 # quick set: graphs of 5 and 50 MiB (minutes)
python benchmarks/run_all.py --full          # adds 150 and 500 MiB graphs, more repeats
python benchmarks/run_all.py --only fold latency --output build/bench/results.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import export_cost_bench
import fold_bn_bench
import fuse_norms_bench
import latency_bench
import merge_bench
import norm_repr_bench
import overhead_bench
import tolerance_bench
from _common import machine_line

BENCHES: dict[str, Callable[[list[str] | None], int]] = {
    "export-cost": export_cost_bench.main,
    "fold": fold_bn_bench.main,
    "fuse-norms": fuse_norms_bench.main,
    "latency": latency_bench.main,
    "merge": merge_bench.main,
    "norms": norm_repr_bench.main,
    "overhead": overhead_bench.main,
    "tolerance": tolerance_bench.main,
}


def bench_args(full: bool, repeats: int | None) -> dict[str, list[str]]:
    """Arguments for each benchmark in the quick or the full set."""
    fold_repeats = repeats or 3
    rounds = str(21 if full else 11)
    sizes = ["5", "50", "150", "500"] if full else ["5", "50"]
    return {
        "export-cost": ["--rounds", str(repeats or (5 if full else 3))],
        "fold": ["--sizes", *sizes, "--repeats", str(fold_repeats)],
        "fuse-norms": ["--rounds", rounds],
        "latency": ["--rounds", rounds],
        "merge": ["--rounds", rounds, "--repeats", str(repeats or (5 if full else 3))],
        "norms": ["--rounds", rounds],
        "overhead": ["--repeats", str(repeats or (5 if full else 3))]
        + ([] if full else ["--models", "resnet_mini", "groupnorm32_cnn"]),
        "tolerance": ["--seeds", "4" if full else "2"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="graphs up to 500 MiB")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    parser.add_argument("--repeats", type=int, help="whole-process runs per measurement")
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    chosen = bench_args(args.full, args.repeats)
    buffer = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s: str) -> int:
            sys.__stdout__.write(s)
            sys.__stdout__.flush()
            return buffer.write(s)

    status = 0
    with contextlib.redirect_stdout(Tee()):
        command = " ".join(["python benchmarks/run_all.py", *(argv or sys.argv[1:])])
        print(f"_Command: `{command}`_  \n_Machine (start): {machine_line()}_\n")
        for name in args.only:
            start = time.perf_counter()
            print(f"### {name}\n", flush=True)
            status |= BENCHES[name](chosen[name])
            print(f"_{name}: {time.perf_counter() - start:.0f} s_\n", flush=True)
        print(f"_Machine (end): {machine_line()}_")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(buffer.getvalue())
    return status


if __name__ == "__main__":
    raise SystemExit(main())
