"""Profile one command with py-spy and print where its time went (self and inclusive).

python benchmarks/profile_fold.py --size 500            # cli.py fold-bn --no-verify
python benchmarks/profile_fold.py --size 500 --verify   # with the verify step
python benchmarks/profile_fold.py -- python -c "..."    # any command
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

from _common import BUILD, PY, ROOT, markdown_table
from gen_graphs import graph_path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:]*)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m["file"].split("site-packages/")[-1].replace(str(ROOT) + "/", "")
    return f"{m['func']} ({file})"


def profile(argv: list[str], top: int, native: bool) -> str:
    """Markdown table of the ``top`` functions by inclusive and self share of samples."""
    spy = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))
    raw = BUILD / "profile.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    cmd = [spy, "record", "--format", "raw", "--rate", "200", "-o", str(raw)]
    subprocess.run(
        [*cmd, *(["--native"] if native else []), "--", *argv], cwd=ROOT, check=True
    )
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_short(f) for f in stack.split(";") if f] or ["(no Python frame)"]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    rows = [
        [f, f"{100 * n / total:.1f} %", f"{100 * own[f] / total:.1f} %"]
        for f, n in inclusive.most_common(top)
    ]
    return markdown_table(["function", "inclusive", "self"], rows) + f"\n\n{total} samples"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=500.0)
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--native", action="store_true", help="include C/C++ frames")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("command", nargs="*", help="a command to profile instead")
    args = parser.parse_args(argv)
    command = args.command
    if not command:
        out = BUILD / "out" / "profile.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        command = [PY, "cli.py", "fold-bn", str(graph_path(args.size)), "-o", str(out)]
        command += [] if args.verify else ["--no-verify"]
    print(profile(command, args.top, args.native))
    return 0


if __name__ == "__main__":
    sys.exit(main())
