"""deploy end to end: library and CLI, asserting on the reports' content."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import models
from normdeploy import deploy
from normdeploy.pipeline import deploy_many

ROOT = Path(__file__).resolve().parents[1]


def _ort_vs_torch(model_path: Path, name: str, batch: int = 2) -> float:
    """Independent check of the written model: onnxruntime vs PyTorch eval."""
    x = models.get(name).inputs(batch)[0]
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = models.get(name).build()(x).numpy()
    return float(np.max(np.abs(got - want)))


def test_deploy_cnn_with_bn_left_by_the_exporter(tmp_path):
    """TorchScript keeps BN after a grouped ConvTranspose: fold-bn folds it, verify passes."""
    out = tmp_path / "decoder"
    result = deploy("decoder_convt", out, exporter="torchscript", opset=17)
    assert result, result.to_text()
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    counts = report["batch_norm"]
    assert counts["exporter"] + counts["fold-bn"] == 2 and counts["kept"] == 0
    assert counts["fold-bn"] >= 1  # the grouped ConvTranspose's BN is ours to fold
    assert report["verify"]["passed"] is True
    # fp32 decoder, two transposed convs: ~1e-6 expected, 1e-4 is the documented tolerance
    assert _ort_vs_torch(out / "model.onnx", "decoder_convt") < 1e-4
    md = (out / "report.md").read_text()
    assert "# Deployment report: `decoder_convt` — PASS" in md and "fold-bn" in md


def test_deploy_transformer_and_groupnorm_report_representations(tmp_path):
    summary = deploy_many(["transformer_preln", "groupnorm32_cnn"], tmp_path / "out")
    assert summary, summary.to_text()
    by_name = {r.model_name: r for r in summary.results}
    reps = by_name["transformer_preln"].norm_representations()
    assert reps["LayerNorm"] == {"LayerNormalization": 2}
    gn = by_name["groupnorm32_cnn"].norm_representations()["GroupNorm"]
    assert sum(gn.values()) == 2 and set(gn) <= {
        "InstanceNormalization+Reshape",
        "GroupNormalization",
    }
    assert (tmp_path / "out" / "summary.md").is_file()
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert data["passed"] and [m["model"] for m in data["models"]] == list(by_name)
    for name in by_name:
        assert _ort_vs_torch(tmp_path / "out" / name / "model.onnx", name) < 1e-4


def test_one_failing_model_does_not_stop_the_others(tmp_path):
    summary = deploy_many(["no_such_model", "conv_bn_relu"], tmp_path / "out")
    assert not summary and summary.failed == ["no_such_model"]
    failed, ok = summary.results
    assert failed.failed_stage == "export" and "unknown reference model" in failed.error
    assert ok.passed and (tmp_path / "out" / "conv_bn_relu" / "model.onnx").is_file()
    assert not (tmp_path / "out" / "no_such_model" / "model.onnx").exists()
    assert (
        json.loads((tmp_path / "out" / "no_such_model" / "report.json").read_text())["passed"]
        is False
    )


@pytest.mark.parametrize("model", ["conv_bn_relu"])
def test_cli_deploy_subprocess(tmp_path, model):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "cli.py", "deploy", model, "-o", str(out), "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["batch_norm"]["exporter"] == 1
    assert report["norm_representations"] == {"BatchNorm": {"folded": 1}}
    assert "[conv_bn_relu] export done" in proc.stderr  # progress per stage
    again = subprocess.run(
        [sys.executable, "cli.py", "deploy", model, "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 2 and "exists (use --force" in again.stderr


DIVERGES = '''
import torch
from torch import nn


class Diverges(nn.Module):
    """The exported graph computes 2·bn(conv(x)); PyTorch eval computes bn(conv(x))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * 2 if torch.onnx.is_in_onnx_export() else y


def net():
    torch.manual_seed(0)
    return Diverges().eval(), torch.zeros(1, 3, 8, 8)
'''


@pytest.mark.parametrize("keep_failed", [False, True], ids=["default", "keep_failed"])
def test_a_failing_deploy_writes_its_reports_and_no_model(tmp_path, monkeypatch, keep_failed):
    """The report is the diagnosis; the graph is written only with keep_failed, and then only
    as model.failed.onnx."""
    (tmp_path / "divergezoo.py").write_text(DIVERGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    result = deploy("divergezoo:net", out, providers="cpu", keep_failed=keep_failed)
    assert not result and result.failed_stage is None  # every stage ran; the verdict is FAIL
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["verify"]["passed"] is False
    assert "— FAIL" in (out / "report.md").read_text()
    assert not (out / "model.onnx").exists()
    # No report names a file of the (removed) staging directory.
    assert report["export"]["written"] == report["model_file"]
    assert ".normdeploy-tmp-" not in (out / "report.json").read_text()
    names = sorted(p.name for p in out.iterdir())
    if keep_failed:
        assert names == ["model.failed.onnx", "report.json", "report.md"]
        assert report["model_file"] == str(out / "model.failed.onnx")
        onnx.checker.check_model(onnx.load(str(out / "model.failed.onnx")), full_check=True)
    else:
        assert names == ["report.json", "report.md"] and report["model_file"] is None


def test_a_passing_deploy_names_its_model_file(tmp_path):
    result = deploy("conv_bn_relu", tmp_path / "ok", providers="cpu")
    assert result and result.model_file == tmp_path / "ok" / "model.onnx"
    assert result.export is not None and result.export.written == result.model_file
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "model.onnx", "report.json", "report.md",
    ]  # fmt: skip
