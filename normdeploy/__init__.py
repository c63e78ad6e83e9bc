"""normdeploy: PyTorch models with normalization layers → ONNX Runtime, proven equivalent.

Public API (imported lazily so that ONNX-only work does not import torch):
``export``, ``inspect``, ``fold_bn``, ``fold_bn_module``, ``verify``, ``deploy``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "export": "normdeploy.exporting",
    "inspect": "normdeploy.census",
    "fold_bn": "normdeploy.passes.fold_bn",
    "fold_bn_module": "normdeploy.torch_fold",
    "verify": "normdeploy.verification",
    "deploy": "normdeploy.pipeline",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'normdeploy' has no attribute '{name}'")
