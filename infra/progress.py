"""Progress reporting with items/s for every long step.

On a terminal this is a rich progress bar; elsewhere (CI logs, ``make demo | tee``)
it is a log line every few seconds and one at the end, so that progress is
visible without flooding the log with carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger("mirflow")


def interactive() -> bool:
    return sys.stderr.isatty()


class ProgressReporter:
    """``with ProgressReporter("features", total=800, unit="clips") as p: p.advance(32)``."""

    def __init__(self, description: str, *, total: int, unit: str = "items", every_s: float = 10.0) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.done = 0
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> "ProgressReporter":
        self._start = self._last = time.perf_counter()
        if interactive():
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, rate="")
        return self

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{self.rate:,.1f} {self.unit}/s")
        elif time.perf_counter() - self._last >= self.every_s:
            self._last = time.perf_counter()
            self._log()

    def _log(self) -> None:
        log.info("%s: %d/%d %s, %.1f %s/s", self.description, self.done, self.total, self.unit, self.rate, self.unit)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._log()
