"""The file flow around a pass (normdeploy/folding.py): outputs, external data, staging, the
self-check that refuses a wrong rewrite, --no-verify, the streaming writer, and fold-bn on the
reference models exported unfolded by torch."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from fold_support import (
    FoldsOnePercentOff,
    PlantsOneBadWeight,
    assert_same_outputs,
    bn_params,
    conv_bn_file,
    conv_bn_model,
    ops,
    parse,
    w,
)
from onnx import helper

from normdeploy.errors import InvalidModelError, OutputPathError, VerificationFailed
from normdeploy.folding import fold_bn, fold_bn_file, run_pass, run_pass_on_file
from normdeploy.io import sha256_file, write_model
from normdeploy.verification.compare import GRAPH_VS_ORIGINAL
from normdeploy.verification.runners import OrtRunner


def listing(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden ones included (staging must leave none)."""
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- in memory


def test_inplace_mutates_and_default_verify_reports_numbers() -> None:
    model = conv_bn_model()
    result = fold_bn(model, inplace=True)
    assert result.model is model and ops(model) == Counter({"Conv": 1})
    assert result.verified is True and bool(result)
    assert {c.comparison.name for c in result.verification} == {"Y@b2"}
    assert {c.batch_size for c in result.verification} == {2}
    assert all(c.kind == GRAPH_VS_ORIGINAL for c in result.verification)
    # onnxruntime has no double Conv: the nominal floor (1e-6 of the output's scale) applies,
    # and the fold re-rounds each weight once (≤ 2e-7 of scale measured here).
    for check in result.verification:
        comp = check.comparison
        assert comp.rule == "nominal" and comp.error is not None and comp.error < 1e-6


def test_a_file_folds_in_memory_and_is_left_untouched(tmp_path) -> None:
    src = tmp_path / "in.onnx"
    original = conv_bn_file(src)
    digest = sha256_file(src)
    result = fold_bn(src)
    assert result.source == str(src) and result.verified is True
    assert ops(result.model) == Counter({"Conv": 1})
    assert sha256_file(src) == digest and listing(tmp_path) == ["in.onnx"]
    assert_same_outputs(original, result.model)


def test_ledger_renders_every_bn_in_text_json_and_markdown() -> None:
    model = parse(
        """G (float[2,4,5,5] X) => (float[2,6,5,5] Y) {
            T = BatchNormalization (X, g, b, m, v)
            Y = Conv <pads=[1,1,1,1]> (T, W)
        }""",
        {"W": w(6, 4, 3, 3), **bn_params(4)},
    )
    model.graph.node[0].name = "bn_kept"
    result = fold_bn(model)
    assert "bn_kept" in result.to_text() and "| bn_kept |" in result.to_markdown()
    d = result.to_dict()
    assert d["kept"] == 1 and d["ledger"][0]["node"] == "bn_kept"
    assert "padded Conv" in d["ledger"][0]["reason"]
    assert "nothing folded" in result.to_text()
    # Nothing changed, so nothing was compared: not "verified", and the report says why.
    assert result.verification == () and result.verified is None and bool(result)
    assert d["verified"] is None and d["checked"].startswith("nothing folded")


# ----------------------------------------------------------------------------- files


def test_fold_file_writes_output_and_stages_nothing_beside_it(tmp_path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    original = conv_bn_file(src)
    digest = sha256_file(src)
    result = fold_bn_file(src, out)
    assert sha256_file(src) == digest
    assert listing(tmp_path) == ["in.onnx", "out.onnx"]  # no staging folder left behind
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert ops(folded) == Counter({"Conv": 1})
    assert_same_outputs(original, folded)
    d = result.to_dict()
    assert d["folded"] == 1 and d["verified"] is True
    assert d["ledger"][0]["direction"] == "preceding"
    assert result.timings["fold"] >= 0 and result.timings["verify"] >= 0
    with pytest.raises(OutputPathError, match="exists"):
        fold_bn_file(src, out)
    with pytest.raises(OutputPathError, match="overwrite the input"):
        fold_bn_file(src, src, overwrite=True)


def test_external_data_is_kept_and_input_untouched(tmp_path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    conv_bn_file(src, external=True)
    data = tmp_path / "in.onnx.data"
    digests = sha256_file(src), sha256_file(data)
    fold_bn_file(src, out)
    assert (sha256_file(src), sha256_file(data)) == digests
    assert (tmp_path / "out.onnx.data").is_file()
    header = onnx.load_model(str(out), load_external_data=False)
    assert any(
        onnx.external_data_helper.uses_external_data(t) for t in header.graph.initializer
    )
    original = onnx.load(str(src))
    assert_same_outputs(original, onnx.load(str(out)))
    assert listing(tmp_path) == ["in.onnx", "in.onnx.data", "out.onnx", "out.onnx.data"]


def test_output_whose_data_file_is_the_inputs_is_refused(tmp_path) -> None:
    model = conv_bn_file(tmp_path / "tmp.onnx")
    src = tmp_path / "in.onnx"
    onnx.save_model(
        model, str(src), save_as_external_data=True, location="out.onnx.data", size_threshold=0
    )
    digest = sha256_file(tmp_path / "out.onnx.data")
    with pytest.raises(
        OutputPathError,
        match=r"out\.onnx\.data: output's external data would overwrite the input's",
    ):
        fold_bn_file(src, tmp_path / "out.onnx")
    assert sha256_file(tmp_path / "out.onnx.data") == digest


def test_no_verify_writes_without_running_a_check(tmp_path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    original = conv_bn_file(src)
    result = fold_bn_file(src, out, verify=False)
    assert result.verified is None and "verify" not in result.timings
    assert "not verified" in result.to_text()
    assert_same_outputs(original, onnx.load(str(out)))


def test_a_bn_that_computes_nan_is_an_input_error_and_nothing_is_written(tmp_path) -> None:
    src = tmp_path / "in.onnx"
    p = bn_params(4)
    p["v"] = np.array([1.0, -1.0, 0.5, 0.5], np.float32)
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y) {
            A = Conv (X, W)
            Y = BatchNormalization (A, g, b, m, v)
        }""",
        {"W": w(4, 3, 3, 3), **p},
    )
    model.graph.node[1].name = "bn"
    onnx.save_model(model, str(src))
    with pytest.raises(InvalidModelError, match=r"'bn' has var \+ epsilon <= 0"):
        fold_bn_file(src, tmp_path / "out.onnx")
    assert listing(tmp_path) == ["in.onnx"]


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_conv_weights_keep_the_bn_and_say_so(bad) -> None:
    """The producer's own weights are NaN/inf: the BN stays, the ledger says the folded values
    would not be finite (not an overflow), and the JSON says nothing was compared."""
    weight = w(4, 3, 3, 3)
    weight[0, 0, 0, 0] = bad
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y) {
            A = Conv (X, W)
            Y = BatchNormalization (A, g, b, m, v)
        }""",
        {"W": weight, **bn_params(4)},
    )
    d = fold_bn(model).to_dict()
    (entry,) = d["ledger"]
    assert entry["action"] == "kept" and "folded values are not finite" in entry["reason"]
    assert "overflow" not in entry["reason"]
    assert d["verified"] is None and d["checked"].startswith("nothing folded")


def test_stream_writer_is_byte_identical_to_serialize(tmp_path) -> None:
    model = conv_bn_file(tmp_path / "m.onnx")
    model.graph.value_info.add().name = "extra"
    helper.set_model_props(model, {"k": "v"})
    path = tmp_path / "s.onnx"
    with open(path, "wb") as f:
        written = write_model(model, f)
    assert path.read_bytes() == model.SerializeToString()
    assert written == path.stat().st_size


# ----------------------------------------------------------------------------- a wrong rewrite


def test_wrong_fold_fails_verification_and_writes_nothing(tmp_path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    conv_bn_file(src)
    digest = sha256_file(src)
    with pytest.raises(VerificationFailed, match=r"out\.onnx not written") as info:
        run_pass_on_file(FoldsOnePercentOff(), src, out)
    result = info.value.result
    assert result.verified is False and not result
    assert {c.comparison.name for c in result.verification if not c} == {"Y@b2"}
    assert "FAIL" in result.to_markdown()
    assert listing(tmp_path) == ["in.onnx"] and sha256_file(src) == digest


def test_wrong_fold_with_no_verify_is_written_and_really_wrong(tmp_path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    original = conv_bn_file(src)
    result = run_pass_on_file(FoldsOnePercentOff(), src, out, verify=False)
    assert result.verified is None and out.exists()
    # the failing tests above fail for the planted error, not for noise
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_same_outputs(original, onnx.load(str(out)))


def test_planted_weight_corruption_raises_and_writes_nothing(tmp_path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    conv_bn_file(src, external=True)
    before = listing(tmp_path)
    digests = [sha256_file(tmp_path / name) for name in before]
    with pytest.raises(VerificationFailed, match="not written") as info:
        run_pass_on_file(PlantsOneBadWeight(), src, out)
    assert info.value.result.verified is False
    assert listing(tmp_path) == before  # no output, no data file, no temp files
    assert [sha256_file(tmp_path / name) for name in before] == digests


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_wrong_fold_in_memory_raises_with_the_result(inplace) -> None:
    model = conv_bn_model()
    before = model.SerializeToString()
    what = "rewritten in place" if inplace else "the input was not changed"
    with pytest.raises(VerificationFailed, match=what) as info:
        run_pass(PlantsOneBadWeight(), model, inplace=inplace)
    result = info.value.result
    assert result.verified is False
    assert (result.model is model) is inplace
    assert (model.SerializeToString() == before) is not inplace


# ----------------------------------------------------------------------------- reference models


@pytest.mark.parametrize(
    "name", ["resnet_mini", "mobilenet_mini", "decoder_convt", "mlp_bn1d", "cnn1d", "cnn3d"]
)
def test_reference_models_exported_without_folding(name, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    import models

    ref = models.get(name)
    module = ref.build().eval()
    (x,) = ref.inputs(2)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        module, (x,), str(path), dynamo=False, do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"],
        dynamic_axes={"x": {0: "b"}}, opset_version=17,
    )  # fmt: skip
    exported = onnx.load(str(path))
    n_bn = ops(exported)["BatchNormalization"]
    assert n_bn > 0, "the exporter folded BN itself; this test needs it kept"
    result = fold_bn(exported)  # verifies against the unfolded graph on onnxruntime
    assert result.verified and len(result.ledger) == n_bn
    assert not result.skipped, result.to_text()  # every BN in these models folds exactly
    assert "BatchNormalization" not in ops(result.model)
    onnx.checker.check_model(result.model, full_check=True)
    with torch.no_grad():
        expected = module(x).numpy()
    got = OrtRunner(result.model).infer({"x": x.numpy()})
    # fp32, PyTorch vs onnxruntime kernels on small nets: see compare.py's fp32 default.
    np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-4, atol=1e-4)
    assert re.search(r"\d+ of \d+ BatchNormalization folded", result.to_text())


def _bn_behind_shape_ops(kind: str):
    """A LeViT or token-MLP block (tests/blocks.py) with statistics far from identity."""
    import torch
    from blocks import LinearNorm, TokenMLP

    torch.manual_seed(0)
    module = {"levit": LinearNorm, "token_mlp": TokenMLP}[kind]().eval()
    with torch.no_grad():
        module.bn.running_mean.normal_(0, 2)
        module.bn.running_var.uniform_(0.2, 3)
        module.bn.weight.normal_()
        module.bn.bias.normal_()
    return module


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["levit", "token_mlp"])
def test_real_blocks_with_bn_behind_shape_ops_fold_completely(kind, exporter) -> None:
    torch = pytest.importorskip("torch")
    from normdeploy.exporting import exporter_quiet

    module = _bn_behind_shape_ops(kind)
    x = torch.randn(2, 7, 16)
    with exporter_quiet():
        if exporter == "dynamo":
            exported = torch.onnx.export(
                module, (x,), dynamo=True, opset_version=18,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            ).model_proto  # fmt: skip
        else:
            buf = io.BytesIO()
            torch.onnx.export(
                module, (x,), buf, dynamo=False, opset_version=17, input_names=["x"],
                dynamic_axes={"x": {0: "batch"}},
            )  # fmt: skip
            exported = onnx.load_from_string(buf.getvalue())
    assert ops(exported)["BatchNormalization"] == 1, "the exporter folded it already"
    result = fold_bn(exported)  # verifies against the unfolded graph on onnxruntime
    assert result.verified and len(result.folded) == 1, result.to_text()
    assert "BatchNormalization" not in ops(result.model)
    onnx.checker.check_model(result.model, full_check=True)
    x3 = torch.randn(3, 7, 16)  # another batch size than traced: the batch stays symbolic
    with torch.no_grad():
        expected = module(x3).numpy()
    got = OrtRunner(result.model).infer({result.model.graph.input[0].name: x3.numpy()})
    # fp32 Linear over 16 features, PyTorch vs onnxruntime kernels: ~1e-6 measured.
    np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-4, atol=1e-4)
