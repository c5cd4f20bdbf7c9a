"""Too few GPUs (or CPUs) is an error, not a wait: a run whose workers the Ray cluster cannot place is refused
before any worker starts, naming the shortfall (cluster/gpu_check.py)."""

import os
import subprocess
import sys

import pytest

from cluster.config import ConfigError, load_config
from cluster.gpu_check import check_placement, placement_shortfall, slots
from tests.conftest import ROOT


def _node(ip: str, cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """One entry of ``ray.nodes()`` (the fields the check reads)."""
    return {"NodeManagerAddress": ip, "Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_slots_count_whole_bundles_per_node():
    """A worker's CPUs and GPUs come from one node: an 8-GPU, 96-CPU node holds 8 workers of 8 CPU + 1 GPU,
    12 of 8 CPU alone; dead nodes hold none."""
    p4d = _node("10.0.0.1", 96, 8)
    assert slots([p4d], 8, 1) == 8 and slots([p4d], 8, 0) == 12 and slots([p4d], 16, 1) == 6
    assert slots([p4d, _node("10.0.0.2", 96, 8, alive=False)], 8, 1) == 8
    assert slots([_node("a", 3, 0), _node("b", 3, 0)], 2, 0) == 2  # 1 + 1, not 6 // 2


def test_scale_yaml_on_one_gpu_node_names_the_shortfall():
    """scale.yaml's 32 workers on one 8-GPU node: 24 short, said with the bundle, the nodes and the remedies."""
    cfg = load_config(ROOT / "launch/configs/scale.yaml")
    short = placement_shortfall(cfg, [_node("10.0.0.1", 96, 8), _node("10.0.0.9", 8)])
    assert short.startswith("the run needs 32 workers of 8 CPU + 1 GPU each, the Ray cluster's nodes can place 8: "
                            "24 short")
    assert "10.0.0.1 (96 CPU, 8 GPU)" in short and "cluster.num_workers" in short
    assert placement_shortfall(cfg, [_node(f"10.0.0.{i}", 96, 8) for i in range(4)]) is None


def test_elastic_run_needs_only_its_minimum():
    """An elastic run (min_workers < num_workers) starts when its minimum fits."""
    cfg = load_config(ROOT / "launch/configs/cpu.yaml", ["cluster.num_workers=4", "cluster.min_workers=2"])
    assert placement_shortfall(cfg, [_node("n", 2)]) is None
    assert "needs 2 workers" in placement_shortfall(cfg, [_node("n", 1)])


@pytest.fixture(scope="module")
def cpu_ray():
    """A local Ray of 2 CPUs and no GPU."""
    import ray

    if ray.is_initialized():
        pytest.skip("Ray already initialised in this process")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.parametrize("overrides,message", [
    (["cluster.cpus_per_worker=3"], "needs 2 workers of 3 CPU each, the Ray cluster's nodes can place 0: 2 short"),
    (["cluster.use_gpu=true", "cluster.num_workers=1"], r"needs 1 worker of 1 CPU \+ 1 GPU each, .* place 0: 1 short"),
])
def test_local_ray_refuses_what_it_cannot_place(cpu_ray, overrides, message):
    """On a real local Ray of 2 CPUs and no GPU: more CPUs than exist, or any GPU, is a ConfigError on
    cluster.num_workers at once; with placement_timeout_s it first waits that long for an autoscaler (none)."""
    cfg = load_config(ROOT / "launch/configs/cpu.yaml", overrides)
    with pytest.raises(ConfigError, match=message) as e:
        check_placement(cfg)
    assert e.value.field == "cluster.num_workers"
    cfg.cluster.placement_timeout_s = 1.0
    with pytest.raises(ConfigError, match=r"waited 1s for an autoscaler"):
        check_placement(cfg, poll_s=0.2)
    check_placement(load_config(ROOT / "launch/configs/cpu.yaml"))  # 2 workers of 1 CPU fit


def test_train_refuses_before_any_worker_starts(tmp_path):
    """`python -m launch.train` asking 2 workers of 1000 CPUs each from a new local Ray: exit 2 with one config
    error line naming the shortfall; no stage folder, worker log or checkpoint is written."""
    from tests.test_train import make_shards

    shards = make_shards(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    res = subprocess.run([sys.executable, "-m", "launch.train", "--config", "launch/configs/cpu.yaml",
                          f"data.shards={shards}", f"cluster.storage_path={tmp_path / 'runs'}", "run.name=short",
                          "cluster.cpus_per_worker=1000", "run.telemetry_sd_port=null"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    line = next(l for l in res.stderr.splitlines() if l.startswith("facesr train: config error"))
    assert "cluster.num_workers: the run needs 2 workers of 1000 CPU each" in line and "2 short" in line
    run = tmp_path / "runs" / "short"
    assert not (run / "stage1").exists() and not list((run / "logs").glob("stage*"))
