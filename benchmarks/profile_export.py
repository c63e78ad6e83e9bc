"""Where ``export`` spends its time and memory: stage by stage, on a real-sized model.

Runs one ``normdeploy.export`` of MODEL (default: the DenseNet-121-shaped model of
``arch_replicas``) in this process with a 10 ms RSS sampler and cProfile. Prints, per stage of
export's own timings (and the part before the exporter runs), the wall seconds and the peak RSS
reached inside it, then the functions with the most cumulative time.

    python benchmarks/profile_export.py --model densenet121 --top 25
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import tempfile
import threading
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
import arch_replicas
from _common import fmt_bytes, markdown_table


class RssSampler:
    """Resident set size every ``period`` seconds, with timestamps (perf_counter)."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._rss()))
            time.sleep(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> int:
        inside = [rss for t, rss in self.samples if start <= t <= end]
        return max(inside, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121", choices=sorted(arch_replicas.MODELS))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    from normdeploy.exporting import export

    module, example = arch_replicas.MODELS[args.model]()
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp, RssSampler() as rss:
        baseline = rss._rss()
        start = time.perf_counter()
        profiler.enable()
        result = export(module, example, Path(tmp) / "model.onnx", model_name=args.model)
        profiler.disable()
        end = time.perf_counter()
    # export's stages run one after another; the time before the first is its preparation
    # (eval copy, the eval forward, the train-mode report, the float64 reference when any).
    stages = list(result.timings.items())
    before = (end - start) - sum(s for _, s in stages)
    rows, t = [], start
    for name, seconds in [("preparation", before), *stages]:
        rows.append([name, f"{seconds:.2f} s", fmt_bytes(rss.peak(t, t + seconds))])
        t += seconds
    rows.append(["whole export", f"{end - start:.2f} s", fmt_bytes(rss.peak(start, end))])
    print(
        f"#### export of {args.model}: {'PASS' if result else 'FAIL'}; RSS before "
        f"{fmt_bytes(baseline)}, process peak {fmt_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}\n"
    )
    print(markdown_table(["stage", "wall", "peak RSS inside"], rows))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
    print("\n```text\n" + out.getvalue().strip() + "\n```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
