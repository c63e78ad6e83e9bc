"""The CLI shell: version, help, models listing, exit codes (in-process and as a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import models
from normdeploy import __version__
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
        ("exporter: 'tf' is not one of", "--exporter: 'tf' is not one of"),
        ("in.onnx: opset 7 is older", "in.onnx: opset 7 is older"),  # prose stays prose
        ("the model's seeds differ: batch_sizes", "the model's seeds differ: batch_sizes"),
    ],
)
def test_library_messages_are_printed_in_the_cli_words(library, cli):
    assert cli_words(library) == cli
