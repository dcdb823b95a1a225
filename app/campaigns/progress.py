"""create-campaign's progress: a rich progress bar per phase of a creation, on stderr.

On a terminal the bars move as the phases go; elsewhere (a pipe, a file, a test) rich
draws nothing until the end, then prints each bar once in its final state. The bars
start with the first phase, so a definition refused before any phase prints nothing.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from app.reports import Phase


class Bars:
    """An app.reports.Progress drawn as one bar per phase: ``with Bars() as bars:``."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            TextColumn("{task.completed:>11,.0f}/{task.total:,.0f} ({task.percentage:.0f}%)"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
        )
        self._tasks: dict[Phase, TaskID] = {}

    def __call__(self, phase: Phase, done: int, total: int) -> None:
        """Move ``phase``'s bar to ``done`` of ``total`` (adding the bar at its first call)."""
        task = self._tasks.get(phase)
        if task is None:
            if not self._tasks:
                self._progress.start()
            self._tasks[phase] = self._progress.add_task(str(phase), total=total, completed=done)
        else:
            self._progress.update(task, completed=done, total=total)

    def __enter__(self) -> Bars:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._tasks:
            self._progress.stop()
