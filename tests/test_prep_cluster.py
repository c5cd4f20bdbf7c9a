"""`facesr prep` as a cluster job: with RAY_ADDRESS set (what `ray job submit` gives the driver) it joins that cluster."""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray.util import get_node_ip_address

from tests.fixtures_faces import PREP_ARGS, prepared

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


_PROBE = ("import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
          "sys.exit(0 if any(n['Alive'] for n in ray.nodes()) else 1)")


def _wait_for_a_node(address: str, deadline: float) -> None:
    """Poll until a driver can join ``address`` and sees a live node (what prep's ray.init then finds)."""
    while time.monotonic() < deadline:
        try:
            if subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, timeout=60).returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1)
    raise TimeoutError(f"no live Ray node at {address} before the deadline")


@pytest.mark.cluster
@pytest.mark.slow
def test_prep_joins_the_cluster_named_by_ray_address(tmp_path):
    """Under a running head, prep connects through RAY_ADDRESS (no local Ray) and writes the same bytes."""
    src, reference, _ = prepared()
    gcs, agent, agent_grpc, env_agent, metrics, client = _free_ports(6)
    temp = Path(tempfile.mkdtemp(prefix="fsr", dir="/tmp"))  # short: Ray's unix sockets live under it (107 chars)
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}", f"--temp-dir={temp}", "--disable-usage-stats"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = tmp_path / "out"
        address = f"{get_node_ip_address()}:{gcs}"  # where the head's GCS listens
        deadline = time.monotonic() + 120
        while head.poll() is None and time.monotonic() < deadline:  # a busy machine starts a head slowly
            with socket.socket() as s:
                if s.connect_ex(tuple(address.rsplit(":", 1)[:1]) + (gcs,)) == 0:
                    break
            time.sleep(1)
        _wait_for_a_node(address, time.monotonic() + 120)  # GCS up is not enough: prep needs the head's raylet registered
        env = dict(os.environ, RAY_ADDRESS=address)
        cmd = [sys.executable, "-m", "launch.cli", "prep", str(src), str(out), *PREP_ARGS]
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"Ray cluster at {address}" in run.stderr
        names = sorted(p.name for p in reference.iterdir() if p.is_file())
        _, mismatch, errors = filecmp.cmpfiles(reference, out, names, shallow=False)
        assert not mismatch and not errors
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
