"""Rendering of result objects: one object, three views (terminal text, JSON, Markdown).

Result dataclasses implement ``to_dict()``, ``to_text()`` and ``to_markdown()``; the helpers here
draw the tables so every command's output looks the same.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Renderable(Protocol):
    def to_dict(self) -> dict[str, Any]: ...
    def to_text(self) -> str: ...
    def to_markdown(self) -> str: ...


def fmt_num(x: float | None, digits: int = 3) -> str:
    """Compact scientific notation for errors; '-' for missing."""
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if x == 0:
        return "0"
    ax = abs(x)
    if 1e-3 <= ax < 1e4:
        return f"{x:.{digits + 1}g}"
    return f"{x:.{digits - 1}e}"


def name_list(names: Sequence[str], limit: int = 3) -> str:
    """'a, b, c (+7 more)': at most ``limit`` names, then how many were left out."""
    shown = ", ".join(names[:limit])
    more = len(names) - limit
    return shown + (f" (+{more} more)" if more > 0 else "")


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table for terminals and logs."""
    cells = [[str(h) for h in headers]] + [
        ["" if c is None else str(c) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_escape(value: Any) -> str:
    return ("" if value is None else str(value)).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    out = ["| " + " | ".join(_md_escape(h) for h in headers) + " |"]
    out.append("|" + "|".join("---" for _ in headers) + "|")
    out.extend("| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows)
    return "\n".join(out)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(result: Renderable) -> str:
    """Standard JSON (no NaN literals) of a result object."""
    return json.dumps(_finite(result.to_dict()), indent=2, default=_json_default) + "\n"


def render(result: Renderable, fmt: str) -> str:
    """Render as 'text', 'json' or 'markdown'."""
    if fmt == "json":
        return to_json(result)
    if fmt in ("md", "markdown"):
        return result.to_markdown().rstrip() + "\n"
    return result.to_text().rstrip() + "\n"


def format_for_path(path: str | os.PathLike[str]) -> str:
    """Choose a report format from a file name: .json, .md/.markdown, else text."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".md", ".markdown"):
        return "markdown"
    return "text"


def write_report(
    result: Renderable, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``result`` atomically in the format the file name asks for; an existing file is
    replaced only with ``overwrite`` (see :class:`normdeploy.io.OutputPlan`)."""
    from normdeploy.io import write_text_atomic

    return write_text_atomic(
        path, render(result, format_for_path(path)), overwrite=overwrite, what="report"
    )
