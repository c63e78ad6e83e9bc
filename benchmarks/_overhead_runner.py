"""One cold measurement in a fresh process; prints one JSON line of seconds.

python benchmarks/_overhead_runner.py export-bare|export-ours|verify|verify-parts MODEL OUT
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import torch

import models

BATCH_SIZES = (1, 3)  # as deploy verifies


def _exporter_settings() -> dict[str, Any]:
    """The exporter and opset ``normdeploy.exporting`` uses by default, so the bare call matches."""
    try:
        export_module = importlib.import_module("normdeploy.exporting")
    except ImportError:  # not written yet: torch's own defaults
        return {"dynamo": True, "opset_version": 18}
    return {
        "dynamo": export_module.DEFAULT_EXPORTER == "dynamo",
        "opset_version": export_module.DEFAULT_OPSET,
    }


def export_bare(module: torch.nn.Module, x: torch.Tensor, out: Path) -> float:
    settings = _exporter_settings()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if settings["dynamo"]:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                module, (x,), str(out), dynamo=True,
                opset_version=settings["opset_version"], dynamic_shapes=({0: batch},),
            )  # fmt: skip
        else:
            torch.onnx.export(
                module, (x,), str(out), dynamo=False,
                opset_version=settings["opset_version"],
                input_names=["input"], dynamic_axes={"input": {0: "batch"}},
            )  # fmt: skip
    return time.perf_counter() - t0


def export_ours(module: torch.nn.Module, x: torch.Tensor, out: Path) -> dict[str, float]:
    """The call's seconds, and the stage timings export reports about itself."""
    from normdeploy.exporting import export

    t0 = time.perf_counter()
    result = export(module, (x,), out, overwrite=True)
    seconds = time.perf_counter() - t0
    stages = {f"stage_{k}": float(v) for k, v in getattr(result, "timings", {}).items()}
    return {"seconds": seconds, **stages}


def verify_ours(module: torch.nn.Module, onnx_path: Path) -> float:
    import onnxruntime  # noqa: F401  (imports are not counted, as in verify_parts)

    from normdeploy.verification.verifier import verify

    batches = _batch_sizes(onnx_path)
    t0 = time.perf_counter()
    verify(module, onnx_path, providers="cpu", batch_sizes=batches)
    return time.perf_counter() - t0


def _batch_sizes(path: Path) -> tuple[int, ...]:
    """BATCH_SIZES, or the one batch size a graph with a static batch dim accepts."""
    import onnx

    dim = onnx.load_model(str(path), load_external_data=False).graph.input[0].type
    first = dim.tensor_type.shape.dim[0]
    return (first.dim_value,) if first.HasField("dim_value") else BATCH_SIZES


def verify_parts(spec: models.ReferenceModel, module: torch.nn.Module, path: Path) -> dict:
    """What a user does by hand for the same verdict, each timed: the float32 and float64
    PyTorch forwards (on eval copies), onnxruntime session creation and the ORT runs, at the
    same batch sizes."""
    import onnxruntime as ort

    from normdeploy.verification.runners import session_options

    inputs = [spec.inputs(b)[0] for b in _batch_sizes(path)]
    t0 = time.perf_counter()
    ref = copy.deepcopy(module).eval()
    with torch.no_grad():
        for x in inputs:
            ref(x)
    t1 = time.perf_counter()
    ref64 = copy.deepcopy(module).eval().double()
    with torch.no_grad():
        for x in inputs:
            ref64(x.double())
    t2 = time.perf_counter()
    sess = ort.InferenceSession(
        str(path), session_options(False), providers=["CPUExecutionProvider"]
    )
    t3 = time.perf_counter()
    name = sess.get_inputs()[0].name
    for x in inputs:
        sess.run(None, {name: np.ascontiguousarray(x.numpy())})
    t4 = time.perf_counter()
    return {
        "torch_forward": t1 - t0,
        "torch_float64": t2 - t1,
        "ort_session": t3 - t2,
        "ort_runs": t4 - t3,
    }


def main(argv: list[str]) -> int:
    what, name, out = argv[0], argv[1], Path(argv[2])
    spec = models.get(name)
    module = spec.build()
    x = spec.inputs(1)[0]
    if what == "export-bare":
        # batch 2, as normdeploy's export traces: torch.export specializes a size-1 batch dim
        result: dict[str, float] = {"seconds": export_bare(module, spec.inputs(2)[0], out)}
    elif what == "export-ours":
        result = export_ours(module, x, out)
    elif what == "verify":
        result = {"seconds": verify_ours(module, out)}
    elif what == "verify-parts":
        result = verify_parts(spec, module, out)
        result["seconds"] = sum(result.values())
    else:
        raise SystemExit(f"unknown measurement '{what}'")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
