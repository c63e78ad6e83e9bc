"""The CLI shell: version, help, models listing, exit codes (in-process and as a subprocess)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import models
import normdeploy.folding
from normdeploy import __version__
from normdeploy.budget import allocator_tuned
from normdeploy.cli import main
from normdeploy.cli._options import cli_words

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert __version__ in capsys.readouterr().out
    assert main([]) == 2


def test_models_lists_every_reference_model_with_norms_and_params(capsys):
    assert main(["models", "--format", "json"]) == 0
    listing = json.loads(capsys.readouterr().out)["models"]
    assert [m["name"] for m in listing] == models.names()
    by_name = {m["name"]: m for m in listing}
    resnet = models.get("resnet_mini").build()
    assert by_name["resnet_mini"]["parameters"] == sum(p.numel() for p in resnet.parameters())
    assert by_name["resnet_mini"]["norm_layers"] == {"BatchNorm2d": 9}
    assert by_name["transformer_preln"]["norm_layers"] == {"LayerNorm": 2}
    assert by_name["groupnorm32_cnn"]["norm_layers"] == {"GroupNorm": 2}


def test_cli_py_runs_as_a_script():
    proc = subprocess.run(
        [sys.executable, "cli.py", "models"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "conv_bn_relu" in proc.stdout and "BatchNorm2d" in proc.stdout


def test_the_process_entry_skips_the_collector_at_teardown_and_still_flushes():
    """The entry point freezes what is alive before the interpreter tears down (no cyclic
    collection over the exporter's objects at exit); its exit code, output and atexit handlers
    are main's."""
    code = (
        "import atexit, gc, sys\n"
        "from normdeploy.cli import entry\n"
        "from normdeploy.budget import allocator_tuned\n"
        "atexit.register(lambda: print('tuned', allocator_tuned(), 'frozen', "
        "gc.get_freeze_count() > 0))\n"
        "sys.argv = ['cli.py', 'models']\n"
        "sys.exit(entry())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "conv_bn_relu" in proc.stdout
    assert proc.stdout.rstrip().endswith("tuned True frozen True")
    assert not allocator_tuned()  # a library caller's process keeps glibc's policy
    bad = subprocess.run(
        [sys.executable, "cli.py", "inspect", str(ROOT / "no-such.onnx")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("library", "cli"),
    [
        ("batch_sizes: [0] must be positive", "--batch-sizes: [0] must be positive"),
        ("opset: 7 is outside 9..23", "--opset: 7 is outside 9..23"),
        ("use opset=18 or higher", "use --opset 18 or higher"),
        (
            "give input_shapes=1x3x224x224 (the shape)",
            "give --input-shape 1x3x224x224 (the shape)",
        ),
        ("export with dynamic_batch=False or another", "export with --static or another"),
        ("static, e.g. dynamic_axes=ids=0,2", "static, e.g. --dynamic-axes ids=0,2"),
        ("exporter='torchscript' exports it", "--exporter torchscript exports it"),
        (
            "input_dtypes: only with input_shapes=SHAPE",
            "--input-dtype: only with --input-shape SHAPE",
        ),
        ("output_names: 1 name(s)", "--output-names: 1 name(s)"),
        ("exporter: 'tf' is not one of", "--exporter: 'tf' is not one of"),
        ("in.onnx: opset 7 is older", "in.onnx: opset 7 is older"),  # prose stays prose
        ("the model's seeds differ: batch_sizes", "the model's seeds differ: batch_sizes"),
    ],
)
def test_library_messages_are_printed_in_the_cli_words(library, cli):
    assert cli_words(library) == cli


def _deep_chain_model(depth: int, scale: float = 1.0):
    """Conv(3→4) → BN whose weight reaches the Conv through ``depth`` Identity nodes, and whose
    output goes through ``depth`` Relu-free Identity nodes too (``scale`` multiplies the end,
    to make two graphs differ)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "g"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
        numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "v"),
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
    ]
    nodes = [helper.make_node("Identity", [f"w{i}"], [f"w{i + 1}"]) for i in range(depth)]
    nodes += [
        helper.make_node("Conv", ["x", f"w{depth}"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["t0"], name="bn"),
    ]
    nodes += [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(depth)]
    nodes.append(helper.make_node("Mul", [f"t{depth}", "s"], ["y"]))
    graph = helper.make_graph(
        nodes, "deep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_deep_chains_go_through_every_command_without_recursion(tmp_path, capsys):
    """3,000 Identity nodes feeding the weight and 3,000 after the BN: deeper than Python's
    default recursion limit (1,000), so any walk that recursed over graph depth would fail."""
    import onnx

    depth = 3000
    assert depth > sys.getrecursionlimit()
    onnx.save_model(_deep_chain_model(depth), str(tmp_path / "deep.onnx"))
    onnx.save_model(_deep_chain_model(depth, 1.5), str(tmp_path / "other.onnx"))
    out = tmp_path / "out.onnx"
    assert main(["fold-bn", str(tmp_path / "deep.onnx"), "-o", str(out)]) == 0
    assert "1 of 1 BatchNormalization folded" in capsys.readouterr().out
    assert main(["inspect", str(out), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["op_counts"] == {}  # the BN is gone
    # A mismatch: verify bisects over every one of the ~6,000 values, by name.
    code = main(["verify", str(tmp_path / "deep.onnx"), str(tmp_path / "other.onnx"),
                 "--providers", "cpu", "--format", "json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["passed"] is False
    bisection = report["bisection"]
    assert bisection["first_divergence"] == "y" and len(bisection["probes"]) > 2 * depth


def test_main_gives_back_the_signal_handlers_it_installs(capsys):
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {s: signal.getsignal(s) for s in signals}
    assert main(["models", "--format", "json"]) == 0
    capsys.readouterr()
    assert {s: signal.getsignal(s) for s in signals} == before


def test_an_exit_past_the_library_guards_is_still_one_line_and_exit_2(monkeypatch, capsys):
    """sys.exit(0) from code the library did not guard must not look like success."""

    def exits(*args, **kwargs):
        raise SystemExit(0)

    monkeypatch.setattr(normdeploy.folding, "fold_bn_file", exits)
    assert main(["fold-bn", "in.onnx", "-o", "out.onnx"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "called sys.exit(0)" in lines[0]


def test_a_result_that_cannot_be_printed_is_one_line(monkeypatch, capsys):
    class FullStdout:  # standard output on a full disk
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", FullStdout())
    assert main(["models"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "normdeploy models: error: standard output: cannot write the result "
        "(No space left on device)"
    ]
