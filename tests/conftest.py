"""Shared test configuration: `cuda` tests skip without CUDAExecutionProvider, `slow` without
NORMDEPLOY_SLOW=1."""

from __future__ import annotations

import os

import pytest


def _has_cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(
        reason="needs onnxruntime's CUDAExecutionProvider (no GPU here)"
    )
    no_slow = pytest.mark.skip(reason="slow: set NORMDEPLOY_SLOW=1 to run")
    has_cuda = _has_cuda_provider()
    run_slow = os.environ.get("NORMDEPLOY_SLOW") == "1"
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(no_cuda)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(no_slow)
