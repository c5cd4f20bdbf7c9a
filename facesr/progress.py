"""One progress system for every phase (prep, training, evaluation, identity): tqdm lines.

On a terminal a line is redrawn in place (tqdm's own drawing), and inside ``console()`` anything printed
meanwhile through ``sys.stdout``/``sys.stderr`` (Ray forwarding a worker's warning or traceback) goes above it
(tqdm.write), never lost. Not on a terminal (a log file, ``ray job logs``) the same line is printed whole, at most
once every ``interval_s`` seconds and once at the end: no carriage returns, no control codes in files.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterator, TextIO

from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

INTERVAL_S = 60.0  # off a terminal: a line a minute
TTY_INTERVAL_S = 0.1
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # cursor moves and line clears tqdm may emit


def isatty(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class Lines:
    """A file for tqdm off a terminal: each redraw (``\\r`` + text) becomes one whole line; a text equal to the
    last one written (the final refresh of a bar just printed) is not repeated."""

    def __init__(self, stream: TextIO):
        self.stream, self.last = stream, None

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", text):
            part = _CONTROL.sub("", part).rstrip()
            if part and part != self.last:
                self.stream.write(part + "\n")
                self.last = part
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def bar(total: int | None = None, desc: str = "", unit: str = "it", *, initial: int = 0, disable: bool = False,
        stream: TextIO | None = None, interval_s: float = INTERVAL_S, **kw) -> tqdm:
    """A tqdm line on ``stream`` (default stderr): in place on a terminal, a whole line every ``interval_s`` else."""
    stream = stream or sys.stderr
    if isatty(stream):
        opts = {"file": stream, "dynamic_ncols": True, "mininterval": TTY_INTERVAL_S}
    else:  # maxinterval too: tqdm's monitor thread would otherwise redraw a slow bar every 10 s
        opts = {"file": Lines(stream), "ascii": True, "mininterval": interval_s,
                "maxinterval": max(interval_s, 10.0)}
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, **{**opts, **kw})


@contextlib.contextmanager
def console(stream: TextIO | None = None) -> Iterator[TextIO]:
    """While bars are drawn on a terminal, other output through sys.stdout/sys.stderr is written above them.
    Yields the real stream: create the bars on it. Off a terminal nothing is redirected."""
    stream = stream or sys.stderr
    if not isatty(stream):
        yield stream
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = DummyTqdmFile(saved[0]), DummyTqdmFile(saved[1])
    try:
        yield stream
    finally:
        for s in (sys.stdout, sys.stderr):  # a last partial line is flushed above the bar
            s.__del__()
            s._buf = []
        sys.stdout, sys.stderr = saved
