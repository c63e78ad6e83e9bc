"""normdeploy: PyTorch models with normalization layers → ONNX Runtime, proven equivalent.

Public API (imported lazily so that ONNX-only work does not import torch):
``export``, ``inspect``, ``fold_bn``, ``fold_bn_module``, ``fuse_norms``, ``verify``, ``deploy``.
"""

from __future__ import annotations

from normdeploy._lazy import lazy_getattr

__version__ = "0.1.0"

_API = {
    "export": "normdeploy.exporting",
    "inspect": "normdeploy.census.inspection",
    "fold_bn": "normdeploy.folding",
    "fold_bn_module": "normdeploy.torch_fold",
    "fuse_norms": "normdeploy.folding",
    "verify": "normdeploy.verification.verifier",
    "deploy": "normdeploy.pipeline",
}

__all__ = ["__version__", *_API]


__getattr__ = lazy_getattr(__name__, _API)
