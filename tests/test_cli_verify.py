"""Verdicts users can trust, from the command line: honest replicas of real architectures deploy
with exit 0, a shape the graph cannot take is exit 2, saved runs replay to the same verdict.

The models are built here (tests/replicas.py) and deployed once per session (conftest's
``replica_deploys``); nothing is fetched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from normdeploy.cli import main
from normdeploy.verification.compare import BATCH_INDEPENDENCE, REFERENCE, K
from tests import replicas
from tests.conftest import DEPLOYED_REPLICAS

ROOT = Path(__file__).resolve().parents[1]


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name", DEPLOYED_REPLICAS)
def test_honest_replica_deploys_with_exit_0(name, replica_deploys):
    code, out = replica_deploys[name]
    data = report(out)
    assert code == 0, data["advice"]
    assert data["export"]["passed"] and data["verify"]["passed"]
    refs = [c for c in data["verify"]["checks"] if c["kind"] == REFERENCE]
    assert refs and all(c["rule"] == "float64" and c["ratio"] <= K for c in refs)
    # every report states the shapes that ran
    assert {r["inputs"] for r in data["verify"]["inputs_ran"]} >= {"b1/seed0", "b3/seed0"}
    assert all(r["shapes"] for r in data["verify"]["inputs_ran"])


def test_deep_preactivation_stack_confirms_every_norm_module(replica_deploys):
    entries = report(replica_deploys["preact_bn_stack"][1])["export"]["census"]["entries"]
    assert len(entries) == 81  # 40 blocks × 2 BN, and the final BN
    assert all(e["confirmed"] is True for e in entries)


def test_wide_range_outputs_pass_where_an_elementwise_bound_fails(replica_deploys):
    """Logits from ~1e3 down to ~1e-3: float32's own error on the largest entries is far above
    a 1e-4 elementwise bound on the entries near zero."""
    module, (x,) = replicas.wide_range_head()
    with torch.no_grad():
        logits = module.eval()(x).abs()
    assert logits.max() / logits.min() > 1e3  # the span the scale-relative rule is for
    data = report(replica_deploys["wide_range_head"][1])["verify"]
    refs = [c for c in data["checks"] if c["kind"] == REFERENCE]
    assert all(c["passed"] for c in refs)


@pytest.mark.parametrize("name", ["clip_like", "seq_first_transformer"])
def test_references_that_couple_samples_skip_batch_independence_with_a_note(
    name, replica_deploys
):
    data = report(replica_deploys[name][1])["verify"]
    assert not any(c["kind"] == BATCH_INDEPENDENCE for c in data["checks"])
    assert any("the reference itself couples samples" in n for n in data["notes"])
    assert "nan" not in json.dumps(data["checks"]).lower()


def test_int64_tokens_with_dict_outputs_check_every_output_by_its_key(replica_deploys):
    data = report(replica_deploys["token_dict_model"][1])["verify"]
    by_kind = {(c["kind"], c["name"]) for c in data["checks"]}
    assert {(REFERENCE, "logits"), (REFERENCE, "pooled")} <= by_kind
    assert {(BATCH_INDEPENDENCE, "logits"), (BATCH_INDEPENDENCE, "pooled")} <= by_kind


def test_an_input_shape_the_graph_cannot_take_is_exit_2(replica_deploys, capsys):
    graph = replica_deploys["token_dict_model"][1] / "model.onnx"  # tokens: [batch, 6]
    code = main(
        ["verify", "tests.replicas:token_dict_model", str(graph), "--input-shape", "1x9"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--input-shape: 1x9" in err[0] and "input 'tokens' dim 1 is fixed at 6" in err[0]


def _reference_errors(path: Path) -> list[tuple[str, str, float]]:
    checks = json.loads(path.read_text())["checks"]
    return [(c["inputs"], c["name"], c["error"]) for c in checks if c["kind"] == REFERENCE]


def test_a_saved_run_replays_to_the_same_verdict_without_pytorch(replica_deploys, tmp_path):
    out = replica_deploys["clip_like"][1]
    graph = out / "model.onnx"
    run, live = tmp_path / "run.npz", tmp_path / "live.json"
    spec = "tests.replicas:clip_like"
    assert (
        main(["verify", spec, str(graph), "--save-run", str(run), "--report", str(live)]) == 0
    )
    # A fault: one weight tensor moved by 1 % of its spread.
    model = onnx.load(graph)
    bad = tmp_path / "bad.onnx"
    onnx.save(replicas.plant_noise(model, replicas.weight_tensors(model)[0], 0, 1e-2), bad)
    bad_live = tmp_path / "bad_live.json"
    assert main(["verify", spec, str(bad), "--no-bisect", "--report", str(bad_live)]) == 1
    # Replay in a process where importing torch fails: no model, no float64 pass.
    for candidate, code, live_report in ((graph, 0, live), (bad, 1, bad_live)):
        replay = tmp_path / f"replay_{code}.json"
        script = (
            "import sys; sys.modules['torch'] = None; from normdeploy.cli import main; "
            f"sys.exit(main(['verify', '--load-run', {str(run)!r}, {str(candidate)!r}, "
            f"'--report', {str(replay)!r}]))"
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == code, done.stderr
        assert _reference_errors(replay) == _reference_errors(live_report)


def test_per_output_atol_gives_that_output_a_fixed_bound(replica_deploys, tmp_path):
    graph = replica_deploys["token_dict_model"][1] / "model.onnx"
    out = tmp_path / "r.json"
    argv = ["verify", "tests.replicas:token_dict_model", str(graph), "--report", str(out)]
    assert main([*argv, "--atol", "pooled=0", "--rtol", "pooled=0", "--no-bisect"]) == 1
    checks = json.loads(out.read_text())["checks"]
    rules = {(c["kind"], c["name"]): (c["rule"], c["passed"]) for c in checks}
    assert rules[(REFERENCE, "pooled")] == ("fixed", False)  # float32 rounding is not 0
    assert rules[(REFERENCE, "logits")] == ("float64", True)


def test_saved_run_layout_is_documented(replica_deploys, tmp_path):
    """The keys the README and normdeploy.verification.record document."""
    run = tmp_path / "run.npz"
    graph = replica_deploys["token_dict_model"][1] / "model.onnx"
    assert (
        main(["verify", "tests.replicas:token_dict_model", str(graph), "--save-run", str(run)])
        == 0
    )
    with np.load(run, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        keys = set(data.files)
    assert meta["format"] == "normdeploy-run" and meta["inputs"] == ["tokens"]
    assert meta["outputs"] == ["logits", "pooled"] and meta["truth"] is True
    assert [s["label"] for s in meta["sets"]] == ["b1/seed0", "b3/seed0"]
    assert {"set0/input0", "set0/expected1", "set1/truth0"} <= keys
    assert data_dtype(run, "set1/truth0") == np.float64
    assert meta["batch_independence"]["batched"] == "b3/seed0"


def data_dtype(path: Path, key: str) -> np.dtype:
    with np.load(path, allow_pickle=False) as data:
        return data[key].dtype
