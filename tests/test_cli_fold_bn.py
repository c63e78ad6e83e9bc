"""`normdeploy fold-bn`: exit codes, --report (on success and, from the error's result, on a
failed check), --format json, --force; the check's inputs (symbolic dims sized where the input
runs, --input-shape, --inputs)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
from fold_support import (
    ATOL32,
    RNG,
    RTOL32,
    FoldsOnePercentOff,
    conv_bn_file,
    conv_bn_model,
    multiple_of_model,
    ops,
    repvgg_block_model,
)

import normdeploy.folding
from normdeploy.cli import main
from normdeploy.cli._options import run_reported
from normdeploy.errors import VerificationFailed
from normdeploy.folding import FoldResult, run_pass, run_pass_on_file
from normdeploy.io import sha256_file
from normdeploy.verification.runners import OrtRunner


def test_cli_fold_bn(tmp_path, capsys) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    conv_bn_file(src)
    assert main(["fold-bn", str(src), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 of 1 BatchNormalization folded" in text and "PASS" in text
    assert main(["fold-bn", str(tmp_path / "missing.onnx"), "-o", str(out), "-f"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.onnx" in err and "does not exist" in err
    assert main(["fold-bn", str(src), "-o", str(out)]) == 2  # exists without --force
    assert "--force" in capsys.readouterr().err
    assert main(["fold-bn", str(src), "-o", str(out), "-f", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["folded"] == 1


def test_cli_fold_bn_merges_branches_unless_no_merge(tmp_path, capsys) -> None:
    src = tmp_path / "block.onnx"
    onnx.save(repvgg_block_model(), src)
    runs = {}
    for flags in ([], ["--no-merge"]):
        out = tmp_path / f"out{len(flags)}.onnx"
        assert main(["fold-bn", str(src), "-o", str(out), "--format", "json", *flags]) == 0
        runs[tuple(flags)] = (json.loads(capsys.readouterr().out), ops(onnx.load(out)))
    (merged, merged_ops), (kept, kept_ops) = runs[()], runs[("--no-merge",)]
    assert (merged["folded"], merged["merged"], merged["kept"]) == (2, 1, 0)
    assert merged["sums_merged"] == 1 and merged["verified"] is True
    assert merged_ops["Conv"] == 1 and "BatchNormalization" not in merged_ops
    assert (kept["folded"], kept["merged"], kept["kept"]) == (2, 0, 1)
    assert kept_ops["Conv"] == 2 and kept_ops["BatchNormalization"] == 1


def test_cli_writes_json_and_markdown_reports(tmp_path, capsys) -> None:
    src = tmp_path / "in.onnx"
    conv_bn_file(src)
    digest = sha256_file(src)
    for suffix in ("json", "md"):
        out = tmp_path / f"out_{suffix}.onnx"
        report = tmp_path / f"r.{suffix}"
        assert main(["fold-bn", str(src), "-o", str(out), "--report", str(report)]) == 0
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    capsys.readouterr()
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["folded"] == 1 and data["kept"] == 0 and data["verified"] is True
    assert data["ledger"][0]["direction"] == "preceding"
    assert all(c["passed"] for c in data["verification"])
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("## fold-bn: 1 of 1") and "Verification: PASS" in md
    assert "| BatchNormalization |" in md
    assert sha256_file(src) == digest


def test_existing_report_needs_force_and_nothing_is_written(tmp_path, capsys) -> None:
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.md"
    conv_bn_file(src)
    report.write_text("old")
    assert main(["fold-bn", str(src), "-o", str(out), "--report", str(report)]) == 2
    assert "r.md" in capsys.readouterr().err
    assert not out.exists() and report.read_text() == "old"
    assert main(["fold-bn", str(src), "-o", str(out), "--report", str(report), "-f"]) == 0
    assert report.read_text().startswith("## fold-bn")


@pytest.fixture
def wrong_fold(monkeypatch):
    """The CLI's fold-bn running a deliberately wrong pass, through the public
    normdeploy.folding.fold_bn_file that the command calls."""

    def fold_wrongly(
        input_path,
        output_path,
        *,
        overwrite=False,
        verify=True,
        seed=0,
        merge=True,
        keep_failed=False,
        input_shapes=None,
        inputs=None,
    ):
        return run_pass_on_file(
            FoldsOnePercentOff(), input_path, output_path,
            overwrite=overwrite, verify=verify, seed=seed, keep_failed=keep_failed,
            input_shapes=input_shapes, inputs=inputs,
        )  # fmt: skip

    monkeypatch.setattr(normdeploy.folding, "fold_bn_file", fold_wrongly)


@pytest.mark.parametrize("suffix", ["md", "json"])
def test_failed_check_exits_1_writes_the_report_and_no_output(
    tmp_path, capsys, wrong_fold, suffix
) -> None:
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / f"r.{suffix}"
    conv_bn_file(src)
    assert main(["fold-bn", str(src), "-o", str(out), "--report", str(report)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out.onnx not written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", report.name]
    text = report.read_text()
    if suffix == "md":
        assert "Verification: FAIL" in text
    else:
        data = json.loads(text)
        assert data["verified"] is False and not all(c["passed"] for c in data["verification"])


def test_no_verify_writes_the_wrong_fold_and_says_so(tmp_path, capsys, wrong_fold) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    conv_bn_file(src)
    assert main(["fold-bn", str(src), "-o", str(out)]) == 1 and not out.exists()
    # --no-verify writes the (wrong) graph: that is what the flag means, and it says so.
    assert main(["fold-bn", str(src), "-o", str(out), "--no-verify"]) == 0 and out.exists()
    assert "not verified (--no-verify)" in capsys.readouterr().out


def _failed_fold() -> VerificationFailed:
    """A real failed check: the wrong pass folded in memory, caught with its FoldResult."""
    with pytest.raises(VerificationFailed) as info:
        run_pass(FoldsOnePercentOff(), conv_bn_model())
    assert isinstance(info.value.result, FoldResult)
    return info.value


def test_run_reported_writes_the_failing_result_then_reraises(tmp_path) -> None:
    report = tmp_path / "r.md"
    error = _failed_fold()

    def fail():
        raise error

    with pytest.raises(VerificationFailed) as info:
        run_reported(argparse.Namespace(report=None), fail)
    assert info.value is error and not report.exists()
    with pytest.raises(VerificationFailed) as info:
        run_reported(argparse.Namespace(report=str(report)), fail)
    assert info.value is error
    text = report.read_text()
    assert text.startswith("## fold-bn: 1 of 1") and "Verification: FAIL" in text


def test_run_reported_without_a_result_writes_no_report(tmp_path) -> None:
    report = tmp_path / "r.md"

    def fail():
        raise VerificationFailed("differs")

    with pytest.raises(VerificationFailed, match="differs"):
        run_reported(argparse.Namespace(report=str(report)), fail)
    assert not report.exists()
    assert run_reported(argparse.Namespace(report=str(report)), lambda: 42) == 42
    assert not report.exists()  # a success is reported by the command's output step


def test_symbolic_dims_are_sized_where_the_original_runs(tmp_path, capsys) -> None:
    # [N, 3, H, W] that runs only at multiples of 32 (PaddleOCR's detector): 8 does not run.
    src, out = tmp_path / "det.onnx", tmp_path / "det_folded.onnx"
    model = multiple_of_model(32)
    onnx.save(model, src)
    assert main(["fold-bn", str(src), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 of 1 BatchNormalization folded" in text
    assert (
        f"note: symbolic dim(s) H=32, W=32 chosen: {src} runs at X[N, 3, H=32, W=32] "
        "(not at X[N, 3, H=8, W=8])"
    ) in text
    assert "verification: PASS" in text and "X[2, 3, 32, 32]" in text
    folded = onnx.load(out)
    assert ops(folded)["BatchNormalization"] == 0
    # The folded graph against the unfolded one at a size no check used.
    x = RNG.standard_normal((2, 3, 64, 96)).astype(np.float32)
    want = OrtRunner(model).infer({"X": x})["Y"]
    np.testing.assert_allclose(
        OrtRunner(folded).infer({"X": x})["Y"], want, rtol=RTOL32, atol=ATOL32
    )
    # --input-shape sizes the dims instead: nothing is probed, the check runs at that shape.
    argv = ["fold-bn", str(src), "-o", str(out), "-f", "--input-shape", "1x3x64x96"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "chosen" not in text and "1 check(s) on X[1, 3, 64, 96]" in text


def test_fold_bn_runs_the_users_feeds_as_well(tmp_path, capsys) -> None:
    src, out, feeds = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "feeds.npz"
    conv_bn_file(src)
    np.savez(feeds, X=RNG.standard_normal((5, 3, 8, 8)).astype(np.float32))
    argv = ["fold-bn", str(src), "-o", str(out), "--inputs", str(feeds), "--format", "json"]
    assert main(argv) == 0
    checks = json.loads(capsys.readouterr().out)["verification"]
    assert {c["name"] for c in checks} == {"Y@b2", "Y@feeds.npz"}
    assert {c["input_shapes"] for c in checks} == {"X[2, 3, 8, 8]", "X[5, 3, 8, 8]"}
