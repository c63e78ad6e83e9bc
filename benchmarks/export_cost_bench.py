"""Cost of ``export`` and ``deploy`` on ResNet-18- and DenseNet-121-shaped models.

Side by side, as whole processes (imports, model build, everything), interleaved rounds:

- ``normdeploy export`` (its check and census included) against what a user writes by hand:
  ``torch.onnx.export(dynamo=True)`` with a dynamic batch, save, one onnxruntime session and a
  comparison with PyTorch eval at batch 1 and 3 (``_bare_export.py``);
- the same ``export`` through ``main()`` alone, without the entry point's skip of the
  interpreter's final collections (what it costs with the teardown the script pays);
- ``normdeploy deploy`` against ``export`` + ``fold-bn`` + ``verify`` run as three commands.

Medians of wall time and peak RSS, and their ratios.

    python benchmarks/export_cost_bench.py --rounds 3 --models resnet18 densenet121
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _common import (
    BUILD,
    PY,
    ProcessRun,
    fmt_bytes,
    fmt_ratio,
    fmt_s,
    loadavg_1m,
    markdown_table,
    median,
)
from _common import run_process as run

MODELS = ("resnet18", "densenet121")
SPEC = "benchmarks.arch_replicas:{}"
HERE = Path(__file__).resolve().parent


def _commands(model: str, work: Path) -> dict[str, list[list[str]]]:
    """Each side: the processes it runs, in order (their walls add up, RSS is the max)."""
    spec = SPEC.format(model)
    onnx_path, folded = work / f"{model}.onnx", work / f"{model}.folded.onnx"
    cli = [PY, "cli.py"]
    # cli.py's entry freezes the collector before the interpreter's teardown; main() alone
    # shows what the export costs with the teardown a script pays (and the bare script does).
    main_only = [PY, "-c", "import sys; from normdeploy.cli import main; sys.exit(main())"]
    return {
        "bare script": [[PY, str(HERE / "_bare_export.py"), model, str(work / "bare.onnx")]],
        "export": [[*cli, "export", spec, "-o", str(onnx_path), "--force"]],
        "export, teardown kept": [
            [*main_only, "export", spec, "-o", str(onnx_path), "--force"]
        ],
        "deploy": [[*cli, "deploy", spec, "-o", str(work / "deploy"), "--force", "-q"]],
        "export + fold-bn + verify": [
            [*cli, "export", spec, "-o", str(onnx_path), "--force"],
            [*cli, "fold-bn", str(onnx_path), "-o", str(folded), "--force"],
            [*cli, "verify", spec, str(folded)],
        ],
    }


def _side(argvs: list[list[str]]) -> ProcessRun | str:
    runs = []
    for argv in argvs:
        done = run(argv)
        if done.returncode not in (0, 1):
            return f"exit {done.returncode}: {done.stderr_tail[:160]}"
        runs.append(done)
    return ProcessRun(sum(r.wall_s for r in runs), max(r.peak_rss for r in runs), 0)


def bench(model: str, rounds: int) -> dict[str, list[ProcessRun | str]]:
    work = BUILD / "export_cost" / model
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    commands = _commands(model, work)
    samples: dict[str, list[ProcessRun | str]] = {k: [] for k in commands}
    for _ in range(rounds):
        for side, argvs in commands.items():
            samples[side].append(_side(argvs))
    return samples


def _stats(samples: list[ProcessRun | str]) -> tuple[float, float, str] | str:
    """Median wall and peak RSS, and the walls' range over the rounds; or the first error."""
    ok = [s for s in samples if isinstance(s, ProcessRun)]
    if not ok:
        return next(s for s in samples if isinstance(s, str))
    walls = [s.wall_s for s in ok]
    spread = f"{min(walls):.1f}–{max(walls):.1f} s"
    return median(walls), median([s.peak_rss for s in ok]), spread


def rows(model: str, samples: dict[str, list[ProcessRun | str]]) -> list[list[str]]:
    out = []
    for side, against in (
        ("export", "bare script"),
        ("export, teardown kept", "bare script"),
        ("deploy", "export + fold-bn + verify"),
    ):
        ours, base = _stats(samples[side]), _stats(samples[against])
        if isinstance(ours, str) or isinstance(base, str):
            note = ours if isinstance(ours, str) else base
            out.append([model, side, against, "-", "-", str(note)])
            continue
        out.append([
            model, f"{side}: {fmt_s(ours[0])} ({ours[2]}), {fmt_bytes(ours[1])}",
            f"{against}: {fmt_s(base[0])} ({base[2]}), {fmt_bytes(base[1])}",
            fmt_ratio(ours[0] / base[0]), fmt_ratio(ours[1] / base[1]),
        ])  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    table = []
    load = loadavg_1m()
    for model in args.models:
        table += rows(model, bench(model, args.rounds))
    print(
        f"#### export and deploy on real-sized models (median of {args.rounds} interleaved "
        f"whole-process rounds; load average {load:.2f} before, {loadavg_1m():.2f} "
        "after)\n"
    )
    print(
        markdown_table(
            ["model", "ours: median wall (range), peak RSS", "against", "wall", "peak RSS"],
            table,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
