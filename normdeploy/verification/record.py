"""A verify run saved to ``.npz`` (``--save-run``) and replayed elsewhere (``--load-run``).

The file holds the inputs that ran, the reference's outputs on them, their float64 ground truth
(when the reference had one) and the measured floors, so that ``verify --load-run FILE.npz
CANDIDATE.onnx`` repeats the verdict on another machine or device with no PyTorch model and no
float64 pass. Layout (numpy ``.npz``, readable with ``allow_pickle=False``)::

    meta                  0-d unicode array: JSON (below)
    set{i}/input{j}       input j (meta "inputs"[j]) of input set i (meta "sets"[i])
    set{i}/expected{k}    the reference's output k (meta "outputs"[k]) on set i
    set{i}/truth{k}       its float64 evaluation (only when meta "truth" is true)

    meta = {"format": "normdeploy-run", "version": 1,
            "reference": label, "reference_kind": "pytorch" | "onnx",
            "inputs": [name, …], "outputs": [name, …], "truth": bool,
            "floors": {output: f}, "k": K,
            "sets": [{"label": "b3/seed0", "batch_size": 3, "seed": 0, "role": "check"}, …],
            "batch_independence": {"batched": label | null, "alone": label | null,
                                   "samples": n, "output_axes": {output: axis},
                                   "coupled": {output: reason}}}

A set whose role is ``alone`` ran only for the batch-independence check (the leading samples of
the batched set, when no smaller batch size was asked for).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normdeploy.errors import InputFileError
from normdeploy.io import check_input_file, write_bytes_atomic
from normdeploy.verification.feeds import FeedSet

FORMAT, VERSION = "normdeploy-run", 1
CHECK, ALONE = "check", "alone"


@dataclass(frozen=True)
class BatchPlan:
    """Batch independence: which set's leading samples are compared with which set, per output
    the batch axis, and the outputs the reference itself couples (with why)."""

    batched: str | None = None
    alone: str | None = None
    samples: int = 0
    output_axes: dict[str, int] = field(default_factory=dict)
    coupled: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batched": self.batched,
            "alone": self.alone,
            "samples": self.samples,
            "output_axes": dict(self.output_axes),
            "coupled": dict(self.coupled),
        }


@dataclass(frozen=True)
class RecordedSet:
    """One input set with the reference's outputs on it."""

    feed_set: FeedSet
    expected: dict[str, np.ndarray]
    truth: dict[str, np.ndarray] | None
    role: str = CHECK


@dataclass(frozen=True)
class RecordedRun:
    """Everything a verdict needs from the reference side (see the module docstring)."""

    reference: str
    reference_kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sets: tuple[RecordedSet, ...]
    floors: dict[str, float]
    k: float
    batch: BatchPlan = field(default_factory=BatchPlan)
    source: str = ""

    def to_npz_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        truth = all(s.truth is not None for s in self.sets)
        for i, rs in enumerate(self.sets):
            for j, name in enumerate(self.inputs):
                arrays[f"set{i}/input{j}"] = rs.feed_set.feeds[name]
            for k, name in enumerate(self.outputs):
                arrays[f"set{i}/expected{k}"] = rs.expected[name]
                if truth and rs.truth is not None:
                    arrays[f"set{i}/truth{k}"] = rs.truth[name]
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "reference": self.reference,
            "reference_kind": self.reference_kind,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "truth": truth,
            "floors": self.floors,
            "k": self.k,
            "sets": [
                {
                    "label": rs.feed_set.label,
                    "batch_size": rs.feed_set.batch_size,
                    "seed": rs.feed_set.seed,
                    "role": rs.role,
                }
                for rs in self.sets
            ],
            "batch_independence": self.batch.to_dict(),
        }
        buffer = io.BytesIO()
        arrays["meta"] = np.array(json.dumps(meta))
        savez: Any = np.savez  # numpy's stub takes the keyword names for its own options
        savez(buffer, **arrays)
        return buffer.getvalue()


def save_run(run: RecordedRun, path: str | os.PathLike[str]) -> Path:
    """Write ``run`` atomically (the caller has checked the path: no clobbering)."""
    p = Path(path)
    write_bytes_atomic(p, run.to_npz_bytes())
    return p


def _bad(p: Path, why: str) -> InputFileError:
    return InputFileError(f"{p}: not a normdeploy run record ({why})")


def load_run(path: str | os.PathLike[str]) -> RecordedRun:
    """Read a run written by ``--save-run``; InputFileError with one line for anything else."""
    p = check_input_file(path, "run record")
    try:
        with np.load(p, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile) or "meta" not in data.files:
                raise _bad(p, "no 'meta' entry")
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in data.files if k != "meta"}
    except InputFileError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise _bad(p, f"cannot read it: {type(exc).__name__}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(p, "wrong format tag")
    if meta.get("version") != VERSION:
        raise _bad(p, f"version {meta.get('version')}, this normdeploy reads {VERSION}")
    try:
        return _from_meta(meta, arrays, str(p))
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(p, f"missing or malformed entry {exc}") from None


def _from_meta(
    meta: dict[str, Any], arrays: dict[str, np.ndarray], source: str
) -> RecordedRun:
    inputs = tuple(str(n) for n in meta["inputs"])
    outputs = tuple(str(n) for n in meta["outputs"])
    truth = bool(meta["truth"])
    sets = []
    for i, s in enumerate(meta["sets"]):
        feeds = {name: arrays[f"set{i}/input{j}"] for j, name in enumerate(inputs)}
        expected = {name: arrays[f"set{i}/expected{k}"] for k, name in enumerate(outputs)}
        exact = (
            {name: arrays[f"set{i}/truth{k}"] for k, name in enumerate(outputs)}
            if truth
            else None
        )
        batch = s.get("batch_size")
        seed = s.get("seed")
        fs = FeedSet(
            str(s["label"]),
            None if batch is None else int(batch),
            feeds,
            None if seed is None else int(seed),
        )
        sets.append(RecordedSet(fs, expected, exact, str(s.get("role", CHECK))))
    bi = meta.get("batch_independence") or {}
    plan = BatchPlan(
        bi.get("batched"),
        bi.get("alone"),
        int(bi.get("samples", 0)),
        {str(k): int(v) for k, v in (bi.get("output_axes") or {}).items()},
        {str(k): str(v) for k, v in (bi.get("coupled") or {}).items()},
    )
    return RecordedRun(
        reference=str(meta["reference"]),
        reference_kind=str(meta["reference_kind"]),
        inputs=inputs,
        outputs=outputs,
        sets=tuple(sets),
        floors={str(k): float(v) for k, v in meta["floors"].items()},
        k=float(meta["k"]),
        batch=plan,
        source=source,
    )
