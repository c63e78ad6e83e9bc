"""What a user writes by hand instead of ``normdeploy export``, as one process: the dynamo export
with a dynamic batch, save, one onnxruntime session, and a comparison with PyTorch eval at batch
1 and 3. ``python benchmarks/_bare_export.py MODEL OUT`` (MODEL: a name in arch_replicas)."""

from __future__ import annotations

import sys
import warnings

import arch_replicas
import numpy as np
import onnxruntime as ort
import torch

name, out = sys.argv[1], sys.argv[2]
model, (x,) = arch_replicas.MODELS[name]()
model.eval()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    batch = torch.export.Dim("batch", min=1)
    # torch.export specializes a size-1 dim: trace at batch 2, as normdeploy does
    program = torch.onnx.export(
        model, (x.repeat(2, 1, 1, 1),), dynamo=True, opset_version=18,
        dynamic_shapes=({0: batch},),
    )  # fmt: skip
program.save(out)
session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
name_in = session.get_inputs()[0].name
for b in (1, 3):
    xb = torch.randn((b, *x.shape[1:]), generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        expected = model(xb).numpy()
    actual = session.run(None, {name_in: xb.numpy()})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3)
