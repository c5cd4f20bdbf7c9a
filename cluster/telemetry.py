"""Per-worker Prometheus exporter for facesr training, found by Prometheus via HTTP SD or file_sd.

Contract with the training loop (wired in cluster/recorder.py), one instance per worker and stage::

    from cluster.telemetry import Telemetry, node_ip

    tel = Telemetry(run=cfg.run.name, stage="prior" | "sr", rank=world_rank, node=socket.gethostname(),
                    port=cfg.run.telemetry_port + local_rank,  # pass None for no exporter
                    host=node_ip(),                             # node IP inside Ray, else loopback
                    sd_dir=cfg.run.telemetry_sd_dir,              # file_sd folder, or None
                    registry=True,                                # HTTP SD registry on the Ray head
                    restarts=restarts_so_far)
    tel.log(loss_terms | {"lr": lr, "samples": n_since_last_log, "step_time_s": dt, "data_wait_s": wait,
                          "epoch": epoch, "step": step, "decode_errors": n_skipped}, split="train")
    tel.log(val_terms | {"epoch": epoch, "step": step}, split="val")  # after each validation
    tel.checkpoint_saved()  # once the checkpoint is durably written (at least on rank 0)
    tel.restart()           # when resuming, if restarts_so_far was not known at construction
    tel.set_stage("sr")     # only if one process runs both stages with one exporter
    tel.close(linger_s)     # in a finally: withdraws from discovery, stops the server; after a stage that ended
                            # normally, linger_s > 0 first waits (that long at most) for a watching Prometheus'
                            # scrape of the final values

``log`` keys follow the loss-dict vocabulary: ``"<name>/<scale>"`` (``ssim/x8``, ``ce/x2``,
``acc/x4``, ``psnr/x8``) becomes ``facesr_<name>{scale="x8"}``; plain keys map through
``PLAIN`` (``lr`` -> ``facesr_learning_rate``, so the learning rate is never confused with the
``lr`` image level); shares end in ``_ratio`` (``data_wait_fraction`` -> ``facesr_data_wait_ratio``,
``mfu`` -> ``facesr_mfu_ratio``); any other numeric key becomes ``facesr_<key>``. Non-numeric values
and the jsonl bookkeeping keys (``stage``, ``split``, ``time``) are ignored, so the same dict that
goes to ``metrics.jsonl`` can be passed. Every series carries ``run, stage, node, rank`` (and
``split``, ``scale`` where they apply). As the Prometheus naming guide has it, what accumulates is
a ``_total`` counter read with ``rate()``, durations are a histogram, and times are timestamps:

* ``samples`` (samples trained since the last log) adds to ``facesr_samples_total``: throughput is
  ``rate(facesr_samples_total[…])``, whatever the scrape interval (a precomputed rate shows only
  the interval that happened to be last);
* ``step_time_s`` (the mean step since the last log) goes into the histogram
  ``facesr_step_seconds``, once for each step of that interval (the ``step`` key's advance): the
  loop reads the time back once per log interval, not per step, so a bucket holds interval means;
* ``decode_errors`` is the loader's cumulative count in this process: ``facesr_decode_errors_total``;
* ``facesr_last_checkpoint_timestamp_seconds``: Unix time of the last ``checkpoint_saved()`` (or
  of this exporter's start); its age is ``time() - …`` in the query;
* ``facesr_restarts_total`` (``restarts`` at construction plus ``restart()`` calls),
  ``facesr_last_log_timestamp_seconds`` (stall detection), and the standard ``process_*``
  metrics (memory, CPU, open files of this worker) under their usual names.

Ports and discovery. ``port`` is tried first (convention: base port + local rank); if it is
busy the OS picks a free one; with ``port=None`` or if binding fails there is no exporter at
all. None of these stop training: they are logged. The exporter binds to ``host`` only
(loopback by default; on a cluster the node's IP, see ``node_ip``). Because the real port can
differ from the requested one, every exporter advertises itself, in one or both of two ways:

* ``registry=True`` (inside Ray): with the cluster's target registry on the Ray head
  (cluster/discovery.py), which Prometheus polls over HTTP (``http_sd_configs``). Needs no
  shared folder; the entry is renewed while the exporter lives and withdrawn by ``close()``,
  and one of a worker killed hard expires after ``discovery.TTL_S``.
* ``sd_dir``: a Prometheus file_sd file ``<run>-<node>-r<rank>.json`` written atomically
  (tmp + rename) and removed by ``close()``. ``sd_dir`` is one dir for all runs,
  ``<cluster.storage_path>/prometheus_sd`` when storage is a folder; on a multi-node cluster
  it must be on the shared filesystem that holds ``storage_path``. A worker killed hard
  leaves its file behind: Prometheus then shows that target as ``up == 0`` until the same
  run/node/rank rewrites it or the file is deleted.

``make monitor`` renders cluster/prometheus/prometheus.yml with both.

Why prometheus_client and not ``ray.util.metrics``: Ray re-exports application metrics through
each node's metrics agent with a ``ray_`` prefix and its own reporting delay, only while the
Ray dashboard agent runs; a custom collector here computes checkpoint age at scrape time (it
keeps growing while a step hangs), keeps the ``facesr_*`` names and labels exactly as
documented, and works the same in CPU tests and outside Ray. Ray's own metrics stay available
through Ray's discovery file (second job in prometheus.yml).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Iterable, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from facesr.vocab import SCALES

log = logging.getLogger(__name__)

PREFIX = "facesr"
# plain log() keys -> metric names in Prometheus base units
PLAIN = {
    "loss": "loss",
    "lr": "learning_rate",
    "samples": "samples",
    "step_time_s": "step_seconds",
    "data_wait_s": "data_wait_seconds",
    "data_wait_fraction": "data_wait_ratio",
    "mfu": "mfu_ratio",
    "peak_memory_bytes": "peak_memory_bytes",
    "epoch": "epoch",
    "step": "step",
    "decode_errors": "decode_errors",
}
COUNTERS = {"decode_errors"}  # cumulative counts: exported as <name>_total counters
INCREMENTS = {"samples"}  # counts since the last log: added up into <name>_total counters
HISTOGRAMS = {"step_seconds"}  # durations: observed into a histogram (once per step of the interval)
# step-time buckets (s): a tiny CPU step ~0.3 s, a paper step on an H200 in CUDA graphs ~0.013 s
# close(linger_s): a registry polled this recently, or a file_sd folder whose exporters were scraped this recently,
# has a Prometheus behind it (refresh intervals are ~15-60 s); after the final values were collected, the response
# still has to reach Prometheus
WATCHED_WITHIN_S, LINGER_GRACE_S = 120.0, 0.3
# in a file_sd folder: touched (every few seconds at most) when one of its exporters is scraped. A stage too short
# for Prometheus to find its exporter (file_sd changes reach the scrape loop at most every 5 s) still lingers for
# its scrape when the folder's earlier exporters (the run's previous stages) were scraped. Not *.json: unseen.
SCRAPED_MARK, MARK_EVERY_S = ".scraped", 5.0
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
IGNORED = {"stage", "split", "time", "run", "rank", "node"}  # jsonl bookkeeping, not metrics
# metrics.jsonl's precomputed rate: Prometheus takes rate(facesr_samples_total) instead
IGNORED |= {"samples_per_s"}
HELP = {
    "loss": "Total loss of the current stage (last logged value).",
    "ssim": "SSIM between output and target at this scale.",
    "ce": "Identity cross-entropy of the frozen prior at this scale.",
    "acc": "Prior top-1 identity accuracy at this scale.",
    "psnr": "PSNR in dB between output and target at this scale.",
    "mse": "Pixel MSE between output and target at this scale (SRCNN, VDSR, SRGAN's content loss).",
    "perceptual": "Perceptual loss (ℓp): mean squared SqueezeNet fire2-4 feature difference at this scale.",
    "adv": "SRGAN generator's adversarial loss -log D(sr) at this scale.",
    "critic": "SRGAN discriminator's loss -log D(hr) - log(1 - D(sr)) at this scale.",
    "critic_real": "SRGAN discriminator's mean probability of 'real' on real faces at this scale.",
    "critic_fake": "SRGAN discriminator's mean probability of 'real' on the generator's faces at this scale.",
    "learning_rate": "Optimizer learning rate.",
    "samples": "Samples this worker trained on since it started (rate() is its throughput).",
    "step_seconds": "Training step wall time (each log interval's mean step, once per step of the interval).",
    "data_wait_seconds": "Mean time a step waited for its batch over the last log interval.",
    "data_wait_ratio": "Share of step time spent waiting for data over the last log interval.",
    "mfu_ratio": "Model FLOPs utilisation: training FLOP/s over the device's conv peak in the run's dtype.",
    "peak_memory_bytes": "Peak accelerator memory (CUDA) or peak resident memory of the worker (CPU).",
    "epoch": "Current epoch.",
    "step": "Current optimizer step.",
    "decode_errors": "Samples skipped because they failed to decode (cumulative).",
    "restarts": "Times this run was restarted (from a checkpoint) before this worker started.",
    "last_checkpoint_timestamp_seconds": "Unix time of the last checkpoint (or of this worker's start).",
    "last_log_timestamp_seconds": "Unix time of the last log() call for this split.",
}
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")
BASE_LABELS = ("run", "stage", "node", "rank")


def metric_name(key: str) -> tuple[str, str | None]:
    """``"ssim/x8" -> ("facesr_ssim", "x8")``; ``"lr" -> ("facesr_learning_rate", None)``."""
    base, _, scale = key.partition("/")
    if scale and scale not in SCALES:  # not a scale suffix: keep it in the name
        base, scale = key, ""
    base = PLAIN.get(base, base)
    return f"{PREFIX}_{_NAME_OK.sub('_', base)}", scale or None


def node_ip() -> str:
    """Address to bind on: this node's IP inside a Ray cluster, loopback otherwise."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # Ray missing or not in a worker: stay on loopback
        pass
    return "127.0.0.1"


def write_sd_file(path: str, targets: list[str], labels: Mapping[str, str]) -> None:
    """Atomically (tmp + rename in the same dir) write one Prometheus file_sd target group."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")  # not *.json: unseen
    try:
        with os.fdopen(fd, "w") as f:
            json.dump([{"targets": targets, "labels": dict(labels)}], f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; Prometheus may run as another user
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Collector(Collector):
    """Builds metric families from the Telemetry's latest values at scrape time."""

    def __init__(self, tel: "Telemetry"):
        self._tel = weakref.ref(tel)

    def collect(self) -> Iterable[Metric]:
        tel = self._tel()
        if tel is None:
            return []
        return tel._families()


class Telemetry:
    """Latest training metrics of one worker, served for Prometheus on ``host:port``."""

    def __init__(
        self,
        run: str,
        stage: str,
        rank: int,
        node: str,
        port: int | None,
        host: str = "127.0.0.1",
        sd_dir: str | None = None,
        restarts: int = 0,
        registry: bool = False,
    ):
        self.run, self.stage, self.rank, self.node, self.host = run, stage, int(rank), node, host
        self.restarts = int(restarts)
        self.port: int | None = None  # the bound port, None without exporter
        self.sd_file: str | None = None
        self.registration = None  # discovery.Registration while advertised in the Ray cluster's registry
        self._lock = threading.Lock()
        # (name, scale, split) -> value; cleared by set_stage
        self._values: dict[tuple[str, str | None, str], float] = {}
        self._last_log: dict[str, float] = {}  # split -> unix time of last log()
        self._checkpoint_time = time.time()  # age counts from start until the first checkpoint
        self._bad_keys: set[str] = set()
        self._totals: dict[tuple[str, str], float] = {}  # (name, split) -> running sum of INCREMENTS
        self._hist: dict[tuple[str, str], list] = {}  # (name, split) -> [bucket counts..., +Inf count, sum]
        self._last_step: dict[str, float] = {}  # split -> the step key of the last log()
        self._version = 0  # bumped by every update; a scrape records the version it collected
        self._scraped_version = -1  # -1: never scraped
        self._marked = 0.0  # monotonic time this exporter last touched its file_sd folder's SCRAPED_MARK
        self._httpd = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)  # the standard process_* names dashboards and alerts know
        self._serve(port)
        if self.port is not None and sd_dir:
            self._advertise(sd_dir)
        if self.port is not None and registry:
            self._register()
        atexit.register(_close_ref, weakref.ref(self))

    # --- what the training loop calls -------------------------------------------------

    def log(self, metrics: Mapping[str, object], split: str) -> None:
        """Record the latest value of each metric for ``split`` (``train`` or ``val``)."""
        now = time.time()
        with self._lock:
            for key, value in metrics.items():
                if key in IGNORED:
                    continue
                try:
                    value = float(value)  # also 0-dim tensors
                except (TypeError, ValueError):
                    if key not in self._bad_keys:  # once per key, not every step
                        self._bad_keys.add(key)
                        log.warning("telemetry: ignoring non-numeric metric %r=%r", key, value)
                    continue
                name, scale = metric_name(key)
                short = name[len(PREFIX) + 1:]
                if short in INCREMENTS:
                    self._totals[(name, split)] = self._totals.get((name, split), 0.0) + value
                elif short in HISTOGRAMS:
                    step = metrics.get("step")
                    steps = 1
                    if step is not None and split in self._last_step:
                        steps = max(1, int(float(step) - self._last_step[split]))
                    self._observe(name, split, value, steps)
                else:
                    self._values[(name, scale, split)] = value
            if metrics.get("step") is not None:
                self._last_step[split] = float(metrics["step"])
            self._last_log[split] = now
            self._version += 1

    def _observe(self, name: str, split: str, value: float, times: int) -> None:
        h = self._hist.setdefault((name, split), [0] * (len(STEP_BUCKETS) + 1) + [0.0])
        for i, le in enumerate(STEP_BUCKETS):
            if value <= le:
                h[i] += times
        h[len(STEP_BUCKETS)] += times  # +Inf: every observation
        h[-1] += value * times

    def checkpoint_saved(self) -> None:
        """Restart the checkpoint-age clock (call after the checkpoint is durably written)."""
        with self._lock:
            self._checkpoint_time = time.time()
            self._version += 1

    def restart(self) -> None:
        """Count one restart of this worker (alternative to ``restarts=`` at construction)."""
        self.restarts += 1

    def set_stage(self, stage: str) -> None:
        """Switch stage label; the previous stage's values stop being exported."""
        with self._lock:
            self.stage = stage
            self._values.clear()
            self._last_log.clear()
            self._totals.clear()
            self._hist.clear()
            self._last_step.clear()
            self._version += 1

    def close(self, linger_s: float = 0.0) -> None:
        """Withdraw from discovery and stop serving. Safe to call twice.

        ``linger_s`` > 0 (a stage that ended normally): when a Prometheus watches this exporter (it has scraped
        it, the registry it is advertised in is being polled, or exporters of its file_sd folder were scraped
        within ``WATCHED_WITHIN_S``) but has not scraped it since the last update,
        keep serving until it has, ``linger_s`` at most. So a stage's final values reach Prometheus, and so does
        a stage shorter than discovery's refresh plus one scrape interval; an exporter nobody watches closes at
        once."""
        if linger_s > 0 and self._httpd is not None:
            self._linger(linger_s)
        if self.registration is not None:
            self.registration.close()
            self.registration = None
        if self.sd_file:
            try:
                os.unlink(self.sd_file)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("telemetry: could not remove %s: %s", self.sd_file, e)
            self.sd_file = None
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _linger(self, linger_s: float) -> None:
        scraped = lambda: self._scraped_version == self._version  # noqa: E731 (the latest values were collected)
        if scraped():
            return
        watched = self._scraped_version >= 0 or (
            self.registration is not None and self.registration.watched(WATCHED_WITHIN_S)) or self._folder_watched()
        if not watched:
            return
        t0 = time.monotonic()
        while not scraped() and time.monotonic() - t0 < linger_s:
            time.sleep(0.05)
        if scraped():
            time.sleep(LINGER_GRACE_S)  # the collected values are still being written to Prometheus
            log.info("telemetry: rank %d's final values scraped %.1fs after the stage ended", self.rank,
                     time.monotonic() - t0)
        else:
            log.info("telemetry: rank %d not scraped within %.0fs of the stage's end; its final values may be "
                     "missing in Prometheus", self.rank, linger_s)

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def target(self) -> str | None:
        """``host:port`` Prometheus scrapes, or None without exporter."""
        if self.port is None:
            return None
        host = self.host
        if host in ("0.0.0.0", "::", ""):  # bound everywhere: advertise a routable name
            host = socket.getfqdn()
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    # --- internals -----------------------------------------------------------------------

    def _serve(self, port: int | None) -> None:
        if port is None:
            log.info("telemetry: no port configured, metrics are not exported (rank %d)", self.rank)
            return
        for attempt in (port, 0):  # 0: let the OS pick a free port; file_sd advertises it
            try:
                self._httpd, _ = start_http_server(attempt, addr=self.host, registry=self.registry)
            except OSError as e:
                if attempt != 0:
                    log.warning("telemetry: port %s:%d unavailable (%s), trying a free port",
                                self.host, attempt, e)
                else:
                    log.error("telemetry: cannot serve on %s (%s); training continues without "
                              "exporter (rank %d)", self.host, e, self.rank)
                continue
            except Exception:  # never let monitoring stop training
                log.exception("telemetry: exporter failed to start (rank %d)", self.rank)
                return
            self.port = self._httpd.server_address[1]
            log.info("telemetry: rank %d serving http://%s/metrics", self.rank, self.target)
            return

    @property
    def sd_labels(self) -> dict[str, str]:
        """Labels every discovery way attaches to the target (also on ``up`` and ``facesr_process_*``)."""
        return {"run": self.run, "node": self.node, "rank": str(self.rank)}

    def _register(self) -> None:
        from .discovery import Registration

        self.registration = Registration.join(f"{self.run}/{self.node}/r{self.rank}", self.target, self.sd_labels)

    def _folder_watched(self) -> bool:
        """Whether an exporter of this one's file_sd folder was scraped within ``WATCHED_WITHIN_S``."""
        if not self.sd_file:
            return False
        try:
            age = time.time() - Path(self.sd_file).with_name(SCRAPED_MARK).stat().st_mtime
        except OSError:
            return False
        return age < WATCHED_WITHIN_S

    def _mark_scraped(self) -> None:
        """Touch the file_sd folder's SCRAPED_MARK (at most every ``MARK_EVERY_S``): a Prometheus reads it."""
        now = time.monotonic()
        if not self.sd_file or now - self._marked < MARK_EVERY_S:
            return
        self._marked = now
        try:
            Path(self.sd_file).with_name(SCRAPED_MARK).touch()
        except OSError:
            pass  # a read-only or vanished folder: the exporter only lingers less

    def _advertise(self, sd_dir: str) -> None:
        safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]", "_", str(s))  # noqa: E731
        path = os.path.join(sd_dir, f"{safe(self.run)}-{safe(self.node)}-r{self.rank}.json")
        try:
            write_sd_file(path, [self.target], self.sd_labels)
            self.sd_file = path
        except OSError as e:
            log.error("telemetry: cannot write discovery file %s: %s", path, e)

    def _families(self) -> list[Metric]:
        with self._lock:
            values = dict(self._values)
            last_log = dict(self._last_log)
            totals = dict(self._totals)
            hists = {k: list(v) for k, v in self._hist.items()}
            stage = self.stage
            checkpoint_time = self._checkpoint_time
            self._scraped_version = self._version
        self._mark_scraped()
        base = [self.run, stage, self.node, str(self.rank)]
        families: dict[str, Metric] = {}

        def family(name: str, labels: tuple[str, ...], counter: bool = False) -> Metric | None:
            if name not in families:
                short = name[len(PREFIX) + 1:]
                kind = CounterMetricFamily if counter else GaugeMetricFamily
                families[name] = kind(name, HELP.get(short, f"facesr metric {short}."),
                                      labels=BASE_LABELS + labels)
                families[name]._facesr_labels = labels
            if families[name]._facesr_labels != labels:  # e.g. "ssim" logged beside "ssim/x2"
                if name not in self._bad_keys:
                    self._bad_keys.add(name)
                    log.warning("telemetry: %s logged with and without a scale; dropping one", name)
                return None
            return families[name]

        for (name, scale, split), value in sorted(values.items(), key=lambda kv: str(kv[0])):
            counter = name[len(PREFIX) + 1:] in COUNTERS
            labels, label_values = (("split",), [split]) if scale is None else (
                ("scale", "split"), [scale, split])
            fam = family(name, labels, counter)
            if fam is not None:
                fam.add_metric(base + label_values, value)
        for (name, split), total in sorted(totals.items()):
            family(name, ("split",), counter=True).add_metric(base + [split], total)
        for (name, split), h in sorted(hists.items()):
            if name not in families:
                families[name] = HistogramMetricFamily(name, HELP.get(name[len(PREFIX) + 1:], name),
                                                       labels=BASE_LABELS + ("split",))
                families[name]._facesr_labels = ("split",)
            buckets = [(repr(le), h[i]) for i, le in enumerate(STEP_BUCKETS)] + [("+Inf", h[len(STEP_BUCKETS)])]
            families[name].add_metric(base + [split], buckets, h[-1])
        for split, t in last_log.items():
            family(f"{PREFIX}_last_log_timestamp_seconds", ("split",)).add_metric(base + [split], t)
        family(f"{PREFIX}_last_checkpoint_timestamp_seconds", ()).add_metric(base, checkpoint_time)
        family(f"{PREFIX}_restarts", (), counter=True).add_metric(base, float(self.restarts))
        return list(families.values())


def _close_ref(ref: "weakref.ref[Telemetry]") -> None:
    tel = ref()
    if tel is not None:
        tel.close()


__all__ = ["Telemetry", "node_ip", "metric_name", "write_sd_file"]
