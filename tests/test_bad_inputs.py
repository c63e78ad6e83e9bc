"""Every row of docs/BAD_INPUTS.md: one clear line on stderr, the documented exit code, no
traceback, no partial output, and the input files unchanged.

Each case builds its inputs in a temp directory, runs the CLI in-process (``main(argv)``), and
checks the contract, including that the documented line is the line the command printed. The
document is generated from these cases (``python tests/gen_bad_inputs_doc.py``), so the two
cannot drift. A few cases also run as a real subprocess to prove no traceback escapes; signals
and concurrent writers are in ``test_cli_processes.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import normdeploy.folding
import normdeploy.io
from normdeploy.cli import main
from normdeploy.folding import run_pass_on_file
from normdeploy.io import sha256_file
from normdeploy.modelspec import REFERENCE_MODULE

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BAD_INPUTS.md"

USER_FACTORIES = """
import sys

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

class Exits(nn.Module):
    def forward(self, x):
        sys.exit(3)

def forward_exits():
    return Exits(), torch.zeros(1, 3, 8, 8)

class Boom(BaseException):
    pass

class RaisesBaseException(nn.Module):
    def forward(self, x):
        raise Boom("not an Exception")

def forward_base_exception():
    return RaisesBaseException(), torch.zeros(1, 3, 8, 8)

class ReturnsNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        self.conv(x)

def returns_none():
    return ReturnsNone(), torch.zeros(1, 3, 8, 8)

class Diverges(nn.Module):
    \"\"\"The exported graph computes 2·conv(x), PyTorch eval conv(x): export's check fails.\"\"\"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if torch.onnx.is_in_onnx_export() else y

def diverges():
    torch.manual_seed(0)
    return Diverges().eval(), torch.zeros(1, 3, 8, 8)

class FixedLength(nn.Module):
    \"\"\"Learned positions of a fixed length 6: no other sequence length works.\"\"\"

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.position = nn.Parameter(torch.zeros(1, 6, 8))

    def forward(self, ids):
        return self.embed(ids) + self.position

def fixed_length():
    return FixedLength().eval(), torch.zeros(2, 6, dtype=torch.long)

def bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval().to(torch.bfloat16)
    return model, torch.zeros(1, 3, 8, 8, dtype=torch.bfloat16)
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
    creates: list[str] = field(default_factory=list)  # must exist afterwards (--keep-failed)
    group: str = ""


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


def _no_checkout(mp: pytest.MonkeyPatch) -> None:
    """normdeploy as a wheel installs it: no models/ beside the package, none loaded yet."""
    mp.setattr("normdeploy.modelspec.reference_models_dir", lambda: None)
    mp.delitem(sys.modules, REFERENCE_MODULE, raising=False)


# ----------------------------------------------------------------------------- more setups


def _external_in(d: Path, name: str = "in.onnx") -> None:
    """A model whose weight (32 output channels, over the inline threshold) is external."""
    normdeploy.io.save_onnx(conv_bn_graph(c=32), d / name, external_data=True)


def _with(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        for step in setups:
            step(d)

    return setup


def _link(name: str, kind: str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        if kind == "hard":
            os.link(d / "in.onnx", d / name)
        else:
            (d / name).symlink_to(d / "in.onnx")

    return setup


def _special(name: str, kind: str) -> Callable[[Path], None]:
    """A character device (1,3, like /dev/null) or a FIFO, created only in the test's dir."""

    def setup(d: Path) -> None:
        try:
            if kind == "fifo":
                os.mkfifo(d / name)
            else:
                os.mknod(d / name, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError as exc:  # no CAP_MKNOD in this sandbox
            pytest.skip(f"cannot create a {kind} here: {exc}")

    return setup


def _external_location(location: str, offset: str | None = None) -> Callable[[Path], None]:
    """in.onnx in DIR/m/ whose weight points at ``location`` (and ``offset``)."""

    def setup(d: Path) -> None:
        (d / "outside.bin").write_bytes(bytes(8192))
        folder = d / "m"
        folder.mkdir()
        (folder / "data.bin").write_bytes(bytes(8192))
        (folder / "link.bin").symlink_to(d / "outside.bin")
        model = conv_bn_graph(c=32)
        tensor = model.graph.initializer[0]
        length = len(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            if value is not None:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
        onnx.save_model(model, str(folder / "in.onnx"))

    return setup


def _graph_variant(kind: str) -> Callable[[], onnx.ModelProto]:
    """conv_bn_graph changed so that onnx.checker accepts it and onnxruntime does not."""

    def build() -> onnx.ModelProto:
        model = conv_bn_graph(c=1 if kind == "rank0" else 4)
        inits = {t.name: t for t in model.graph.initializer}
        if kind == "opset999":
            model.opset_import[0].version = 999
        elif kind == "rank3":
            gamma = numpy_helper.to_array(inits["gamma"])
            inits["gamma"].CopyFrom(numpy_helper.from_array(gamma.reshape(4, 1, 1), "gamma"))
        elif kind == "rank0":  # one channel, every BN parameter a scalar
            for name in ("gamma", "beta", "mean", "var"):
                value = numpy_helper.to_array(inits[name]).reshape(())
                inits[name].CopyFrom(numpy_helper.from_array(value, name))
        elif kind == "custom-domain":
            extra = helper.make_node("Scale", ["y"], ["z"], domain="custom.ops", name="scale")
            model.graph.node.append(extra)
            model.graph.output[0].name = "z"
            model.opset_import.append(helper.make_opsetid("custom.ops", 1))
        elif kind == "bad-reshape":  # loads, but fails when run: 4·8·8 values into 7 rows
            model.graph.initializer.append(
                numpy_helper.from_array(np.array([7, -1], np.int64), "rows")
            )
            model.graph.node.append(helper.make_node("Reshape", ["y", "rows"], ["z"]))
            model.graph.output[0].CopyFrom(
                helper.make_tensor_value_info("z", TensorProto.FLOAT, [7, None])
            )
        elif kind in ("float64", "bfloat16"):
            elem = TensorProto.DOUBLE if kind == "float64" else TensorProto.BFLOAT16
            for t in model.graph.initializer:
                value = numpy_helper.to_array(t).astype(np.float32)
                t.CopyFrom(
                    helper.make_tensor(t.name, elem, value.shape, value.ravel().tolist())
                )
            for vi in (*model.graph.input, *model.graph.output):
                vi.type.tensor_type.elem_type = elem
        return model

    return build


def _weights_value(kind: str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        _user_pkg(d)
        state = dict(
            torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()
        )
        state["0.weight"] = {
            "float": 1.5,
            "none": None,
            "meta": torch.empty(4, 3, 3, 3, device="meta"),
            "sparse": torch.zeros(4, 3, 3, 3).to_sparse(),
        }[kind]
        torch.save(state, d / "w.pt")

    return setup


def _npz_bomb(d: Path) -> None:
    """An .npz whose member declares a (100000, 100000) float32 array (37 GiB) in a few bytes."""
    ONNX_IN(d)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000)}
    )
    with zipfile.ZipFile(d / "feed.npz", "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:])


def _npz_member(name: str, data: bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        ONNX_IN(d)
        with zipfile.ZipFile(d / "feed.npz", "w") as archive:
            archive.writestr(name, data)

    return setup


def _object_npz(d: Path) -> None:
    ONNX_IN(d)
    np.savez(d / "feed.npz", x=np.array([{"a": 1}], dtype=object))


def _big_input(d: Path) -> None:
    model = conv_bn_graph()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[2].dim_value, dims[3].dim_value = 1, 100000, 100000
    onnx.save_model(model, str(d / "big.onnx"))


def _budget(value: str) -> Callable[[pytest.MonkeyPatch], None]:
    """A fixed memory budget, so that the documented message is the same on every machine."""
    return lambda mp: mp.setenv("NORMDEPLOY_MAX_MEMORY", value)


def _wrong_fold(mp: pytest.MonkeyPatch) -> None:
    """fold-bn running a deliberately wrong pass (through the public fold_bn_file the CLI calls)."""
    from fold_support import FoldsOnePercentOff

    def fold_wrongly(input_path, output_path, *, merge=True, **options):
        return run_pass_on_file(FoldsOnePercentOff(), input_path, output_path, **options)

    mp.setattr(normdeploy.folding, "fold_bn_file", fold_wrongly)


LONG = "z" * 252 + ".onnx"  # 257 bytes: over the usual 255-byte name limit


INPUT_CASES = [
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

]  # fmt: skip

MODEL_CASES = [
    Case("unknown-model", ["export", "no_such_model", "-o", "{d}/o.onnx"], 2, r"unknown reference model 'no_such_model'", outputs=["o.onnx"]),
    Case("reference-models-not-installed", ["export", "conv_bn_relu", "-o", "{d}/o.onnx"], 2, r"reference models live in the normdeploy checkout's models/, which is not installed", outputs=["o.onnx"], patch=_no_checkout),
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

]  # fmt: skip

STATS_CASES = [
    Case("nan-bn-stats", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"BatchNormalization 'bn'.*non-finite", _save("in.onnx", lambda: conv_bn_graph(mean=np.array([0, np.nan, 0, 0]))), ["o.onnx"]),
    Case("inf-bn-stats", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"BatchNormalization 'bn'.*non-finite", _save("in.onnx", lambda: conv_bn_graph(var=np.array([1, np.inf, 1, 1]))), ["o.onnx"]),
    Case("negative-running-var", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"BatchNormalization 'bn'.*var \+ epsilon <= 0", _save("in.onnx", lambda: conv_bn_graph(var=np.array([1.0, -2.0, 1.0, 1.0]))), ["o.onnx"]),
    Case("var-plus-eps-zero", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"BatchNormalization 'bn'.*var \+ epsilon <= 0", _save("in.onnx", lambda: conv_bn_graph(var=np.array([1.0, -1e-5, 1.0, 1.0]), eps=1e-5)), ["o.onnx"]),

]  # fmt: skip

VERIFY_CASES = [
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

]  # fmt: skip

OUTPUT_CASES = [
    Case("output-dir-missing", ["export", "conv_bn_relu", "-o", "{d}/missing/o.onnx"], 2, r"directory '.*missing' does not exist"),
    Case("output-is-directory", ["export", "conv_bn_relu", "-o", "{d}"], 2, r"is a directory"),
    Case("output-empty", ["fold-bn", "{d}/in.onnx", "-o", ""], 2, r"^normdeploy fold-bn: error: -o: empty path$", ONNX_IN),
    Case("report-empty", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--report", ""], 2, r"--report: empty path$", ONNX_IN),
    Case("output-exists", ["export", "conv_bn_relu", "-o", "{d}/in.onnx"], 2, r"exists \(use --force", ONNX_IN),
    Case("output-is-input", ["fold-bn", "{d}/in.onnx", "-o", "{d}/in.onnx", "--force"], 2, r"would overwrite the input file", ONNX_IN),
    Case("report-dir-missing", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx", "--report", "{d}/no/r.json"], 2, r"r\.json: report directory '.*no' does not exist", ONNX_IN, ["o.onnx"]),
    Case("fold-no-disk-space", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"No space left on device", ONNX_IN, ["o.onnx"], patch=_no_space),
    Case("fold-ctrl-c", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 130, r"interrupted; no output was written", ONNX_IN, ["o.onnx"], patch=_interrupt),
    Case("no-disk-space", ["export", "conv_bn_relu", "-o", "{d}/o.onnx"], 2, r"No space left on device", outputs=["o.onnx"], patch=_no_space),
    Case("ctrl-c", ["export", "conv_bn_relu", "-o", "{d}/o.onnx"], 130, r"interrupted; no output was written", outputs=["o.onnx"], patch=_interrupt),
    Case("unsupported-opset-arg", ["export", "conv_bn_relu", "--opset", "5", "-o", "{d}/o.onnx"], 2, r"--opset: 5 is outside", outputs=["o.onnx"]),
    Case("fuse-opset-downgrade", ["fuse-norms", "{d}/in.onnx", "-o", "{d}/o.onnx", "--opset", "12"], 2, r"--opset 12: .*in\.onnx already imports opset 17; conversion goes upward only", ONNX_IN, ["o.onnx"]),
    Case("fuse-opset-too-new", ["fuse-norms", "{d}/in.onnx", "-o", "{d}/o.onnx", "--opset", "99"], 2, r"--opset 99: newer than the newest opset onnx .* knows \(\d+\)", ONNX_IN, ["o.onnx"]),
]  # fmt: skip

FILES_CASES = [
    Case("data-file-exists", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"o\.onnx\.data: output's external data file exists \(use --force", _with(_external_in, _write("o.onnx.data", "an unrelated file\n")), ["o.onnx"]),
    Case("output-is-input-data", ["fold-bn", "{d}/in.onnx", "-o", "{d}/in.onnx.data", "--force"], 2, r"in\.onnx\.data: output would overwrite the input's external data file", _external_in),
    Case("output-data-is-input", ["fold-bn", "{d}/m.onnx.data", "-o", "{d}/m.onnx"], 2, r"m\.onnx\.data: output's external data would overwrite the input file", lambda d: _external_in(d, "m.onnx.data"), ["m.onnx"]),
    Case("output-hard-link-to-input", ["fold-bn", "{d}/in.onnx", "-o", "{d}/copy.onnx", "--force"], 2, r"copy\.onnx: output would overwrite the input file", _with(ONNX_IN, _link("copy.onnx", "hard"))),
    Case("output-symlink-to-input", ["fold-bn", "{d}/in.onnx", "-o", "{d}/copy.onnx", "--force"], 2, r"copy\.onnx: output would overwrite the input file", _with(ONNX_IN, _link("copy.onnx", "soft"))),
    Case("output-char-device", ["fold-bn", "{d}/in.onnx", "-o", "{d}/null", "--force"], 2, r"null: output is a character device; normdeploy writes only regular files", _with(ONNX_IN, _special("null", "chardev"))),
    Case("output-fifo", ["export", "conv_bn_relu", "-o", "{d}/pipe", "--force"], 2, r"pipe: output is a FIFO \(named pipe\); normdeploy writes only regular files", _special("pipe", "fifo")),
    Case("report-is-output", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx", "--report", "{d}/o.onnx"], 2, r"o\.onnx: the report and the output name the same file", ONNX_IN, ["o.onnx"]),
    Case("report-is-input", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx", "--report", "{d}/in.onnx", "--force"], 2, r"in\.onnx: report would overwrite the input file", ONNX_IN, ["o.onnx"]),
    Case("deploy-report-exists", ["deploy", "conv_bn_relu", "-o", "{d}/out"], 2, r"out/report\.json: report file exists \(use --force", lambda d: ((d / "out").mkdir(), (d / "out" / "report.json").write_text("{}"))),
    Case("output-name-too-long", ["fold-bn", "{d}/in.onnx", "-o", f"{{d}}/{LONG}"], 2, r"output file name is 257 bytes, over this file system's limit of 255", ONNX_IN),
    Case("input-fifo", ["inspect", "{d}/pipe"], 2, r"pipe: ONNX is a FIFO \(named pipe\), not a regular file", _special("pipe", "fifo")),
    Case("input-char-device", ["inspect", "{d}/null"], 2, r"null: ONNX is a character device, not a regular file", _special("null", "chardev")),
]  # fmt: skip

SUCCESS_CASES = [
    Case("export-check-fails", ["export", "userzoo_bad:diverges", "-o", "{d}/o.onnx"], 1, r"FAIL: output '.*' differs from PyTorch eval: e = .* vs floor f = .*; .*o\.onnx not written", _user_pkg, ["o.onnx"]),
    Case("export-keep-failed", ["export", "userzoo_bad:diverges", "-o", "{d}/o.onnx", "--keep-failed"], 1, r"FAIL: .*; kept as .*o\.failed\.onnx", _user_pkg, ["o.onnx"], creates=["o.failed.onnx"]),
    Case("fold-check-fails", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 1, r"differs from the original .*; .*o\.onnx not written$", ONNX_IN, ["o.onnx"], patch=_wrong_fold),
    Case("fold-keep-failed", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx", "--keep-failed"], 1, r"o\.onnx not written; the graph is kept as .*o\.failed\.onnx", ONNX_IN, ["o.onnx"], patch=_wrong_fold, creates=["o.failed.onnx"]),
    Case("model-returns-none", ["export", "userzoo_bad:returns_none", "-o", "{d}/o.onnx"], 2, r"returns_none: the model returns no tensors", _user_pkg, ["o.onnx"]),
    Case("factory-sys-exit", ["export", "sys:exit", "-o", "{d}/o.onnx"], 2, r"MODEL 'sys:exit': factory called sys\.exit\(\)", outputs=["o.onnx"]),
    Case("forward-sys-exit", ["export", "userzoo_bad:forward_exits", "-o", "{d}/o.onnx"], 2, r"forward called sys\.exit\(3\)", _user_pkg, ["o.onnx"]),
    Case("forward-base-exception", ["verify", "userzoo_bad:forward_base_exception", "{d}/in.onnx"], 2, r"forward raised Boom: not an Exception", _with(_user_pkg, ONNX_IN)),
    Case("deploy-bad-model", ["deploy", "nosuchpkg_zz:net", "-o", "{d}/out"], 2, r"MODEL 'nosuchpkg_zz:net': cannot import module", outputs=["out"]),
    Case("deploy-factory-exits", ["deploy", "sys:exit", "-o", "{d}/out"], 2, r"factory called sys\.exit\(\)", outputs=["out"]),
]  # fmt: skip

BOMBS_CASES = [
    Case("huge-declared-input", ["fold-bn", "{d}/big.onnx", "-o", "{d}/o.onnx"], 2, r"stress inputs \(largest x\[1, 3, 100000, 100000\] float32.*needs .* GiB, over the memory budget of 4\.0 GiB", _big_input, ["o.onnx"], patch=_budget("4G")),
    Case("huge-declared-input-verify", ["verify", "{d}/big.onnx", "{d}/big.onnx"], 2, r"over the memory budget of 4\.0 GiB \(NORMDEPLOY_MAX_MEMORY=4G", _big_input, patch=_budget("4G")),
    Case("huge-input-shape", ["export", "conv_bn_relu", "--input-shape", "1x3x100000x100000", "-o", "{d}/o.onnx"], 2, r"--input-shape: 1x3x100000x100000 \(float32\) needs 111\.8 GiB", outputs=["o.onnx"], patch=_budget("4G")),
    Case("huge-batch-sizes", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--batch-sizes", "1,100000000"], 2, r"batch sizes 1, 100000000\) needs .* GiB", ONNX_IN, patch=_budget("4G")),
    Case("deploy-huge-batch-sizes", ["deploy", "conv_bn_relu", "--batch-sizes", "100000000", "-o", "{d}/out"], 2, r"verify inputs at batch size 100000000 .* needs", outputs=["out"], patch=_budget("4G")),
    Case("npz-bomb", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--inputs", "{d}/feed.npz"], 2, r"feed\.npz: arrays x\[100000, 100000\] float32 needs 37\.3 GiB", _npz_bomb, patch=_budget("4G")),
    Case("max-memory-tiny", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--max-memory", "1K"], 2, r"over the memory budget of 1\.0 KiB \(--max-memory 1K\)", ONNX_IN),
    Case("max-memory-not-a-size", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--max-memory", "lots"], 2, r"--max-memory: 'lots' is not a size", ONNX_IN),
    Case("env-max-memory-not-a-size", ["verify", "{d}/in.onnx", "{d}/in.onnx"], 2, r"NORMDEPLOY_MAX_MEMORY: 'abc' is not a size", ONNX_IN, patch=_budget("abc")),
]  # fmt: skip


def _runs_at_no_size_tried(d: Path) -> None:
    """[N, 3, H, W] that runs only at multiples of 100: none of the sizes probed."""
    from fold_support import multiple_of_model

    onnx.save_model(multiple_of_model(100), str(d / "in.onnx"))


SHAPES_CASES = [
    Case("input-shape-unknown-name", ["verify", "userzoo_bad:net", "{d}/in.onnx", "--input-shape", "nope=1x3x8x8"], 2, r"--input-shape: no input named 'nope' \(graph inputs: x\)", _both(ONNX_IN, _user_pkg)),
    Case("input-shape-mixed", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--input-shape", "1x3x8x8", "--input-shape", "x=1x3x8x8"], 2, r"--input-shape: give SHAPE for every input in order, or NAME=SHAPE for each, not both", ONNX_IN),
    Case("fold-input-shape-conflict", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx", "--input-shape", "1x3x16x16"], 2, r"--input-shape: 1x3x16x16 does not fit the graph: input 'x' dim 2 is fixed at 8", ONNX_IN, ["o.onnx"]),
    Case("inspect-input-shape-rank", ["inspect", "{d}/in.onnx", "--input-shape", "1x3x8"], 2, r"--input-shape: 1x3x8 has rank 3, the graph's input 'x' has rank 4", ONNX_IN),
    Case("symbolic-dims-run-at-no-size", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"in\.onnx: onnxruntime cannot run it at any size tried for its symbolic dim\(s\) H, W \(X\[N, 3, H=8, W=8\]; .*X\[N, 3, H=640, W=640\]; last error: .*\); give the sizes it takes, e\.g\. --input-shape 1x3x640x640; fold-bn cannot check", _runs_at_no_size_tried, ["o.onnx"]),
    Case("fold-inputs-missing-name", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx", "--inputs", "{d}/feed.npz"], 2, r"feed\.npz: missing input\(s\) x", _npz({"other": np.zeros((1, 3, 8, 8), np.float32)}), ["o.onnx"]),
    Case("fold-inputs-no-verify", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx", "--inputs", "{d}/feed.npz", "--no-verify"], 2, r"--inputs: --no-verify runs no check to feed them", _npz({"x": np.zeros((1, 3, 8, 8), np.float32)}), ["o.onnx"]),
    Case("dynamic-axes-not-axes", ["export", "conv_bn_relu", "--dynamic-axes", "0,x", "-o", "{d}/o.onnx"], 2, r"--dynamic-axes: '0,x' is not a comma-separated list of axis indices", outputs=["o.onnx"]),
    Case("dynamic-axes-unknown-input", ["export", "conv_bn_relu", "--dynamic-axes", "y=0,2", "-o", "{d}/o.onnx"], 2, r"--dynamic-axes: no input named 'y' \(inputs: input\)", outputs=["o.onnx"]),
    Case("dynamic-axis-fixed-by-model", ["export", "userzoo_bad:fixed_length", "--dynamic-axes", "0,1", "-o", "{d}/o.onnx"], 2, r"--dynamic-axes: fixed_length fixes axis 1 of input 'ids' \(sequence\) at 6", _user_pkg, ["o.onnx"]),
    Case("dynamic-axis-rejected", ["export", "userzoo_bad:fixed_length", "--dynamic-axes", "0,1", "--exporter", "torchscript", "-o", "{d}/o.onnx"], 2, r"--dynamic-axes: fixed_length rejects sequence=8 \(axis 1 of input 'ids', 6 in the example\)", _user_pkg, ["o.onnx"]),
    Case("input-dtype-unknown", ["export", "conv_bn_relu", "--input-shape", "1x3x8x8", "--input-dtype", "float7", "-o", "{d}/o.onnx"], 2, r"--input-dtype: 'float7' is not one of float32, ", outputs=["o.onnx"]),
    Case("input-dtype-without-shape", ["export", "conv_bn_relu", "--input-dtype", "int64", "-o", "{d}/o.onnx"], 2, r"--input-dtype: only with --input-shape SHAPE", outputs=["o.onnx"]),
    Case("input-names-count", ["export", "conv_bn_relu", "--input-names", "a,b", "-o", "{d}/o.onnx"], 2, r"--input-names: 2 name\(s\) for 1 input\(s\) \(input\)", outputs=["o.onnx"]),
    Case("output-name-is-input", ["export", "conv_bn_relu", "--output-names", "input", "-o", "{d}/o.onnx"], 2, r"--output-names: 'input' is also an input name", outputs=["o.onnx"]),
]  # fmt: skip

TRACEBACK_CASES = [
    Case("external-data-dotdot", ["inspect", "{d}/m/in.onnx"], 2, r"external data '\.\./outside\.bin' of tensor 'w' points outside the model's folder", _external_location("../outside.bin")),
    Case("external-data-absolute", ["inspect", "{d}/m/in.onnx"], 2, r"external data '/etc/passwd' of tensor 'w' points outside the model's folder", _external_location("/etc/passwd")),
    Case("external-data-symlink-out", ["fold-bn", "{d}/m/in.onnx", "-o", "{d}/o.onnx"], 2, r"'link\.bin' of tensor 'w' is a symlink that leads outside the model's folder", _external_location("link.bin"), ["o.onnx"]),
    Case("external-data-negative-offset", ["inspect", "{d}/m/in.onnx"], 2, r"tensor 'w' has external data offset '-5' \(must be a non-negative integer\)", _external_location("data.bin", "-5")),
    Case("external-data-text-offset", ["inspect", "{d}/m/in.onnx"], 2, r"offset 'abc' \(must be a non-negative integer\)", _external_location("data.bin", "abc")),
    Case("ort-cannot-load-opset", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"in\.onnx: onnxruntime cannot load it: .*opset", _save("in.onnx", _graph_variant("opset999")), ["o.onnx"]),
    Case("ort-cannot-load-rank3-bn", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"onnxruntime cannot load it: .*expected to have rank 1 but has rank 3", _save("in.onnx", _graph_variant("rank3")), ["o.onnx"]),
    Case("ort-cannot-load-0d-bn", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"onnxruntime cannot load it: .*rank", _save("in.onnx", _graph_variant("rank0")), ["o.onnx"]),
    Case("ort-cannot-load-custom-op", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"onnxruntime cannot load it: .*custom\.ops", _save("in.onnx", _graph_variant("custom-domain")), ["o.onnx"]),
    Case("ort-cannot-run-graph", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"in\.onnx: onnxruntime cannot run it on x\[2, 3, 8, 8\]: .*Reshape", _save("in.onnx", _graph_variant("bad-reshape")), ["o.onnx"]),
    Case("ort-cannot-run-float64", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"onnxruntime cannot load it: .*Could not find an implementation for Conv", _save("in.onnx", _graph_variant("float64")), ["o.onnx"]),
    Case("ort-cannot-run-bfloat16", ["fold-bn", "{d}/in.onnx", "-o", "{d}/o.onnx"], 2, r"onnxruntime cannot load it: .*bfloat16", _save("in.onnx", _graph_variant("bfloat16")), ["o.onnx"]),
    Case("bfloat16-module", ["export", "userzoo_bad:bf16", "-o", "{d}/o.onnx"], 1, r"FAIL: onnxruntime failed: .*bfloat16.*; .*o\.onnx not written", _user_pkg, ["o.onnx"]),
    Case("weights-float-value", ["export", "userzoo_bad:net", "--weights", "{d}/w.pt", "-o", "{d}/o.onnx"], 2, r"w\.pt: weight '0\.weight' is float, not a tensor", _weights_value("float"), ["o.onnx"]),
    Case("weights-none-value", ["export", "userzoo_bad:net", "--weights", "{d}/w.pt", "-o", "{d}/o.onnx"], 2, r"weight '0\.weight' is NoneType, not a tensor", _weights_value("none"), ["o.onnx"]),
    Case("weights-meta-tensor", ["export", "userzoo_bad:net", "--weights", "{d}/w.pt", "-o", "{d}/o.onnx"], 2, r"weight '0\.weight' is a meta tensor \(shape only, no data\)", _weights_value("meta"), ["o.onnx"]),
    Case("weights-sparse-tensor", ["export", "userzoo_bad:net", "--weights", "{d}/w.pt", "-o", "{d}/o.onnx"], 2, r"weight '0\.weight' is a sparse_coo tensor; weights must be dense", _weights_value("sparse"), ["o.onnx"]),
    Case("inputs-npy", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--inputs", "{d}/x.npy"], 2, r"x\.npy: a single \.npy array, not an \.npz", lambda d: (ONNX_IN(d), np.save(d / "x.npy", np.zeros((1, 3, 8, 8), np.float32)))),
    Case("inputs-garbage-member", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--inputs", "{d}/feed.npz"], 2, r"feed\.npz: member 'x\.npy' is not a NumPy array", _npz_member("x.npy", b"garbage, not an array")),
    Case("inputs-text-file", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--inputs", "{d}/feed.npz"], 2, r"feed\.npz: not an \.npz archive \(a text file\)", lambda d: (ONNX_IN(d), (d / "feed.npz").write_text("x = 1, 2, 3\n"))),
    Case("inputs-object-array", ["verify", "{d}/in.onnx", "{d}/in.onnx", "--inputs", "{d}/feed.npz"], 2, r"member 'x\.npy' holds Python objects \(pickled data\); refused", _object_npz),
]  # fmt: skip

# Every group is a section of docs/BAD_INPUTS.md, in this order: (key, title, what it promises).
GROUPS = [
    ("input", "Input files", "An input that is missing, unreadable, not a regular file, or not what it claims to be."),
    ("model", "MODEL arguments", "A reference name or `package.module:factory` that cannot give a module, its weights, its example inputs."),
    ("stats", "BatchNorm statistics that compute NaN/inf", "fold-bn keeps such a node (it never writes NaN weights) and says the input model itself is broken."),
    ("verify", "verify inputs and providers", "Feeds and providers are checked against the graph before anything runs."),
    ("output", "Outputs", "The named output: its directory, an existing file, the input itself, a failed write, Ctrl-C."),
    ("files", "Files besides the named output", "Every file a command will write (model, its `.data`, reports, a kept failing graph) is planned before any work and checked against every input and its external data (by device and inode: symlinks and hard links count), existing files (`--force`), special files (refused even with `--force`), each other, and the file system's name limit."),
    ("success", "A verdict or an output only when the work succeeded", "A failing graph is written only with `--keep-failed`, as `NAME.failed.onnx` (exit 1). A MODEL's code that exits or raises a `BaseException` is a user-code error. A MODEL that cannot be resolved writes nothing, in `deploy` as in `export`."),
    ("shapes", "Input shapes, dynamic axes, dtypes and names", "Every command takes `--input-shape` (SHAPE for every input in order, or NAME=SHAPE) and checks it against the graph's declared inputs before any work; a graph whose symbolic dims run at none of the sizes tried says which it tried. `export` checks `--dynamic-axes`, `--input-dtype` and the names it is given, and a model that fixes or rejects a size its dynamic axes allow is bad input (the axis is named), not a failed check."),
    ("bombs", "Resource bombs", "The arrays normdeploy allocates (inputs, example inputs, `.npz` members, exposed values) are sized from shapes before allocation; over the budget (half the available memory, or `--max-memory` / `NORMDEPLOY_MAX_MEMORY`) it is a one-line bad input. The rows run with `NORMDEPLOY_MAX_MEMORY=4G` so the line is the same on every machine."),
    ("traceback", "No traceback on any input", "External data that leaves the model's folder, offsets that are not non-negative integers, graphs that pass `onnx.checker` but onnxruntime cannot load (fold-bn's self-check names the input), state dicts with values that are not dense tensors, feeds files that are not `.npz` archives of arrays, and a bfloat16 module (the real cause: onnxruntime has no bfloat16 Conv)."),
]  # fmt: skip
CASES: list[Case] = []
for _key, _title, _ in GROUPS:
    for _case in globals()[f"{_key.upper()}_CASES"]:
        _case.group = _key
        CASES.append(_case)


def _format(argv: list[str], d: Path) -> list[str]:
    return [a.replace("{d}", str(d)) for a in argv]


@dataclass(frozen=True)
class Outcome:
    """What a case's command did: its exit code and stderr."""

    code: int
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_case(case: Case, d: Path, mp: pytest.MonkeyPatch) -> Outcome:
    """Build the case's inputs in ``d`` and run its command in-process."""
    mp.syspath_prepend(str(d))
    case.setup(d)
    if case.patch is not None:
        case.patch(mp)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(_format(case.argv, d))
    return Outcome(code, err.getvalue())


def shown(text: str, d: Path) -> str:
    """A command or message as documented: the temp dir as DIR."""
    return text.replace(str(d), "DIR")


def _files(d: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``d`` (FIFOs and devices are never opened)."""
    return {
        str(p.relative_to(d)): sha256_file(p)
        for p in sorted(d.rglob("*"))
        if p.is_file() and stat.S_ISREG(os.stat(p).st_mode)
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before: dict[str, str] = {}

    def snapshot_then(setup: Callable[[Path], None]) -> Callable[[Path], None]:
        def wrapped(d: Path) -> None:
            setup(d)
            before.update(_files(d))

        return wrapped

    outcome = run_case(
        Case(**{**case.__dict__, "setup": snapshot_then(case.setup)}), tmp_path, monkeypatch
    )
    assert outcome.code == case.code, outcome.err
    assert len(outcome.lines) == 1, f"expected one line, got:\n{outcome.err}"
    assert "Traceback" not in outcome.err
    assert re.search(case.message, outcome.lines[0]), outcome.lines[0]
    after = _files(tmp_path)
    for name, digest in before.items():
        assert after.get(name) == digest, f"input {name} was modified"
    for name in case.outputs:
        assert not (tmp_path / name).exists(), f"partial output {name} left behind"
    for name in case.creates:
        assert (tmp_path / name).is_file(), f"{name} was not written"
    leftovers = [
        p.name
        for p in tmp_path.rglob("*")
        if p.name.startswith(".") and ("tmp" in p.name or p.name.startswith(".normdeploy"))
    ]
    assert not leftovers, f"temp files left behind: {leftovers}"
    documented = documented_rows().get(case.id)
    assert documented is not None, (
        f"{case.id} is not in {DOC.name}: run tests/gen_bad_inputs_doc.py"
    )
    assert documented[2] == shown(outcome.lines[0], tmp_path), (
        f"{DOC.name} shows another line for {case.id}: run tests/gen_bad_inputs_doc.py"
    )


# ----------------------------------------------------------------------------- the document


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_uncell(text: str) -> str:
    return text.replace("\\|", "|")


def documented_command(case: Case) -> str:
    return " ".join(_format(case.argv, Path("DIR")))


@lru_cache(maxsize=1)
def documented_rows() -> dict[str, tuple[str, int, str]]:
    """{case id: (command, exit code, the one line)} as docs/BAD_INPUTS.md shows them."""
    rows = {}
    pattern = re.compile(r"^\| `([a-z0-9-]+)` \| `(.*?)` \| (\d+) \| (.*) \|$")
    for line in DOC.read_text().splitlines():
        if m := pattern.match(line):
            rows[m.group(1)] = (m.group(2), int(m.group(3)), _md_uncell(m.group(4)))
    return rows


DOC_INTRO = """# Bad input, and what it gets

Generated from the tests by `python tests/gen_bad_inputs_doc.py` (run from the checkout); a test
fails when this file and the tests disagree. Every row of the tables below is a test
(`tests/test_bad_inputs.py`): the command exits with the code shown and prints exactly one line
on stderr (no traceback; `--debug` shows one), the input files are unchanged (SHA-256 before and
after), no output or temporary file is left behind, and the line is the one shown. `DIR` stands
for the test's temporary directory. Exit codes: 2 bad input or usage, 1 a numerical mismatch (the
check failed), 128 + the signal number when interrupted (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).
"""


def render_doc(lines: dict[str, str], process_cases: list) -> str:
    """docs/BAD_INPUTS.md from the cases, the line each printed, and the process cases."""
    out = [DOC_INTRO]
    for key, title, text in GROUPS:
        out += [f"## {title}", "", text, ""]
        out += ["| case | command | exit | the one line on stderr |", "|---|---|---|---|"]
        out += [
            f"| `{c.id}` | `{documented_command(c)}` | {c.code} | {_md_cell(lines[c.id])} |"
            for c in CASES
            if c.group == key
        ]
        out.append("")
    out += [
        "## Every way a process ends",
        "",
        "Real processes (`tests/test_cli_processes.py`), each stopped at a known point while its "
        "output is staged (fold-bn: its self-check; deploy: the model's forward), so the signal "
        "or the race lands there every time. Staging directories carry an owner marker (pid and "
        "process start time); a later run removes one only when its owner is gone.",
        "",
        "| case | command | what happens | exit | what is left |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| `{c.id}` | `{_md_cell(c.command)}` | {_md_cell(c.event)} | {c.code} | "
        f"{_md_cell(c.outcome)} |"
        for c in process_cases
    ]
    return "\n".join(out) + "\n"


def test_the_documented_table_and_the_tests_agree() -> None:
    from test_cli_processes import PROCESS_CASES

    rows = documented_rows()
    assert sorted(rows) == sorted(c.id for c in CASES), "run tests/gen_bad_inputs_doc.py"
    for case in CASES:
        command, code, _ = rows[case.id]
        assert (command, code) == (documented_command(case), case.code), case.id
    # The generated file, with the lines it shows, is exactly what the generator writes.
    assert DOC.read_text() == render_doc({k: v[2] for k, v in rows.items()}, PROCESS_CASES)
    assert len(rows) >= 90


# In a real process onnxruntime's own logging (fd 2, not Python's stderr) and the exporter's
# chatter would show up: these cases prove the one line holds there too.
REAL_PROCESS_CASES = [
    "missing-path", "text-as-onnx", "ort-cannot-run-graph", "ort-cannot-load-custom-op",
    "forward-sys-exit", "export-check-fails",
]  # fmt: skip


@pytest.mark.parametrize("case_id", REAL_PROCESS_CASES)
def test_no_traceback_from_a_real_process(case_id: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == case_id)
    assert case.patch is None  # nothing can be patched inside another process
    case.setup(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "cli.py", *_format(case.argv, tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == case.code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and re.search(case.message, lines[0]), proc.stderr
