"""Overheads: ``export`` vs a bare ``torch.onnx.export``; ``verify`` vs the sum of its parts.

Each measurement is one cold call in a fresh process (imports and model building not counted),
repeated and interleaved; medians are reported. The parts of a verify are: a PyTorch forward on
an eval copy for batch sizes 1 and 3, the same on a float64 copy (the ground truth the tolerance
policy measures against), one onnxruntime session creation, and the ORT runs.
Export's own stage timings (torch export, ORT check, census, save) are listed beside it.

    python benchmarks/overhead_bench.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

from _common import BUILD, PY, ROOT, fmt_ratio, fmt_s, markdown_table, median

MODELS = ("resnet_mini", "mobilenet_mini", "transformer_preln", "groupnorm32_cnn")
EXPORT_STAGES = ("export", "check", "census", "save")
VERIFY_PARTS = ("torch_forward", "torch_float64", "ort_session", "ort_runs")
RUNNER = str(Path(__file__).with_name("_overhead_runner.py"))


def measure(what: str, model: str, path: Path) -> dict[str, float] | str:
    """The runner's JSON for one cold call, or the error's last line."""
    done = subprocess.run(
        [PY, RUNNER, what, model, str(path)], cwd=ROOT, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def available(module: str) -> bool:
    """Whether normdeploy has this module or package yet."""
    return (ROOT / "normdeploy" / f"{module}.py").exists() or (
        ROOT / "normdeploy" / module / "__init__.py"
    ).exists()


def _median_of(samples: list[dict[str, float] | str], key: str = "seconds") -> float | None:
    ok = [s[key] for s in samples if isinstance(s, dict)]
    return median(ok) if ok else None


def _cell(x: float | None) -> str:
    return "-" if x is None else fmt_s(x)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else fmt_ratio(a / b)


def _errors(samples: list[dict[str, float] | str]) -> str:
    errs = sorted({s for s in samples if isinstance(s, str)})
    return "; ".join(e[:100] for e in errs)


Samples = list[dict[str, float] | str]


def _export_row(model: str, bare_samples: Samples, ours_samples: Samples) -> list[str]:
    bare, ours = _median_of(bare_samples), _median_of(ours_samples)
    stages = [_median_of(ours_samples, f"stage_{k}") for k in EXPORT_STAGES]
    rests: Samples = [
        {"seconds": s["seconds"] - sum(v for k, v in s.items() if k.startswith("stage_"))}
        for s in ours_samples
        if isinstance(s, dict)
    ]
    rest = (
        _median_of(rests)
        if any(isinstance(s, dict) and len(s) > 1 for s in ours_samples)
        else None
    )
    return [
        model, _cell(bare), _cell(ours), _ratio(ours, bare), *(_cell(x) for x in stages),
        _cell(rest), _errors(bare_samples + ours_samples),
    ]  # fmt: skip


def _verify_row(model: str, parts_samples: Samples, verify_samples: Samples) -> list[str]:
    parts = [_median_of(parts_samples, k) for k in (*VERIFY_PARTS, "seconds")]
    whole = _median_of(verify_samples)
    return [
        model, *(_cell(x) for x in parts), _cell(whole), _ratio(whole, parts[-1]),
        _errors(parts_samples + verify_samples),
    ]  # fmt: skip


def bench(
    repeats: int, model_names: Sequence[str] = MODELS, verify_only: bool = False
) -> tuple[str, str]:
    out_dir = BUILD / "overhead"
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = ["export-bare", "verify-parts"]
    kinds += ["export-ours"] if available("exporting") and not verify_only else []
    kinds += ["verify"] if available("verification") else []
    if verify_only:
        kinds.remove("export-bare")
    export_rows, verify_rows = [], []
    for model in model_names:
        path = out_dir / f"{model}.onnx"
        samples: dict[str, Samples] = {k: [] for k in kinds}
        # The first bare export writes the graph that verify and its parts run.
        samples.setdefault("export-bare", []).append(measure("export-bare", model, path))
        for i in range(repeats):
            for kind in kinds:
                if kind == "export-bare" and i == 0:
                    continue
                target = (
                    out_dir / f"{model}.{kind}.onnx" if kind.startswith("export") else path
                )
                samples[kind].append(measure(kind, model, target))
        export_rows.append(
            _export_row(model, samples["export-bare"], samples.get("export-ours", []))
        )
        verify_rows.append(
            _verify_row(model, samples["verify-parts"], samples.get("verify", []))
        )
    export_table = markdown_table(
        ["model", "bare torch.onnx.export", "normdeploy export", "ratio",
         *(f"└ {k}" for k in EXPORT_STAGES), "└ rest", "errors"],
        export_rows,
    )  # fmt: skip
    verify_table = markdown_table(
        ["model", "torch forward", "torch float64", "ORT session", "ORT runs",
         "sum of parts", "verify", "verify / parts", "errors"],
        verify_rows,
    )  # fmt: skip
    return export_table, verify_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--verify-only", action="store_true", help="skip the export rows")
    args = parser.parse_args(argv)
    export_table, verify_table = bench(args.repeats, args.models, args.verify_only)
    print(f"#### export vs bare torch.onnx.export (cold call, median of {args.repeats})\n")
    print(export_table, end="\n\n")
    print(f"#### verify vs the sum of its parts (cold call, median of {args.repeats})\n")
    print(verify_table, end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
