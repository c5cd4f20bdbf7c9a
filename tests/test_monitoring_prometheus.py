"""End to end against a real Prometheus: exporters of a short run -> file_sd -> every dashboard query.

Debian's ``prometheus`` (installed at session start, tests/system.py) runs on loopback with
cluster/prometheus/prometheus.yml rendered to a temporary discovery dir and a 1 s scrape
interval (tests/conftest.py's ``prometheus``) while the session's training job runs (``monitored_job``, which
tests/test_train.py checks as a job); every PromQL query of the Grafana dashboard is then evaluated over the
job's time window through /api/v1/query_range (as Grafana does).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cluster import monitor
from cluster.summary import write_summary
from facesr.vocab import SCALES
from tests.conftest import needs_system

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "cluster" / "grafana" / "dashboards" / "facesr.json"
# The run being monitored: the session's `monitored_job` (tests/conftest.py), a real short CPU training (Ray
# Train + DeepSpeed, both stages, 2 workers) on tiny real shards, submitted as a Ray job
WORKERS = 2
RUN = "job"
PER_SCALE = re.compile(r"\bfacesr_(ssim|ce|acc|psnr)\b")  # families labelled by scale
RATE_INTERVAL = "10s"  # $__rate_interval for a 1 s scrape interval

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def panels(dashboard: dict) -> list[dict]:
    """Every non-row panel, including those folded inside collapsed rows."""
    out = []
    for p in dashboard["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, expr) for every query target of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in panels(dash) for t in p["targets"]]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($v, ${v}, [[v]]) as the dashboard would with these choices."""
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr}")
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]", repl, expr)


VARIABLES = {"run": RUN,  # no regex metacharacters in RUN
             "stage": ".*", "node": ".*", "rank": ".*",
             "__rate_interval": RATE_INTERVAL, "__interval": "1s"}


def api(url: str, path: str, **params) -> dict:
    query = urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # 400/422 carry Prometheus' parse error: show it
        raise AssertionError(f"{path} {params}: {e.code} {e.read().decode()}") from None
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture(scope="module")
def run_window(monitored_job):
    """The session's monitored job (tests/conftest.py: both stages, 2 workers, `ray job submit`, exporters
    found by the session's ``prometheus`` through its file_sd folder): (t_start, t_end, run_dir)."""
    t_start, t_end = monitored_job["window"]
    return t_start, t_end, monitored_job["run"]


def test_rendered_config_is_valid(prometheus, tmp_path):
    """promtool accepts the project's config once rendered with other paths and interval."""
    needs_system("promtool")
    promtool = shutil.which("promtool")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(monitor.render_config(str(tmp_path), scrape_interval="1s"))
    out = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("title,expr", dashboard_queries(), ids=[t for t, _ in dashboard_queries()])
def test_dashboard_query_returns_series(prometheus, run_window, title, expr):
    """Each dashboard query returns series during the run: for every scale if per-scale, for
    every rank if per-rank (each worker's exporter was discovered)."""
    url = prometheus[0]
    t_start, t_end, _ = run_window
    data = api(url, "query_range", query=substitute(expr, VARIABLES),
               start=f"{t_start:.3f}", end=f"{t_end:.3f}", step="1s")
    series = data["result"]
    assert series, f"{title}: no series for {substitute(expr, VARIABLES)}"
    if PER_SCALE.search(expr):
        scales = {s["metric"].get("scale") for s in series}
        want = {"x8"} if 'stage="gate"' in expr else set(SCALES)  # the detail gate (stage 3) scores x8 only
        assert scales == want, f"{title}: scales {scales}"
    ranks = {s["metric"]["rank"] for s in series if "rank" in s["metric"]}
    if ranks:
        assert ranks == {str(r) for r in range(WORKERS)}, f"{title}: ranks {ranks}"


def test_dashboard_variables_resolve(prometheus, run_window):
    """Each template variable's label_values() lists this run's values (all three stages, all ranks)."""
    url = prometheus[0]
    t_start, t_end, _ = run_window
    dash = json.loads(DASHBOARD.read_text())
    expected = {"run": {RUN}, "stage": {"prior", "sr", "gate"}, "rank": {str(r) for r in range(WORKERS)}}
    for var in (v for v in dash["templating"]["list"] if v["type"] == "query"):  # not the datasource picker
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
        assert m, var["query"]
        selector, label = substitute(m.group(1), VARIABLES), m.group(2)
        values = set(api(url, f"label/{label}/values", **{"match[]": selector},
                         start=f"{t_start:.3f}", end=f"{t_end:.3f}"))
        assert values >= expected.get(label, set()) and values, (var["name"], values)


def test_exporters_withdraw_after_run(prometheus, run_window):
    """Closed exporters remove their file_sd files, so finished runs are not scraped forever."""
    _, sd_dir, _ = prometheus
    assert list(sd_dir.glob("*.json")) == []


def test_summary_of_monitored_run(run_window):
    """The run folder's metrics.jsonl from the same run yields summary.md and summary.png."""
    _, _, run_dir = run_window
    md, png = write_summary(run_dir)
    text = md.read_text()
    assert all(f"| {s} |" in text for s in SCALES)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def facesr_targets(url: str, run: str) -> list[dict]:
    """Prometheus' active targets of the facesr job that carry ``run``."""
    return [t for t in api(url, "targets", state="active")["activeTargets"]
            if t["labels"].get("job") == "facesr" and t["labels"].get("run") == run]


def wait_until(ok, what: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := ok():
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def test_http_sd_finds_exporters_without_a_shared_folder(prometheus):
    """Exporters advertised only in the registry's HTTP SD table (cluster/discovery.py) are scraped with their
    run/node/rank labels; one advertised both ways is one target; a withdrawn entry leaves Prometheus."""
    from cluster.telemetry import Telemetry

    url, sd_dir, table = prometheus
    run = "http-sd"
    # rank 0 only in the HTTP SD table (no folder); rank 1 also in the file_sd folder
    tels = [Telemetry(run, "sr", rank, f"n{rank}", port=0, sd_dir=str(sd_dir) if rank else None) for rank in (0, 1)]
    keys = [f"{run}/{t.node}/r{t.rank}" for t in tels]
    try:
        for t, key in zip(tels, keys):
            t.log({"loss": 0.5 + t.rank, "step": 3}, split="train")
            table.put(key, t.target, t.sd_labels)
        loss = lambda: api(url, "query", query=f'facesr_loss{{run="{run}"}}')["result"]  # noqa: E731
        series = wait_until(lambda: len(loss()) == 2 and loss(), "both exporters scraped")
        assert {(s["metric"]["rank"], s["metric"]["node"], float(s["value"][1])) for s in series} == {
            ("0", "n0", 0.5), ("1", "n1", 1.5)}
        targets = facesr_targets(url, run)
        assert len(targets) == 2 and all(t["health"] == "up" for t in targets), targets
        assert {t["scrapeUrl"] for t in targets} == {f"http://{t.target}/metrics" for t in tels}
        table.drop(keys[0])
        wait_until(lambda: [t["labels"]["rank"] for t in facesr_targets(url, run)] == ["1"], "rank 0 withdrawn")
    finally:
        for t, key in zip(tels, keys):
            table.drop(key)
            t.close()


def test_a_stage_s_final_values_reach_prometheus_before_its_exporter_closes(prometheus):
    """An exporter Prometheus scrapes gets its stage's final values and is closed right away (as a worker does
    at the stage's end, with run.telemetry_linger_s): it keeps serving until Prometheus has scraped them."""
    from cluster.telemetry import Telemetry

    url, sd_dir, _ = prometheus
    run = "linger"
    tel = Telemetry(run, "prior", 0, "n0", port=0, sd_dir=str(sd_dir))
    loss = lambda: api(url, "query", query=f'facesr_loss{{run="{run}"}}')["result"]  # noqa: E731
    try:
        tel.log({"loss": 0.75, "step": 1}, split="train")
        wait_until(lambda: loss(), "the exporter scraped")
        t0 = time.time()
        tel.log({"loss": 0.125, "step": 2}, split="train")  # the last step's values, then the stage ends
    finally:
        tel.close(linger_s=30)
    series = api(url, "query_range", query=f'facesr_loss{{run="{run}"}}', start=f"{t0 - 5:.3f}",
                 end=f"{time.time():.3f}", step="0.5")["result"]
    values = {float(v) for s in series for _, v in s["values"]}
    assert 0.125 in values, values


def test_monitor_started_in_the_background_stops_with_its_prometheus_on_sigterm(tmp_path):
    """`python -m cluster.monitor` (`make monitor`) started as a background job is (SIGINT ignored, as a
    non-interactive shell starts `cmd &`): SIGTERM ends it, and the Prometheus it started with it, at once."""
    import os
    import signal
    import sys

    needs_system("prometheus")
    port = monitor.free_port()
    log = tmp_path / "monitor.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.monitor", "--address=none", f"--port={port}",
                                 f"--sd-dir={tmp_path / 'sd'}", f"--data-dir={tmp_path / 'data'}",
                                 f"--ray-sd-file={tmp_path / 'ray_sd.json'}"], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_until(lambda: "Prometheus: http" in log.read_text() or proc.poll() is not None, "monitor ready")
        assert proc.poll() is None, log.read_text()[-2000:]
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert children, "no Prometheus under the monitor"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
        for pid in children:  # Prometheus gone too (its zombie reaped by the monitor's wait)
            assert not Path(f"/proc/{pid}").exists(), log.read_text()[-2000:]
    finally:
        try:  # whatever is left of the monitor's process group (an orphaned Prometheus when the test fails)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
