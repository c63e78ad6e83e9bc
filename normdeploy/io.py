"""Load and save ONNX files safely: every input checked, every output planned.

Loading gives one-line errors for every way a file can be wrong, external data included (a
location that leaves the model's folder, a negative or non-numeric offset, a file that is too
short). Large models are written one initializer at a time (:func:`save_model_streaming`).

Writing goes through an :class:`OutputPlan`. Before any work, a command names every file it will
write (the model, its ``.data`` file, reports, a kept failing graph) and the plan checks each one:
not an input file nor an input's external data (compared by device and inode, so symlinks and
hard links count), not a directory, device, FIFO, socket or kernel pseudo-file (refused even with
``overwrite``), not existing unless ``overwrite``, not named twice, and a name the file system
accepts. Files are staged in a private directory beside their target (:func:`staging_dir`, with
an owner marker so that a later run removes a killed run's leftovers and never a live run's) and
published atomically: without ``overwrite`` by a hard link that fails if the name exists (or an
exclusive create), so of two concurrent writers exactly one wins; with ``overwrite`` by
``os.replace``. A new file gets the user's umask, a replaced file keeps its mode.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import Message
from onnx import external_data_helper

from normdeploy.errors import InputFileError, InvalidArgumentError, OutputPathError

PROTOBUF_LIMIT = 2**31 - 1
# Tensors smaller than this stay inline when a model is written with external data.
EXTERNAL_DATA_THRESHOLD = 1024
# Staging directories (and nothing else) start with this; a later run may remove one whose
# owner (pid + process start time in OWNER_FILE) is gone.
STAGING_PREFIX = ".normdeploy-tmp-"
OWNER_FILE = "owner"
DATA_SUFFIX = ".data"
FAILED_SUFFIX = ".failed.onnx"
_ONNX_MAGIC_HINTS = {
    b"\x89PNG": "a PNG image",
    b"PK\x03\x04": "a zip archive (a PyTorch checkpoint?)",
    b"\x80\x02": "a Python pickle",
    b"\x80\x04": "a Python pickle",
    b"\x80\x05": "a Python pickle",
}
# Kernel and device file systems: a "file" there is an interface, never a place for a model.
_PSEUDO_FILESYSTEMS = frozenset(
    (
        "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
        "securityfs", "configfs", "pstore", "bpf", "efivarfs", "fusectl", "binfmt_misc",
        "mqueue", "autofs", "rpc_pipefs", "nsfs",
    )
)  # fmt: skip
_PSEUDO_ROOTS = (Path("/proc"), Path("/sys"))  # when the mount table cannot be read


@dataclass
class OnnxFile:
    """A loaded ONNX model with where it came from and how its weights were stored."""

    model: onnx.ModelProto
    path: Path
    external_data: bool
    data_files: tuple[Path, ...] = ()  # resolved external data files the model reads


# ----------------------------------------------------------------------------- file facts


def as_path(value: object, what: str) -> Path:
    """``value`` as a Path if it is a ``str`` or ``os.PathLike``; InvalidArgumentError else."""
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        text = os.fspath(value)
        if isinstance(text, str) and text:
            if "\x00" in text:
                raise InvalidArgumentError(f"{what}: a path cannot contain a NUL character")
            return Path(text)
        if isinstance(text, str):
            raise InvalidArgumentError(f"{what}: empty path")
    raise InvalidArgumentError(f"{what}: expected a file path, got {type(value).__name__}")


def file_kind(mode: int) -> str:
    """What a ``st_mode`` says a file is, in words."""
    for test, words in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "not a regular file"


@lru_cache(maxsize=1)
def _mounts() -> tuple[tuple[Path, str], ...]:
    """(mount point, file system type), longest mount point first; () when unreadable."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ()
    mounts = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            point = fields[4].encode().decode("unicode_escape")  # \040 for spaces
            mounts.append((Path(point), right.split()[0]))
    return tuple(sorted(mounts, key=lambda m: len(m[0].parts), reverse=True))


def pseudo_filesystem(path: str | os.PathLike[str]) -> str | None:
    """The kernel/device file system ``path`` lives on (``proc``, ``sysfs``, ``devtmpfs``…),
    or None for an ordinary one. Only looks things up; never opens ``path``."""
    resolved = Path(os.path.realpath(path))
    for point, fstype in _mounts():
        if resolved == point or point in resolved.parents:
            return fstype if fstype in _PSEUDO_FILESYSTEMS else None
    for root in _PSEUDO_ROOTS:
        if resolved == root or root in resolved.parents:
            return root.name
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _name_max(directory: Path) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_input_file(path: str | os.PathLike[str], what: str = "input") -> Path:
    """Return ``path`` as a Path if it is an existing, readable, non-empty regular file."""
    p = as_path(path, what)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputFileError(f"{p}: {what} file does not exist") from None
    except OSError as exc:
        raise InputFileError(f"{p}: cannot open {what} file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputFileError(f"{p}: {what} is a directory, expected a file")
    if not stat.S_ISREG(st.st_mode):
        # Reading a FIFO or a device blocks or never ends: refuse before opening it.
        raise InputFileError(f"{p}: {what} is {file_kind(st.st_mode)}, not a regular file")
    if not os.access(p, os.R_OK):
        raise InputFileError(f"{p}: {what} file is not readable (permission denied)")
    if st.st_size == 0:
        raise InputFileError(f"{p}: {what} file is empty")
    return p


def describe_content(head: bytes) -> str:
    """What the first bytes of a file say it is ('a PNG image', 'JSON text', 'a text file')."""
    for magic, what in _ONNX_MAGIC_HINTS.items():
        if head.startswith(magic):
            return what
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "JSON text"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "binary data"


def _not_onnx(head: bytes) -> str:
    what = describe_content(head)
    return "not an ONNX protobuf" if what == "binary data" else what


# ----------------------------------------------------------------------------- external data


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            yield tensor


def _non_negative(tensor: onnx.TensorProto, key: str, value: str, source: Path) -> int:
    text = value.strip()
    if not text.isdigit():
        raise InputFileError(
            f"{source}: tensor '{tensor.name}' has external data {key} '{value[:40]}' "
            "(must be a non-negative integer)"
        )
    return int(text)


def external_data_files(model: onnx.ModelProto, source: Path) -> dict[Path, int]:
    """The external data files ``model`` (read from ``source``) refers to, resolved, with the
    bytes each must hold. InputFileError (one line) for a location that leaves the model's
    folder (absolute, ``..``, or a symlink out), a bad offset/length, or a missing, special or
    too-short file. Reads no data."""
    base = source.parent.resolve()
    needed: dict[Path, int] = {}
    for tensor in _external_tensors(model):
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        offset = _non_negative(tensor, "offset", entries.get("offset", "0"), source)
        length = (
            _non_negative(tensor, "length", entries["length"], source)
            if "length" in entries
            else 0
        )
        where = f"{source}: external data '{location}' of tensor '{tensor.name}'"
        if not location or "\x00" in location:
            raise InputFileError(
                f"{source}: tensor '{tensor.name}' has no external data location"
            )
        rel = Path(location)
        if rel.is_absolute() or ".." in rel.parts:
            raise InputFileError(f"{where} points outside the model's folder (refused)")
        resolved = (base / rel).resolve()
        if base not in resolved.parents:
            raise InputFileError(
                f"{where} is a symlink that leads outside the model's folder (refused)"
                if resolved != base
                else f"{where} names the model's folder itself, not a file"
            )
        try:
            st = os.stat(resolved)
        except FileNotFoundError:
            raise InputFileError(
                f"{source}: external data file '{location}' for tensor '{tensor.name}' is "
                "missing"
            ) from None
        except OSError as exc:
            raise InputFileError(f"{where}: cannot open ({exc.strerror or exc})") from None
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{where} is {file_kind(st.st_mode)}, not a regular file")
        end = offset + length
        if length and st.st_size < end:
            raise InputFileError(
                f"{source}: external data file '{location}' is truncated "
                f"(tensor '{tensor.name}' needs bytes up to {end}, the file has {st.st_size})"
            )
        needed[resolved] = max(needed.get(resolved, 0), end)
    return needed


def model_header(model: onnx.ModelProto | bytes | str | os.PathLike[str]) -> onnx.ModelProto:
    """A model's proto without reading its external data (inputs, outputs, graph structure)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load_model(os.fspath(model), load_external_data=False)


def read_onnx(path: str | os.PathLike[str], *, load_external_data: bool = True) -> OnnxFile:
    """Parse an ONNX file and its external data; raise InputFileError with one line if broken."""
    p = check_input_file(path, "ONNX")
    with open(p, "rb") as f:
        head = f.read(16)
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError or plain errors on garbage
        raise InputFileError(
            f"{p}: cannot parse as ONNX ({_not_onnx(head)}; {type(exc).__name__})"
        ) from None
    if not model.HasField("graph") or (
        not model.graph.node and not model.graph.output and not model.opset_import
    ):
        raise InputFileError(
            f"{p}: not an ONNX model ({_not_onnx(head)}; no graph in the file)"
        )
    data_files = external_data_files(model, p)
    if data_files and load_external_data:
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:  # onnx refuses what it finds unsafe; one line either way
            raise InputFileError(
                f"{p}: cannot read external data ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"
            ) from None
    return OnnxFile(
        model=model, path=p, external_data=bool(data_files), data_files=tuple(data_files)
    )


# ----------------------------------------------------------------------------- staging


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), or None when unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _owner_alive(pid: int, start: str) -> bool:
    """Whether the process that wrote an owner marker is still running (pid reuse counts as
    gone when the start time is known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process exists
    except OSError:
        return True
    now = _process_start(pid)
    return now is None or start == "-" or now == start


def staging_owner(directory: Path) -> tuple[int, str] | None:
    """(pid, start time) from a staging directory's owner marker; None when unreadable."""
    try:
        pid_text, start = (directory / OWNER_FILE).read_text().split()[:2]
        return int(pid_text), start
    except (OSError, ValueError):
        return None


def remove_stale_staging(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove staging directories in ``directory`` whose owner process is gone (a killed run's
    leftovers); never a live run's, and never one without a readable marker. Returns them."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX) or not entry.is_dir(
            follow_symlinks=False
        ):
            continue
        owner = staging_owner(Path(entry.path))
        if owner is None or _owner_alive(*owner):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def staging_dir(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """A private directory in ``directory`` (same file system as the outputs, so publishing is
    a rename), marked with its owner; removed when the block ends, however it ends."""
    parent = Path(directory)
    remove_stale_staging(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    except OSError as exc:
        raise OutputPathError(
            f"{parent}: cannot create a staging directory ({exc.strerror or exc})"
        ) from None
    try:
        pid = os.getpid()
        (tmp / OWNER_FILE).write_text(f"{pid} {_process_start(pid) or '-'}\n")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the output plan


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the user's umask."""
    return 0o666 & ~_umask()


def data_file_for(path: Path) -> Path:
    """Where a model's external data goes: ``NAME.onnx.data`` beside it. (A path without a
    name, like ``.``, is returned as it is: the plan refuses it as a directory.)"""
    return path.with_name(path.name + DATA_SUFFIX) if path.name else path


def failed_file_for(path: Path) -> Path:
    """Where ``--keep-failed`` keeps a failing graph: ``NAME.failed.onnx`` beside ``path``."""
    if not path.name:
        return path
    stem = path.name[: -len(".onnx")] if path.name.lower().endswith(".onnx") else path.name
    return path.with_name(stem + FAILED_SUFFIX)


@dataclass(frozen=True)
class PlannedFile:
    """One file a command will write: where, and what it is (for messages)."""

    path: Path
    what: str


@dataclass
class OutputPlan:
    """Every file a command will write, checked before any work (see the module docstring)."""

    overwrite: bool = False
    files: list[PlannedFile] = field(default_factory=list)
    _inputs: dict[tuple[int, int], str] = field(default_factory=dict, repr=False)
    _names: dict[Path, PlannedFile] = field(default_factory=dict, repr=False)

    def add_input(
        self,
        path: str | os.PathLike[str],
        data_files: Iterable[Path] = (),
        what: str = "input",
    ) -> None:
        """An input file (and its external data files): no output may be any of them."""
        files = [(Path(path), f"the {what} file")]
        files += [(Path(d), f"the {what}'s external data file") for d in data_files]
        for p, label in files:
            ident = _identity(p)
            if ident is None:
                continue
            self._inputs.setdefault(ident, label)
            for planned in self.files:
                if _identity(planned.path) == ident:
                    raise OutputPathError(self._is_input(planned, label))

    @staticmethod
    def _is_input(planned: PlannedFile, label: str) -> str:
        return f"{planned.path}: {planned.what} would overwrite {label}; choose another name"

    def add(self, path: str | os.PathLike[str], what: str = "output") -> Path:
        """Check one output file now; return it as a Path."""
        p = as_path(path, what)
        parent = p.parent
        if parent.is_dir() and len(os.fsencode(p.name)) > (limit := _name_max(parent)):
            raise OutputPathError(
                f"{parent / (p.name[:24] + '…')}: {what} file name is "
                f"{len(os.fsencode(p.name))} bytes, over this file system's limit of {limit}"
            )
        try:
            lst = os.lstat(p)
        except FileNotFoundError:
            lst = None
        except OSError as exc:
            raise OutputPathError(
                f"{p}: cannot check {what} path ({exc.strerror or exc})"
            ) from None
        st = None
        if lst is not None:
            with contextlib.suppress(OSError):
                st = os.stat(p)  # what a symlink points at; None when it dangles
        shown = st or lst
        mode = shown.st_mode if shown is not None else None
        if mode is not None and stat.S_ISDIR(mode):
            raise OutputPathError(f"{p}: {what} path is a directory, expected a file name")
        if not parent.exists():
            raise OutputPathError(f"{p}: {what} directory '{parent}' does not exist")
        if not parent.is_dir():
            raise OutputPathError(f"{p}: {what} directory '{parent}' is not a directory")
        if (fs := pseudo_filesystem(p)) is not None:
            raise OutputPathError(
                f"{p}: {what} is on the kernel's '{fs}' file system, not a place for files; "
                "choose a path on a disk"
            )
        if mode is not None and not stat.S_ISREG(mode):
            raise OutputPathError(
                f"{p}: {what} is {file_kind(mode)}; normdeploy writes only regular files "
                "(even with --force)"
            )
        planned = PlannedFile(p, what)
        if st is not None and (label := self._inputs.get((st.st_dev, st.st_ino))):
            raise OutputPathError(self._is_input(planned, label))
        key = Path(os.path.realpath(p))
        if (other := self._names.get(key)) is not None or (
            st is not None
            and (
                other := next(
                    (f for f in self.files if _identity(f.path) == (st.st_dev, st.st_ino)),
                    None,
                )
            )
            is not None
        ):
            raise OutputPathError(
                f"{p}: the {what} and the {other.what} name the same file; give them "
                "different names"
            )
        if lst is not None and not self.overwrite:
            raise OutputPathError(f"{p}: {what} file exists (use --force to overwrite)")
        if not os.access(parent, os.W_OK):
            raise OutputPathError(f"{p}: {what} directory '{parent}' is not writable")
        self._names[key] = planned
        self.files.append(planned)
        return p

    def reserve(self, path: str | os.PathLike[str], what: str) -> None:
        """A file another step writes (and checks itself): only its name is taken, so that no
        output planned here names the same file."""
        p = as_path(path, what)
        self._names.setdefault(Path(os.path.realpath(p)), PlannedFile(p, what))

    def add_onnx(
        self, path: str | os.PathLike[str], what: str = "output", *, external_data: bool = True
    ) -> Path:
        """A model output and, when it may get one, its external data file."""
        p = self.add(path, what)
        if external_data:
            self.add(data_file_for(p), f"{what}'s external data")
        return p

    def planned(self, path: Path) -> PlannedFile:
        key = Path(os.path.realpath(path))
        if key not in self._names:
            raise KeyError(f"{path} is not in the output plan")
        return self._names[key]

    def publish(self, pairs: Sequence[tuple[Path, Path]]) -> None:
        """Move staged files onto their planned targets, in order (data before the model that
        points at it). Without ``overwrite`` a target that appeared meanwhile is not touched:
        the files published so far are taken back and OutputPathError says which one exists.
        """
        done: list[Path] = []
        try:
            for staged, target in pairs:
                publish_file(
                    staged, target, overwrite=self.overwrite, what=self.planned(target).what
                )
                done.append(target)
        except BaseException:
            if not self.overwrite:
                for target in done:  # ours alone: created exclusively a moment ago
                    with contextlib.suppress(OSError):
                        target.unlink()
            raise


def publish_file(staged: Path, target: Path, *, overwrite: bool, what: str = "output") -> None:
    """Rename ``staged`` onto ``target`` atomically; see the module docstring for the rules."""
    try:
        existing = os.stat(target)
    except OSError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        raise OutputPathError(
            f"{target}: {what} became {file_kind(existing.st_mode)} while this command ran; "
            "not written"
        )
    try:
        if overwrite:
            os.chmod(staged, stat.S_IMODE(existing.st_mode) if existing else new_file_mode())
            os.replace(staged, target)
            return
        os.chmod(staged, new_file_mode())
        try:
            os.link(staged, target)
        except FileExistsError:
            raise OutputPathError(
                f"{target}: {what} file exists (another process wrote it while this one ran; "
                "use --force to overwrite)"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            _claim_then_replace(staged, target, what)
        else:
            os.unlink(staged)
    except OutputPathError:
        raise
    except OSError as exc:
        raise OutputPathError(f"{target}: cannot write ({exc.strerror or exc})") from None


def _claim_then_replace(staged: Path, target: Path, what: str) -> None:
    """Exclusive create where hard links are not supported: claim the name, then replace the
    claim (ours alone) with the staged file."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise OutputPathError(
            f"{target}: {what} file exists (another process wrote it while this one ran; "
            "use --force to overwrite)"
        ) from None
    os.close(fd)
    os.replace(staged, target)


def plan_outputs(
    outputs: Sequence[tuple[str | os.PathLike[str], str]],
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> OutputPlan:
    """An :class:`OutputPlan` for ``(path, what)`` outputs against existing ``inputs`` (ONNX
    inputs bring their external data files)."""
    plan = OutputPlan(overwrite=overwrite)
    for inp in inputs:
        plan.add_input(inp, _data_files_of(inp))
    for path, what in outputs:
        plan.add(path, what)
    return plan


def _data_files_of(path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """The external data files of an ONNX input (header only; nothing for other files)."""
    p = Path(path)
    if p.suffix.lower() != ".onnx" or not p.is_file():
        return ()
    try:
        header = onnx.load_model(str(p), load_external_data=False)
        return tuple(external_data_files(header, p))
    except Exception:  # an input that cannot be read fails later, with its own message
        return ()


def check_output_path(
    out: str | os.PathLike[str],
    *,
    inputs: tuple[str | os.PathLike[str], ...] = (),
    overwrite: bool = False,
    what: str = "output",
) -> Path:
    """Validate that ``out`` can be written (see :class:`OutputPlan`); return it as a Path."""
    plan = plan_outputs([], inputs=inputs, overwrite=overwrite)
    return plan.add(out, what)


def write_bytes_atomic(
    path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False, what: str = "output"
) -> Path:
    """Write ``data`` to ``path`` atomically (staged, then published; see the module docstring)."""
    plan = OutputPlan(overwrite=overwrite)
    p = plan.add(path, what)
    with staging_dir(p.parent) as tmp:
        staged = tmp / "file"
        try:
            staged.write_bytes(data)
        except OSError as exc:
            raise OutputPathError(f"{p}: cannot write ({exc.strerror or exc})") from None
        plan.publish([(staged, p)])
    return p


def write_text_atomic(
    path: str | os.PathLike[str], text: str, *, overwrite: bool = False, what: str = "output"
) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite, what=what)


def model_size_bytes(model: onnx.ModelProto) -> int:
    """The serialized size of ``model`` without serializing it twice for large models."""
    return model.ByteSize()


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when the model is too large for one protobuf file (2 GB, less headroom)."""
    return model_size_bytes(model) > PROTOBUF_LIMIT - 64 * 2**20


def stage_onnx(
    model: onnx.ModelProto,
    staged: Path,
    *,
    external_data: bool,
    target: Path | None = None,
) -> list[Path]:
    """Write ``model`` to ``staged`` (inside a staging directory), with its tensors in
    ``<name>.data`` beside it when ``external_data``; return the files written, data first.
    The in-memory model then references that data file instead of holding the bytes. Errors
    name ``target``, the file being staged for."""
    try:
        if not external_data:
            save_model_streaming(model, staged)
            return [staged]
        data_name = data_file_for(staged).name
        onnx.save_model(
            model,
            str(staged),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=EXTERNAL_DATA_THRESHOLD,
        )
    except OSError as exc:
        raise OutputPathError(
            f"{target or staged.name}: cannot write ({exc.strerror or exc})"
        ) from None
    data = data_file_for(staged)
    return [data, staged] if data.exists() else [staged]


def restage_as(staged: Path, name: str) -> list[Path]:
    """Rename a staged model (and its staged external data) to ``name`` in the same staging
    directory, rewriting the data location the model records; return the files, data first.

    Only the model's small header is rewritten: its tensors live in the data file.
    """
    target = staged.with_name(name)
    data = data_file_for(staged)
    if not data.exists():
        os.replace(staged, target)
        return [target]
    header = onnx.load_model(str(staged), load_external_data=False)
    new_data = data_file_for(target)
    for tensor in _external_tensors(header):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == data.name:
                entry.value = new_data.name
    os.replace(data, new_data)
    save_model_streaming(header, target)
    staged.unlink()
    return [new_data, target]


def save_onnx(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Save atomically. ``external_data=None`` chooses external data only past protobuf's 2 GB.

    With external data the tensors go to ``<name>.data`` beside the file; both are planned and
    checked first, staged, and the data file is published before the model that points at it.
    """
    if not isinstance(model, onnx.ModelProto):
        raise InvalidArgumentError(
            f"model: expected an onnx.ModelProto, got {type(model).__name__}"
        )
    if external_data is None:
        external_data = needs_external_data(model)
    plan = plan_outputs([], inputs=inputs, overwrite=overwrite)
    p = plan.add_onnx(path, external_data=external_data)
    with staging_dir(p.parent) as tmp:
        written = stage_onnx(model, tmp / p.name, external_data=external_data, target=p)
        plan.publish([(f, p.parent / f.name) for f in written])
    return p


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- streaming writer
#
# ``model.SerializeToString()`` builds the whole file in memory (one more copy of every weight)
# and is slow on large graphs under upb. Protobuf's wire format is a concatenation of fields, so
# the same bytes can be written as: the model's fields before ``graph``, the graph's tag and
# length, the graph's fields before ``initializer``, each initializer (tag, length, bytes), the
# graph's remaining fields, then the model's remaining fields: field order as protobuf writes it.

_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_LENGTH_DELIMITED = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)


def _fields_bytes(msg: Message, lo: int, hi: int, skip: int) -> bytes:
    """Serialized fields of ``msg`` with numbers in [lo, hi), except ``skip``."""
    part = type(msg)()
    for fd, value in msg.ListFields():
        if fd.number == skip or not lo <= fd.number < hi:
            continue
        if fd.is_repeated:
            getattr(part, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(part, fd.name).CopyFrom(value)
        else:
            setattr(part, fd.name, value)
    return part.SerializeToString()


def write_model(model: onnx.ModelProto, f: BinaryIO) -> int:
    """Write ``model`` to the open binary file ``f``; return the number of bytes written."""
    if not model.HasField("graph"):
        data = model.SerializeToString()
        f.write(data)
        return len(data)
    graph = model.graph
    head = _fields_bytes(model, 0, _MODEL_GRAPH, _MODEL_GRAPH)
    tail = _fields_bytes(model, _MODEL_GRAPH + 1, 1 << 29, _MODEL_GRAPH)
    g_head = _fields_bytes(graph, 0, _GRAPH_INITIALIZER, _GRAPH_INITIALIZER)
    g_tail = _fields_bytes(graph, _GRAPH_INITIALIZER + 1, 1 << 29, _GRAPH_INITIALIZER)
    init_tag = _tag(_GRAPH_INITIALIZER)
    # Per-tensor ByteSize is cheap; it gives the graph's length before any tensor is written.
    sizes = [t.ByteSize() for t in graph.initializer]
    graph_len = len(g_head) + len(g_tail)
    graph_len += sum(len(init_tag) + len(_varint(n)) + n for n in sizes)
    written = 0
    for chunk in (head, _tag(_MODEL_GRAPH), _varint(graph_len), g_head):
        f.write(chunk)
        written += len(chunk)
    for tensor, n in zip(graph.initializer, sizes, strict=True):
        prefix = init_tag + _varint(n)
        f.write(prefix)
        f.write(tensor.SerializeToString())
        written += len(prefix) + n
    for chunk in (g_tail, tail):
        f.write(chunk)
        written += len(chunk)
    return written


def save_model_streaming(model: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    """Write ``model`` to ``path`` (not atomically: callers stage it); return its size."""
    with open(path, "wb") as f:
        return write_model(model, f)
