"""`normdeploy fuse-norms`: file to file, the ledger and notes in text/JSON/Markdown, --opset
conversion (proven before fusing), a file with nothing to fuse written unchanged, and a failed
conversion check that writes nothing."""

from __future__ import annotations

import json

import onnx
from fold_support import ops
from norm_graphs import layernorm_graph, magnitude
from onnx import numpy_helper

import normdeploy.folding
from normdeploy.cli import main
from normdeploy.io import sha256_file
from normdeploy.onnx_graph import default_opset
from normdeploy.passes.opset import convert_opset


def write_layernorm(path, opset: int) -> onnx.ModelProto:
    g, y = layernorm_graph(opset=min(opset, 18))
    model = g.model(y, opset=opset)
    onnx.save(model, path)
    return model


def test_cli_fuses_a_layernorm_at_the_files_opset(tmp_path, capsys) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    write_layernorm(src, 18)
    digest = sha256_file(src)
    assert main(["fuse-norms", str(src), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fuse-norms" in text and "1 of 1 decomposed norm(s) fused, 0 kept" in text
    assert "verification: PASS: fused vs original" in text
    fused = onnx.load(str(out))
    onnx.checker.check_model(fused, full_check=True)
    assert ops(fused) == {"LayerNormalization": 1} and default_opset(fused) == 18
    assert sha256_file(src) == digest
    assert main(["fuse-norms", str(src), "-o", str(out), "-f", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pass"] == "fuse-norms" and data["fused"] == 1 and data["kept"] == 0
    assert data["ledger"][0]["target_op"] == "LayerNormalization"
    assert data["verified"] is True and data["opset_conversion"] is None


def test_nothing_to_fuse_is_written_unchanged_and_the_ledger_says_why(
    tmp_path, capsys
) -> None:
    g, y = magnitude()
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.md"
    onnx.save(g.model(y), src)
    assert main(["fuse-norms", str(src), "-o", str(out), "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "0 of 1 decomposed norm(s) fused, 1 kept" in text
    assert "look-alike (Pow/Add/Sqrt): the square is not averaged by a ReduceMean" in text
    assert "nothing fused: the graph is unchanged" in text
    written, given = onnx.load(str(out)), onnx.load(str(src))
    assert written.SerializeToString() == given.SerializeToString()
    md = report.read_text()
    assert md.startswith("## fuse-norms: 0 of 1") and "| decomposed norm(s) |" in md


def test_below_the_opset_it_says_which_opset_and_converts_when_asked(tmp_path, capsys) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    write_layernorm(src, 12)
    assert main(["fuse-norms", str(src), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    (note,) = [line for line in text.splitlines() if line.startswith("note:")]
    assert "LayerNormalization needs opset >= 17, the model imports opset 12" in note
    assert ops(onnx.load(str(out)))["Sqrt"] == 1 and default_opset(onnx.load(str(out))) == 12

    # converted as asked, still below 17: nothing fuses, the check is of the conversion
    assert main(["fuse-norms", str(src), "-o", str(out), "-f", "--opset", "16"]) == 0
    text = capsys.readouterr().out
    assert "verification: PASS: converted vs original" in text
    assert "the model imports opset 16; converting the model to opset 17 fuses them" in text
    assert default_opset(onnx.load(str(out))) == 16

    assert main(["fuse-norms", str(src), "-o", str(out), "-f", "--opset", "17"]) == 0
    text = capsys.readouterr().out
    assert "note: opset 12 → 17 (onnx.version_converter): PASS: converted vs input" in text
    fused = onnx.load(str(out))
    assert ops(fused) == {"LayerNormalization": 1} and default_opset(fused) == 17
    assert main(["fuse-norms", str(src), "-o", str(out), "-f", "--opset", "23", "--format",
                 "json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    conversion = data["opset_conversion"]
    assert (conversion["from_opset"], conversion["to_opset"]) == (12, 23)
    assert conversion["verified"] is True and all(c["passed"] for c in conversion["checks"])


def test_a_conversion_that_changes_the_outputs_exits_1_and_writes_nothing(
    tmp_path, capsys, monkeypatch
) -> None:
    """A converter that gets one weight 1 % wrong (through folding's public convert_opset):
    the check between conversion and fusion catches it; no output, the report says FAIL."""

    def converts_wrongly(model, target, source):
        converted = convert_opset(model, target, source)
        gamma = next(t for t in converted.graph.initializer if t.name == "gamma")
        gamma.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(gamma) * 1.01, "gamma"))
        return converted

    monkeypatch.setattr(normdeploy.folding, "convert_opset", converts_wrongly)
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    write_layernorm(src, 12)
    argv = ["fuse-norms", str(src), "-o", str(out), "--opset", "17", "--report", str(report)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "converting opset 12 → 17 changed output" in err
    assert "out.onnx not written" in err and not out.exists()
    data = json.loads(report.read_text())
    assert data["opset_conversion"]["verified"] is False and data["ledger"] == []
    worst = max(c["max_abs"] for c in data["opset_conversion"]["checks"])
    assert worst > 1e-3  # a 1 % scale error on outputs of size ~1, far above fp32's 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "r.json"]
