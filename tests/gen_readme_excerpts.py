"""Regenerate README.md's command excerpts: run each documented command, paste what it printed.

    python tests/gen_readme_excerpts.py                  # every excerpt (make demo's run too)
    python tests/gen_readme_excerpts.py verify-resnet    # only the excerpts named

An excerpt is the part of README.md between ``<!-- excerpt: NAME -->`` and ``<!-- /excerpt -->``.
Its commands run as a reader runs them from the checkout: in a fresh temporary directory,
``python`` being the checkout's ``.venv`` python, ``cli.py`` the checkout's, and the checkout on
``PYTHONPATH`` (the ``python -c "import models …"`` lines). The excerpt is what they printed on
stdout, abbreviated only as ``EXCERPTS`` declares (dropped table rows become one ``…`` line), so
every line shown is a line the tool prints, timings included. A command that writes to stderr
fails the excerpt unless the excerpt says its stderr is progress. Every setup command must
appear verbatim in README.md: the prose shows how each input was made.

``test_readme_excerpts.py`` reruns the cheap excerpts and fails when README.md disagrees with
them beyond what ``masked`` hides: timings and measured error statistics (float32 rounding in
torch's and onnxruntime's kernels, which differ with the CPU's vector instructions).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
ELLIPSIS = "…"

BEGIN = re.compile(r"^<!-- excerpt: ([a-z0-9-]+) -->$", re.MULTILINE)
END = "<!-- /excerpt -->"


class ExcerptError(RuntimeError):
    """A documented command failed, or printed what an excerpt does not show."""


@dataclass(frozen=True)
class Keep:
    """Abbreviation of a command's output: of its table (the lines between the dashes under the
    header and the next blank line), only the rows that ``rows`` matches; every run of dropped
    rows becomes one ``…`` line. Lines outside the table stay."""

    rows: str

    def apply(self, lines: list[str]) -> list[str]:
        start = next((i + 1 for i, line in enumerate(lines) if _is_rule(line)), None)
        if start is None:
            raise ExcerptError("abbreviation declared for an output without a table")
        stop = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
        out, dropping = lines[:start], False
        for line in lines[start:stop]:
            keep = re.search(self.rows, line) is not None
            if keep:
                out.append(line)
            elif not dropping:
                out.append(ELLIPSIS)
            dropping = not keep
        return out + lines[stop:]


@dataclass(frozen=True)
class Shown:
    """One command whose output the excerpt shows; ``prompt`` puts ``$ command`` above it
    (``comment`` after it, as a shell comment)."""

    command: str
    prompt: bool = True
    comment: str = ""
    keep: Keep | None = None
    progress_on_stderr: bool = False


@dataclass(frozen=True)
class Excerpt:
    """A README block: ``setup`` commands make its inputs (shown in the prose, not in the
    block), then ``shown`` commands run in order in the same directory, where ``dirs`` were
    made first (as ``make demo`` makes ``build/``)."""

    setup: tuple[str, ...]
    shown: tuple[Shown, ...]
    fence: str | None = "text"
    cheap: bool = False  # rerun by test_readme_excerpts.py (a few seconds)
    dirs: tuple[str, ...] = ()


RESNET_UNFOLDED = (
    "python -c \"import torch, models; m = models.get('resnet_mini'); torch.onnx.export("
    "m.build(), m.inputs(2), 'resnet_unfolded.onnx', dynamo=False, do_constant_folding=False, "
    "training=torch.onnx.TrainingMode.PRESERVE, input_names=['x'], "
    "dynamic_axes={'x': {0: 'batch'}}, opset_version=17)\""
)
REPVGG_A0 = (
    'python -c "import torch; from models.reparam import repvgg_a0; torch.onnx.export('
    "repvgg_a0(), (torch.randn(1, 3, 224, 224),), 'repvgg_a0.onnx', dynamo=False, "
    "do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE, "
    "input_names=['x'], output_names=['y'], dynamic_axes={'x': {0: 'batch'}, "
    "'y': {0: 'batch'}}, opset_version=17)\""
)
PRELN14 = (
    "python -c \"import torch, models; m = models.get('transformer_preln'); torch.onnx.export("
    "m.build(), m.inputs(2), 'preln14.onnx', dynamo=False, opset_version=14, "
    "input_names=['x'], dynamic_axes={'x': {0: 'batch'}})\""
)

EXCERPTS: dict[str, Excerpt] = {
    "demo": Excerpt(
        setup=(),
        shown=(
            Shown(
                "python cli.py deploy --all-reference -o build/demo --force",
                prompt=False,
                progress_on_stderr=True,
            ),
        ),
        dirs=("build",),
    ),
    "fold-bn-resnet": Excerpt(
        setup=(RESNET_UNFOLDED,),
        shown=(Shown("python cli.py fold-bn resnet_unfolded.onnx -o resnet_folded.onnx"),),
        cheap=True,
    ),
    "fold-bn-repvgg": Excerpt(
        setup=(REPVGG_A0,),
        shown=(
            Shown(
                "python cli.py fold-bn repvgg_a0.onnx -o repvgg_a0.merged.onnx",
                comment="RepVGG-A0, every BN kept",
                keep=Keep(rows=r"^/stages/stages\.0/stages\.0\.1/"),
            ),
        ),
    ),
    "verify-resnet": Excerpt(
        setup=("python cli.py export resnet_mini -o model.onnx",),
        shown=(Shown("python cli.py verify resnet_mini model.onnx"),),
        cheap=True,
    ),
    "fuse-norms-preln": Excerpt(
        setup=(PRELN14,),
        shown=(
            Shown("python cli.py fuse-norms preln14.onnx -o preln_fused.onnx"),
            Shown(
                "python cli.py fuse-norms preln14.onnx -o preln_fused.onnx --opset 17 --force"
            ),
        ),
    ),
    "models": Excerpt(
        setup=(),
        shown=(Shown("python cli.py models --format markdown", prompt=False),),
        fence=None,
    ),
}


def argv(command: str) -> list[str]:
    """The command as the README writes it, with the checkout's python and cli.py."""
    words = shlex.split(command)
    if words[0] != "python":
        raise ExcerptError(f"{command!r}: documented commands start with `python`")
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
    words[0] = str(python)
    if len(words) > 1 and words[1] == "cli.py":
        words[1] = str(ROOT / "cli.py")
    return words


def run(command: str, cwd: Path, *, stderr_ok: bool) -> str:
    """stdout of ``command`` run in ``cwd``; exit 0 and (unless ``stderr_ok``) nothing on stderr."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        argv(command), cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0 or (done.stderr and not stderr_ok):
        raise ExcerptError(
            f"{command}: exit {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n"
            f"{done.stderr}"
        )
    return done.stdout


def render(excerpt: Excerpt, workdir: Path) -> str:
    """The excerpt's block (fences included) from running its commands in ``workdir``."""
    for directory in excerpt.dirs:
        (workdir / directory).mkdir(parents=True)
    for command in excerpt.setup:
        run(command, workdir, stderr_ok=True)  # exporter deprecation warnings
    lines: list[str] = []
    for shown in excerpt.shown:
        if shown.prompt:
            comment = f"   # {shown.comment}" if shown.comment else ""
            lines.append(f"$ {shown.command}{comment}")
        out = run(shown.command, workdir, stderr_ok=shown.progress_on_stderr).splitlines()
        lines += shown.keep.apply(out) if shown.keep else out
    if excerpt.fence is not None:
        lines = [f"```{excerpt.fence}", *lines, "```"]
    return "\n".join(lines)


def render_fresh(name: str) -> str:
    """``render`` in a temporary directory of its own."""
    with tempfile.TemporaryDirectory(prefix=f"excerpt-{name}-") as tmp:
        return render(EXCERPTS[name], Path(tmp))


def readme_blocks(text: str) -> dict[str, str]:
    """{name: block} for every marked excerpt of the README text."""
    blocks = {}
    for m in BEGIN.finditer(text):
        end = text.find("\n" + END, m.end())
        if end < 0:
            raise ExcerptError(f"README.md: excerpt {m.group(1)!r} has no {END}")
        blocks[m.group(1)] = text[m.end() + 1 : end]
    return blocks


def replace_block(text: str, name: str, block: str) -> str:
    """README text with the excerpt ``name`` replaced by ``block``."""
    m = re.search(rf"^<!-- excerpt: {re.escape(name)} -->$", text, re.MULTILINE)
    if m is None:
        raise ExcerptError(f"README.md: no <!-- excerpt: {name} --> marker")
    end = text.find("\n" + END, m.end())
    return text[: m.end() + 1] + block + text[end:]


def setup_commands_missing(text: str) -> list[str]:
    """Setup commands that README.md does not show verbatim."""
    return [c for e in EXCERPTS.values() for c in e.setup if c not in text]


# ------------------------------------------------------------------------------------- masks

# Measured values: timings, errors, floors and their ratios. A mask replaces numbers only: the
# words, units, signs of structure (×, [ ], →) and every other number must match exactly.
NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?(?:e[-+]\d+)?|∞|inf|nan)")
MEASURED_COLUMNS = frozenset(
    {
        "max abs",
        "error e",
        "floor f",
        "e/f",
        "margin",
        "worst [index] expected → actual",
        "worst |Δ|",
        "time per stage",
        "max|onnx-torch|",
        "max|onnx-oracle|",
    }
)
# The same statistics inside verdict lines ("e = 1.77e-07 vs nominal floor f = 1.00e-06 (e/f
# 0.1769, bound 1.00e-05, margin ×56.5; max |Δ| 1.34e-07") and stage timings ("export 2.49 s").
# A nominal floor is a documented constant, not a measurement: it stays.
MEASURED_INLINE = re.compile(
    r"(?P<label>\be = |(?<!nominal )\bfloor f = |\be/f |\bbound |\bmargin ×?|\bmax \|Δ\| (?:= )?"
    r"|\b(?:export|check|census|save|fold-bn|fuse-norms|verify) )"
    r"(?P<value>-?(?:\d+(?:\.\d+)?(?:e[-+]\d+)?|∞))(?P<unit> ?s\b)?"
)
MASK = "<v>"


def _is_rule(line: str) -> bool:
    """The dashes under a text table's header."""
    return re.fullmatch(r"-+(?:  -+)*", line) is not None


def _mask_inline(line: str) -> str:
    return MEASURED_INLINE.sub(lambda m: m["label"] + MASK + (m["unit"] or ""), line)


def _is_row(line: str, spans: list[tuple[int, int | None]]) -> bool:
    """A line of the table: blank where the table puts the two spaces between columns."""
    return all(not line[s - 2 : s].strip() for s, _ in spans[1:])


def masked(block: str) -> str:
    """``block`` with measured values replaced by ``<v>``: the numbers in the measured columns
    of its text tables (cells re-joined by `` | ``, since a value's width moves the columns)
    and the labelled statistics and timings anywhere else. Everything else is kept as is."""
    lines = block.splitlines()
    out: list[str] = []
    spans: list[tuple[int, int | None]] | None = None
    measured: set[int] = set()
    for n, line in enumerate(lines):
        if n + 1 < len(lines) and _is_rule(lines[n + 1]):
            starts = [m.start() for m in re.finditer(r"-+", lines[n + 1])]
            spans = list(zip(starts, [*starts[1:], None], strict=True))
            measured = {
                i for i, (s, e) in enumerate(spans) if line[s:e].strip() in MEASURED_COLUMNS
            }
        if spans is not None and _is_rule(line):
            out.append(" | ".join("-" for _ in spans))
        elif spans is not None and line and (line == ELLIPSIS or _is_row(line, spans)):
            cells = [line[s:e].strip() for s, e in spans]
            out.append(
                " | ".join(
                    NUMBER.sub(MASK, c) if i in measured else _mask_inline(c)
                    for i, c in enumerate(cells)
                )
            )
        else:
            spans = None  # a blank line or a note ends the table
            out.append(_mask_inline(line))
    return "\n".join(out)


def main(names: list[str]) -> int:
    text = README.read_text()
    if missing := setup_commands_missing(text):
        print("README.md does not show these setup commands:\n" + "\n".join(missing))
        return 1
    unknown = [n for n in names if n not in EXCERPTS]
    if unknown:
        print(f"no such excerpt: {', '.join(unknown)} (known: {', '.join(EXCERPTS)})")
        return 2
    marked = readme_blocks(text)
    if unmarked := [n for n in EXCERPTS if n not in marked]:
        print(f"README.md has no marker for: {', '.join(unmarked)}")
        return 1
    for name in names or list(EXCERPTS):
        try:
            block = render_fresh(name)
        except ExcerptError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
        text = replace_block(text, name, block)
        print(f"{name}: {len(block.splitlines())} lines")
    README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
