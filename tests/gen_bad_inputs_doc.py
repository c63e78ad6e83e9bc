"""Regenerate docs/BAD_INPUTS.md from the bad-input cases: run each one, record its line.

    python tests/gen_bad_inputs_doc.py          # from the checkout (reference models need it)

Each case runs in-process in its own temporary directory, exactly as the test runs it
(``tests/test_bad_inputs.py: run_case``); the table shows the one stderr line it printed, with the
directory written as DIR. ``test_bad_inputs.py`` fails when the file and the cases disagree.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path[:0] = [str(TESTS), str(ROOT)]  # the checkout first: `models` and `normdeploy`

import pytest  # noqa: E402
from test_bad_inputs import CASES, DOC, render_doc, run_case, shown  # noqa: E402
from test_cli_processes import PROCESS_CASES  # noqa: E402


def main() -> int:
    lines: dict[str, str] = {}
    failed = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
            d = Path(tmp)
            try:
                outcome = run_case(case, d, mp)
            except pytest.skip.Exception as exc:  # e.g. no CAP_MKNOD: keep the documented line
                print(
                    f"{case.id}: skipped ({exc}); its row is not regenerated", file=sys.stderr
                )
                continue
            if (
                outcome.code != case.code
                or len(outcome.lines) != 1
                or not re.search(case.message, outcome.lines[0])
            ):
                failed.append(f"{case.id}: exit {outcome.code}, stderr:\n{outcome.err}")
                continue
            lines[case.id] = shown(outcome.lines[0], d)
    if failed:
        print(
            "cases that do not hold (fix them first):\n" + "\n".join(failed), file=sys.stderr
        )
        return 1
    if missing := [c.id for c in CASES if c.id not in lines]:
        from test_bad_inputs import documented_rows

        old = documented_rows()
        lines.update({k: old[k][2] for k in missing if k in old})
    DOC.write_text(render_doc(lines, PROCESS_CASES))
    print(
        f"wrote {DOC.relative_to(ROOT)}: {len(CASES)} cases, {len(PROCESS_CASES)} process cases"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
