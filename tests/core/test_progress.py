"""The long runs' progress: a bar drawn on a real pseudo-terminal, plain lines elsewhere.

The plain lines are driven by a clock the test sets, so no assertion depends on how fast
the machine is.
"""

from __future__ import annotations

import io
import os
import pty
import re
import sys
import threading

import pytest

from idemtask.testing.progress import Progress, duration

#: Cursor movement and colours, as rich draws them.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _plain(every: float = 10.0) -> tuple[Progress, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    return Progress(out, every=every, clock=clock), out, clock


def test_durations_read_in_passing() -> None:
    assert [duration(s) for s in (0, 44.6, 72, 3599, 3600 * 2 + 5 * 60)] == [
        "0s",
        "45s",
        "1m12s",
        "59m59s",
        "2h05m",
    ]


def test_off_a_terminal_a_line_per_stage_per_marked_round_per_interval_and_at_the_end() -> None:
    progress, out, clock = _plain(every=10)
    progress.begin(section="3/9 celery")
    progress.begin("keys", 10_000, round="1/5")
    clock.now += 4
    progress.update(2000)  # within the interval: no line
    progress.update(round="2/5", line=True)  # a round begins: a line
    clock.now += 68
    progress.update(4000)  # the interval has passed: a line
    progress.close()
    progress.close()  # once only

    assert out.getvalue().splitlines() == [
        "section 3/9 celery elapsed 0s",
        "section 3/9 celery round 1/5 keys 0/10000 elapsed 0s eta ?",
        "section 3/9 celery round 2/5 keys 2000/10000 elapsed 4s eta 16s",
        "section 3/9 celery round 2/5 keys 4000/10000 elapsed 1m12s eta 1m48s",
        "section 3/9 celery round 2/5 keys 4000/10000 elapsed 1m12s eta 1m48s",
    ]


def test_a_field_set_to_none_goes_and_a_finished_count_has_no_time_left() -> None:
    progress, _, clock = _plain()
    progress.begin("runs", 4, section="1/2 busy", variant="Celery prefork")
    clock.now += 30
    progress.update(advance=4, variant=None)
    assert progress.line() == "section 1/2 busy runs 4/4 elapsed 30s eta 0s"


def test_the_run_s_own_lines_go_to_their_stream_untouched() -> None:
    progress, out, _ = _plain()
    timeline = io.StringIO()
    progress.begin("keys", 5)
    progress.write("   3.1s kill pid 42", file=timeline)
    assert timeline.getvalue() == "   3.1s kill pid 42\n"
    assert "kill" not in out.getvalue()


def test_off_shows_nothing_but_still_writes_the_run_s_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = Progress.off()
    progress.begin("keys", 5)
    progress.update(5, line=True)
    progress.write("a line of the run")
    progress.close()
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("a line of the run\n", "")


def test_no_bar_unless_progress_and_output_are_both_on_a_terminal_that_draws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``| tee run.log``: the copy of the output would land in the bar; plain lines instead."""
    monkeypatch.setenv("TERM", "xterm-256color")
    master, slave = pty.openpty()
    with os.fdopen(slave, "w", closefd=True) as terminal:
        assert Progress(terminal, output=terminal).bar
        assert not Progress(terminal, output=io.StringIO()).bar
        assert not Progress(io.StringIO(), output=terminal).bar
        monkeypatch.setenv("TERM", "dumb")  # no cursor movement
        assert not Progress(terminal, output=terminal).bar
    os.close(master)


def test_without_rich_a_terminal_gets_the_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # import rich.progress fails
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, terminal=True, clock=clock)
    progress.begin("keys", 2)
    progress.update(2)
    progress.close()
    assert out.getvalue().splitlines() == [
        "keys 0/2 elapsed 0s eta ?",
        "keys 2/2 elapsed 0s eta 0s",
    ]


def test_on_a_pseudo_terminal_a_bar_is_drawn_and_the_timeline_stays_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "120")  # rich sizes the bar from this, or from stdio
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # read as a terminal would, so rich never blocks on a full pty
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the other end is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with os.fdopen(slave, "w", encoding="utf-8", closefd=True) as terminal:
        assert terminal.isatty()
        with Progress(terminal, output=terminal) as progress:
            assert progress.bar
            progress.begin("keys", 10, faults="0/2")
            progress.update(4, faults="1/2")
            progress.write("   12.3s kill pid 4242")
            progress.update(10, faults="2/2")
    reader.join(timeout=10)
    os.close(master)

    raw = b"".join(chunks).decode("utf-8", errors="replace")
    assert "\x1b[" in raw  # drawn with cursor and colour control, not written as lines
    assert "━" in raw  # rich's bar
    shown = ANSI.sub("", raw).replace("\r\n", "\n")
    # The timeline's line arrived whole, on a line of its own.
    assert re.search(r"(^|\r|\n)   12\.3s kill pid 4242\r?\n", shown), shown
    frames = shown.replace("\r", "\n").splitlines()
    # The last frame is the finished count.
    last = [f for f in frames if "keys" in f][-1]
    assert re.fullmatch(r"faults 2/2 ━+ keys 10/10 elapsed \d+s eta 0s\s*", last), last
