"""Prometheus discovery without a shared folder: a target registry on the Ray head, served as HTTP SD.

    head node ── TargetRegistry (detached Ray actor "facesr/prometheus-sd", no CPU reserved)
                 GET http://<head ip>:<port>/targets  ->  [{"targets": ["10.0.0.7:9400"], "labels": {...}}, ...]
    every node ─ training workers' exporters (cluster/telemetry.py) register host:port + labels with it
                 through Ray (token-authenticated), and renew the registration every TTL_S / 3 seconds
    Prometheus ─ http_sd_configs: [{url: http://<head ip>:<port>/targets}]  (``make monitor`` renders it)

Why this and not the alternatives. file_sd needs every worker to write into a folder Prometheus reads, i.e.
a mount shared by all nodes; clusters with object storage only have none. Ray's own discovery file
(``/tmp/ray/prom_metrics_service_discovery.json`` on the head) lists each node's Ray metrics agent, which
serves only metrics sent through ``ray.util.metrics``: our exporters (checkpoint age computed at scrape time,
``facesr_*`` names, telemetry.py says why) are not in it, and it is a file on the head, so Prometheus
would have to run there. An HTTP SD endpoint is what Prometheus polls natively (``http_sd_configs``); a
named Ray actor gives it a fixed place (the head, which lives as long as the cluster) that every worker
finds by name with no address to configure, and registration rides on Ray's authenticated channel: the
HTTP side only serves the list (read-only, bound to the head's cluster address like the exporters).

Lifetime. The registry is detached: one serves every run on the cluster until the cluster goes down (on a
new local Ray, until that Ray stops). It is created by whoever needs it first (the training driver, or
``python -m cluster.monitor`` / ``make monitor``); ``get_if_exists`` makes the others find that one. An
entry expires ``TTL_S`` after its last renewal, so a worker killed hard (or a lost node) drops out of
discovery within a minute instead of lingering as a dead target; a registry restarted after a crash is
refilled by the next renewals. file_sd stays available where a shared folder exists (telemetry.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Mapping

log = logging.getLogger(__name__)

NAME, NAMESPACE = "prometheus-sd", "facesr"  # the registry actor, found by name from any job
PORT = 9095  # default port on the head (next to Prometheus' 9090 and Pushgateway's 9091)
PATH = "/targets"
TTL_S = 60.0  # an entry not renewed for this long is dropped (renewed every TTL_S / 3)


class TargetTable:
    """Targets by key (``<run>/<node>/r<rank>``), each with labels and an expiry time; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[str, dict[str, str], float]] = {}
        self._polled: float | None = None  # time.monotonic() of Prometheus' last GET, None before the first

    def polled(self) -> None:
        """Note a poll by Prometheus (the HTTP side calls this for every GET of the list)."""
        self._polled = time.monotonic()

    def last_poll_age(self) -> float | None:
        """Seconds since Prometheus last polled the list, None if it never has: whether anyone watches."""
        return None if self._polled is None else time.monotonic() - self._polled

    def put(self, key: str, target: str, labels: Mapping[str, str], ttl_s: float = TTL_S) -> None:
        with self._lock:
            self._entries[key] = (target, {k: str(v) for k, v in labels.items()}, time.monotonic() + ttl_s)

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def groups(self) -> list[dict]:
        """Prometheus' HTTP SD (and file_sd) format: one target group per live entry, sorted by key."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (_, _, until) in self._entries.items() if until <= now]:
                del self._entries[key]
            return [{"targets": [target], "labels": labels}
                    for _, (target, labels, _) in sorted(self._entries.items())]


class SDServer:
    """Serves a TargetTable at ``http://host:port/targets`` (JSON, as Prometheus' http_sd_configs wants)."""

    def __init__(self, table: TargetTable, host: str, port: int = PORT):
        self.table = table

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != PATH:
                    self.send_error(404, f"only {PATH} is served here")
                    return
                table.polled()
                body = json.dumps(table.groups()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # one line per Prometheus poll is noise
                pass

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            if port == 0:
                raise
            log.warning("discovery: port %s:%d unavailable (%s); serving on a free port", host, port, e)
            self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="prometheus-sd", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}{PATH}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class TargetRegistry:
    """The Ray actor body: a TargetTable served on this node's cluster address (the head's)."""

    def __init__(self, port: int = PORT):
        import ray

        self.table = TargetTable()
        self.server = SDServer(self.table, ray.util.get_node_ip_address(), port)

    def url(self) -> str:
        return self.server.url

    def register(self, key: str, target: str, labels: dict, ttl_s: float = TTL_S) -> None:
        self.table.put(key, target, labels, ttl_s)

    def withdraw(self, key: str) -> None:
        self.table.drop(key)

    def groups(self) -> list[dict]:
        return self.table.groups()

    def last_poll_age(self) -> float | None:
        return self.table.last_poll_age()


def ensure_registry(port: int = PORT) -> str:
    """The registry's URL, starting it on the head node first if this Ray cluster has none (Ray initialised)."""
    import ray

    actor = ray.remote(TargetRegistry).options(
        name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, resources={"node:__internal_head__": 0.001},  # on the head, which lives as long as the cluster
        max_restarts=-1, max_concurrency=16,  # a crashed one comes back empty and is refilled by the renewals
    ).remote(port)
    return ray.get(actor.url.remote(), timeout=120)


def find_registry():
    """The registry actor's handle, or None when this Ray cluster has none (or Ray is not initialised)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except (ImportError, ValueError):  # ValueError: no actor of that name
        return None


class Registration:
    """One exporter's entry in the registry, renewed from a daemon thread until ``close()``."""

    def __init__(self, registry, key: str, target: str, labels: Mapping[str, str], ttl_s: float = TTL_S):
        import ray

        self._ray, self.registry, self.key, self.ttl_s = ray, registry, key, ttl_s
        self._args = (key, target, dict(labels), ttl_s)
        self._stop = threading.Event()
        self._failing = False
        ray.get(registry.register.remote(*self._args), timeout=30)  # first one synchronous: errors surface here
        self._thread = threading.Thread(target=self._renew, name=f"sd-renew-{key}", daemon=True)
        self._thread.start()

    @classmethod
    def join(cls, key: str, target: str, labels: Mapping[str, str], ttl_s: float = TTL_S) -> "Registration | None":
        """Register with this cluster's registry; None (logged) when there is none or it cannot be reached."""
        registry = find_registry()
        if registry is None:
            log.info("discovery: no Prometheus registry on this Ray cluster; %s is not advertised there", target)
            return None
        try:
            return cls(registry, key, target, labels, ttl_s)
        except Exception as e:  # monitoring never stops training
            log.warning("discovery: could not register %s with the registry: %s", target, e)
            return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._ray.get(self.registry.register.remote(*self._args), timeout=self.ttl_s / 3)
                if self._failing:
                    log.info("discovery: registration of %s renewed again", self.key)
                self._failing = False
            except Exception as e:  # registry restarting or head unreachable: retried at the next renewal
                if not self._failing:
                    log.warning("discovery: could not renew %s: %s", self.key, e)
                self._failing = True

    def watched(self, within_s: float) -> bool:
        """Whether a Prometheus polled the registry in the last ``within_s`` seconds (False if it cannot be asked)."""
        try:
            age = self._ray.get(self.registry.last_poll_age.remote(), timeout=10)
        except Exception as e:
            log.info("discovery: could not ask the registry whether Prometheus polls it: %s", e)
            return False
        return age is not None and age <= within_s

    def close(self) -> None:
        """Stop renewing and withdraw the entry (best effort: else it expires after ``ttl_s``)."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._ray.get(self.registry.withdraw.remote(self.key), timeout=10)
        except Exception as e:
            log.info("discovery: could not withdraw %s (it expires in %.0fs): %s", self.key, self.ttl_s, e)


__all__ = ["TargetTable", "SDServer", "TargetRegistry", "Registration", "ensure_registry", "find_registry",
           "NAME", "NAMESPACE", "PORT", "PATH", "TTL_S"]
