"""The driver's console line per training stage (``StageProgress``), drawn by facesr.progress (tqdm) as
every other phase's line is.

The workers' step lines go to their log files (``logs/stage<N>-rank<R>.log``) and rank 0's records to
``metrics.jsonl``; the driver reads that file (it is on the shared run folder) and draws one line a stage::

    stage 2 (SR cascade)   45% 864/1920 steps  epoch 14/32  loss 0.352  val psnr/x8 24.05  0.17 s/step, ETA 3m05s  elapsed 2m31s

On a terminal the line is redrawn in place once a second, and whatever else reaches the console meanwhile
(a worker's warning or traceback, forwarded by Ray) is printed above it, never lost. Not on a terminal
(``ray job logs``, a file) it is printed as a new line at most every ``interval_s`` seconds, and once at the end.
Before the first record it says what the workers are doing (starting Ray workers, building the model and the
DeepSpeed engine), which is the slow part of a first start.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

from facesr.progress import INTERVAL_S, bar, console
from shards.store import ObjectPath, path as store_path

from .config import TrainConfig, accumulation

TITLES = {1: "stage 1 (priors)", 2: "stage 2 (SR cascade)"}
VAL_KEYS = {1: "acc/x8", 2: "psnr/x8"}  # the one validation figure the line shows
TTY_REFRESH_S = 1.0  # the line is recomposed every second; drawn as facesr.progress allows


def planned_steps(cfg: TrainConfig, number: int, manifest: dict, world: int | None = None) -> int:
    """Optimizer steps the stage will take: epochs x steps per epoch, the worker loop's own arithmetic."""
    from shards.manifest import split_samples

    from .data import split_name

    st = cfg.stage_cfg(number)
    world = world or cfg.cluster.num_workers
    micro, accum = accumulation(st.batch_size, world, st.max_micro_batch)
    per_epoch = split_samples(manifest, split_name(cfg, number, "train"), labelled_only=number == 1) // (world * micro)
    per_epoch //= accum
    if cfg.steps_cap(number):
        per_epoch = min(per_epoch, cfg.steps_cap(number))
    return per_epoch * st.epochs


def _duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StageProgress:
    """Tails ``metrics_path`` for one stage's records and keeps its console line (a tqdm bar) up to date (a thread)."""

    def __init__(self, metrics_path: Path, number: int, total_steps: int, epochs: int, stream=None,
                 interval_s: float = INTERVAL_S, title: str = ""):
        self.path, self.number, self.total, self.epochs = store_path(metrics_path), number, total_steps, epochs
        self.title = title or TITLES.get(number, f"stage {number}")
        self.stream, self.interval_s = stream or sys.stderr, interval_s
        self._offset, self._train, self._val = 0, None, None
        self._recent: deque = deque(maxlen=32)  # (step, time) of the latest train records
        self._t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-stage{number}", daemon=True)
        self._console = None
        self.bar = None

    def __enter__(self) -> "StageProgress":
        self._console = console(self.stream)
        stream = self._console.__enter__()
        # the whole line is ours (steps, epoch, loss, validation, pace from the records' own times); tqdm draws it
        self.bar = bar(desc=self.line(), stream=stream, interval_s=self.interval_s, bar_format="{desc}", miniters=1)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.bar.set_description_str(self.line(), refresh=False)
        self.bar.close()  # its last state stays as a line of its own
        self._console.__exit__(*exc)

    def _run(self) -> None:
        while not self._stop.wait(TTY_REFRESH_S):
            self.poll()
            self.bar.set_description_str(self.line(), refresh=False)
            self.bar.update(1)  # displayed as tqdm's interval allows: every second on a terminal, a minute in files

    def poll(self) -> None:
        """Read the records appended since the last call (a resumed stage rewrites the file: start over)."""
        try:
            chunk = _read_from(self.path, self._offset)
        except FileNotFoundError:
            return
        if chunk is None:  # shorter than what was read: rewritten
            self._offset = 0
            chunk = _read_from(self.path, 0)
        end = chunk.rfind(b"\n") + 1  # a line rank 0 is still writing is read next time
        self._offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("stage") != self.number:
                continue
            if rec.get("split") == "val":
                self._val = rec
            elif rec.get("split") == "train":
                self._train = rec
                self._recent.append((rec["step"], rec["time"]))

    def seconds_per_step(self) -> float | None:
        """The median pace between consecutive recent records: a resumed stage's file holds earlier attempts'
        records, and the gap before this attempt (hours, across sessions) is one interval the median ignores."""
        pairs = list(self._recent)
        paces = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(pairs, pairs[1:]) if s1 > s0 and t1 > t0]
        return statistics.median(paces) if paces else None

    def line(self) -> str:
        title = f"{self.title:<21}"
        elapsed = _duration(time.time() - self._t0)
        rec = self._train
        if rec is None:
            return (f"{title} starting Ray workers, model and DeepSpeed engine ({elapsed}; "
                    f"a first start on a machine also compiles DeepSpeed's CPU comm op, ~1 min)")
        step, total = rec["step"], max(self.total, rec["step"])
        parts = [f"{title} {100 * step / total:3.0f}% {step}/{total} steps", f"epoch {rec['epoch'] + 1}/{self.epochs}"]
        if "loss" in rec:
            parts.append(f"loss {rec['loss']:.4g}")
        key = VAL_KEYS.get(self.number)
        if self._val is not None and key in self._val:
            parts.append(f"val {key} {self._val[key]:.4g}")
        per_step = self.seconds_per_step()
        if per_step is not None:
            parts.append(f"{per_step:.2f} s/step, ETA {_duration(per_step * (total - step))}")
        parts.append(f"elapsed {elapsed}")
        return "  ".join(parts)


def _read_from(path, offset: int) -> bytes | None:
    """The bytes of ``path`` after ``offset`` (None: the file is now shorter); an object is fetched whole."""
    if isinstance(path, ObjectPath):
        data = path.read_bytes()
        return data[offset:] if len(data) >= offset else None
    if path.stat().st_size < offset:
        return None
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()
