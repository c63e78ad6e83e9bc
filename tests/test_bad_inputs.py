"""Every row of docs/BAD_INPUTS.md: one clear line on stderr, the documented exit code, no
traceback, no partial output, and the input file unchanged.

Each case builds its inputs in a temp directory, runs the CLI in-process (``main(argv)``), and
checks the contract. A few cases also run as a real subprocess to prove no traceback escapes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import normdeploy.io
from normdeploy.cli import main
from normdeploy.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BAD_INPUTS.md"

USER_FACTORIES = """
import torch
from torch import nn

def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), torch.zeros(1, 3, 8, 8)

def broken():
    raise RuntimeError("boom")

def not_a_module():
    return "a string"

def zero_channels():
    return nn.Sequential(nn.Conv2d(3, 0, 3)), torch.zeros(1, 3, 8, 8)
"""


def conv_bn_graph(
    *,
    mean: np.ndarray | None = None,
    var: np.ndarray | None = None,
    eps: float = 1e-5,
    opset: int = 17,
    c: int = 4,
) -> onnx.ModelProto:
    """x → Conv(3→c, 3×3) → BatchNormalization → y with adjustable statistics."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
        numpy_helper.from_array(
            (rng.standard_normal(c) if mean is None else mean).astype(np.float32), "mean"
        ),
        numpy_helper.from_array(
            (rng.random(c) + 0.5 if var is None else var).astype(np.float32), "var"
        ),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"], name="bn",
            epsilon=eps,
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@dataclass
class Case:
    """A bad input: how to build it, the argv, and what the user must get."""

    id: str
    argv: list[str]
    code: int
    message: str  # regex the one stderr line must match
    setup: Callable[[Path], None] = lambda d: None
    outputs: list[str] = field(default_factory=list)  # must not exist afterwards
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        p = d / name
        if isinstance(data, str):
            p.write_text(data)
        else:
            p.write_bytes(data)

    return setup


def _save(name: str, model_fn: Callable[[], onnx.ModelProto]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        onnx.save_model(model_fn(), str(d / name))

    return setup


def _truncated(d: Path) -> None:
    data = conv_bn_graph().SerializeToString()
    (d / "in.onnx").write_bytes(data[: len(data) // 2])


def _missing_external_data(d: Path) -> None:
    # 32 output channels: the weight is over the inline-size threshold, so it goes external
    normdeploy.io.save_onnx(conv_bn_graph(c=32), d / "in.onnx", external_data=True)
    (d / "in.onnx.data").unlink()


def _fails_checker() -> onnx.ModelProto:
    model = conv_bn_graph()
    model.graph.node[0].input[1] = "undefined_weight"
    return model


def _user_pkg(d: Path) -> None:
    (d / "userzoo_bad.py").write_text(USER_FACTORIES)


def _weights(kind: str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        _user_pkg(d)
        own = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
        ).state_dict()
        if kind == "keys":
            torch.save({"other.weight": torch.zeros(1)}, d / "w.pt")
        elif kind == "shapes":
            own["0.weight"] = torch.zeros(2, 2)
            torch.save(own, d / "w.pt")
        elif kind == "pickle":
            import pickle

            with open(d / "w.pt", "wb") as f:
                pickle.dump({"0.weight": Exception("not a tensor")}, f)

    return setup


def _unreadable(mp: pytest.MonkeyPatch) -> None:
    real = normdeploy.io.os.access
    mp.setattr(
        normdeploy.io.os,
        "access",
        lambda p, mode: False if str(p).endswith("in.onnx") else real(p, mode),
    )


# Both ONNX writers: onnx.save_model (export, external data) and fold-bn's streaming writer.
WRITERS = ((onnx, "save_model"), (normdeploy.io, "write_model"))


def _no_space(mp: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    for owner, name in WRITERS:
        mp.setattr(owner, name, full)


def _interrupt(mp: pytest.MonkeyPatch) -> None:
    def interrupt_after(real):
        def write_then_interrupt(model, f, *args, **kwargs):
            real(model, f, *args, **kwargs)  # the temp file is fully written …
            raise KeyboardInterrupt  # … and Ctrl-C arrives before the rename

        return write_then_interrupt

    for owner, name in WRITERS:
        mp.setattr(owner, name, interrupt_after(getattr(owner, name)))


ONNX_IN = _save("in.onnx", conv_bn_graph)


def _both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        for one in setups:
            one(d)

    return setup


def _npz(arrays: dict[str, np.ndarray]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        ONNX_IN(d)
        np.savez(d / "feed.npz", **arrays)

    return setup


CASES: list[Case] = [
    # ---- input files
    Case("missing-path", ["inspect", "{d}/nope.onnx"], 2, r"nope\.onnx: ONNX file does not exist"),
    Case("directory", ["inspect", "{d}"], 2, r"is a directory"),
    Case("unreadable", ["inspect", "{d}/in.onnx"], 2, r"not readable", ONNX_IN, patch=_unreadable),
    Case("empty-file", ["inspect", "{d}/in.onnx"], 2, r"in\.onnx: ONNX file is empty", _write("in.onnx", b"")),
    Case("text-as-onnx", ["inspect", "{d}/in.onnx"], 2, r"cannot parse as ONNX|not an ONNX model", _write("in.onnx", "hello\n")),
    Case("json-as-onnx", ["inspect", "{d}/in.onnx"], 2, r"JSON|not an ONNX model|cannot parse", _write("in.onnx", '{"a": 1}')),
    Case("png-as-onnx", ["inspect", "{d}/in.onnx"], 2, r"PNG|not an ONNX model|cannot parse", _write("in.onnx", b"\x89PNG\r\n\x1a\n" + bytes(64))),
    Case("truncated-onnx", ["inspect", "{d}/in.onnx"], 2, r"in\.onnx", _truncated),
    Case("missing-external-data", ["inspect", "{d}/in.onnx"], 2, r"external data file 'in\.onnx\.data'.*missing", _missing_external_data),
    Case("fails-checker", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"fails onnx\.checker: node 'conv' reads 'undefined_weight'", _save("in.onnx", _fails_checker), ["o.onnx"]),
    Case("opset-too-old", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"opset 6 is older than the oldest supported \(9\)", _save("in.onnx", lambda: conv_bn_graph(opset=6)), ["o.onnx"]),
    Case("onnx-as-model-name", ["verify", "{d}/in.onnx", "{d}/nope.onnx"], 2, r"nope\.onnx: ONNX file does not exist", ONNX_IN),
    # ---- MODEL arguments
    Case("unknown-model", ["export", "no_such_model", "-o", "{d}/o.onnx"], 2, r"unknown reference model 'no_such_model'", outputs=["o.onnx"]),
    Case("import-missing-module", ["export", "nosuchpkg_zz:net", "-o", "{d}/o.onnx"], 2, r"cannot import module 'nosuchpkg_zz'", outputs=["o.onnx"]),
    Case("import-missing-attr", ["export", "userzoo_bad:nope", "-o", "{d}/o.onnx"], 2, r"has no attribute 'nope'", _user_pkg, ["o.onnx"]),
    Case("factory-raises", ["export", "userzoo_bad:broken", "-o", "{d}/o.onnx"], 2, r"factory raised RuntimeError: boom", _user_pkg, ["o.onnx"]),
    Case("factory-non-module", ["export", "userzoo_bad:not_a_module", "-o", "{d}/o.onnx"], 2, r"returned str, not a torch\.nn\.Module", _user_pkg, ["o.onnx"]),
    Case("zero-channel-conv", ["export", "userzoo_bad:zero_channels", "-o", "{d}/o.onnx"], 2, r"zero_channels: the model fails in eval mode.*weight of size \[0, 3, 3, 3\]", _user_pkg, ["o.onnx"]),
    Case("weights-wrong-keys", ["export", "userzoo_bad:net", "--weights", "{d}/w.pt", "-o", "{d}/o.onnx"], 2, r"w\.pt: weights do not match the model", _weights("keys"), ["o.onnx"]),
    Case("weights-wrong-shapes", ["export", "userzoo_bad:net", "--weights", "{d}/w.pt", "-o", "{d}/o.onnx"], 2, r"w\.pt: weight '0\.weight' has shape", _weights("shapes"), ["o.onnx"]),
    Case("weights-pickle", ["export", "userzoo_bad:net", "--weights", "{d}/w.pt", "-o", "{d}/o.onnx"], 2, r"w\.pt: refused to load", _weights("pickle"), ["o.onnx"]),
    Case("wrong-input-shape", ["export", "conv_bn_relu", "--input-shape", "1x5x32x32", "-o", "{d}/o.onnx"], 2, r"fails in eval mode on example inputs of shape 1x5x32x32.*3 channels", outputs=["o.onnx"]),
    Case("bad-input-shape-text", ["export", "conv_bn_relu", "--input-shape", "1xthree", "-o", "{d}/o.onnx"], 2, r"--input-shape: '1xthree'", outputs=["o.onnx"]),
    # ---- BatchNorm statistics that make the model itself compute NaN/inf: fold-bn keeps the
    # node (never writes NaN weights) and says why; the input model is what is broken.
    Case("nan-bn-stats", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"BatchNormalization 'bn'.*non-finite", _save("in.onnx", lambda: conv_bn_graph(mean=np.array([0, np.nan, 0, 0]))), ["o.onnx"]),
    Case("inf-bn-stats", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"BatchNormalization 'bn'.*non-finite", _save("in.onnx", lambda: conv_bn_graph(var=np.array([1, np.inf, 1, 1]))), ["o.onnx"]),
    Case("negative-running-var", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"BatchNormalization 'bn'.*var \+ epsilon <= 0", _save("in.onnx", lambda: conv_bn_graph(var=np.array([1.0, -2.0, 1.0, 1.0]))), ["o.onnx"]),
    Case("var-plus-eps-zero", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"BatchNormalization 'bn'.*var \+ epsilon <= 0", _save("in.onnx", lambda: conv_bn_graph(var=np.array([1.0, -1e-5, 1.0, 1.0]), eps=1e-5)), ["o.onnx"]),
    # ---- verify inputs and providers
    Case("unknown-provider", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--providers", "tpu"], 2, r"--providers: unknown provider 'tpu'", ONNX_IN),
    Case("cuda-not-available", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--providers", "cuda"], 2, r"--providers: 'cuda' is not available here", ONNX_IN, patch=lambda mp: mp.setattr("normdeploy.verification.runners.available_providers", lambda: ["CPUExecutionProvider"])),
    Case("npz-missing-name", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--inputs", "{d}/feed.npz"], 2, r"feed\.npz: missing input\(s\) x", _npz({"other": np.zeros((1, 3, 8, 8), np.float32)})),
    Case("npz-extra-name", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--inputs", "{d}/feed.npz"], 2, r"feed\.npz: unknown name\(s\) bogus", _npz({"x": np.zeros((1, 3, 8, 8), np.float32), "bogus": np.zeros(2)})),
    Case("npz-wrong-rank", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--inputs", "{d}/feed.npz"], 2, r"feed\.npz.*'x'.*(rank|shape)", _npz({"x": np.zeros((3, 8, 8), np.float32)})),
    Case("npz-wrong-dtype", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--inputs", "{d}/feed.npz"], 2, r"feed\.npz.*'x'.*(dtype|int64|type)", _npz({"x": np.zeros((1, 3, 8, 8), np.int64)})),
    Case("bad-batch-sizes", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--batch-sizes", "1,zero"], 2, r"--batch-sizes", ONNX_IN),
    Case("input-shape-conflict", ["verify", "userzoo_bad:net", "{d}/in.onnx", "--input-shape", "1x3x16x16"], 2, r"--input-shape: 1x3x16x16 does not fit the graph: input 'x' dim 2 is fixed at 8", _both(ONNX_IN, _user_pkg)),
    Case("atol-unknown-output", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--atol", "nope=1e-3"], 2, r"--atol: no output named 'nope' \(graph outputs: y\)", ONNX_IN),
    Case("atol-not-a-number", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--atol", "y=abc"], 2, r"--atol: 'y=abc' must be X or NAME=X with X a number", ONNX_IN),
    Case("batch-axis-out-of-range", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--batch-axis", "7"], 2, r"--batch-axis: input 'x' has rank 4, no axis 7", ONNX_IN),
    Case("load-run-not-a-record", ["verify", "--load-run", "{d}/feed.npz", "{d}/in.onnx"], 2, r"feed\.npz: not a normdeploy run record \(no 'meta' entry\)", _npz({"x": np.zeros((1, 3, 8, 8), np.float32)})),
    Case("save-run-exists", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--save-run", "{d}/feed.npz"], 2, r"feed\.npz: run file exists \(use --force", _npz({"x": np.zeros((1, 3, 8, 8), np.float32)})),
    Case("deploy-model-and-all", ["deploy", "conv_bn_relu", "--all-reference", "-o", "{d}/out"], 2, r"exactly one of MODEL or --all-reference"),
    # ---- outputs
    Case("output-dir-missing", ["export", "conv_bn_relu", "-o", "{d}/missing/o.onnx"], 2, r"directory '.*missing' does not exist"),
    Case("output-is-directory", ["export", "conv_bn_relu", "-o", "{d}"], 2, r"is a directory"),
    Case("output-exists", ["export", "conv_bn_relu", "-o", "{d}/in.onnx"], 2, r"exists \(use --force", ONNX_IN),
    Case("output-is-input", ["fold-bn", "{d}/in.onnx", "-o", "{d}/in.onnx", "--force"], 2, r"would overwrite the input file", ONNX_IN),
    Case("report-dir-missing", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx", "--report", "{d}/no/r.json"], 2, r"r\.json: report directory '.*no' does not exist", ONNX_IN, ["o.onnx"]),
    Case("fold-no-disk-space", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"No space left on device", ONNX_IN, ["o.onnx"], patch=_no_space),
    Case("fold-ctrl-c", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 130, r"interrupted; no output was written", ONNX_IN, ["o.onnx"], patch=_interrupt),
    Case("no-disk-space", ["export", "conv_bn_relu", "-o", "{d}/o.onnx"], 2, r"No space left on device", outputs=["o.onnx"], patch=_no_space),
    Case("ctrl-c", ["export", "conv_bn_relu", "-o", "{d}/o.onnx"], 130, r"interrupted; no output was written", outputs=["o.onnx"], patch=_interrupt),
    Case("unsupported-opset-arg", ["export", "conv_bn_relu", "--opset", "5", "-o", "{d}/o.onnx"], 2, r"--opset: 5 is outside", outputs=["o.onnx"]),
]  # fmt: skip


def _format(argv: list[str], d: Path) -> list[str]:
    return [a.replace("{d}", str(d)) for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    case.setup(tmp_path)
    before = {p.name: sha256_file(p) for p in tmp_path.iterdir() if p.is_file()}
    if case.patch is not None:
        case.patch(monkeypatch)
    code = main(_format(case.argv, tmp_path))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, err
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    assert re.search(case.message, lines[0]), lines[0]
    after = {p.name: sha256_file(p) for p in tmp_path.iterdir() if p.is_file()}
    for name, digest in before.items():
        assert after.get(name) == digest, f"input {name} was modified"
    for name in case.outputs:
        assert not (tmp_path / name).exists(), f"partial output {name} left behind"
    leftovers = [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "tmp" in p.name
    ]
    assert not leftovers, f"temp files left behind: {leftovers}"


def test_the_documented_table_and_the_tests_agree() -> None:
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), flags=re.M)
    assert sorted(documented) == sorted(c.id for c in CASES)
    assert len(documented) >= 30


@pytest.mark.parametrize("case_id", ["missing-path", "text-as-onnx"])
def test_no_traceback_from_a_real_process(case_id: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == case_id)
    case.setup(tmp_path)
    proc = subprocess.run(
        [sys.executable, "cli.py", *_format(case.argv, tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == case.code
    assert "Traceback" not in proc.stderr
    assert len([x for x in proc.stderr.splitlines() if x.strip()]) == 1
