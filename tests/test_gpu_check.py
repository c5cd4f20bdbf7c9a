"""`python -m launch.gpu_check --device cpu`: the GPU machine's harness runs here as it would on a bare GPU host,
with Ray, DeepSpeed and WebDataset unimportable: every stage it can run passes, the others say why they skip."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

BLOCKER = '''
import sys

BLOCKED = {%s}


class Bare:
    """A bare GPU host: these are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Bare())
'''


def _run(tmp: Path, blocked: tuple[str, ...], *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    site = tmp / "bare"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER % ", ".join(repr(b) for b in blocked))
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run([sys.executable, "-m", "launch.gpu_check", "--device", "cpu", "--out", str(tmp / "out"),
                          "--pack", str(tmp / "no-pack"), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    report = tmp / "out" / "gpu_check.json"
    return res, json.loads(report.read_text()) if report.exists() else {}


def test_harness_on_the_cpu_of_a_bare_host(tmp_path):
    """Ray, DeepSpeed and WebDataset blocked: the driver (machine), worker-step (no host sync), roofline and
    step-benchmark stages run and pass, DeepSpeed and the GPU tests are skipped with the reason, the Ray training is named as
    needing a full GPU host with its command; exit 0; the JSON holds every stage."""
    t0 = time.monotonic()
    res, report = _run(tmp_path, ("ray", "deepspeed", "webdataset"), "--quick", "--seconds", "0.2", "--steps", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    st = report["stages"]
    assert [k for k, v in st.items() if v["status"] == "ok"] == ["driver", "worker_step", "roofline:tiny",
                                                                 "step:tiny:off"], st
    roof = st["roofline:tiny"]  # measured here: the CPU's conv peak and copy bandwidth as the target
    assert 0 < roof["mfu"] and 0 < roof["mfu_max_every_op"] <= roof["mfu_max_conv_only"] <= 1
    assert roof["classes"]["conv"]["measured_ms"] > 0 and roof["step_ms"] > 0
    assert st["worker_step"]["host_syncs"] == 0 and "made here" in st["worker_step"]["batches"]
    assert st["step:tiny:off"]["launches"] > 100 and st["step:tiny:off"]["images_per_s"] > 0
    assert "deepspeed" in st["deepspeed"]["reason"] and st["deepspeed"]["status"] == "skipped"
    assert st["gpu_tests"]["status"] == "skipped" and "CUDA" in st["gpu_tests"]["reason"]
    full = st["train_kill_resume"]
    assert full["status"] == "skipped" and "needs a full GPU host" in full["reason"]
    assert "python -m launch.gpu_check" in full["reason"] and "ray" in full["reason"]
    assert report["finished"] and "worker_step: ok" in res.stdout
    print(f"harness: {time.monotonic() - t0:.0f}s")


def test_deepspeed_stage_round_trips_a_checkpoint_where_deepspeed_is_installed(tmp_path):
    """With DeepSpeed importable (only Ray blocked): a one-process engine (gloo here, NCCL on a GPU) saves, a second
    engine from other weights loads the same weights, and a step more keeps them equal."""
    res, report = _run(tmp_path, ("ray",), "--stages", "deepspeed")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = report["stages"]["deepspeed"]
    assert r["status"] == "ok" and r["backend"] == "gloo", r
    assert r["same_weights_after_load"] and r["same_weights_after_a_step_more"]


@pytest.mark.parametrize("stages,missing", [("step", "step:tiny:off")])
def test_a_cut_run_still_reports(tmp_path, stages, missing):
    """A budget too small for anything: every planned stage is in the JSON, skipped as out of time."""
    res, report = _run(tmp_path, ("ray", "deepspeed", "webdataset"), "--quick", "--stages", stages, "--budget-s", "5")
    assert res.returncode == 0 and report["stages"][missing]["status"] == "skipped"
    assert "budget" in report["stages"][missing]["reason"]
