"""Real processes: every way a run ends leaves nothing behind, and two writers of one output
never both win.

Each run is made to wait at a known point while its output is staged (fold-bn: its self-check,
reached only after the staged file is written; deploy: the model's own forward, called inside
the staging directory), so the signal or the race lands there every time, not by timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from fold_support import conv_bn_file

from normdeploy.io import STAGING_PREFIX, sha256_file

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI with fold-bn's self-check (a public seam) made to announce itself and wait for a
# "go" file: the output is staged in its owner-marked directory and not yet published.
FOLD_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import normdeploy.folding
    from normdeploy.cli import main

    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    real = normdeploy.folding.compare_graphs

    def paused(*args, **kwargs):
        ready.write_text(str(os.getpid()))
        while not go.exists():
            time.sleep(0.01)
        return real(*args, **kwargs)

    normdeploy.folding.compare_graphs = paused
    sys.exit(main(sys.argv[3:]))
    """
)

# A MODEL whose forward announces itself and then never returns (deploy's staging dir exists).
SLOW_MODEL = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    import torch
    from torch import nn

    class Stuck(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            Path(os.environ["READY_FILE"]).write_text(str(os.getpid()))
            while True:
                time.sleep(0.01)

    def net():
        return Stuck().eval(), torch.zeros(1, 3, 8, 8)
    """
)

WAIT_S = 120  # generous: a cold start imports torch and onnxruntime on a loaded CI machine


@dataclass(frozen=True)
class ProcessCase:
    """A row of docs/BAD_INPUTS.md's process table: what the test does and what it checks."""

    id: str
    command: str
    event: str
    code: int
    outcome: str
    signum: int = 0


_NOTHING = "one line `interrupted by {sig}`; no output, no staging directory; inputs unchanged"
FOLD = "fold-bn DIR/in.onnx -o DIR/out.onnx"
SIGNAL_CASES = [
    ProcessCase(
        "fold-sigterm",
        FOLD,
        "SIGTERM while the output is staged",
        143,
        _NOTHING.format(sig="SIGTERM"),
        signal.SIGTERM,
    ),
    ProcessCase(
        "fold-sighup",
        FOLD,
        "SIGHUP while the output is staged",
        129,
        _NOTHING.format(sig="SIGHUP"),
        signal.SIGHUP,
    ),
    ProcessCase(
        "fold-sigint",
        FOLD,
        "Ctrl-C (SIGINT) while the output is staged",
        130,
        "one line `interrupted`; no output, no staging directory; inputs unchanged",
        signal.SIGINT,
    ),
]
DEPLOY_SIGNAL_CASES = [
    ProcessCase(
        "deploy-sigterm",
        "deploy stuckzoo:net -o DIR/out",
        "SIGTERM while the model's forward runs",
        143,
        "one line; no staging directory; DIR/out, created by this run, removed",
        signal.SIGTERM,
    ),
    ProcessCase(
        "deploy-sighup",
        "deploy stuckzoo:net -o DIR/out",
        "SIGHUP while the model's forward runs",
        129,
        "one line; no staging directory; DIR/out, created by this run, removed",
        signal.SIGHUP,
    ),
]
RACE_CASES = [
    ProcessCase(
        "two-writers",
        f"{FOLD} (twice, at once)",
        "both pass the plan and stage, then publish together",
        2,
        "exactly one exits 0; the other exits 2 with `exists (another process wrote it …)`; the winner's model and its .data, consistent",
    ),
    ProcessCase(
        "two-writers-force",
        f"{FOLD} --force (twice, at once)",
        "both publish with --force",
        0,
        "both exit 0; the file is one complete model (os.replace), no staging directory",
    ),
]
PIPE_CASES = [
    ProcessCase(
        "stdout-closed",
        "models --format json | (a reader that has gone)",
        "writing the result finds the pipe closed",
        141,
        "nothing on stderr, no traceback: 128 + SIGPIPE, like any Unix filter whose reader left",
    ),
]
PROCESS_CASES = [*SIGNAL_CASES, *DEPLOY_SIGNAL_CASES, *RACE_CASES, *PIPE_CASES]  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"process ended before it was ready ({proc.returncode}): {err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("process never reached the staging step")
        time.sleep(0.02)


def _fold(tmp_path: Path, name: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", FOLD_DRIVER, str(tmp_path / f"{name}.ready"),
         str(tmp_path / "go"), "fold-bn", *argv],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(STAGING_PREFIX))


@pytest.mark.parametrize("case", SIGNAL_CASES, ids=[c.id for c in SIGNAL_CASES])
@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_a_signal_while_fold_bn_stages_its_output_leaves_nothing(tmp_path, case, external):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    conv_bn_file(src, external=external)
    inputs = {p.name: sha256_file(p) for p in tmp_path.iterdir()}
    proc = _fold(tmp_path, "a", str(src), "-o", str(out))
    _wait_for(tmp_path / "a.ready", proc)
    staged = _leftovers(tmp_path)
    assert len(staged) == 1  # the staging directory is there, the output staged inside it
    (stage,) = [tmp_path / s for s in staged]
    assert (stage / "out.onnx").is_file() and (stage / "owner").is_file()
    proc.send_signal(case.signum)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == case.code, err
    lines = [line for line in err.splitlines() if line.strip()]
    name = signal.Signals(case.signum).name
    words = "interrupted;" if case.signum == signal.SIGINT else f"interrupted by {name};"
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in err
    (tmp_path / "a.ready").unlink()
    assert {p.name: sha256_file(p) for p in tmp_path.iterdir()} == inputs  # nothing else


def test_two_writers_of_one_output_exactly_one_wins(tmp_path):
    assert RACE_CASES[0].code == 2  # the loser's exit code, as documented
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    conv_bn_file(src, external=True)
    first = _fold(tmp_path, "a", str(src), "-o", str(out))
    second = _fold(tmp_path, "b", str(src), "-o", str(out))
    _wait_for(tmp_path / "a.ready", first)
    _wait_for(tmp_path / "b.ready", second)
    assert not out.exists()  # both checked "does not exist" and staged: the race is on
    (tmp_path / "go").write_text("")
    results = [(p.wait(timeout=WAIT_S), p.communicate()[1]) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "exists (another process wrote it" in loser and "Traceback" not in loser
    # The winner's model and its data file, consistent with each other; nothing else.
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".ready")) == [
        "go", "in.onnx", "in.onnx.data", "out.onnx", "out.onnx.data",
    ]  # fmt: skip


def test_with_force_the_last_writer_replaces_atomically(tmp_path):
    assert RACE_CASES[1].code == 0
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    conv_bn_file(src)
    procs = [_fold(tmp_path, n, str(src), "-o", str(out), "--force") for n in ("a", "b")]
    for n, p in zip(("a", "b"), procs, strict=True):
        _wait_for(tmp_path / f"{n}.ready", p)
    (tmp_path / "go").write_text("")
    assert [p.wait(timeout=WAIT_S) for p in procs] == [0, 0]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", DEPLOY_SIGNAL_CASES, ids=[c.id for c in DEPLOY_SIGNAL_CASES])
def test_a_signal_during_deploy_leaves_no_staging_dir_and_no_folder(tmp_path, case):
    (tmp_path / "stuckzoo.py").write_text(SLOW_MODEL)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "READY_FILE": str(tmp_path / "ready")}
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "deploy", "stuckzoo:net", "-o", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for(tmp_path / "ready", proc)
    assert len(_leftovers(out)) == 1  # deploy works inside its staging directory
    proc.send_signal(case.signum)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == case.code, err
    assert (
        "Traceback" not in err and f"interrupted by {signal.Signals(case.signum).name}" in err
    )
    assert not out.exists()  # the folder this run created, empty again, is gone too


def test_a_reader_that_has_gone_ends_the_run_quietly():
    (case,) = PIPE_CASES
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "models", "--format", "json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader leaves before the result is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=WAIT_S) == case.code and err == ""
