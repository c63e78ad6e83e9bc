"""deploy end to end: library and CLI, asserting on the reports' content."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import models
from normdeploy import deploy
from normdeploy.cli import main
from normdeploy.onnx_graph import default_opset
from normdeploy.pipeline import deploy_many
from normdeploy.progress import Progress
from normdeploy.verification.runners import CUDA, available_providers

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
    stream = io.StringIO()
    summary = deploy_many(
        ["transformer_preln", "groupnorm32_cnn"],
        tmp_path / "out",
        progress=Progress(stream=stream),
    )
    assert summary, summary.to_text()
    if CUDA not in available_providers():  # said once per run, not once per model
        assert stream.getvalue().count("CUDA not used") == 1
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


def test_deploy_merges_identity_branches_and_no_merge_keeps_them(tmp_path, capsys):
    """RepVGG: the exporter folds each branch's BN, fold-bn merges the 2 identity BNs; the
    summary column reads exporter/fold-bn/merged/kept. --no-merge keeps them (still PASS)."""
    spec = "models.reparam:repvgg_mini"
    result = deploy(spec, tmp_path / "merged")
    assert result, result.to_text()
    assert result.bn_counts() == {"exporter": 10, "fold-bn": 0, "merged": 2, "kept": 0}
    assert "BN folded by exporter/fold-bn/merged/kept" in result.to_text()
    assert "10/0/2/0" in result.to_text()
    args = [
        "deploy",
        spec,
        "-o",
        str(tmp_path / "kept"),
        "--no-merge",
        "-q",
        "--format",
        "json",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["batch_norm"]["merged"] == 0
    assert report["batch_norm"]["kept"] == 2


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


TEN_GROUPNORMS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def net():
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, 8, 3, padding=1)]
        for _ in range(10):
            layers += [nn.GroupNorm(4, 8), nn.Conv2d(8, 8, 1)]
        return nn.Sequential(*layers).eval(), torch.randn(1, 3, 8, 8)
    """
)


def test_advice_says_each_thing_once_with_a_count(tmp_path, monkeypatch):
    (tmp_path / "ten_gn.py").write_text(TEN_GROUPNORMS)
    monkeypatch.chdir(tmp_path)  # module:factory imports from the current directory
    result = deploy("ten_gn:net", tmp_path / "out")
    assert result, result.to_text()
    groupnorm_tips = [t for t in result.advice() if "GroupNorm" in t]
    assert len(groupnorm_tips) == 1, groupnorm_tips
    (tip,) = groupnorm_tips
    assert tip.startswith("10 GroupNorm modules (`1`, `3`, `5` (+7 more)) use the")
    md = (tmp_path / "out" / "report.md").read_text()
    what_to_do = md.split("## What to do about it")[1].split("\n#")[0]
    assert what_to_do.count("\n- ") == 1  # one bullet for the ten modules


HAND_WRITTEN_NORMS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class LayerNorm(nn.Module):
        # written out, as PP-OCR-style recognizers and older code bases do
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(d) + 0.5)
            self.bias = nn.Parameter(torch.randn(d))

        def forward(self, x):
            u = x.mean(-1, keepdim=True)
            s = (x - u).pow(2).mean(-1, keepdim=True)
            return (x - u) / torch.sqrt(s + 1e-6) * self.weight + self.bias

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)
            self.ln = LayerNorm(32)
            self.rms = nn.RMSNorm(32)
            self.head = nn.Linear(32, 8)
            with torch.no_grad():
                self.rms.weight.uniform_(0.5, 1.5)

        def forward(self, x):
            return self.head(self.rms(nn.functional.gelu(self.ln(self.fc(x)))))

    def net():
        torch.manual_seed(0)
        return Net().eval(), torch.randn(2, 10, 32)
    """
)


def test_deploy_fuses_decomposed_norms_at_the_export_opset_and_never_changes_it(
    tmp_path, monkeypatch
):
    """At the default opset 18 the written-out LayerNorm fuses into LayerNormalization; the
    RMSNorm needs opset 23, so it stays decomposed and the advice says so once. deploy
    --opset 23 exports at 23, where both end up native."""
    (tmp_path / "hand_norms.py").write_text(HAND_WRITTEN_NORMS)
    monkeypatch.chdir(tmp_path)
    result = deploy("hand_norms:net", tmp_path / "out")
    assert result, result.to_text()
    assert result.fuse is not None and "fuse-norms" in result.timings
    assert [(e.action, e.target_op) for e in result.fuse.ledger] == [
        ("fused", "LayerNormalization"),
        ("kept", ""),
    ]
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert default_opset(model) == 18
    counts = Counter(n.op_type for n in model.graph.node)
    assert counts["LayerNormalization"] == 1 and counts["RMSNormalization"] == 0
    # the fused LayerNorm's decomposition lint is gone; the RMSNorm's names the opset, once
    tips = result.advice()
    assert not [t for t in tips if "LayerNorm" in t], tips
    (rms_tip,) = [t for t in tips if "RMSNorm" in t]
    assert "decomposed-rmsnorm" in rms_tip and "RMSNormalization (opset >= 23)" in rms_tip
    assert "fused by fuse-norms: 1" in result.summary_row()[1]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fuse_norms"]["fused"] == 1 and report["verify"]["passed"] is True
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## fuse-norms: 1 of 2" in md
    assert "RMSNormalization needs opset >= 23, the model imports opset 18" in md
    # independent check of the written file: onnxruntime vs PyTorch eval, fp32 over 32
    # features through two norms: ~1e-6 expected, 1e-4 is the documented tolerance
    sys.path.insert(0, str(tmp_path))
    module, x = __import__("hand_norms").net()
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert float(np.max(np.abs(got - module(x).numpy()))) < 1e-4

    native = deploy("hand_norms:net", tmp_path / "out23", opset=23)
    assert native, native.to_text()
    model = onnx.load(str(tmp_path / "out23" / "model.onnx"))
    counts = Counter(n.op_type for n in model.graph.node)
    assert default_opset(model) == 23
    assert counts["LayerNormalization"] == 1 and counts["RMSNormalization"] == 1


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


def test_deploy_takes_a_module_and_runs_every_stage_at_the_examples_size(tmp_path):
    from blocks import TokenMLP

    from normdeploy.errors import InvalidArgumentError
    from tests import replicas

    # A token MLP (Linear → transpose → BatchNorm1d → transpose): the exporter leaves the BN
    # for fold-bn. Its sequence is dynamic; the example's length is 20.
    torch.manual_seed(0)
    module, x = TokenMLP(), torch.randn(1, 20, 16)
    replicas.calibrate_bn(module, (x,))
    result = deploy(module, tmp_path / "mlp", example_inputs=(x,), dynamic_axes=(0, 1))
    assert result, result.to_text()
    assert result.model_name == "TokenMLP"
    dims = onnx.load(tmp_path / "mlp" / "model.onnx").graph.input[0].type.tensor_type.shape
    assert [d.dim_param or d.dim_value for d in dims.dim] == ["batch", "sequence", 16]
    # fold-bn and verify fed the graph the example's length (not a default one).
    assert result.bn_counts()["fold-bn"] == 1
    assert "x[1, 20, 16]" in result.fold.checked
    assert all(shapes.endswith(", 20, 16]") for _, shapes in result.verification.inputs_ran)
    # Shapes instead of example inputs; neither is a typed error, and nothing is written.
    cnn = replicas.cnn_module_only()
    result = deploy(cnn, tmp_path / "cnn", input_shapes=[(1, 3, 32, 32)], model_name="cnn")
    assert result and result.model_name == "cnn"
    with pytest.raises(
        InvalidArgumentError, match=r"^example_inputs: deploy\(\) of a module \(Sequential\)"
    ):
        deploy(cnn, tmp_path / "none")
    assert not (tmp_path / "none").exists()


class _CountingCNN(torch.nn.Module):
    """Conv → BatchNorm → ReLU → pool → Linear that counts its forwards (over every copy)."""

    forwards = 0

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).forwards += 1
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


def test_deploy_verifies_with_the_reference_outputs_its_export_computed(tmp_path):
    from normdeploy import export
    from normdeploy.verification.verifier import verify

    torch.manual_seed(0)
    module, x = _CountingCNN().eval(), torch.randn(1, 3, 16, 16)
    _CountingCNN.forwards = 0
    exported = export(module, (x,), tmp_path / "alone.onnx")
    export_forwards = _CountingCNN.forwards
    assert exported and exported.reference is not None
    _CountingCNN.forwards = 0
    result = deploy(module, tmp_path / "out", example_inputs=(x,), providers="cpu")
    assert result, result.to_text()
    # verify ran no forward of its own: the export check's outputs on the same inputs served.
    assert _CountingCNN.forwards == export_forwards
    assert result.verification.batch_sizes == (1, 3)
    # They are used, not merely present: outputs (and truth) that disagree with the module
    # by 1% on the very inputs verify draws fail its verdict; without them it passes.
    memo = exported.reference
    for table in (memo.expected, memo.truth):
        for key, outputs in table.items():
            table[key] = {k: v * v.dtype.type(1.01) for k, v in outputs.items()}
    graph = tmp_path / "alone.onnx"
    assert not verify(module, graph, providers="cpu", reference_outputs=memo, bisect=False)
    assert verify(module, graph, providers="cpu", bisect=False)


def test_verify_of_the_file_export_checked_takes_its_onnxruntime_outputs(tmp_path):
    """deploy where fold-bn has nothing to fold (the exporter folded the BN into the Conv)
    verifies the very file export checked, and takes onnxruntime's outputs on the inputs that
    check ran instead of running them again; only for that file, unchanged."""
    import shutil

    from normdeploy import export
    from normdeploy.verification.verifier import verify

    torch.manual_seed(0)
    module, x = _CountingCNN().eval(), torch.randn(1, 3, 16, 16)
    result = deploy(module, tmp_path / "out", example_inputs=(x,), providers="cpu")
    assert result, result.to_text()
    assert not result.fold.modified
    said = [n for n in result.verification.notes if "are that check's" in n]
    assert said == [
        "onnxruntime's outputs on cpu for input sets the export check ran are that check's: "
        "the same file, unchanged, on the same inputs"
    ]
    exported = export(module, (x,), tmp_path / "alone.onnx")
    memo = exported.reference
    assert len(memo.graph) == 2  # batch 1 and 3
    # Used, not merely present: outputs 1% off fail the verdict on that file...
    for key, outputs in memo.graph.items():
        memo.graph[key] = {k: v * v.dtype.type(1.01) for k, v in outputs.items()}
    graph = tmp_path / "alone.onnx"
    assert not verify(module, graph, providers="cpu", reference_outputs=memo, bisect=False)
    # ...and a copy of it (another file, the same bytes) is run, not looked up.
    shutil.copyfile(graph, tmp_path / "copy.onnx")
    copied = verify(module, tmp_path / "copy.onnx", providers="cpu", reference_outputs=memo)
    assert copied and not [n for n in copied.notes if "are that check's" in n]
