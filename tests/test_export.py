"""export: every reference model × exporter × opset, eval semantics, dynamic batch, simplify, CLI.

Numerical checks run the written file in onnxruntime here (independently of export's own check)
and compare with PyTorch eval of a freshly built model at batch 1 and 3.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import models
from normdeploy.census import FOLDED, GROUPNORM_TRICK
from normdeploy.cli import main
from normdeploy.errors import ExportError, InvalidArgumentError, OutputPathError
from normdeploy.exporting import (
    DEFAULT_OPSET,
    EXPORTERS,
    METADATA_PREFIX,
    OFFERED_OPSETS,
    export,
    export_model,
)
from tests import replicas

# fp32: PyTorch and onnxruntime use different conv/gemm kernels and summation orders; the
# reference models are shallow, so 1e-4 absolute + relative leaves ~10x headroom over the
# ~1e-5 measured worst case while a wrong BN statistic (error ~1e-1) still fails.
ATOL = RTOL = 1e-4

BN_CONV = ("conv_bn_relu", "resnet_mini", "mobilenet_mini", "cnn1d", "cnn3d")


def expected_representation(name: str, exporter: str, opset: int) -> str:
    """How each norm layer of a reference model should appear (measured with torch 2.13)."""
    if name in BN_CONV:
        return FOLDED
    if name in ("decoder_convt", "mlp_bn1d"):
        # TorchScript folds BN only into Conv; dynamo's rewriter also into ConvTranspose/Gemm.
        return FOLDED if exporter == "dynamo" else "BatchNormalization"
    if name.startswith("groupnorm"):
        return (
            "GroupNormalization" if exporter == "dynamo" and opset >= 21 else GROUPNORM_TRICK
        )
    if name == "style_instancenorm":
        return "InstanceNormalization"
    if name == "style_instancenorm_running":
        return (
            "BatchNormalization"  # eval uses running stats: inference-form BatchNormalization
        )
    return "LayerNormalization"


def expected_failure(name: str, exporter: str, opset: int) -> str | None:
    """The clear message expected where an exporter cannot do it (measured with torch 2.13)."""
    if exporter == "dynamo" and opset < 18 and name in ("resnet_mini", "mobilenet_mini"):
        # onnx's converter leaves ReduceMean-18's noop_with_empty_axes in a ReduceMean-13.
        return "converting opset 18 to 17 failed"
    if exporter == "torchscript" and name == "style_instancenorm_running":
        return "instance_norm training for unknown batch size"
    return None


_BUILT: dict[str, nn.Module] = {}


def reference(name: str) -> nn.Module:
    if name not in _BUILT:
        _BUILT[name] = models.get(name).build()
    return _BUILT[name]


def ort_vs_eval(path, module: nn.Module, name: str, batch: int) -> float:
    """Max |ORT - PyTorch eval| on the model's example input at ``batch``; asserts allclose."""
    x = models.get(name).inputs(batch)[0]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = module.eval()(x).numpy()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    return float(np.max(np.abs(got - want)))


# Every model runs at the default (dynamo, 18) and at (torchscript, 17); the models whose
# representation depends on exporter and opset run everywhere. The rest of the 14 × 2 × 3
# matrix is marked slow (NORMDEPLOY_SLOW=1) to keep the suite within its time budget.
FAST_COMBOS = (("dynamo", DEFAULT_OPSET), ("torchscript", 17))
EVERY_COMBO = ("groupnorm32_cnn", "resnet_mini", "style_instancenorm_running")


def matrix() -> list:
    params = []
    for name in models.names():
        for exporter in EXPORTERS:
            for opset in OFFERED_OPSETS:
                fast = (exporter, opset) in FAST_COMBOS or name in EVERY_COMBO
                marks = () if fast else (pytest.mark.slow,)
                params.append(pytest.param(name, exporter, opset, marks=marks))
    return params


def expected_per_module(name: str, exporter: str, opset: int) -> dict[str, str] | None:
    """Models whose norm layers are written differently from one another."""
    if name == "decoder_convt" and exporter == "torchscript":
        # onnxsim (default after TorchScript) folds BN into the plain ConvTranspose and
        # rightly leaves it beside the grouped one.
        return {"bn1": FOLDED, "bn2": "BatchNormalization"}
    return None


@pytest.mark.parametrize(("name", "exporter", "opset"), matrix())
def test_reference_matrix(name, exporter, opset, tmp_path):
    module = reference(name)
    out = tmp_path / f"{name}.onnx"
    failure = expected_failure(name, exporter, opset)
    if failure:
        with pytest.raises(ExportError, match=failure):
            export(module, models.get(name).inputs(1), out, exporter=exporter, opset=opset)
        assert not out.exists()
        return
    result = export(module, models.get(name).inputs(1), out, exporter=exporter, opset=opset)
    assert result.passed, result.to_text()
    assert [c.batch_size for c in result.batch_checks] == [1, 3]
    saved = onnx.load(out)
    assert next(o.version for o in saved.opset_import if o.domain == "") == opset
    reps = {e.module_path: e.representation for e in result.census.entries}
    n_norms = sum(1 for m in module.modules() if type(m).__name__[:-2] in ("BatchNorm",) or
                  isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)))  # fmt: skip
    assert len(reps) == n_norms > 0
    per_module = expected_per_module(name, exporter, opset)
    if per_module is not None:
        assert reps == per_module
    else:
        assert set(reps.values()) == {expected_representation(name, exporter, opset)}, reps
    # LayerNorm and GroupNorm must be confirmed numerically, module by module.
    for entry in result.census.entries:
        if entry.kind in ("LayerNorm", "GroupNorm"):
            assert entry.vs_torch is not None and entry.vs_oracle is not None
            assert entry.confirmed, entry
    assert "dropout" not in result.census.lint_codes()
    for batch in (1, 3):
        ort_vs_eval(out, module, name, batch)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def wild_resnet18(width: int = 8) -> nn.Module:
    """ResNet-18 topology (2-2-2-2 basic blocks), narrow, Dropout before the classifier."""
    torch.manual_seed(0)
    chans = [width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]  # fmt: skip
    cin = width
    for i, c in enumerate(chans):
        layers += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
        cin = c
    model = nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(cin, 10)
    )
    with torch.no_grad():  # non-trivial running statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.train()  # handed over in train mode


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_train_mode_model_from_the_wild_is_reported_and_exported_in_eval(exporter, tmp_path):
    model = wild_resnet18()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    result = export(model, (x,), tmp_path / "wild.onnx", exporter=exporter)
    # The caller's module is untouched: still training, BN statistics unchanged.
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    report = result.train_mode
    assert report.was_training and "<root>" in report.training_modules
    assert any(n.endswith(".1") for n in report.training_modules)  # the stem BatchNorm2d
    assert (
        report.max_abs_train_minus_eval is not None and report.max_abs_train_minus_eval > 1e-3
    )
    assert "TRAIN mode" in result.to_text()
    assert result.passed, result.to_text()
    assert "dropout" not in result.census.lint_codes()
    sess = ort.InferenceSession(
        str(tmp_path / "wild.onnx"), providers=["CPUExecutionProvider"]
    )
    assert not any(n.op_type in ("Dropout", "BatchNormalization") for n in onnx.load(
        tmp_path / "wild.onnx").graph.node)  # fmt: skip
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = copy.deepcopy(model).eval()(xb).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0]
        # 20 conv layers in fp32: ~1e-6 measured; 1e-4 still catches an active Dropout.
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def test_batch1_example_keeps_a_symbolic_batch_for_attention(tmp_path):
    # torch.export turns a size-1 dim into a constant; MultiheadAttention then bakes batch 1.
    name = "transformer_postln"
    out = tmp_path / "t.onnx"
    export(reference(name), models.get(name).inputs(1), out)
    dim0 = onnx.load(out).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    assert ort_vs_eval(out, reference(name), name, 3) < ATOL


def test_static_batch_and_metadata(tmp_path):
    name = "mlp_bn1d"
    out = tmp_path / "m.onnx"
    result = export(
        reference(name), models.get(name).inputs(2), out, dynamic_batch=False, model_name="mlp"
    )
    saved = onnx.load(out)
    assert saved.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert [c.batch_size for c in result.batch_checks] == [2] and result.passed
    meta = {p.key[len(METADATA_PREFIX) :]: p.value for p in saved.metadata_props
            if p.key.startswith(METADATA_PREFIX)}  # fmt: skip
    assert meta["model_name"] == "mlp" and meta["opset"] == str(DEFAULT_OPSET)
    assert meta["exporter"].startswith("dynamo") and meta["dynamic_batch"] == "false"
    assert meta["version"]


def test_simplify_keeps_numerics_and_module_scopes(tmp_path):
    name = "transformer_preln"
    plain = export(reference(name), models.get(name).inputs(1), tmp_path / "a.onnx")
    simp = export(
        reference(name), models.get(name).inputs(1), tmp_path / "b.onnx", simplify=True
    )
    assert not plain.simplify.requested and simp.simplify.applied
    assert simp.simplify.nodes_after < simp.simplify.nodes_before
    # onnxsim drops node metadata; export restores it so the census still maps modules.
    assert {e.representation for e in simp.census.entries} == {"LayerNormalization"}
    assert all(e.confirmed for e in simp.census.entries)
    assert ort_vs_eval(tmp_path / "b.onnx", reference(name), name, 3) < ATOL


def test_simplify_that_changes_numerics_is_discarded(tmp_path, monkeypatch):
    import onnxsim

    def bad_simplify(model, *args, **kwargs):
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        for init in broken.graph.initializer:
            if init.dims and len(init.dims) == 4:  # a conv weight
                w = onnx.numpy_helper.to_array(init) * 1.5
                init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
                break
        return broken, True

    monkeypatch.setattr(onnxsim, "simplify", bad_simplify)
    name = "conv_bn_relu"
    result = export(reference(name), models.get(name).inputs(1), tmp_path / "c.onnx",
                    simplify=True)  # fmt: skip
    assert result.simplify.requested and not result.simplify.applied
    assert "changed numerics" in result.simplify.note
    assert result.passed
    ort_vs_eval(tmp_path / "c.onnx", reference(name), name, 1)


def test_user_errors_and_no_partial_output(tmp_path):
    module, x = reference("conv_bn_relu"), models.get("conv_bn_relu").inputs(1)
    with pytest.raises(InvalidArgumentError, match=r"^exporter: 'tf' is not one of"):
        export(module, x, tmp_path / "a.onnx", exporter="tf")
    with pytest.raises(InvalidArgumentError, match=r"^opset: 7 is outside"):
        export(module, x, tmp_path / "a.onnx", opset=7)
    with pytest.raises(OutputPathError, match="does not exist"):
        export(module, x, tmp_path / "missing" / "a.onnx")
    (tmp_path / "exists.onnx").write_bytes(b"keep")
    with pytest.raises(OutputPathError, match="exists"):
        export(module, x, tmp_path / "exists.onnx")
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep"

    class Broken(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]  # no ONNX symbolic for aten::linalg_svd

    with pytest.raises(ExportError, match="exporter failed"):
        export(Broken(), (torch.randn(2, 3),), tmp_path / "b.onnx", exporter="torchscript",
               opset=13)  # fmt: skip
    assert not (tmp_path / "b.onnx").exists()


def test_export_model_spec_and_cli(tmp_path, capsys):
    result = export_model("layernorm_chw", tmp_path / "ln.onnx")
    assert result.source == "models/layernorm_chw" and result.model_name == "layernorm_chw"
    out, report = tmp_path / "cli.onnx", tmp_path / "r.json"
    rc = main(["export", "groupnorm32_cnn", "-o", str(out), "--opset", "18",
               "--report", str(report), "--format", "json"])  # fmt: skip
    assert rc == 0
    data = json.loads(report.read_text())
    assert data["opset"] == 18 and data["passed"] is True
    assert {e["representation"] for e in data["census"]["entries"]} == {GROUPNORM_TRICK}
    assert json.loads(capsys.readouterr().out)["path"] == str(out)
    assert main(["export", "groupnorm32_cnn", "-o", str(out)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err
    assert main(["export", "no_such_model", "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "unknown reference model" in err and "Traceback" not in err


class _ExportsDouble(nn.Module):
    """The exported graph computes 2·conv(x), PyTorch eval conv(x): the check must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if torch.onnx.is_in_onnx_export() else y


@pytest.mark.parametrize("keep_failed", [False, True], ids=["default", "keep_failed"])
def test_a_failed_export_check_writes_no_graph_unless_kept(tmp_path, keep_failed) -> None:
    torch.manual_seed(0)
    module = _ExportsDouble().eval()
    out = tmp_path / "m.onnx"
    result = export(module, torch.randn(1, 3, 8, 8), out, keep_failed=keep_failed)
    assert not result and not out.exists()
    kept = tmp_path / "m.failed.onnx"
    assert result.written == (kept if keep_failed else None)
    assert result.to_dict()["written"] == (str(kept) if keep_failed else None)
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["m.failed.onnx"] if keep_failed else []
    )
    if (
        keep_failed
    ):  # the kept graph is the one that failed: it computes twice PyTorch's output
        sess = ort.InferenceSession(str(kept), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
        (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        # fp32 3x3x3 conv: ~1e-6 between kernels; 1e-4 is the documented fp32 default
        np.testing.assert_allclose(got, 2 * want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keep_failed", [False, True], ids=["passes", "fails-kept"])
def test_a_graph_with_external_data_is_checked_from_its_staged_files(
    tmp_path, monkeypatch, keep_failed
) -> None:
    """Past 2 GB the graph is staged with its weights in NAME.data: the check, the census's
    exposed run and the published (or kept) files all use the staged pair. A small model
    stands in for the large one: the size rule is forced."""
    import normdeploy.exporting as exporting

    monkeypatch.setattr(exporting, "needs_external_data", lambda model: True)
    torch.manual_seed(0)
    module = (_ExportsDouble() if keep_failed else replicas.cnn_module_only()).eval()
    if keep_failed:
        module.conv = nn.Conv2d(3, 64, 3)  # a weight past the external-data threshold
    else:
        replicas.calibrate_bn(module, (torch.randn(4, 3, 16, 16),))
    out = tmp_path / "m.onnx"
    result = export(module, torch.randn(1, 3, 16, 16), out, keep_failed=keep_failed)
    assert result.external_data and bool(result) is not keep_failed
    written = tmp_path / ("m.failed.onnx" if keep_failed else "m.onnx")
    assert result.written == written
    assert sorted(p.name for p in tmp_path.iterdir()) == [written.name, written.name + ".data"]
    header = onnx.load(str(written), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    if not keep_failed:  # the census confirmed its BatchNorm from the exposed run
        assert result.census.entries and all(e.vs_torch for e in result.census.entries)
    sess = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    # fp32 convs in different kernels: ~1e-6 apart; the documented fp32 default is 1e-4
    np.testing.assert_allclose(got, 2 * want if keep_failed else want, rtol=1e-4, atol=1e-4)


class _Float32Projection(nn.Module):
    """Conv → BatchNorm → pool, a projection by a plain float32 tensor attribute (not a
    parameter or buffer), LayerNorm: the module runs in float32 only; in float64 it fails
    between its two norms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.proj = torch.randn(8, 5)
        self.ln = nn.LayerNorm(5)

    def forward(self, x):
        return self.ln(self.bn(self.conv(x)).mean(dim=(2, 3)) @ self.proj)


def test_a_module_that_fails_in_float64_is_judged_on_nominal_floors(tmp_path) -> None:
    torch.manual_seed(0)
    module = _Float32Projection().eval()
    result = export(module, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert result, result.to_text()
    assert any("float64 copy of the module fails" in n for n in result.notes)
    rules = {c.comparison.rule for group in result.batch_checks for c in group.checks}
    assert rules == {"nominal"}
    # The census rode on the same forwards. The BatchNorm ran in float64 before the
    # projection failed: its own float64 output is its truth. The LayerNorm after it never
    # got one: nominal floor. The note says what failed.
    assert any("the float64 forward failed" in n for n in result.census.notes)
    rule = {e.module_path: e.vs_torch.comparison.rule for e in result.census.entries}
    assert rule == {"bn": "float64", "ln": "nominal"}
    # The caller's module is untouched: still float32, still runs.
    assert module.conv.weight.dtype == torch.float32
    module(torch.randn(1, 3, 8, 8))


# ------------------------------------------------------------------- dynamic axes, names


def graph_dims(path) -> dict[str, list]:
    """Input and output name → declared dims (names for symbolic dims)."""
    graph = onnx.load(path).graph
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*graph.input, *graph.output)
    }


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_token_model_exports_with_a_dynamic_batch_and_sequence(exporter, tmp_path):
    model, (ids, mask) = replicas.bert_like()
    out = tmp_path / "bert.onnx"
    result = export(model, (ids, mask), out, exporter=exporter, dynamic_axes=(0, 1))
    assert result.passed, result.to_text()
    # ids and mask share one batch and one sequence dim; output axes follow from the graph.
    dims = graph_dims(out)
    assert dims["input_ids"] == dims["attention_mask"] == ["batch", "sequence"]
    assert dims["logits"] == ["batch", 3] and dims["token_logits"][0] == "batch"
    # dynamo derives the output's length from the input's; TorchScript names it itself.
    length = dims["token_logits"][1]
    assert length == "sequence" if exporter == "dynamo" else isinstance(length, str)
    assert result.dynamic_axes == (
        "batch (input_ids:0, attention_mask:0)", "sequence (input_ids:1, attention_mask:1)",
    )  # fmt: skip
    # The example's sizes at batch 1 and 3, and the sequence at another length.
    assert [c.label for c in result.batch_checks] == [
        "b1/seed0", "b3/seed0", "b1/seed0 sequence=8",
    ]  # fmt: skip
    assert "1, sequence=8" in result.to_text()
    # The written file at a batch and length no check used, against PyTorch eval.
    g = torch.Generator().manual_seed(5)
    ids2 = torch.randint(0, 32, (2, 11), generator=g)
    mask2 = (torch.arange(11) < torch.tensor([[11], [7]])).long()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["logits", "token_logits"], {"input_ids": ids2.numpy(),
                                                "attention_mask": mask2.numpy()})  # fmt: skip
    with torch.no_grad():
        want = model(ids2, mask2)
    for name, value in zip(["logits", "token_logits"], got, strict=True):
        # fp32, 16-wide layers: ~1e-6 between kernels; a graph fixed at length 6 fails to run
        np.testing.assert_allclose(value, want[name].numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_cnn_exports_with_a_dynamic_height_and_width(exporter, tmp_path):
    model, (x,) = replicas.fcn_like()
    out = tmp_path / "fcn.onnx"
    result = export(model, (x,), out, exporter=exporter, dynamic_axes="0,2,3")
    assert result.passed, result.to_text()
    assert graph_dims(out)["x"] == ["batch", 3, "height", "width"]
    # 64 is a multiple of 32: each of H and W is checked at the next one, 96.
    assert [c.label for c in result.batch_checks][2:] == [
        "b1/seed0 height=96", "b1/seed0 width=96",
    ]  # fmt: skip
    assert {c.input_shapes for c in result.batch_checks[2].checks} == {"x[1, 3, 96, 64]"}
    x2 = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(2))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x2.numpy()})
    with torch.no_grad():
        want = model(x2).numpy()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dict_outputs_are_named_by_their_keys_and_names_can_be_given(exporter, tmp_path):
    model, (tokens,) = replicas.token_dict_model()
    export(model, (tokens,), tmp_path / "a.onnx", exporter=exporter)
    graph = onnx.load(tmp_path / "a.onnx").graph
    assert [o.name for o in graph.output] == ["logits", "pooled"]
    assert [i.name for i in graph.input] == ["tokens"]
    result = export(
        model, (tokens,), tmp_path / "b.onnx", exporter=exporter, input_names=["ids"],
        output_names=["scores", "summary"],
    )  # fmt: skip
    assert result.passed
    graph = onnx.load(tmp_path / "b.onnx").graph
    assert [i.name for i in graph.input] == ["ids"]
    assert [o.name for o in graph.output] == ["scores", "summary"]
    with pytest.raises(InvalidArgumentError, match=r"^output_names: 1 name\(s\) for 2 output"):
        export(model, (tokens,), tmp_path / "c.onnx", output_names=["scores"])
    assert not (tmp_path / "c.onnx").exists()


class FixedLength(nn.Module):
    """Learned positions of a fixed length added to the embeddings: only length 6 works."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.position = nn.Parameter(torch.randn(1, 6, 8))
        self.norm = nn.LayerNorm(8)

    def forward(self, ids):
        return self.norm(self.embed(ids) + self.position)


@pytest.mark.parametrize(
    ("exporter", "message"),
    [
        # torch.export specializes the length: the graph comes out static.
        ("dynamo", r"fixes axis 1 of input 'ids' \(sequence\) at 6"),
        # TorchScript writes a dynamic length: the model fails at the check's other length.
        ("torchscript", r"rejects sequence=8 \(axis 1 of input 'ids', 6 in the example\)"),
    ],
)
def test_a_model_that_rejects_another_size_of_a_dynamic_axis_is_one_line(
    exporter, message, tmp_path
):
    with pytest.raises(InvalidArgumentError, match=rf"^dynamic_axes: FixedLength {message}"):
        export(FixedLength().eval(), torch.zeros(2, 6, dtype=torch.long), tmp_path / "f.onnx",
               exporter=exporter, dynamic_axes=(0, 1))  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    # The batch alone is fine.
    export(FixedLength().eval(), torch.zeros(2, 6, dtype=torch.long), tmp_path / "f.onnx",
           exporter=exporter)  # fmt: skip


class DataDependentBranch(nn.Module):
    """A Python branch on a tensor's value: torch.export cannot trace it, TorchScript's tracer
    records the branch taken (the same for every input with a non-zero entry)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.abs().sum() > 0:
            return self.fc(x)
        return x


def test_an_exporter_failure_suggests_what_exports_the_model(tmp_path):
    with pytest.raises(ExportError) as info:
        export(DataDependentBranch().eval(), torch.randn(2, 4), tmp_path / "d.onnx")
    assert str(info.value).endswith("exporter='torchscript' exports it")
    assert "dynamic_batch=False" not in str(info.value)  # static fails the same way
    result = export(DataDependentBranch().eval(), torch.randn(2, 4), tmp_path / "d.onnx",
                    exporter="torchscript")  # fmt: skip
    assert result.passed


def test_a_new_input_shape_keeps_the_examples_integer_dtype(tmp_path):
    # The factory's example is int64 tokens: a longer shape stays int64, with valid ids.
    result = export_model(
        "tests.replicas:token_dict_model", tmp_path / "t.onnx", input_shapes=[(2, 24)]
    )
    assert result.passed, result.to_text()
    (tokens,) = onnx.load(tmp_path / "t.onnx").graph.input
    assert tokens.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert result.example_shapes == {"tokens": (2, 24)}


def test_input_dtype_makes_inputs_where_there_is_no_example(user_zoo, tmp_path):
    # A factory that returns only a module: --input-shape with --input-dtype int64 (by the
    # forward's parameter name: nn.Sequential's is 'input').
    result = export_model(
        "zoo_tokens:embedder", tmp_path / "e.onnx", input_shapes={"input": (2, 5)},
        input_dtypes="int64",
    )  # fmt: skip
    assert result.passed, result.to_text()
    assert onnx.load(tmp_path / "e.onnx").graph.input[0].type.tensor_type.elem_type == (
        onnx.TensorProto.INT64
    )
    with pytest.raises(InvalidArgumentError, match=r"^input_dtypes: 'float7' is not one of"):
        export_model("zoo_tokens:embedder", tmp_path / "f.onnx", input_shapes=[(2, 5)],
                     input_dtypes="float7")  # fmt: skip


@pytest.fixture
def user_zoo(tmp_path, monkeypatch):
    (tmp_path / "zoo_tokens.py").write_text(
        "from torch import nn\n\n"
        "def embedder():\n"
        "    return nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8)).eval()\n"
    )
    monkeypatch.chdir(tmp_path)
