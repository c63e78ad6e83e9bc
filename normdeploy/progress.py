"""One progress helper for long work: per item and per stage, on stderr.

On a terminal it shows a live status line (rich); elsewhere (CI, pipes) it prints one plain line
per finished stage. Stage durations are returned so reports can show them.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Progress:
    """Report ``[item] stage … done (1.2 s)`` lines; ``enabled=False`` keeps it silent."""

    enabled: bool = True
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    _console: Any = field(default=None, init=False, repr=False)
    _said: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.enabled and self.stream.isatty():
            from rich.console import Console

            self._console = Console(file=self.stream)

    def note(self, message: str) -> None:
        if self.enabled:
            if self._console is not None:
                self._console.print(message, markup=False, highlight=False)
            else:
                print(message, file=self.stream, flush=True)

    def note_once(self, message: str) -> None:
        """:meth:`note`, unless this progress already said exactly that."""
        if message not in self._said:
            self._said.add(message)
            self.note(message)

    @contextlib.contextmanager
    def stage(
        self, item: str, stage: str, timings: dict[str, float] | None = None
    ) -> Iterator[None]:
        """Time one stage of one item; record its seconds in ``timings`` if given."""
        start = time.perf_counter()
        status = None
        if self.enabled and self._console is not None:
            status = self._console.status(f"[{item}] {stage} …")
            status.start()
        outcome = "failed"
        try:
            yield
            outcome = "done"
        finally:
            seconds = time.perf_counter() - start
            if timings is not None:
                timings[stage] = seconds
            if status is not None:
                status.stop()
            self.note(f"[{item}] {stage} {outcome} ({seconds:.1f} s)")
