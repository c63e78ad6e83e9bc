"""README.md shows what its commands print: the cheap excerpts of ``gen_readme_excerpts.py`` are
run again and compared with the README, measured values (timings, error statistics) masked.

The expensive excerpts (``make demo``'s table, RepVGG-A0, fuse-norms, the model list) are only
checked for their marker and the commands that make their inputs; regenerate them with
``python tests/gen_readme_excerpts.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gen_readme_excerpts import (
    ELLIPSIS,
    EXCERPTS,
    README,
    Keep,
    masked,
    readme_blocks,
    render,
    setup_commands_missing,
)

from normdeploy.report import text_table

CHEAP = [name for name, excerpt in EXCERPTS.items() if excerpt.cheap]


def test_every_excerpt_is_marked_and_the_commands_making_its_inputs_are_shown() -> None:
    text = README.read_text()
    assert sorted(readme_blocks(text)) == sorted(EXCERPTS)
    assert setup_commands_missing(text) == []


@pytest.mark.parametrize("name", CHEAP)
def test_readme_excerpt_is_what_the_commands_print(name: str, tmp_path: Path) -> None:
    documented = readme_blocks(README.read_text())[name]
    printed = render(EXCERPTS[name], tmp_path)
    # On failure: python tests/gen_readme_excerpts.py NAME, then read the diff.
    assert masked(documented) == masked(printed)


HEADERS = ("check", "inputs", "max abs", "e/f", "margin", "worst [index] expected → actual")
VERDICT = (
    "verification: PASS: folded vs original on onnxruntime CPU (optimizations off), 1 check(s) "
    "on x[2, 3, 32, 32]; worst '87@b2': e = {e} vs nominal floor f = 1.00e-06 (e/f {ratio}, "
    "bound 1.00e-05, margin ×{margin}; max |Δ| {delta}; rule nominal)"
)


def _report(
    row: tuple[str, ...],
    *,
    headers: tuple[str, ...] = HEADERS,
    ratio: str = "0.1769",
    note: str = "note: CUDA not used",
) -> str:
    verdict = VERDICT.format(e="1.77e-07", ratio=ratio, margin="56.5", delta="1.34e-07")
    return "\n".join([text_table(headers, [row]), note, "", verdict, "timings: export 2.49 s"])


ROW = ("reference", "b1/seed0", "1.27e-07", "0.542", "×18.5", "[0,2] -0.06029 → -0.06029")


def test_mask_hides_measured_values_of_any_width() -> None:
    other = ("reference", "b1/seed0", "1.3e-06", "0.5421", "×888", "[10,2] -0.006 → -0.0061")
    assert masked(_report(ROW)) == masked(_report(other, ratio="12.05"))
    assert masked(_report(ROW)) != _report(ROW)  # something was masked


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(_report((*ROW[:1], "b3/seed0", *ROW[2:])), id="inputs-cell"),
        pytest.param(_report(ROW, headers=(*HEADERS[:3], "e / f", *HEADERS[4:])), id="header"),
        pytest.param(_report(ROW[:-1], headers=HEADERS[:-1]), id="column-dropped"),
        pytest.param(_report((*ROW[:4], "18.5", ROW[5])), id="margin-sign"),
        pytest.param(_report(ROW, note="note: CUDA 2 not used"), id="note-number"),
        pytest.param(_report(ROW).replace("PASS", "FAIL"), id="verdict"),
        pytest.param(_report(ROW).replace("x[2, 3, 32, 32]", "x[1, 3, 32, 32]"), id="shape"),
        pytest.param(_report(ROW).replace("e/f 0.1769,", "e/f 0.1769"), id="punctuation"),
        pytest.param(_report(ROW).replace("2.49 s", "2.49s"), id="timing-unit"),
    ],
)
def test_mask_keeps_wording_layout_and_unmeasured_numbers(changed: str) -> None:
    assert masked(changed) != masked(_report(ROW))


def test_abbreviation_keeps_matching_rows_and_marks_each_gap_once() -> None:
    rows = [(f"/b{i}/BatchNormalization", "folded" if i % 3 else "merged") for i in range(7)]
    table = text_table(("BatchNormalization", "result"), rows).splitlines()
    lines = ["fold-bn m.onnx: 5 of 7 folded", "", *table, "", "verification: PASS"]
    kept = Keep(rows="merged").apply(lines)
    assert kept == [
        *lines[:4],  # summary, blank, header, dashes
        table[2],  # b0 merged
        ELLIPSIS,
        table[5],  # b3 merged
        ELLIPSIS,
        table[8],  # b6 merged
        "",
        "verification: PASS",
    ]
