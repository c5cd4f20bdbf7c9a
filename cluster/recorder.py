"""``Recorder``: every effect a training worker has outside its model and optimizer, in one place.

What it records: log lines (a file per rank; rank 0 also on stdout), train and
val metrics in ``metrics.jsonl`` (cut back to the checkpoint on resume) and, with
``run.tensorboard``, the same records as TensorBoard event files (``tensorboard/stage<N>``;
a resumed run purges the events after its checkpoint's step), Prometheus telemetry, and the stage's result (its final weights through
``Stage.finish`` and ``stage<N>.done.json``). The two collectives this needs
run here too: the all-reduce that averages train metrics over ranks before
they are recorded, and the barrier that holds the other ranks until rank 0
has written the result.

Rank-0-only work is gated here and nowhere else, on ``self.is_main``
(nanoGPT's ``master_process``): writing ``metrics.jsonl``, the stage's final
weights and its ``stage<N>.done.json``. Collectives run on every rank before
the gate. Every rank keeps its own log file and, with ``run.telemetry_port``
set, its own Prometheus exporter (port + local rank), because stalls and
memory are per worker.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from shards.store import Mirror, MirrorHandler, ObjectPath, path as store_path

from .config import TrainConfig


FILE_ONLY = {"file_only": True}  # ``extra=`` of a record that goes to the rank's log file, not to the console


def _console_line(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def done_path(run_dir, number: int):
    """Written by rank 0 when stage ``number`` finished; the driver skips finished stages of a resumed run."""
    return store_path(run_dir) / f"stage{number}.done.json"


class Recorder:
    def __init__(self, cfg: TrainConfig, number: int, stage_label: str, rank: int, local_rank: int, world: int,
                 node: str):
        self.cfg, self.number, self.rank, self.world = cfg, number, rank, world
        self.is_main = rank == 0  # the one rank-0 gate
        self.run_dir = cfg.run_path  # a folder, or an object-store URI (shards.store: files mirrored there)
        # rank 0's metrics: a local file (the run folder's, or a copy uploaded every few seconds)
        self.metrics = Mirror(self.run_dir / "metrics.jsonl", fetch=self.is_main) if self.is_main else None
        self.metrics_path = self.metrics.local if self.is_main else None
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.tensorboard = _TensorBoard(self.run_dir / "tensorboard" / f"stage{number}") \
            if self.is_main and cfg.run.tensorboard else None
        self.logger = logging.getLogger(f"facesr.train.stage{number}.rank{rank}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        fh = MirrorHandler(self.run_dir / "logs" / f"stage{number}-rank{rank}.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.logger.handlers = [fh]
        if self.is_main:  # rank 0 also speaks on stdout, which Ray forwards to the driver / job log
            sh = logging.StreamHandler()
            sh.setFormatter(logging.Formatter(f"[stage {number}] %(message)s"))
            # start, setup and end only: step, validation and checkpoint lines stay in the file, and the driver
            # draws one progress line from metrics.jsonl (cluster/progress.py)
            sh.addFilter(_console_line)
            self.logger.addHandler(sh)
        self.telemetry = None
        if cfg.run.telemetry_port is not None:
            from .telemetry import Telemetry, node_ip

            self.telemetry = Telemetry(
                run=cfg.run.name, stage=stage_label, rank=rank, node=node,
                port=cfg.run.telemetry_port + local_rank, host=node_ip(), sd_dir=cfg.run.telemetry_sd_dir or None,
                registry=cfg.run.telemetry_sd_port is not None,
            )
        self.logger.info("rank %d/%d on %s, pid %d, process up %.1fs", rank, world, node, os.getpid(), _uptime())

    # ------------------------------------------------------------------ events

    def ready(self, build_s: float, engine_s: float, batching, precision, device) -> None:
        from facesr.hardware import machine_info, native_bf16

        info = machine_info(device)
        where = info.get("gpu", info["cpu"])
        self.logger.info("precision %s on %s (%s; engine.precision=%s, bf16 native: %s)", precision.name, device,
                         where, self.cfg.engine.precision, "yes" if native_bf16(device) else "no")
        self.logger.info("model built in %.1fs, DeepSpeed engine in %.1fs; micro-batch %d x %d accumulation x %d "
                         "workers = global batch %d", build_s, engine_s, batching.micro_batch, batching.accumulation,
                         self.world, batching.global_batch)

    def compiling(self, ops: list[str], cache: str) -> None:
        """Why a first start is slow: said before the build, so a silent minute has a reason."""
        self.logger.info("DeepSpeed compiles %s: 20-60 s on a machine's first start (or when its cache in %s is "
                         "stale), then it loads from there", ", ".join(ops), cache)

    def resumed(self, state, folder: str) -> None:
        self.logger.info("resumed from %s at epoch %d, step %d (%d in epoch); restart %d of this stage", folder,
                         state.epoch, state.global_step, state.step_in_epoch, state.restarts)
        if self.telemetry is not None:  # the run's own count, not this process's: each restart is a new process
            self.telemetry.restarts = state.restarts
        if self.is_main:  # records after the checkpoint are about to be produced again
            self._truncate(state.global_step)
            if self.tensorboard is not None:
                self.tensorboard.purge_from = state.global_step + 1

    def train(self, terms: dict[str, float], extra: dict, epoch: int, step: int) -> None:
        """Train metrics averaged over ranks (collective), then recorded by rank 0."""
        self._record("train", self._mean_over_ranks(terms), extra, epoch, step)

    def val(self, terms: dict[str, float], extra: dict, epoch: int, step: int) -> None:
        """Validation metrics (already reduced over ranks)."""
        self._record("val", terms, extra, epoch, step)

    def _record(self, split: str, terms: dict[str, float], extra: dict, epoch: int, step: int) -> None:
        record = {**terms, **extra}
        if self.telemetry is not None:
            self.telemetry.log({**record, "epoch": epoch, "step": step}, split=split)
        label = "" if split == "train" else f"{split} "
        self.logger.info("epoch %d step %d %s%s", epoch, step, label, _fmt(record), extra=FILE_ONLY)
        if self.is_main:
            self._append(split, epoch, step, record)

    def checkpoint_written(self, folder: str, state) -> None:
        self.logger.info("checkpoint part written at step %d (epoch %d)", state.global_step, state.epoch,
                         extra=FILE_ONLY)

    def checkpoint_saved(self) -> None:
        if self.is_main:  # the records up to a checkpoint are in the run with it
            self.metrics.sync(force=True)
            if self.tensorboard is not None:
                self.tensorboard.flush()
        if self.telemetry is not None:
            self.telemetry.checkpoint_saved()

    def finish(self, stage, module: torch.nn.Module, state, lr: float) -> None:
        """Rank 0 writes the stage's weights and its done marker; the others wait for it."""
        if self.is_main:
            path = stage.finish(module, self.run_dir)
            summary = {"stage": self.number, "global_step": state.global_step, "epoch": state.epoch, "lr": lr,
                       "restarts": state.restarts, "weights": str(path), "world_size": self.world, "time": time.time()}
            self.metrics.sync(force=True)  # every record is in the run before the marker says it is done
            done = done_path(self.run_dir, self.number)
            if isinstance(done, ObjectPath):
                done.write_text(json.dumps(summary, indent=1))  # one PUT: whole or absent
            else:
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps(summary, indent=1))
                os.replace(tmp, done)
            self.logger.info("stage %d done: %s", self.number, _fmt(summary))
        if dist.is_initialized():
            dist.barrier()

    def close(self, finished: bool = False) -> None:
        """``finished``: the stage ended normally, so its exporter waits for a watching Prometheus' last scrape
        (a failing worker withdraws at once: its restart should not wait)."""
        if self.is_main:
            self.metrics.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        if self.telemetry is not None:
            self.telemetry.close(self.cfg.run.telemetry_linger_s if finished else 0.0)
        for h in self.logger.handlers:
            h.close()

    # ------------------------------------------------------------------ helpers

    def _mean_over_ranks(self, terms: dict[str, float]) -> dict[str, float]:
        if not dist.is_initialized() or self.world == 1:
            return terms
        keys = sorted(terms)
        vec = torch.tensor([terms[k] for k in keys], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            vec = vec.cuda()
        dist.all_reduce(vec)
        return {k: float(v) / self.world for k, v in zip(keys, vec.tolist())}

    def _append(self, split: str, epoch: int, step: int, record: dict) -> None:
        line = {"stage": self.number, "split": split, "epoch": epoch, "step": step, "time": time.time(), **record}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.metrics.sync()
        if self.tensorboard is not None:
            problem = self.tensorboard.add(split, step, record)
            if problem:
                self.logger.info("%s", problem)

    def _truncate(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by the crash
                continue
            if not (rec.get("stage") == self.number and rec.get("step", 0) > step):
                keep.append(line)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.metrics_path)
        self.metrics.sync(force=True)


class _TensorBoard:
    """Rank 0's TensorBoard event files of the stage's records, written by ``torch.utils.tensorboard``.

    Tags are ``<name>/<split>`` and, for per-scale terms, ``<name>/<split>/<scale>`` (``ssim/train/x8``), so
    TensorBoard groups each term's curves by scale and split. A run folder in an object store gets its event
    files uploaded whole at most every 10 s and at close (objects cannot grow)."""

    def __init__(self, target):
        self.target = target
        self.purge_from: int | None = None  # a resumed run: events at or after this step are stale
        self._writer = None
        self._folder = None
        self._failed = False
        self._last_upload = 0.0

    def add(self, split: str, step: int, record: dict) -> str | None:
        """Write the record's numbers; a message the first time TensorBoard is unavailable, else None."""
        if self._failed:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # the package is an install option; training goes on without it
                self._failed = True
                return f"no TensorBoard event files ({e}; pip install tensorboard, or run.tensorboard=false)"
            if isinstance(self.target, ObjectPath):
                import tempfile

                self._folder = tempfile.mkdtemp(prefix="facesr-tensorboard-")
            else:
                self._folder = str(self.target)
            self._writer = SummaryWriter(self._folder, purge_step=self.purge_from, flush_secs=10)
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, _, scale = key.partition("/")
            self._writer.add_scalar(f"{name}/{split}/{scale}" if scale else f"{key}/{split}", value, step)
        self._upload(force=False)
        return None

    def _upload(self, force: bool) -> None:
        if self._folder is None or not isinstance(self.target, ObjectPath):
            return
        now = time.monotonic()
        if force or now - self._last_upload >= 10.0:
            self._last_upload = now
            self._writer.flush()
            for f in sorted(Path(self._folder).iterdir()):
                (self.target / f.name).write_bytes(f.read_bytes())

    def flush(self) -> None:
        """Everything written so far on disk (and uploaded): a checkpoint's records survive a kill."""
        if self._writer is not None:
            self._writer.flush()
            self._upload(force=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._upload(force=True)
            self._writer = None


def _uptime() -> float:
    import psutil  # ships with ray

    return time.time() - psutil.Process().create_time()


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
