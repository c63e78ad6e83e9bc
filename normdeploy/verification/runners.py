"""Runners: one ``infer(feeds) -> {name: array}`` interface for onnxruntime and PyTorch, and the
execution-provider choice.

Every place that runs an ONNX graph goes through :func:`resolve_providers` and
:class:`OrtRunner`, so CUDA is used wherever it exists and its absence is said once, clearly.
The PyTorch runner works on a deep copy of the module in eval mode under ``no_grad``: the
caller's module keeps its mode and its BatchNorm statistics.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from normdeploy.errors import InvalidArgumentError, InvalidModelError, first_line, user_code

if TYPE_CHECKING:
    import torch

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA}
_ALIAS_OF = {v: k for k, v in PROVIDER_ALIASES.items()}


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def provider_alias(provider: str) -> str:
    """Short name ('cpu', 'cuda') for a provider, or the full name when there is none."""
    return _ALIAS_OF.get(provider, provider)


@dataclass(frozen=True)
class ProviderChoice:
    """Providers to run on, and what was asked for but is not there (with why)."""

    providers: tuple[str, ...]
    notes: tuple[str, ...] = ()


def cuda_unavailable_reason() -> str:
    """Why CUDAExecutionProvider is not usable here, in one line."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return (
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
            "(install the 'gpu' extra: onnxruntime-gpu)"
        )
    return ""


def resolve_providers(requested: Sequence[str] | str | None = None) -> ProviderChoice:
    """Map user names ('cpu', 'cuda', full names) to available providers.

    ``None`` means every useful provider present (CPU, plus CUDA when available) and notes when
    CUDA is absent. Naming a provider that is not available is an error, not a silent fallback.
    """
    avail = available_providers()
    if requested is None or requested == "auto":
        chosen = [CPU]
        notes = []
        if CUDA in avail:
            chosen.append(CUDA)
        else:
            notes.append(f"CUDA not used: {cuda_unavailable_reason()}")
        return ProviderChoice(tuple(chosen), tuple(notes))
    if isinstance(requested, str):
        requested = [r for r in requested.split(",") if r.strip()]
    chosen = []
    for name in requested:
        key = name.strip()
        full = PROVIDER_ALIASES.get(key.lower(), key)
        if full not in PROVIDER_ALIASES.values() and full not in avail:
            known = ", ".join(sorted(PROVIDER_ALIASES))
            raise InvalidArgumentError(f"providers: unknown provider '{key}' (known: {known})")
        if full not in avail:
            reason = cuda_unavailable_reason() if full == CUDA else "not in this onnxruntime"
            raise InvalidArgumentError(f"providers: '{key}' is not available here: {reason}")
        if full not in chosen:
            chosen.append(full)
    if not chosen:
        raise InvalidArgumentError("providers: no provider given")
    return ProviderChoice(tuple(chosen))


def session_options(
    optimize: bool = False, threads: int | None = None, arena: bool = True
) -> Any:
    """SessionOptions; graph optimizations off by default so we test the graph as written.
    ``arena=False``: every buffer of a run is allocated and freed on its own, instead of in
    an arena that keeps its largest size for the session's life and while any output it
    handed out is alive (for a run whose outputs are many intermediate values)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 4  # fatal only: errors arrive as exceptions, with their message
    # Idle onnxruntime workers otherwise spin for a while after each run, taking the cores the
    # PyTorch forwards that follow need (3x slower verify on a 2-core machine).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return so


_ORT_NOISE = (
    re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : "),  # error code and name
    re.compile(r"^Load model from .*? failed:"),  # the path: the caller names the file
    re.compile(r"/\S+\.(?:cc|cpp|h):\d+ [^(]*\([^)]*\)\s*"),  # C++ location and signature
)


def ort_message(exc: BaseException, limit: int = 200) -> str:
    """onnxruntime's reason in plain words: its error code, the model path and the C++ source
    location that prefix it are dropped."""
    text = first_line(exc, 10_000)
    for pattern in _ORT_NOISE:
        text = pattern.sub("", text)
    return text.strip()[:limit] or type(exc).__name__


@dataclass
class OrtRunner:
    """Runs one ONNX model on one execution provider: ``infer(feeds) -> {name: array}``."""

    model: onnx.ModelProto | str | os.PathLike[str] | bytes
    provider: str = CPU
    optimize: bool = False
    threads: int | None = None
    arena: bool = True
    _session: Any = field(default=None, init=False, repr=False)

    @property
    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            src: Any = self.model
            if isinstance(src, onnx.ModelProto):
                src = src.SerializeToString()
            elif isinstance(src, Path):
                src = str(src)
            session = ort.InferenceSession(
                src,
                sess_options=session_options(self.optimize, self.threads, self.arena),
                providers=[self.provider] if self.provider == CPU else [self.provider, CPU],
            )
            # A run that fails on CUDA is an error here, not a silent rerun on CPU: reports
            # name the provider that ran. Without the fallback the wrapper needs the model's
            # bytes no more, which it would otherwise keep for the session's life (a second
            # copy of the weights while the session lives).
            session.disable_fallback()
            if isinstance(getattr(session, "_model_bytes", None), bytes):
                session._model_bytes = None
            self._session = session
        return self._session

    @property
    def opened(self) -> bool:
        """Whether the session exists yet (it is made by the first use)."""
        return self._session is not None

    def open(self, label: str) -> OrtRunner:
        """Create the session now; a graph onnxruntime cannot load is the user's bad input."""
        try:
            self.session  # noqa: B018
        except Exception as exc:
            raise InvalidModelError(
                f"{label}: onnxruntime cannot load it: {ort_message(exc)}"
            ) from None
        return self

    @property
    def providers_used(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_owned(self.session, self.output_names, feeds)


def run_owned(
    session: Any, names: Sequence[str], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``session.run`` with every output in memory of its own. onnxruntime hands back views of
    its own buffers, each of which keeps the session's whole memory arena alive: kept outputs
    would hold a released session's peak memory until the last of them goes."""
    values = session.run(list(names), dict(feeds))
    return {
        name: value.copy()
        if isinstance(value, np.ndarray) and value.base is not None
        else value
        for name, value in zip(names, values, strict=True)
    }


# ------------------------------------------------------------------------------- PyTorch


def named_outputs(value: Any) -> list[tuple[str | None, torch.Tensor]]:
    """Tensors of a (nested) model output in order (tensor, tuple/list, dict values), each with
    its path when a dict key is on it (``"logits"``; ``"aux.0"`` under a list; ``"1.score"`` in
    a tuple's second item), else None: dict keys are the outputs' names."""
    import torch

    out: list[tuple[str | None, torch.Tensor]] = []

    def walk(item: Any, path: tuple[str, ...], keyed: bool) -> None:
        if isinstance(item, torch.Tensor):
            out.append((".".join(path) if keyed else None, item))
        elif isinstance(item, Mapping):
            for k, v in item.items():
                walk(v, (*path, str(k)), True)
        elif isinstance(item, (list, tuple)):
            for i, v in enumerate(item):
                walk(v, (*path, str(i)), keyed)

    walk(value, (), False)
    return out


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """Tensors of a (nested) model output in order: tensor, tuple/list, dict values."""
    return [t for _, t in named_outputs(value)]


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bfloat16 (which numpy lacks) widened to float32.

    A copy, never a view of the tensor's memory: hooks capture module outputs that the forward
    goes on to change in place (``nn.ReLU(inplace=True)`` after a norm, as torchvision writes).
    """
    import torch

    t = tensor.detach()
    if t.dtype == torch.bfloat16:
        return t.float().cpu().numpy()
    return t.cpu().numpy().copy() if t.device.type == "cpu" else t.cpu().numpy()


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A torch tensor of ``array`` (contiguous); bfloat16 (ml_dtypes, which torch cannot take
    directly) through a 16-bit view."""
    import torch

    a = np.ascontiguousarray(array)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def module_float_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter or buffer."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return None


def module_outputs(module: torch.nn.Module, args: Sequence[Any]) -> list[np.ndarray]:
    """The module's outputs on ``args`` under ``no_grad`` as numpy arrays (mode as it is)."""
    return [array for _, array in named_module_outputs(module, args)]


def named_module_outputs(
    module: torch.nn.Module, args: Sequence[Any]
) -> list[tuple[str | None, np.ndarray]]:
    """The module's outputs with their dict-key names (:func:`named_outputs`) as numpy arrays."""
    import torch

    with torch.no_grad(), user_code("the model's forward"):
        outputs = named_outputs(module(*args))
    return [(name, to_numpy(t)) for name, t in outputs]


def torch_args(
    module: torch.nn.Module,
    input_names: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """``feeds`` as ``module``'s positional arguments, in ``input_names`` order; floating ones
    cast to ``dtype``, else to the module's parameter dtype."""
    dtype = dtype or module_float_dtype(module)
    out = []
    for name in input_names:
        t = from_numpy(feeds[name])
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out.append(t.to(device))
    return out


@dataclass
class TorchRunner:
    """Runs a deep copy of ``module`` in eval mode, no_grad, on ``device``: ``infer(feeds)``.

    Inputs are taken from ``feeds`` in ``input_names`` order; floating inputs are cast to the
    module's parameter dtype. Outputs are matched to ``output_names`` by name when the module
    returns a dict whose keys are those names (in any order), else by position. With
    ``dtype`` (``torch.float64`` for ground truth) the copy's floating parameters and buffers
    are converted to it and tensors the forward creates default to it.

    ``owned=True`` hands ``module`` over instead: a private eval copy nobody else runs (export's
    own) is run as it is, and with ``dtype`` converted in place, so that a float64 reference
    costs no second copy of the weights.
    """

    module: torch.nn.Module
    input_names: Sequence[str]
    output_names: Sequence[str] | None = None
    device: str = "cpu"
    dtype: torch.dtype | None = None
    owned: bool = False
    _model: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.owned:
            model = self.module if self.dtype is None else self.module.to(self.dtype)
        else:
            model = copy_module(self.module, self.dtype)
        model = model.eval()
        self._model = model if self.device == "cpu" else model.to(self.device)

    def args(self, feeds: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
        """The positional torch arguments for ``feeds``."""
        return torch_args(self._model, self.input_names, feeds, self.dtype, self.device)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with default_dtype(self.dtype):
            named = named_module_outputs(self._model, self.args(feeds))
        arrays = [array for _, array in named]
        names = list(self.output_names or [f"output_{i}" for i in range(len(arrays))])
        keys = [key for key, _ in named if key is not None]
        if len(keys) == len(named) and sorted(keys) == sorted(names):
            by_key = dict(zip(keys, arrays, strict=True))
            return {name: by_key[name] for name in names}
        if len(names) != len(arrays):
            raise InvalidArgumentError(
                f"the PyTorch model returns {len(arrays)} tensor(s) but the ONNX graph has "
                f"{len(names)} output(s) ({', '.join(names)}); are these the same model?"
            )
        return dict(zip(names, arrays, strict=True))


def feeds_key(feeds: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    """A key equal for two feed dicts exactly when their names, shapes, dtypes and bytes are."""
    import hashlib

    return tuple(
        (name, a.shape, a.dtype.str, hashlib.sha1(np.ascontiguousarray(a).data).hexdigest())
        for name, a in sorted(feeds.items())
    )


@dataclass
class ReferenceMemo:
    """A module's float32 outputs and float64 truth on input sets it already ran on, so that a
    later comparison with the same module on the same inputs (``deploy``'s verify after its
    export check) reuses them instead of copying and running the module again. Looked up by
    the inputs' bytes (:func:`feeds_key`): a different input is a miss, never a wrong hit.

    It also keeps what onnxruntime gave for a graph file on those inputs, looked up by the
    file's identity (:func:`file_identity`): verify of the very file the export check ran,
    unchanged since (deploy when fold-bn and fuse-norms had nothing to do), takes them."""

    expected: dict[tuple[Any, ...], dict[str, np.ndarray]] = field(default_factory=dict)
    truth: dict[tuple[Any, ...], dict[str, np.ndarray]] = field(default_factory=dict)
    train_mode: Any = None  # the module's TrainModeReport, when one was taken
    graph: dict[tuple[Any, ...], dict[str, np.ndarray]] = field(default_factory=dict)

    def add_graph_run(
        self,
        path: Path,
        provider: str,
        feeds: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        """onnxruntime's ``outputs`` for the graph file ``path`` on ``provider`` (a session
        with :func:`session_options`' defaults) and ``feeds``."""
        identity = file_identity(path)
        if identity is not None:
            self.graph[(identity, provider, feeds_key(feeds))] = dict(outputs)

    def ran_file(self, path: Path) -> bool:
        """Whether onnxruntime ran the file at ``path``, unchanged since, for the memo."""
        identity = file_identity(path)
        return identity is not None and any(key[0] == identity for key in self.graph)

    def graph_outputs(
        self, path: Path, provider: str, feeds: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray] | None:
        """The recorded outputs of the same file, unchanged, on the same inputs; or None."""
        identity = file_identity(path) if self.graph else None
        return (
            None
            if identity is None
            else self.graph.get((identity, provider, feeds_key(feeds)))
        )

    def add(
        self,
        feeds: Mapping[str, np.ndarray],
        expected: Mapping[str, np.ndarray],
        truth: Mapping[str, np.ndarray] | None,
    ) -> None:
        key = feeds_key(feeds)
        self.expected[key] = dict(expected)
        if truth is not None:
            self.truth[key] = dict(truth)

    def outputs(
        self, feeds: Mapping[str, np.ndarray], float64: bool = False
    ) -> dict[str, np.ndarray] | None:
        """The recorded outputs (float64 truth with ``float64``) on ``feeds``, or None."""
        table = self.truth if float64 else self.expected
        return table.get(feeds_key(feeds)) if table else None


def file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """The file at ``path`` as the file system knows it (device, inode, size, modification
    time in ns): the same value means the same file, not rewritten; None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def copy_module(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy of ``module``; with ``dtype``, its floating parameters and buffers are
    converted while copying (one copy of the weights, not two)."""
    if dtype is None:
        return copy.deepcopy(module)
    import torch

    memo: dict[int, Any] = {}
    for param in module.parameters():
        if param.is_floating_point():
            memo[id(param)] = torch.nn.Parameter(
                param.detach().to(dtype, copy=True), requires_grad=param.requires_grad
            )
    for buffer in module.buffers():
        if buffer.is_floating_point():
            memo[id(buffer)] = buffer.detach().to(dtype, copy=True)
    return copy.deepcopy(module, memo)


@contextlib.contextmanager
def forward_hooks(
    model: torch.nn.Module,
    pre: Mapping[str, Callable[..., Any]] | None = None,
    post: Mapping[str, Callable[..., Any]] | None = None,
) -> Iterator[None]:
    """Forward pre-hooks (``pre``) and forward hooks (``post``) on ``model``'s submodules, by
    module path, for the duration of the block; removed however it ends."""
    pre, post = pre or {}, post or {}
    handles = []
    try:
        for path, mod in model.named_modules():
            if path in pre:
                handles.append(mod.register_forward_pre_hook(pre[path]))
            if path in post:
                handles.append(mod.register_forward_hook(post[path]))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """torch's default floating dtype set to float64 inside the block when ``dtype`` is
    float64: a float64 forward also makes the tensors it creates itself in float64."""
    import torch

    if dtype is not torch.float64:
        yield
        return
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
