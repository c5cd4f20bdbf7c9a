"""Start a local Prometheus with the project's configuration (``make monitor``).

    python -m cluster.monitor [--port 9090] [--address auto | ADDRESS | none] [--sd-url URL]
                              [--sd-dir runs/prometheus_sd] [--scrape-interval 5s] [--data-dir runs/prometheus]

Finds the training workers' exporters two ways, both rendered into cluster/prometheus/prometheus.yml:
* HTTP SD from the Ray cluster's target registry (cluster/discovery.py; no shared folder needed): joins the
  Ray cluster at ``--address`` (default ``RAY_ADDRESS``, else ``auto``: one started on this machine with
  ``ray start``, e.g. on the head), starts the registry there if the cluster has none, and disconnects; or
  ``--sd-url`` names the registry directly. Without a reachable cluster, says so and goes on with file_sd.
* file_sd from ``--sd-dir`` (a folder every worker writes to: one machine, or a shared mount).
Then starts ``prometheus`` bound to ``--host`` (loopback by default), prints the URL and runs in the
foreground until Ctrl-C or SIGTERM, which stop Prometheus with it. The tests start Prometheus through the same
functions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

CONFIG = Path(__file__).parent / "prometheus" / "prometheus.yml"
RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"  # Ray keeps it current on the head
SD_DIR = "runs/prometheus_sd"  # <cluster.storage_path>/prometheus_sd with the default storage_path


def render_config(sd_dir: str | None, ray_sd_file: str = RAY_SD_FILE, scrape_interval: str | None = None,
                  src: Path = CONFIG, *, sd_url: str | None = None) -> str:
    """The project's Prometheus config with the discovery sources and interval replaced: file_sd over
    ``sd_dir``, HTTP SD from ``sd_url`` (the registry); a source given as None is left out."""
    cfg = yaml.safe_load(src.read_text())
    if scrape_interval:
        cfg["global"]["scrape_interval"] = scrape_interval
        cfg["global"]["evaluation_interval"] = scrape_interval
        cfg["global"]["scrape_timeout"] = scrape_interval
    files = {"facesr": os.path.join(os.path.abspath(sd_dir), "*.json") if sd_dir else None, "ray": ray_sd_file}
    for job in cfg["scrape_configs"]:
        if job["job_name"] in files:
            _set_source(job, "file_sd_configs", "files", [files[job["job_name"]]] if files[job["job_name"]] else None)
        if job["job_name"] == "facesr":
            _set_source(job, "http_sd_configs", "url", sd_url)
            for sd in job.get("http_sd_configs", []):
                if scrape_interval:  # a test or a local watch wants new workers seen within an interval
                    sd["refresh_interval"] = scrape_interval
    return yaml.safe_dump(cfg, sort_keys=False)


def _set_source(job: dict, kind: str, key: str, value) -> None:
    """Point the job's (single) ``kind`` discovery entry at ``value``, or drop it when ``value`` is None."""
    if value is None:
        job.pop(kind, None)
    else:
        for sd in job.get(kind, []):
            sd[key] = value


def registry_url(address: str, port: int | None = None) -> str | None:
    """Join the Ray cluster at ``address``, make sure it runs the target registry, disconnect; its URL, or None
    (with a line on stderr) when no cluster answers there."""
    import ray

    from .discovery import PORT, ensure_registry
    from .ray_connect import connect

    try:
        connect(address)
    except ConnectionError as e:
        print(f"monitor: no Ray cluster at {address!r} ({e}); discovery by file_sd only", file=sys.stderr)
        return None
    try:
        return ensure_registry(port or PORT)
    finally:
        ray.shutdown()  # the registry is detached: it stays with the cluster


def prometheus_binary(install: bool = False) -> str:
    """Path of ``prometheus``; with ``install`` and root, apt-get installs Debian's package."""
    path = shutil.which("prometheus")
    if path is None and install and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "prometheus"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        path = shutil.which("prometheus")
    if path is None:
        raise FileNotFoundError("prometheus not found: apt-get install prometheus (Debian/Ubuntu)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(config_text: str, data_dir: str, host: str = "127.0.0.1", port: int = 9090,
          install: bool = False, log_file=None) -> subprocess.Popen:
    """Write the config into ``data_dir`` and start Prometheus on ``host:port``."""
    data = Path(data_dir)
    (data / "tsdb").mkdir(parents=True, exist_ok=True)
    config = data / "prometheus.yml"
    config.write_text(config_text)
    cmd = [prometheus_binary(install), f"--config.file={config}",
           f"--storage.tsdb.path={data / 'tsdb'}", f"--web.listen-address={host}:{port}",
           "--storage.tsdb.retention.time=30d"]
    return subprocess.Popen(cmd, stdout=log_file or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if log_file else subprocess.DEVNULL)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Block until Prometheus answers /-/ready, or raise if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"prometheus not ready at {url} after {timeout:.0f}s")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "auto",
                   help="Ray cluster whose target registry to poll (auto: the one started here); none: file_sd only")
    p.add_argument("--sd-url", default=None, help="the registry's URL (skips joining Ray)")
    p.add_argument("--sd-port", type=int, default=None, help="port for the registry if it must be started")
    p.add_argument("--sd-dir", default=SD_DIR, help="facesr file_sd dir (one machine or a shared mount); '' = none")
    p.add_argument("--ray-sd-file", default=RAY_SD_FILE)
    p.add_argument("--scrape-interval", default="5s", help="5s suits watching a local run")
    p.add_argument("--data-dir", default="runs/prometheus")
    p.add_argument("--install", action="store_true", help="apt-get install prometheus if missing")
    args = p.parse_args(argv)

    url = args.sd_url or (registry_url(args.address, args.sd_port) if args.address != "none" else None)
    if args.sd_dir:
        os.makedirs(args.sd_dir, exist_ok=True)
    text = render_config(args.sd_dir or None, args.ray_sd_file, args.scrape_interval, sd_url=url)
    proc = start(text, args.data_dir, args.host, args.port, args.install, log_file=sys.stderr)
    prom = f"http://{args.host}:{args.port}"
    found = " and ".join(x for x in (url and f"registry {url}", args.sd_dir and f"{args.sd_dir}/*.json") if x)
    # SIGTERM (a supervisor's or a script's stop; the one a background job still hears, as it starts with SIGINT
    # ignored) ends Prometheus too, as Ctrl-C does
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        wait_ready(prom, proc)
        print(f"Prometheus: {prom}  (targets: {prom}/targets)\n"
              f"  discovery: {found or 'none'}  config: {args.data_dir}/prometheus.yml\n"
              f"  Grafana: provision cluster/grafana/ with FACESR_PROMETHEUS_URL={prom}", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
