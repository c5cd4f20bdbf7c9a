"""What the driver sets up on a real (local) Ray before training: the Prometheus target registry that exporters
join (cluster/discovery.py), and the CUDA check of the GPU nodes (cluster/gpu_check.py).

One Ray for the module, advertising one GPU: on this CPU-only machine that is a GPU node whose CUDA does not
work (no NVIDIA driver), which the check must refuse; on a GPU machine the same test sees CUDA work.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

from cluster.config import ConfigError, load_config


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():
        pytest.skip("Ray already initialised in this process")
    # with its dashboard on loopback, as facesr starts a local Ray (cluster/ray_connect.py)
    from cluster.ray_connect import _free_port

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port(),
             logging_level="WARNING", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def sd_groups(url: str) -> list[dict]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def test_exporters_in_ray_workers_register_with_the_head_registry(local_ray):
    """ensure_registry starts one registry (a second call finds it); exporters in Ray workers register their real
    host:port with run/node/rank labels, served as HTTP SD, and learn from it that someone polls; close() withdraws
    them."""
    from cluster.discovery import ensure_registry

    class Worker:
        """Stands where a training worker's Recorder does: an exporter in a Ray worker process, registered."""

        def __init__(self, rank: int):
            from cluster.telemetry import Telemetry, node_ip

            self.tel = Telemetry("services", "sr", rank, "n0", port=0, host=node_ip(), registry=True)

        def target(self) -> str | None:
            return self.tel.target if self.tel.registration else None

        def watched(self) -> bool:
            return self.tel.registration.watched(60)

        def close(self) -> None:
            self.tel.close()

    url = ensure_registry(0)  # port 0: a free one (tests share the machine)
    assert ensure_registry(0) == url and url.endswith("/targets")
    Worker = local_ray.remote(num_cpus=0)(Worker)
    workers = [Worker.remote(rank) for rank in (0, 1)]
    targets = local_ray.get([w.target.remote() for w in workers])
    assert all(targets)
    groups = [g for g in sd_groups(url) if g["labels"]["run"] == "services"]
    assert sorted((g["targets"][0], g["labels"]["rank"], g["labels"]["node"]) for g in groups) == sorted(
        (t, str(r), "n0") for r, t in enumerate(targets))
    # that GET was a poll: an exporter asks the registry whether a Prometheus watches (close's linger)
    assert local_ray.get(workers[0].watched.remote())
    local_ray.get([w.close.remote() for w in workers])
    assert [g for g in sd_groups(url) if g["labels"]["run"] == "services"] == []


def test_gpu_run_is_refused_when_cuda_does_not_work_on_a_gpu_node(local_ray):
    """cluster.use_gpu with a GPU node whose NVIDIA driver/CUDA does not work: refused on cluster.use_gpu, naming the
    node and what is missing; where CUDA works, the check passes and reports the devices."""
    from cluster.gpu_check import check_gpus

    cfg = load_config(None, ["cluster.use_gpu=true", "cluster.num_workers=1"])
    if torch.cuda.is_available():
        (status,) = check_gpus(cfg)
        assert status["problems"] == [] and status["devices"] >= 1
        return
    with pytest.raises(ConfigError) as e:
        check_gpus(cfg, timeout_s=120)
    node = local_ray.util.get_node_ip_address()
    assert e.value.field == "cluster.use_gpu"
    assert f"CUDA does not work on GPU node {node}" in str(e.value)
    assert "nvidia-smi not found" in str(e.value) or "sees no CUDA device" in str(e.value) or \
        "built without CUDA" in str(e.value), str(e.value)


def test_cuda_status_names_what_is_missing():
    """facesr.hardware.cuda_status on this machine: no problem exactly when torch can run a CUDA op here; each
    problem says what is missing."""
    from facesr.hardware import cuda_status

    status = cuda_status()
    if torch.cuda.is_available():
        assert status["problems"] == [] and status["devices"] == torch.cuda.device_count()
    else:
        assert status["problems"] and status["devices"] == 0
        assert all(("nvidia-smi" in p or "torch" in p) for p in status["problems"]), status["problems"]


def test_driver_shortens_ray_trains_poll_interval_unless_the_environment_sets_it(monkeypatch):
    """The driver's default poll interval (0.5 s, cluster/ray_connect.py) is among what Ray Train passes on to its
    controller; a value in the environment is kept."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from cluster.ray_connect import HEALTH_CHECK_INTERVAL_S, set_train_defaults

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    set_train_defaults()
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == HEALTH_CHECK_INTERVAL_S == "0.5"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    set_train_defaults()
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
