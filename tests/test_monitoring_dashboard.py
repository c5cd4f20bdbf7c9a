"""Grafana dashboard and provisioning files: structure Grafana relies on (no server needed).

Whether every query returns data is checked against a real Prometheus in
tests/test_monitoring_prometheus.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "cluster" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "facesr.json").read_text())
DATASOURCES = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "facesr.yaml").read_text())
PROVIDERS = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "facesr.yaml").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]

# what issue 5 asks the dashboard to show: title pattern -> metric it must query
REQUIRED = {
    r"SSIM .*train": "facesr_ssim", r"SSIM .*val": "facesr_ssim",
    r"CE .*train": "facesr_ce", r"CE .*val": "facesr_ce",
    r"loss": "facesr_loss", r"accuracy": "facesr_acc", r"PSNR": "facesr_psnr",
    r"Throughput": "facesr_samples_total", r"Learning rate": "facesr_learning_rate",
    r"Data wait": "facesr_data_wait_ratio", r"Step time": "facesr_step_seconds_bucket",
    r"Checkpoint age": "facesr_last_checkpoint_timestamp_seconds", r"Decode errors": "facesr_decode_errors_total",
    r"Restarts": "facesr_restarts_total", r"Epoch": "facesr_epoch", r"Step$": "facesr_step",
    r"MFU": "facesr_mfu_ratio", r"Peak memory": "facesr_peak_memory_bytes",
    r"Detail gate: strength": "facesr_strength", r"Detail gate: x8 PSNR": "facesr_psnr_full",
}


@pytest.mark.parametrize("title,metric", REQUIRED.items())
def test_required_panel_present(title, metric):
    """Each view the issue asks for has a panel whose query uses the right metric."""
    hits = [p for p in PANELS if re.search(title, p["title"], re.I)]
    assert hits, f"no panel titled like {title!r}"
    assert any(re.search(rf"\b{metric}\b", t["expr"]) for p in hits for t in p["targets"])


def test_panels_use_a_datasource_variable_defaulting_to_the_provisioned_one():
    """Every panel, query and template variable points at ``${datasource}``, a Prometheus datasource variable
    whose default is the uid the provisioning file creates: importable into any Grafana (Ray's too), where
    the user picks the Prometheus; no uid is written anywhere else in the file."""
    [ds] = DATASOURCES["datasources"]
    [var] = [v for v in DASHBOARD["templating"]["list"] if v["type"] == "datasource"]
    assert var["name"] == "datasource" and var["query"] == "prometheus" and var["current"]["value"] == ds["uid"]
    for p in PANELS:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], f"{p['title']}: no query"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    for v in DASHBOARD["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}", v["name"]
    assert json.dumps(DASHBOARD).count(f'"{ds["uid"]}"') == 2  # the variable's default (text, value), nowhere else


def test_panel_ids_unique_and_layout_within_grid():
    """Grafana needs unique panel ids; panels stay inside the 24-column grid and do not overlap."""
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_every_query_filters_by_the_run_variable():
    """Queries are scoped to the selected run, so runs sharing a Prometheus do not mix."""
    for p in PANELS:
        for t in p["targets"]:
            assert 'run=~"$run"' in t["expr"], (p["title"], t["expr"])


def test_provider_points_at_the_dashboards_folder():
    """The dashboard provider is a file provider whose path is set from the environment."""
    [prov] = PROVIDERS["providers"]
    assert prov["type"] == "file" and prov["options"]["path"].startswith("$")


def test_prometheus_client_only_imported_in_cluster():
    """Only cluster/ imports prometheus_client (STYLE.md: one job per top-level folder)."""
    offenders = [str(f.relative_to(ROOT)) for d in ("facesr", "shards", "launch")
                 for f in (ROOT / d).rglob("*.py")
                 if re.search(r"^\s*(import|from)\s+prometheus_client", f.read_text(), re.M)]
    assert offenders == []
