"""cluster.telemetry on its own: names, labels, ports, discovery files; real HTTP scrapes."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.telemetry import Telemetry, metric_name
from facesr.vocab import SCALES


def scrape(tel: Telemetry) -> dict[str, list]:
    """family name -> samples, read over HTTP like Prometheus does."""
    with urllib.request.urlopen(f"http://{tel.target}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.fixture
def tel(tmp_path):
    t = Telemetry(run="r", stage="sr", rank=1, node="n0", port=0, sd_dir=str(tmp_path / "sd"))
    yield t
    t.close()


@pytest.mark.parametrize("key,expected", [
    ("ssim/x8", ("facesr_ssim", "x8")),
    ("ce/x2", ("facesr_ce", "x2")),
    ("acc/x4", ("facesr_acc", "x4")),
    ("loss", ("facesr_loss", None)),
    ("lr", ("facesr_learning_rate", None)),
    ("samples", ("facesr_samples", None)),
    ("step_time_s", ("facesr_step_seconds", None)),
    ("data_wait_fraction", ("facesr_data_wait_ratio", None)),
    ("mfu", ("facesr_mfu_ratio", None)),
    ("data_wait_s", ("facesr_data_wait_seconds", None)),
    ("grad/norm", ("facesr_grad_norm", None)),
])
def test_metric_name(key, expected):
    """Loss-dict keys map to facesr_ names, '/<scale>' to a scale label, units to base units."""
    assert metric_name(key) == expected


def test_log_exports_every_scale_with_labels(tel):
    """Logged values are scraped with run/stage/node/rank/split and scale labels."""
    tel.log({f"ssim/{s}": 0.5 + i / 10 for i, s in enumerate(SCALES)} | {"loss": 0.3, "lr": 1e-3},
            split="val")
    fams = scrape(tel)
    ssim = {s.labels["scale"]: s for s in fams["facesr_ssim"]}
    assert set(ssim) == set(SCALES)
    assert ssim["x4"].value == pytest.approx(0.6)
    assert ssim["x8"].labels == {"run": "r", "stage": "sr", "node": "n0", "rank": "1",
                                 "scale": "x8", "split": "val"}
    assert fams["facesr_learning_rate"][0].value == pytest.approx(1e-3)


def test_bookkeeping_and_non_numeric_values_are_ignored(tel, caplog):
    """The metrics.jsonl row can be passed as is: stage/split/time and strings are skipped."""
    with caplog.at_level(logging.WARNING, logger="cluster.telemetry"):
        tel.log({"stage": "sr", "split": "train", "time": 1.0, "note": "hi", "step": 7}, "train")
        tel.log({"note": "again"}, "train")
    fams = scrape(tel)
    assert "facesr_time" not in fams and "facesr_note" not in fams
    assert fams["facesr_step"][0].value == 7
    assert sum("note" in r.message for r in caplog.records) == 1  # warned once, not per step


def test_decode_errors_and_restarts_are_counters(tmp_path):
    """decode_errors (cumulative) and restarts are exported as *_total counters."""
    with Telemetry("r", "sr", 0, "n0", port=0, restarts=2) as t:
        t.restart()
        t.log({"decode_errors": 5}, "train")
        fams = scrape(t)
    assert [s.value for s in fams["facesr_decode_errors"] if s.name.endswith("_total")] == [5]
    assert [s.value for s in fams["facesr_restarts"] if s.name.endswith("_total")] == [3]


def test_samples_are_a_counter_and_the_precomputed_rate_is_not_exported(tel):
    """Each log's ``samples`` adds to facesr_samples_total (rate() gives throughput); metrics.jsonl's
    samples_per_s is not exported beside it."""
    tel.log({"samples": 80, "samples_per_s": 8.0, "step": 10}, "train")
    tel.log({"samples": 40, "samples_per_s": 4.0, "step": 15}, "train")
    fams = scrape(tel)
    assert [(s.name, s.value) for s in fams["facesr_samples"] if s.name.endswith("_total")] == \
        [("facesr_samples_total", 120)]
    assert not any("samples_per" in name for name in fams)


def test_step_time_is_a_histogram_observed_once_per_step_of_the_interval(tel):
    """A log's mean step time counts once for each step since the previous log (the step key's advance):
    count = steps, sum = their time, and each bucket holds the intervals whose mean fits under it."""
    tel.log({"step_time_s": 0.3, "step": 10}, "train")  # first log: one observation
    tel.log({"step_time_s": 0.02, "step": 20}, "train")  # ten steps of 0.02 s
    tel.log({"step_time_s": 4.0, "step": 25}, "train")  # five of 4 s
    samples = {(s.name, s.labels.get("le")): s.value for s in scrape(tel)["facesr_step_seconds"]}
    assert samples[("facesr_step_seconds_count", None)] == 16
    assert samples[("facesr_step_seconds_sum", None)] == pytest.approx(0.3 + 10 * 0.02 + 5 * 4.0)
    assert samples[("facesr_step_seconds_bucket", "0.025")] == 10
    assert samples[("facesr_step_seconds_bucket", "0.5")] == 11
    assert samples[("facesr_step_seconds_bucket", "5.0")] == 16 == samples[("facesr_step_seconds_bucket", "+Inf")]
    assert not any(name.startswith("facesr_step_time") for name in scrape(tel))


def test_standard_process_metrics_keep_their_names(tel):
    """The process collector's series are process_*, as every Prometheus dashboard and alert expects."""
    fams = scrape(tel)
    assert "process_resident_memory_bytes" in fams and "process_cpu_seconds" in fams
    assert not any(name.startswith("facesr_process") for name in fams)


class _WallClock:
    """Stands in for the ``time`` module where a test moves the wall clock itself."""

    def __init__(self, now: list[float]):
        self.now = now

    def time(self) -> float:
        return self.now[0]

    def __getattr__(self, name):
        return getattr(time, name)


def test_last_checkpoint_is_a_timestamp(tel, monkeypatch):
    """facesr_last_checkpoint_timestamp_seconds is the exporter's start until the first checkpoint_saved(),
    then the time of the latest one; it does not move between checkpoints (the age is time() - it)."""
    from cluster import telemetry

    def stamp():
        return scrape(tel)["facesr_last_checkpoint_timestamp_seconds"][0].value
    started = stamp()
    assert abs(started - time.time()) < 600
    now = [started + 1000.0]  # wall clock moved by hand: no margin for a slow scrape on a loaded machine
    monkeypatch.setattr(telemetry, "time", _WallClock(now))
    assert stamp() == started
    tel.checkpoint_saved()
    now[0] += 42.0
    assert stamp() == started + 1000.0 == stamp()
    tel.checkpoint_saved()
    assert stamp() == started + 1042.0


def test_set_stage_drops_previous_stage_series(tel):
    """After set_stage, only the new stage's values are exported."""
    tel.log({"acc/x2": 0.9}, "train")
    tel.set_stage("prior2")
    tel.log({"loss": 1.0}, "train")
    fams = scrape(tel)
    assert "facesr_acc" not in fams
    assert fams["facesr_loss"][0].labels["stage"] == "prior2"


def test_busy_port_falls_back_and_advertises_real_port(tmp_path, caplog):
    """A port in use is logged and replaced by a free one, which the file_sd file advertises."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="cluster.telemetry"):
            t = Telemetry("r", "sr", 0, "n0", port=taken, sd_dir=str(tmp_path))
        try:
            assert t.port not in (None, taken)
            assert "unavailable" in caplog.text
            [group] = json.loads((tmp_path / "r-n0-r0.json").read_text())
            assert group["targets"] == [f"127.0.0.1:{t.port}"]
            assert group["labels"] == {"run": "r", "node": "n0", "rank": "0"}
            assert "facesr_last_checkpoint_timestamp_seconds" in scrape(t)
        finally:
            t.close()


def test_ranks_get_their_own_ports(tmp_path):
    """base_port + local rank gives each worker of a node its own exporter and file."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    tels = [Telemetry("r", "sr", rank, "n0", port=base + rank, sd_dir=str(tmp_path))
            for rank in range(2)]
    try:
        assert len({t.port for t in tels}) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r-n0-r0.json", "r-n0-r1.json"]
    finally:
        for t in tels:
            t.close()


@pytest.mark.parametrize("port,host,message", [
    (None, "127.0.0.1", "no port configured"),
    (0, "192.0.2.1", "cannot serve"),  # TEST-NET address: not an interface of this machine
])
def test_no_exporter_never_breaks_training(tmp_path, caplog, port, host, message):
    """Without a usable port the loop's calls still work; the reason is logged; nothing advertised."""
    with caplog.at_level(logging.INFO, logger="cluster.telemetry"):
        t = Telemetry("r", "sr", 0, "n0", port=port, host=host, sd_dir=str(tmp_path))
    assert t.port is None and t.target is None
    t.log({"loss": 1.0, "ssim/x2": 0.5}, "train")
    t.checkpoint_saved()
    t.restart()
    t.close()
    assert message in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_discovery_file_written_atomically_and_removed(tel, tmp_path):
    """Only the finished *.json is ever visible (no temp leftovers); close() removes it; twice is fine."""
    sd = tmp_path / "sd"
    assert [p.name for p in sd.iterdir()] == ["r-n0-r1.json"]
    assert json.loads((sd / "r-n0-r1.json").read_text())[0]["targets"] == [tel.target]
    tel.close()
    tel.close()
    assert list(sd.iterdir()) == []


class _Clock:
    """Stands in for the ``time`` module where a test moves the monotonic clock itself."""

    def __init__(self, now: list[float]):
        self.now = now

    def monotonic(self) -> float:
        return self.now[0]

    def __getattr__(self, name):
        return getattr(time, name)


def test_http_sd_table_serves_groups_and_expires_stale_entries(monkeypatch):
    """The registry's table, served over HTTP as Prometheus' http_sd wants (JSON list of target groups): an
    entry not renewed within its TTL is gone, a renewed one stays, other paths are 404."""
    import urllib.error

    from cluster.discovery import PATH, SDServer, TargetTable

    from cluster import discovery

    now = [1000.0]  # the table's clock, moved by hand: expiry is tested without racing a loaded machine
    monkeypatch.setattr(discovery, "time", _Clock(now))
    table = TargetTable()
    server = SDServer(table, "127.0.0.1", 0)
    try:
        assert table.last_poll_age() is None  # nobody has polled: an exporter closing now need not linger
        table.put("r/n0/r0", "10.0.0.1:9400", {"run": "r", "node": "n0", "rank": 0}, ttl_s=15)
        table.put("r/n1/r1", "10.0.0.2:9401", {"run": "r", "node": "n1", "rank": 1}, ttl_s=30)
        get = lambda path=PATH: urllib.request.urlopen(server.url.replace(PATH, path), timeout=5)  # noqa: E731
        with get() as r:
            assert r.headers["Content-Type"] == "application/json"
            assert json.load(r) == [{"targets": ["10.0.0.1:9400"], "labels": {"run": "r", "node": "n0", "rank": "0"}},
                                    {"targets": ["10.0.0.2:9401"], "labels": {"run": "r", "node": "n1", "rank": "1"}}]
        now[0] += 14.9  # both still within their TTL
        assert table.last_poll_age() == pytest.approx(14.9)  # Prometheus' GET was noted
        with get() as r:
            assert len(json.load(r)) == 2
        now[0] += 0.2  # the first one's 15 s are over, the second's 30 are not
        with get() as r:
            assert [g["targets"] for g in json.load(r)] == [["10.0.0.2:9401"]]
        table.drop("r/n1/r1")
        with get() as r:
            assert json.load(r) == []
        with pytest.raises(urllib.error.HTTPError, match="404"):
            get("/metrics")
    finally:
        server.close()


def test_close_lingers_until_a_watching_prometheus_scraped_the_final_values(tel):
    """An exporter that has been scraped (someone watches) and then gets its final values keeps serving after
    close(linger_s) until they are scraped, then stops: the stage's last values are never lost to timing."""
    import threading

    tel.log({"loss": 0.9, "step": 10}, split="train")
    scrape(tel)  # the watcher's regular scrape
    tel.log({"loss": 0.1, "step": 20}, split="val")  # the stage's final values, then it ends
    closing = threading.Thread(target=tel.close, kwargs={"linger_s": 60})
    closing.start()
    time.sleep(1.0)
    assert closing.is_alive(), "closed before the final values were scraped"
    samples = scrape(tel)["facesr_loss"]
    assert {s.labels["split"]: s.value for s in samples} == {"train": 0.9, "val": 0.1}
    closing.join(timeout=20)  # well before the 60 s bound: it ends once the scrape is done
    assert not closing.is_alive()
    with pytest.raises(OSError):
        scrape(tel)  # the server has stopped
    assert tel.sd_file is None


def test_close_does_not_linger_unwatched_or_already_scraped(tmp_path):
    """Nobody ever scraped it (no Prometheus, no registry): close returns at once, whatever linger_s; nor does
    an exporter whose latest values were already scraped wait for another scrape."""
    import threading

    for watched in (False, True):
        t = Telemetry(run="r", stage="prior", rank=0, node="n0", port=0, sd_dir=str(tmp_path / "sd"))
        t.log({"loss": 0.5, "step": 4}, split="train")
        if watched:
            scrape(t)
        closing = threading.Thread(target=t.close, kwargs={"linger_s": 60})
        closing.start()
        closing.join(timeout=20)
        assert not closing.is_alive(), f"watched={watched}: waited for a scrape it did not need"


def test_a_stage_too_short_to_be_found_lingers_where_the_previous_stage_was_scraped(tmp_path):
    """file_sd: a stage that ends before Prometheus has found its exporter (file_sd changes reach the scrape loop
    at most every 5 s; a CI run's 8-step stage 3 did) was never scraped itself, but its folder's earlier exporter
    was: it keeps serving until its final values are scraped. A folder scraped long ago is not watched."""
    import os
    import threading

    from cluster.telemetry import SCRAPED_MARK, WATCHED_WITHIN_S

    sd = tmp_path / "sd"
    before = Telemetry(run="r", stage="sr", rank=0, node="n0", port=0, sd_dir=str(sd))
    before.log({"loss": 0.5, "step": 4}, split="train")
    scrape(before)  # the previous stage, watched
    before.close(linger_s=60)
    short = Telemetry(run="r", stage="gate", rank=0, node="n0", port=0, sd_dir=str(sd))
    short.log({"loss": 0.2, "step": 8}, split="val")
    closing = threading.Thread(target=short.close, kwargs={"linger_s": 60})
    closing.start()
    time.sleep(1.0)
    assert closing.is_alive(), "closed before its final values were scraped"
    assert scrape(short)["facesr_loss"][0].value == 0.2
    closing.join(timeout=20)
    assert not closing.is_alive()

    old = time.time() - WATCHED_WITHIN_S - 1  # the same folder, its last scrape long ago: nobody watches
    os.utime(sd / SCRAPED_MARK, (old, old))
    stale = Telemetry(run="r", stage="gate", rank=0, node="n0", port=0, sd_dir=str(sd))
    stale.log({"loss": 0.2, "step": 8}, split="val")
    closing = threading.Thread(target=stale.close, kwargs={"linger_s": 60})
    closing.start()
    closing.join(timeout=20)
    assert not closing.is_alive(), "lingered for a folder nobody has scraped for minutes"
    assert sorted(p.name for p in sd.iterdir()) == [SCRAPED_MARK]  # every exporter withdrew its *.json
