"""Safe ONNX loading and atomic saving."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import normdeploy.io
from normdeploy.errors import InputFileError, OutputPathError
from normdeploy.io import (
    OWNER_FILE,
    STAGING_PREFIX,
    OutputPlan,
    check_output_path,
    plan_outputs,
    pseudo_filesystem,
    read_onnx,
    remove_stale_staging,
    save_onnx,
    sha256_file,
    stage_onnx,
    staging_dir,
    staging_owner,
    write_text_atomic,
)


def _tiny_model(n: int = 64) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n, dtype=np.float32).reshape(1, n), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"", "empty"),
        (b'{"not": "onnx"}', "cannot parse|not an ONNX"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "PNG|cannot parse|not an ONNX"),
        (b"hello world, this is text\n", "cannot parse|not an ONNX"),
    ],
    ids=["empty", "json", "png", "text"],
)
def test_read_onnx_rejects_non_onnx_with_one_line(tmp_path, content, expect):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InputFileError, match=expect) as info:
        read_onnx(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_read_onnx_missing_and_directory(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        read_onnx(tmp_path / "nope.onnx")
    with pytest.raises(InputFileError, match="directory"):
        read_onnx(tmp_path)


def test_truncated_file_is_rejected(tmp_path):
    p = tmp_path / "m.onnx"
    data = _tiny_model(4096).SerializeToString()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError):
        read_onnx(p)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    p = tmp_path / "m.onnx"
    model = _tiny_model()
    save_onnx(model, p)
    assert onnx.load(str(p)).graph.node[0].op_type == "Add"
    assert [f.name for f in tmp_path.iterdir()] == ["m.onnx"]  # no temp files left
    with pytest.raises(OutputPathError, match="exists"):
        check_output_path(p)
    with pytest.raises(OutputPathError, match="overwrite the input"):
        check_output_path(p, inputs=(p,), overwrite=True)
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "x.onnx")


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, external):
    target = tmp_path / "out.onnx"

    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # Both writers: the streaming one (inline) and onnx's (external data).
    monkeypatch.setattr(onnx, "save_model", explode)
    monkeypatch.setattr(normdeploy.io, "write_model", explode)
    with pytest.raises(OutputPathError, match="No space left"):
        save_onnx(_tiny_model(4096), target, external_data=external)
    assert list(tmp_path.iterdir()) == []


def test_external_data_round_trip_and_missing_data(tmp_path):
    p = tmp_path / "ext.onnx"
    model = _tiny_model(4096)
    expected = numpy_helper.to_array(model.graph.initializer[0]).copy()
    save_onnx(model, p, external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    loaded = read_onnx(p)
    assert loaded.external_data
    np.testing.assert_array_equal(
        numpy_helper.to_array(loaded.model.graph.initializer[0]), expected
    )
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(InputFileError, match=r"external data file 'ext\.onnx\.data'.*missing"):
        read_onnx(p)


def test_reading_never_modifies_the_input(tmp_path):
    p = tmp_path / "m.onnx"
    save_onnx(_tiny_model(), p)
    before = sha256_file(p)
    read_onnx(p)
    assert sha256_file(p) == before


def test_write_text_atomic(tmp_path):
    p = tmp_path / "r.json"
    write_text_atomic(p, "{}\n")
    assert p.read_text() == "{}\n"


# ----------------------------------------------------------------------------- the output plan


@pytest.mark.parametrize("path", ["/dev/null", "/proc/self/status", "/sys/kernel/notes"])
def test_kernel_and_device_paths_are_refused_by_looking_only(path):
    # The plan only stats the path: nothing is opened or written.
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(OutputPathError, match=r"kernel's|character device"):
        OutputPlan(overwrite=True).add(path)


def test_pseudo_filesystems_are_recognised_and_disks_are_not(tmp_path):
    assert pseudo_filesystem("/proc/self/status") == "proc"
    assert pseudo_filesystem("/proc/does/not/exist") == "proc"
    assert pseudo_filesystem(tmp_path / "x.onnx") is None


def test_plan_compares_input_data_files_by_inode_not_by_name(tmp_path):
    """A symlink to the input's data file, or another spelling of its path, is that file
    (the CLI table covers links to the input model itself)."""
    src = tmp_path / "in.onnx"
    save_onnx(_tiny_model(4096), src, external_data=True)
    soft = tmp_path / "soft.data"
    soft.symlink_to(tmp_path / "in.onnx.data")
    plan = plan_outputs([], inputs=[src], overwrite=True)
    with pytest.raises(OutputPathError, match="would overwrite the input's external data"):
        plan.add(soft)
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputPathError, match="would overwrite the input's external data"):
        plan.add(tmp_path / "sub" / ".." / "in.onnx.data")


def test_two_outputs_naming_one_file_are_refused(tmp_path):
    plan = OutputPlan()
    plan.add(tmp_path / "o.onnx")
    with pytest.raises(OutputPathError, match="the report and the output name the same file"):
        plan.add(tmp_path / "." / "o.onnx", "report")
    plan.reserve(tmp_path / "r.onnx", "output")
    with pytest.raises(OutputPathError, match="the report and the output"):
        plan.add(tmp_path / "r.onnx", "report")


def test_name_longer_than_the_file_system_allows_is_refused_up_front(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    ok = "z" * (limit - len(".onnx")) + ".onnx"
    save_onnx(
        _tiny_model(), tmp_path / ok
    )  # staging names stay short: a full-length name works
    assert [p.name for p in tmp_path.iterdir()] == [ok]
    with pytest.raises(OutputPathError, match=f"over this file system's limit of {limit}"):
        save_onnx(_tiny_model(), tmp_path / ("z" + ok), external_data=True)


def test_exclusive_publish_lets_one_writer_win(tmp_path):
    """Without overwrite the name is taken atomically: a file that appears after the plan was
    checked is left alone, and the files published before it are taken back."""
    target = tmp_path / "o.onnx"
    plan = OutputPlan()
    plan.add_onnx(target)
    with staging_dir(tmp_path) as tmp:
        files = stage_onnx(_tiny_model(4096), tmp / target.name, external_data=True)
        target.write_text("the other writer")  # lands between the check and the publish
        with pytest.raises(OutputPathError, match="another process wrote it"):
            plan.publish([(f, tmp_path / f.name) for f in files])
    assert target.read_text() == "the other writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]  # its .data taken back


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        model, report = tmp_path / "m.onnx", tmp_path / "r.json"
        save_onnx(_tiny_model(4096), model, external_data=True)
        write_text_atomic(report, "{}")
        for p in (model, tmp_path / "m.onnx.data", report):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~mask, p
        os.chmod(model, 0o640)
        os.chmod(report, 0o604)
        save_onnx(_tiny_model(), model, overwrite=True)
        write_text_atomic(report, "[]", overwrite=True)
        assert stat.S_IMODE(os.stat(model).st_mode) == 0o640
        assert stat.S_IMODE(os.stat(report).st_mode) == 0o604
    finally:
        os.umask(old)


def test_staging_dirs_of_dead_owners_are_removed_and_live_ones_kept(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(done.stdout)
    me = os.getpid()
    markers = {
        "dead": f"{dead_pid} -\n",  # its process has exited
        "reused": f"{me} 1\n",  # a live pid, but not the process that wrote it (start time)
        "live": f"{me} {Path(f'/proc/{me}/stat').read_text().rpartition(')')[2].split()[19]}\n",
        "unmarked": None,  # no marker: not provably ours, left alone
    }
    for name, marker in markers.items():
        d = tmp_path / f"{STAGING_PREFIX}{name}"
        d.mkdir()
        (d / "payload").write_bytes(b"x" * 100)
        if marker is not None:
            (d / OWNER_FILE).write_text(marker)
    other = tmp_path / ".o.onnx.abcd"  # not a staging dir of ours
    other.mkdir()
    removed = remove_stale_staging(tmp_path)
    assert sorted(p.name for p in removed) == [
        f"{STAGING_PREFIX}dead",
        f"{STAGING_PREFIX}reused",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{STAGING_PREFIX}live", f"{STAGING_PREFIX}unmarked", ".o.onnx.abcd"]
    )


def test_a_staging_dir_is_marked_with_its_owner_and_removed_on_any_exit(tmp_path):
    with pytest.raises(KeyboardInterrupt), staging_dir(tmp_path) as tmp:
        owner = staging_owner(tmp)
        assert owner is not None and owner[0] == os.getpid() and owner[1] != "-"
        (tmp / "big").write_bytes(b"\0" * 4096)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- external data


def _external_model(tmp_path: Path, location: str, offset: str | None = None) -> Path:
    model = _tiny_model(4096)
    tensor = model.graph.initializer[0]
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", str(length))):
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def test_external_data_past_the_end_of_its_file_is_refused_before_any_read(tmp_path):
    # The CLI table covers locations outside the folder and malformed offsets; this one is a
    # valid location whose offset + length run past the file's end.
    path = _external_model(tmp_path, "data.bin", "99999999")
    (path.parent / "data.bin").write_bytes(b"\0" * 65536)
    with pytest.raises(
        InputFileError, match=r"'data\.bin' is truncated \(tensor 'w' needs"
    ) as info:
        read_onnx(path)
    assert "\n" not in str(info.value)
