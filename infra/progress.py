"""Progress reporting with items/s for every long step.

On a terminal this is a rich progress bar; elsewhere (CI logs, ``make demo | tee``)
it is a log line every few seconds and one at the end, so that progress is
visible without flooding the log with carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger("mirflow")


def interactive() -> bool:
    return sys.stderr.isatty()


def _in_prefect_run() -> bool:
    try:
        from prefect.context import FlowRunContext
    except ImportError:
        return False
    return FlowRunContext.get() is not None


class ProgressReporter:
    """``with ProgressReporter("features", total=800, unit="clips") as p: p.advance(32)``.

    With ``artifact_key`` and inside a Prefect flow run, the progress is also a
    Prefect progress artifact (percent done, items/s in its description), updated
    at most every ``artifact_every_s`` seconds.
    """

    def __init__(
        self,
        description: str,
        *,
        total: int | None,
        unit: str = "items",
        every_s: float = 10.0,
        artifact_key: str | None = None,
        artifact_every_s: float = 2.0,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.done = 0
        self._bar: Progress | None = None
        self._task = None
        self._artifact_key = artifact_key
        self._artifact_every_s = artifact_every_s
        self._artifact = None

    def __enter__(self) -> ProgressReporter:
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
        if self._artifact_key and _in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact = create_progress_artifact(0.0, key=self._artifact_key, description=self._status())
            self._artifact_last = self._start
        return self

    def _status(self) -> str:
        done = f"{self.done:,}" if self.total is None else f"{self.done}/{self.total}"
        return f"{self.description}: {done} {self.unit}, {self.rate:,.1f} {self.unit}/s"

    def _update_artifact(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self._artifact is None or (not force and now - self._artifact_last < self._artifact_every_s):
            return
        from prefect.artifacts import update_progress_artifact

        self._artifact_last = now
        percent = 0.0 if self.total is None else 100.0 * self.done / max(self.total, 1)
        update_progress_artifact(self._artifact, percent, description=self._status())

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
        self._update_artifact()

    def _log(self) -> None:
        log.info("%s", self._status())

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._log()
        self._update_artifact(force=True)


def run_here(fn: Callable, items: Sequence, *, description: str, unit: str, **kwargs) -> list:
    """An in-process ``map_fn`` (see ``tasks.events``): ``fn(item, **kwargs)`` for each item, in order,
    with progress in ``unit``/s."""
    out = []
    with ProgressReporter(description, total=len(items), unit=unit, every_s=10) as progress:
        for item in items:
            out.append(fn(item, **kwargs))
            progress.advance(1)
    return out
