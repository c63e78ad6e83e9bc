"""verify: reference models pass on CPU; planted faults fail with the right module named.

The oracle is PyTorch eval mode (a fresh build of each reference model) and, for the statistics,
numpy on the same onnxruntime/PyTorch outputs. Graphs come from the TorchScript exporter (fast);
it folds BatchNorm into the preceding Conv, which the bisection has to see through.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import models
from normdeploy.census.lints import model_eval_mode_lints as graph_flags
from normdeploy.census.results import ERROR
from normdeploy.cli import main
from normdeploy.errors import InputFileError, InvalidArgumentError, ModelSpecError
from normdeploy.onnx_graph import graph_input_specs
from normdeploy.shapes import batch_axes
from normdeploy.verification.compare import (
    BATCH_INDEPENDENCE,
    CUDA_FLOOR,
    CUDA_VS_CPU,
    FLOOR_MIN,
    REFERENCE,
    scale_relative_error,
)
from normdeploy.verification.feeds import make_feeds, stress_feed_sets
from normdeploy.verification.runners import (
    CPU,
    CUDA,
    OrtRunner,
    TorchRunner,
    available_providers,
)
from normdeploy.verification.verifier import verify
from tests import replicas


def _export(
    module: torch.nn.Module, x: torch.Tensor, *, training: bool = False
) -> onnx.ModelProto:
    """TorchScript export with a dynamic batch axis (the dynamo exporter as fallback)."""
    buf = io.BytesIO()
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                training=mode, do_constant_folding=not training,
            )  # fmt: skip
            return onnx.load_from_string(buf.getvalue())
        except Exception:  # TorchScript cannot export InstanceNorm with running stats
            program = torch.onnx.export(
                module, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )  # fmt: skip
            return program.model_proto


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("verify")
    paths = {}
    for name in models.names():
        spec = models.get(name)
        path = out / f"{name}.onnx"
        onnx.save(_export(spec.build(), spec.inputs(2)[0]), path)
        paths[name] = path
    return paths


def _edit(src: Path, dst: Path, node_name: str, change) -> Path:
    """Copy ``src`` to ``dst`` with ``change(array) -> array`` applied to a node's weight."""
    model = onnx.load(src)
    node = next(n for n in model.graph.node if n.name == node_name)
    init = next(t for t in model.graph.initializer if t.name == node.input[1])
    init.CopyFrom(
        numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), init.name)
    )
    onnx.save(model, dst)
    return dst


def _swap_channels(w: np.ndarray) -> np.ndarray:
    w[[0, 1]] = w[[1, 0]]
    return w


# ------------------------------------------------------------------------ passing models


@pytest.mark.parametrize("name", models.names())
def test_every_reference_model_passes_on_cpu_at_batch_1_and_3(name, exported):
    spec = models.get(name)
    result = verify(spec.build(), exported[name], providers="cpu", batch_sizes=(1, 3))
    assert result, result.to_text()
    assert result.providers == (CPU,)
    assert result.batch_sizes == (1, 3)
    kinds = {c.kind for c in result.checks}
    assert kinds == {REFERENCE, BATCH_INDEPENDENCE}
    # The reported statistics are the real ones: recompute b3 with an independent eval forward.
    graph = onnx.load(exported[name])
    feeds = make_feeds(graph_input_specs(graph), 3, 0)
    (actual,) = OrtRunner(graph).infer(feeds).values()
    with torch.no_grad():
        (x,) = feeds.values()
        expected = spec.build()(torch.from_numpy(x)).double().numpy()
    b3 = next(c for c in result.checks if c.kind == REFERENCE and c.inputs == "b3/seed0")
    assert b3.comparison.max_abs == pytest.approx(
        np.abs(actual.astype(np.float64) - expected).max(), abs=1e-9
    )


def test_train_mode_module_is_reported_verified_in_eval_and_left_untouched(exported):
    module = models.get("resnet_mini").build().train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    result = verify(module, exported["resnet_mini"], providers="cpu")
    assert result, result.to_text()
    assert result.train_mode is not None and result.train_mode.was_training
    # Batch statistics vs running statistics: the train output is far from eval.
    assert result.train_mode.max_abs_train_minus_eval > 1e-2
    assert module.training and all(m.training for m in module.modules())
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no running-stat update


def test_eval_module_stays_in_eval(exported):
    module = models.get("conv_bn_relu").build()
    result = verify(module, exported["conv_bn_relu"], providers="cpu")
    assert result and not result.train_mode.was_training
    assert not any(m.training for m in module.modules())


# ------------------------------------------------------------------------ planted faults


def test_swapped_channels_fail_and_bisection_names_the_conv(exported, tmp_path):
    bad = _edit(
        exported["resnet_mini"], tmp_path / "swap.onnx", "/layer3/conv2/Conv", _swap_channels
    )
    result = verify(models.get("resnet_mini").build(), bad, providers="cpu")
    assert not result
    culprit = result.bisection.first_divergence
    assert culprit.key == "layer3.conv2"
    # TorchScript folded layer3.bn2 into the Conv: it is listed, not silently lost.
    assert culprit.absorbed == ("layer3.bn2",)
    folded = {u.key for u in result.bisection.no_counterpart}
    assert {"bn1", "layer1.bn1", "layer3.bn2"} <= folded
    assert "layer3.conv2" in result.diagnosis


def test_one_weight_perturbed_by_1e_3_relative_is_named(exported, tmp_path):
    """A 1e-3 relative change of one weight moves resnet_mini's logits by ~1e-5 of their scale:
    50-300× the model's own float32 error against float64, so the default policy fails it
    (a fixed atol=rtol=1e-4 let it pass)."""

    def bump_largest(w: np.ndarray) -> np.ndarray:
        i = np.unravel_index(np.argmax(np.abs(w)), w.shape)
        w[i] *= 1 + 1e-3
        return w

    bad = _edit(
        exported["resnet_mini"], tmp_path / "bump.onnx", "/layer2/conv1/Conv", bump_largest
    )
    module = models.get("resnet_mini").build()
    assert verify(module, exported["resnet_mini"], providers="cpu")  # the control
    result = verify(module, bad, providers="cpu")
    assert not result
    culprit = result.bisection.first_divergence
    assert (culprit.key, culprit.absorbed) == ("layer2.conv1", ("layer2.bn1",))
    assert culprit.node == "/layer2/conv1/Conv (Conv)"


def test_graph_with_batch_statistics_is_flagged_and_fails_batch_independence(tmp_path):
    spec = models.get("resnet_mini")
    path = tmp_path / "train.onnx"
    onnx.save(_export(spec.build().train(), spec.inputs(2)[0], training=True), path)
    result = verify(spec.build(), path, providers="cpu")
    assert not result
    bn_flags = [f for f in result.graph_flags if f.code == "bn-training-mode"]
    assert len(bn_flags) == 9 and all(f.severity == ERROR for f in bn_flags)
    # every BN says the same thing: the diagnosis says it once, with the count
    assert result.diagnosis.count(bn_flags[0].message) == 1
    assert "(9 nodes: " in result.diagnosis and "(+6 more)" in result.diagnosis
    assert result.to_text().count(bn_flags[0].message) == 2  # the diagnosis and one flag line
    independence = [c for c in result.checks if c.kind == BATCH_INDEPENDENCE]
    assert independence and not any(c.passed for c in independence)
    culprit = result.bisection.first_divergence
    assert culprit.key == "bn1" and culprit.kind == "BatchNorm2d"


def test_dropped_batchnorm_eps_fails_on_a_dead_channel(tmp_path):
    """A channel whose running variance is 0 (a dead channel) is where eps matters."""
    spec = models.get("decoder_convt")
    module = spec.build()
    with torch.no_grad():
        module.bn2.running_var[0] = 0.0
    model = _export(module, spec.inputs(2)[0])
    good = tmp_path / "good.onnx"
    onnx.save(model, good)
    assert verify(module, good, providers="cpu")  # BN after ConvTranspose is kept, eps intact
    bn = next(n for n in model.graph.node if n.name == "/bn2/BatchNormalization")
    next(a for a in bn.attribute if a.name == "epsilon").f = 0.0
    bad = tmp_path / "no_eps.onnx"
    onnx.save(model, bad)
    result = verify(module, bad, providers="cpu")
    assert not result
    assert result.bisection.first_divergence.key == "bn2"


# ------------------------------------------------------------------------- ONNX vs ONNX


def test_onnx_vs_onnx_same_passes_and_edited_fails_with_module_named(exported, tmp_path):
    a = exported["mobilenet_mini"]
    assert verify(a, a, providers="cpu")
    b = _edit(a, tmp_path / "b.onnx", "/features/features.9/Conv", _swap_channels)
    result = verify(a, b, providers="cpu")
    assert not result and result.reference_kind == "onnx"
    assert result.bisection.mapping == "module"
    assert result.bisection.first_divergence.key == "features.9"


def test_onnx_vs_onnx_without_module_names_bisects_by_value(tmp_path):
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) {
            a = Relu(x)
            b = Mul(a, s)
            y = Add(b, t)
        }
    """
    base = onnx.parser.parse_model(text)
    for name, value in (("s", 2.0), ("t", 0.5)):
        base.graph.initializer.append(
            numpy_helper.from_array(np.full(4, value, np.float32), name)
        )
    changed = onnx.ModelProto()
    changed.CopyFrom(base)
    changed.graph.initializer[1].CopyFrom(
        numpy_helper.from_array(np.full(4, 0.6, np.float32), "t")
    )
    result = verify(base, changed, providers="cpu")
    assert not result and result.bisection.mapping == "value"
    assert result.bisection.first_divergence.key == "y"  # a and b agree; the Add differs


# --------------------------------------------------------------------- inputs and errors


def test_npz_feeds_are_used_and_bad_names_are_user_errors(exported, tmp_path):
    path = exported["mlp_bn1d"]
    module = models.get("mlp_bn1d").build()
    good = tmp_path / "feeds.npz"
    np.savez(good, input=np.linspace(-30, 30, 5 * 64, dtype=np.float32).reshape(5, 64))
    result = verify(module, path, providers="cpu", inputs=good)
    assert result and any(c.inputs == "feeds.npz" for c in result.checks)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((1, 64), np.float32))
    with pytest.raises(InputFileError, match=r"missing input\(s\) input; unknown name\(s\) x"):
        verify(module, path, providers="cpu", inputs=bad)


def test_bad_arguments_are_user_errors(exported):
    module = models.get("conv_bn_relu").build()
    with pytest.raises(InvalidArgumentError, match=r"^batch_sizes: \[0\] must be positive"):
        verify(module, exported["conv_bn_relu"], batch_sizes=(0,))
    with pytest.raises(InvalidArgumentError, match=r"^seeds: 0 must be a positive integer"):
        verify(module, exported["conv_bn_relu"], seeds=0)
    with pytest.raises(InputFileError, match="does not exist"):
        verify(module, "missing.onnx")
    with pytest.raises(ModelSpecError):
        verify("no_such_model", exported["conv_bn_relu"])
    # A model that does not match the graph: a user error, not a traceback.
    with pytest.raises(InvalidArgumentError, match="fails on the graph's inputs"):
        verify(models.get("mlp_bn1d").build(), exported["conv_bn_relu"], providers="cpu")


@pytest.mark.skipif(CUDA in available_providers(), reason="CUDA is present here")
def test_cuda_requested_without_it_is_a_user_error(exported):
    with pytest.raises(InvalidArgumentError, match="cuda"):
        verify(models.get("conv_bn_relu").build(), exported["conv_bn_relu"], providers="cuda")
    result = verify(models.get("conv_bn_relu").build(), exported["conv_bn_relu"])
    assert result.providers == (CPU,)
    assert any("CUDA not used" in n for n in result.notes)


def test_graph_flags_dropout_and_training_batchnorm():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) {
            r = Constant <value = float {0.5}> ()
            on = Constant <value = bool {1}> ()
            y = Dropout(x, r, on)
        }
    """
    flags = graph_flags(onnx.parser.parse_model(text))
    assert [(f.severity, f.op) for f in flags] == [(ERROR, "Dropout")]


def test_torch_runner_matches_outputs_by_position_and_never_touches_the_module():
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.bn(x)
            return {"a": y, "b": (y * 2, y + 1)}

    module = TwoHeads().train()
    runner = TorchRunner(module, ["x"], ["p", "q", "r"])
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = runner.infer({"x": x})
    assert list(out) == ["p", "q", "r"]
    expected = x / np.sqrt(1 + 1e-5)  # eval: running mean 0, var 1
    np.testing.assert_allclose(out["q"], 2 * expected, rtol=1e-6)  # fp32 division only
    assert module.training and int(module.bn.num_batches_tracked) == 0


# ------------------------------------------------------------------------------- the CLI


def test_cli_exit_codes_and_reports(exported, tmp_path, capsys):
    path = str(exported["conv_bn_relu"])
    report = tmp_path / "r.json"
    assert (
        main(["verify", "conv_bn_relu", path, "--providers", "cpu", "--report", str(report)])
        == 0
    )
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["providers"] == [CPU]
    assert "PASS" in capsys.readouterr().out
    b = _edit(exported["conv_bn_relu"], tmp_path / "b.onnx", "/0/Conv", _swap_channels)
    md = tmp_path / "r.md"
    assert main(["verify", path, str(b), "--report", str(md)]) == 1
    text = md.read_text()
    assert "## Verification: FAIL" in text and "error jumps at module '0' [Conv]" in text
    capsys.readouterr()
    assert main(["verify", "conv_bn_relu", str(tmp_path / "nope.onnx")]) == 2
    assert "nope.onnx" in capsys.readouterr().err
    assert main(["verify", "conv_bn_relu", path, "--batch-sizes", "1,x"]) == 2
    assert main(["verify", "conv_bn_relu", path, "--report", str(report)]) == 2  # exists


# --------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_path_compares_against_cpu_and_pytorch(exported):
    result = verify(
        models.get("resnet_mini").build(), exported["resnet_mini"], providers="cpu,cuda"
    )
    assert result, result.to_text()
    assert result.providers == (CPU, CUDA)
    kinds = {(c.kind, c.provider) for c in result.checks}
    assert {(REFERENCE, CUDA), (CUDA_VS_CPU, CUDA), (BATCH_INDEPENDENCE, CUDA)} <= kinds
    cuda_ref = [c for c in result.checks if c.kind == REFERENCE and c.provider == CUDA]
    # TF32 on CUDA: the floor is at least CUDA_FLOOR.
    assert all(c.comparison.floor_used >= CUDA_FLOOR for c in cuda_ref)


# ------------------------------------------------------------------- faults and the floor


def _floor_and_outputs(module, path, sets, specs):
    """The floor as the policy defines it, measured here: PyTorch float32 against a float64
    copy of the module on verify's default inputs, per output, never below float32's unit
    roundoff; and the float64 outputs (the scale of each output)."""
    names = [s.name for s in specs]
    outputs = [o.name for o in onnx.load(path, load_external_data=False).graph.output]
    f32 = TorchRunner(module, names, outputs)
    f64 = TorchRunner(module, names, outputs, dtype=torch.float64)
    truths = [f64.infer(fs.feeds) for fs in sets]
    floor = {
        name: max(
            FLOOR_MIN["float32"],
            *(
                scale_relative_error(f32.infer(fs.feeds)[name], t[name])
                for fs, t in zip(sets, truths, strict=True)
            ),
        )
        for name in outputs
    }
    return floor, truths


@pytest.mark.parametrize("name", ["preact_bn_stack", "wide_range_head", "token_dict_model"])
def test_noise_in_one_weight_tensor_fails_once_it_moves_an_output_20x_its_floor(
    name, replica_deploys, tmp_path
):
    """Seeded noise of 1e-4·std in ONE weight tensor at a time (first, middle, last): every
    case whose output moves >= 20 floors fails; the honest graph passes on several seeds."""
    module, _ = replicas.ALL[name]()
    path = replica_deploys[name][1] / "model.onnx"
    assert verify(module, path, providers="cpu", seeds=3), "honest graph, seeds 0-2"
    model = onnx.load(path)
    specs = graph_input_specs(model)
    sets, _ = stress_feed_sets(specs, (1, 3), 1, None, batch_axes(specs))
    floor, truths = _floor_and_outputs(module, path, sets, specs)
    honest = OrtRunner(model)
    weights = replicas.weight_tensors(model)
    moved = []
    for tensor in (weights[0], weights[len(weights) // 2], weights[-1]):
        bad = replicas.plant_noise(model, tensor, seed=0)
        faulty = OrtRunner(bad)
        # how far the output moves, relative to its scale, in floors
        move = max(
            np.abs(faulty.infer(fs.feeds)[o] - honest.infer(fs.feeds)[o]).max()
            / np.abs(t[o]).max() / floor[o]
            for fs, t in zip(sets, truths, strict=True) for o in floor
        )  # fmt: skip
        moved.append(move)
        if move >= 20:
            path_bad = tmp_path / f"{tensor.replace('/', '_')}.onnx"
            onnx.save(bad, path_bad)
            result = verify(module, path_bad, providers="cpu", bisect=False)
            assert not result, f"{tensor}: moved {move:.0f} floors and passed"
    assert max(moved) >= 20, moved  # the test would prove nothing otherwise


# ------------------------------------------------------------- matching two graphs' names


def _two_outputs(order: tuple[str, str]) -> onnx.ModelProto:
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] {order[0]}, float[N, 4] {order[1]}) {{
            relu = Relu(x)
            neg = Neg(x)
        }}
    """
    return onnx.parser.parse_model(text)


def test_a_reordered_output_list_is_matched_by_name_and_passes():
    result = verify(
        _two_outputs(("relu", "neg")), _two_outputs(("neg", "relu")), providers="cpu"
    )
    assert result, result.to_text()
    assert "outputs matched by name" in result.notes
    assert {c.comparison.name for c in result.checks if c.kind == REFERENCE} == {"relu", "neg"}


class _Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_torchscript_and_dynamo_exports_match_inputs_by_position(tmp_path):
    """TorchScript names the input 'input.1', dynamo 'x': same count, shapes and dtypes."""
    module = _Head().eval()
    x = torch.randn(2, 8)
    ts, dyn = tmp_path / "ts.onnx", tmp_path / "dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), str(ts), dynamo=False, dynamic_axes={"input.1": {0: "batch"}},
            input_names=["input.1"],
        )  # fmt: skip
        program = torch.onnx.export(
            module, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
    onnx.save(program.model_proto, dyn)
    (ts_in,) = graph_input_specs(onnx.load(ts))
    (dyn_in,) = graph_input_specs(onnx.load(dyn))
    assert (ts_in.name, dyn_in.name) == ("input.1", "x")
    result = verify(ts, dyn, providers="cpu")
    assert result, result.to_text()
    assert any(
        n.startswith("inputs matched by position (names differ: input.1 ↔ x)")
        for n in result.notes
    )


def test_batch_axis_moves_the_batch_for_a_sequence_first_model(tmp_path):
    """Exported with batch_axis=1, the graph's dim named 'batch' is axis 1: verify finds it by
    name and checks batch independence there (axis 0, the sequence, couples samples)."""
    from normdeploy.exporting import export

    module, example = replicas.seq_first_transformer()
    path = tmp_path / "seq.onnx"
    assert export(module, example, path, batch_axis=1)
    (spec,) = graph_input_specs(onnx.load(path))
    assert spec.shape[1] == "batch" and batch_axes([spec]) == {spec.name: 1}
    result = verify(module, path, providers="cpu")
    assert result, result.to_text()
    independence = [c for c in result.checks if c.kind == BATCH_INDEPENDENCE]
    assert independence and all(independence)
    assert [s for _, s in result.inputs_ran][-1].endswith("[5, 3, 16]")


# ------------------------------------------------------------------ shapes from the graph


def test_a_module_only_factory_is_verified_and_inspected_from_the_graphs_shapes(
    tmp_path, capsys
):
    """torchvision/timm constructors return only a module: the ONNX file declares the shapes
    (its input is 'input', nn.Sequential's forward parameter)."""
    from normdeploy.exporting import export

    module = replicas.cnn_module_only()
    static, dynamic = tmp_path / "static.onnx", tmp_path / "hw.onnx"
    assert export(module, torch.randn(1, 3, 32, 32), static)
    assert export(module, torch.randn(1, 3, 32, 32), dynamic, dynamic_axes=(0, 2, 3))
    factory = "tests.replicas:cnn_module_only"
    assert main(["verify", factory, str(static), "--format", "json"]) == 0
    ran = [r["shapes"] for r in json.loads(capsys.readouterr().out)["inputs_ran"]]
    assert ran == ["input[1, 3, 32, 32]", "input[3, 3, 32, 32]"]
    assert main(["inspect", str(static), "--module", factory, "--format", "json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert len(entries) == 2 and all(e["confirmed"] for e in entries)
    # Symbolic H and W: --input-shape sizes them, and its batch is the one run.
    argv = ["verify", factory, str(dynamic), "--input-shape", "2x3x48x40", "--format", "json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["shapes"] for r in data["inputs_ran"]] == [
        "input[2, 3, 48, 40]",
        "input[1, 3, 48, 40]",
    ]
    assert data["batch_sizes"] == [2]
    # --batch-sizes wins over that batch, and the report says so.
    assert main([*argv, "--batch-sizes", "1,3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batch_sizes"] == [1, 3]
    assert (
        "batch sizes 1, 3 (batch_sizes) replace the batch 2 of input_shapes" in data["notes"]
    )
    # Without --input-shape: the first size tried at which the graph runs, said in a note.
    assert main(["verify", factory, str(dynamic), "--format", "json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(n.startswith("symbolic dim(s) height=8, width=8 chosen") for n in notes)
    # A static dim the shape contradicts is exit 2.
    assert main(["verify", factory, str(static), "--input-shape", "1x3x64x64"]) == 2
    assert "dim 2 is fixed at 32" in capsys.readouterr().err


def test_symbolic_dims_of_another_toolchains_graph_are_sized_where_it_runs():
    """[N, 3, H, W] that runs only at multiples of 32: verify chooses 32, and says so."""
    from fold_support import multiple_of_model

    from normdeploy.folding import fold_bn

    model = multiple_of_model(32)
    folded = fold_bn(model).model
    result = verify(model, folded, providers="cpu")
    assert result, result.to_text()
    assert [s for _, s in result.inputs_ran] == ["X[1, 3, 32, 32]", "X[3, 3, 32, 32]"]
    assert any(n.startswith("symbolic dim(s) H=32, W=32 chosen") for n in result.notes)
    result = verify(model, folded, providers="cpu", input_shapes=[(2, 3, 64, 96)])
    assert [s for _, s in result.inputs_ran] == ["X[2, 3, 64, 96]", "X[1, 3, 64, 96]"]


def test_name_shape_sizes_one_input_of_two_and_shared_dims_follow(tmp_path):
    from normdeploy.exporting import export

    module, example = replicas.bert_like()
    path = tmp_path / "bert.onnx"
    assert export(module, example, path, dynamic_axes=(0, 1))
    result = verify("tests.replicas:bert_like", path, input_shapes={"input_ids": (2, 12)})
    assert result, result.to_text()
    # attention_mask shares the 'sequence' dim: it follows the ids.
    assert result.inputs_ran[0] == ("b2/seed0", "input_ids[2, 12], attention_mask[2, 12]")
    with pytest.raises(
        InvalidArgumentError, match=r"^input_shapes: input 'attention_mask' dim"
    ):
        verify(module, path, input_shapes={"input_ids": (2, 12), "attention_mask": (2, 13)})


def test_dict_outputs_are_matched_to_graph_outputs_by_name(tmp_path):
    from normdeploy.exporting import export

    module, example = replicas.token_dict_model()
    path = tmp_path / "t.onnx"
    assert export(module, example, path)
    graph = onnx.load(path)
    assert [o.name for o in graph.graph.output] == ["logits", "pooled"]
    # The same outputs listed in the other order (another toolchain's graph): by name, PASS.
    reordered = onnx.ModelProto()
    reordered.CopyFrom(graph)
    reordered.graph.output.reverse()
    result = verify(module, reordered, providers="cpu")
    assert result, result.to_text()
    assert {c.comparison.name for c in result.checks if c.kind == REFERENCE} == {
        "logits", "pooled",
    }  # fmt: skip
    # Names that lie about what the outputs hold fail, where matching by position would pass.
    swapped = onnx.ModelProto()
    swapped.CopyFrom(graph)
    first, second = swapped.graph.output
    first.name, second.name = "pooled", "logits"
    for node in swapped.graph.node:
        node.output[:] = [
            {"logits": "pooled", "pooled": "logits"}.get(o, o) for o in node.output
        ]
    assert not verify(module, swapped, providers="cpu", bisect=False)
