"""Shared test configuration: `cuda` tests skip without CUDAExecutionProvider, `slow` without
NORMDEPLOY_SLOW=1; replicas of real architectures deployed once per session."""

from __future__ import annotations

import os
from pathlib import Path

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


# Replicas of real architectures (tests/replicas.py) that must deploy with exit 0; deployed once
# per session because each export takes seconds.
DEPLOYED_REPLICAS = (
    "preact_bn_stack",
    "wide_range_head",
    "clip_like",
    "seq_first_transformer",
    "token_dict_model",
    "densenet_like",
)


@pytest.fixture(scope="session")
def replica_deploys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, Path]]:
    """Replica name → (exit code of `deploy tests.replicas:NAME`, its output directory)."""
    from normdeploy.cli import main

    out = tmp_path_factory.mktemp("replicas")
    return {
        name: (
            main(["deploy", f"tests.replicas:{name}", "-o", str(out / name), "-q"]),
            out / name,
        )
        for name in DEPLOYED_REPLICAS
    }
