"""How far a long run has got: a live bar on a terminal, plain lines anywhere else.

The chaos runner and the benchmark suite run for minutes. On a terminal they draw a bar
(with rich, from the ``testing`` extra) under the lines they print. When either the
progress stream (standard error) or the run's own output (standard output) is a file or a
pipe (CI logs, ``pytest``'s capture, ``| tee run.log``, whose copy of the output would land
in the middle of the bar) the same facts are written as plain lines: one when a stage
begins, one when the caller marks a round, one every ``every`` seconds and one at the end::

    section 8/10 celery round 2/5 runs 31/100 elapsed 3m12s eta 7m07s

``elapsed`` counts from the start of the whole run; ``eta`` is the time left for the
current count, from its rate so far. Without rich installed, a terminal gets the plain
lines too: progress is a display and never the reason a run fails.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

#: Seconds between two plain lines while a count goes on.
EVERY = 10.0


def duration(seconds: float) -> str:
    """``45s``, ``1m12s``, ``2h05m``: short enough for a line that is read in passing."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def is_terminal(stream: TextIO) -> bool:
    """A stream a bar can be drawn on: a TTY whose terminal moves the cursor."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False
    return tty and os.environ.get("TERM", "") not in ("dumb", "unknown")


class _Count(NamedTuple):
    """The current count, replaced whole on each change (the bar's thread reads it)."""

    unit: str
    done: int
    total: int | None
    began: float


class Progress:
    """One run's progress on ``stream`` (standard error by default).

    ``begin`` starts a count (``unit``, ``total``) and sets fields shown before it
    (``section="3/10 celery"``); fields stay until set again (``None`` removes one).
    ``update`` moves the count; ``write`` prints a line of the run's own output (the fault
    timeline) to ``output`` (standard output by default), above the bar, so the bar never
    cuts into it. The bar is drawn when ``stream`` and ``output`` are both terminals;
    ``terminal`` overrides that check. ``show=False`` shows nothing and only writes the
    run's lines.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        output: TextIO | None = None,
        every: float = EVERY,
        terminal: bool | None = None,
        show: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.output = output
        self.every = every
        self.show = show
        self.clock = clock
        if terminal is None:
            terminal = is_terminal(self.stream) and is_terminal(self._output())
        self.bar = show and terminal
        self.fields: dict[str, str] = {}
        self.count = _Count("", 0, None, clock())
        self.started = clock()
        self._last_line = -float("inf")
        self._rich: RichProgress | None = None
        self._task: TaskID | None = None
        self._closed = False

    @classmethod
    def off(cls) -> Progress:
        """Shows nothing: for callers that passed no progress."""
        return cls(show=False)

    # -- the count ------------------------------------------------------------------------

    def begin(self, unit: str = "", total: int | None = None, **fields: object) -> None:
        """A new count from 0 (its own rate for ``eta``), and a plain line."""
        if not self.show:
            return
        self._set(fields)
        self.count = _Count(unit, 0, total, self.clock())
        self._refresh(line=True)

    def update(
        self,
        done: int | None = None,
        *,
        advance: int = 0,
        line: bool = False,
        **fields: object,
    ) -> None:
        """Set the count to ``done`` (or move it by ``advance``) and change fields; ``line``
        writes a plain line now (a round begins) rather than at the next interval."""
        if not self.show:
            return
        count = self.count
        new = (count.done if done is None else done) + advance
        changed = self._set(fields)
        if new != count.done:
            self.count = count._replace(done=new)
        self._refresh(line=line, fields_changed=changed)

    def _set(self, fields: dict[str, object]) -> bool:
        changed = False
        for name, value in fields.items():
            if value is None:
                changed |= self.fields.pop(name, None) is not None
            elif self.fields.get(name) != str(value):
                self.fields[name] = str(value)
                changed = True
        return changed

    # -- what is shown --------------------------------------------------------------------

    def describe(self) -> str:
        """The fields, as shown before the count: ``section 3/10 celery round 2/5``."""
        return " ".join(f"{name} {value}" for name, value in self.fields.items())

    def tally(self) -> str:
        """The count and the times: ``runs 31/100 elapsed 3m12s eta 7m07s``."""
        count, now = self.count, self.clock()
        parts = []
        if count.unit:
            total = "?" if count.total is None else str(count.total)
            parts.append(f"{count.unit} {count.done}/{total}")
        parts.append(f"elapsed {duration(now - self.started)}")
        if count.total is not None:
            parts.append(f"eta {self._eta(count, now)}")
        return " ".join(parts)

    @staticmethod
    def _eta(count: _Count, now: float) -> str:
        assert count.total is not None
        if count.done >= count.total:
            return duration(0)
        if count.done <= 0:
            return "?"
        return duration((count.total - count.done) * (now - count.began) / count.done)

    def line(self) -> str:
        """The plain line: fields, count and times."""
        return " ".join(part for part in (self.describe(), self.tally()) if part)

    def _refresh(self, *, line: bool, fields_changed: bool = True) -> None:
        if self._closed:
            return
        if self.bar:
            self._draw(fields_changed)
            return
        now = self.clock()
        if line or now - self._last_line >= self.every:
            self._last_line = now
            self._emit(self.line(), self.stream)

    def _draw(self, fields_changed: bool) -> None:
        if self._rich is None:
            self._rich = _rich_bar(self.stream, self.tally)
            if self._rich is None:  # rich is not installed: plain lines on the terminal too
                self.bar = False
                self._refresh(line=True)
                return
            self._rich.start()
        count = self.count
        if self._task is None:
            self._task = self._rich.add_task(self.describe(), total=count.total)
        elif fields_changed:
            self._rich.update(self._task, description=self.describe())
        self._rich.update(self._task, completed=count.done, total=count.total)

    # -- the run's own lines --------------------------------------------------------------

    def _output(self) -> TextIO:
        return self.output if self.output is not None else sys.stdout

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print one line of the run's output to ``file`` (by default ``output``): above
        the bar when it is a terminal too, else straight to ``file``."""
        target = file if file is not None else self._output()
        if self._rich is not None and is_terminal(target):
            self._rich.console.out(text, highlight=False)
        else:
            self._emit(text, target)

    @staticmethod
    def _emit(text: str, target: TextIO) -> None:
        target.write(text + "\n")  # one write: a line is never split by another's
        target.flush()

    # -- the end --------------------------------------------------------------------------

    def close(self) -> None:
        """The last state stays: the bar's final frame, or a last plain line."""
        if self._closed:
            return
        if self.show and self._rich is None and not self.bar:
            self._emit(self.line(), self.stream)
        self._closed = True
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _rich_bar(stream: TextIO, tally: Callable[[], str]) -> RichProgress | None:
    """A rich bar on ``stream``: the fields, the bar, then ``tally`` (the same text as the
    plain lines). Prints to standard output and error meanwhile go above it."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, ProgressColumn, Task, TextColumn
        from rich.progress import Progress as RichProgress
        from rich.text import Text
    except ImportError:
        return None

    class Tally(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(tally())

    console = Console(file=stream, force_terminal=True)
    return RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        Tally(),
        console=console,
        refresh_per_second=4,
        # Standard output is taken over only when it is a terminal as well: output sent
        # to a file must stay in that file.
        redirect_stdout=is_terminal(sys.stdout),
        redirect_stderr=stream is sys.stderr,
    )
