"""Run an iterator ahead in a background thread: the loader's decoding and evaluation's reading and degrading
overlap the computation that consumes them (PNG/zlib, PIL and torch release the GIL), without a second process."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator


def prefetched(items: Iterable, depth: int = 2, stop: threading.Event | None = None,
               name: str = "prefetch") -> Iterator:
    """``items`` run by a daemon thread up to ``depth`` ahead, in order; its exceptions re-raised here.

    The thread stops when the consumer goes away (or ``stop`` is set by its owner) and is joined then, so
    nothing of it runs on after the loop that consumed it."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = stop if stop is not None else threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                _offer(q, item, stop)
                if stop.is_set():
                    return
            _offer(q, done, stop)
        except BaseException as exn:  # handed to the consumer, raised in its thread with its traceback
            _offer(q, exn, stop)

    thread = threading.Thread(target=produce, daemon=True, name=name)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)  # it stops within one item


def _offer(q: queue.Queue, item, stop: threading.Event) -> None:
    """Put ``item`` unless the consumer has gone (then a full queue would block the thread forever)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
