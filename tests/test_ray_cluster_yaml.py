"""ray_cluster.yaml: what `ray up` validates, token auth and a private dashboard, commands that name real things."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex

import pytest
import yaml

from launch.cli import COMMANDS
from tests.conftest import ROOT

PATH = ROOT / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def cfg() -> dict:
    return yaml.safe_load(PATH.read_text())


def _commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in cfg.get(k) or []]


def test_passes_the_validation_ray_up_runs(cfg):
    """The launcher's own prepare_config + validate_config (schema, node types, worker counts) accept it."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_has_a_cpu_head_and_gpu_workers(cfg):
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert workers and all(t["resources"]["GPU"] >= 1 and t["min_workers"] >= 1 for t in workers)
    assert sum(t["max_workers"] for t in workers) <= cfg["max_workers"]


def test_paper_config_fits_the_gpu_workers(cfg):
    """paper.yaml's workers × (GPU, CPU) fit on the GPU nodes the cluster starts."""
    from cluster.config import load_config

    paper = load_config(ROOT / "launch/configs/paper.yaml")
    nodes = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    slots = sum(
        t["max_workers"] * min(int(t["resources"]["GPU"] // paper.cluster.gpus_per_worker),
                               int(t["resources"]["CPU"] // paper.cluster.cpus_per_worker))
        for t in nodes
    )
    assert paper.cluster.use_gpu and slots >= paper.cluster.num_workers


def test_token_auth_on_every_node_and_dashboard_on_loopback(cfg):
    """Every `ray start` runs with RAY_AUTH_MODE=token; the head's dashboard binds to 127.0.0.1; the token file
    is shipped to every node and is not part of the repository."""
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in starts)
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in PATH.read_text()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not (ROOT / ".ray").exists()


def test_setup_installs_this_project_and_mounts_the_shared_path(cfg):
    """This checkout is synced and pip-installed; the shared mount holds paper.yaml's shards and runs."""
    from cluster.config import load_config

    src = next(k for k, v in cfg["file_mounts"].items() if v == ".")
    setup = " && ".join(cfg["setup_commands"])
    assert re.search(rf"pip install .*-e {re.escape(src)}\b", setup)
    assert (ROOT / "pyproject.toml").is_file()
    mount = re.search(r"mount -t nfs4 .* (/\S+)\)?$", next(c for c in cfg["setup_commands"] if "mount -t" in c))
    assert mount
    paper = load_config(ROOT / "launch/configs/paper.yaml")
    shared = mount.group(1).rstrip(")")
    assert paper.data.shards.startswith(shared) and paper.cluster.storage_path.startswith(shared)


def test_commands_name_real_entry_points(cfg):
    """Every `ray <sub>`, `facesr <sub>` and `python -m <module>` in the file (comments too) exists."""
    import ray.scripts.scripts as ray_cli

    text = PATH.read_text()
    ray_subs = set(re.findall(r"\bray ([a-z][a-z-]+)", text))
    assert {"start", "stop", "up", "job", "get-auth-token", "dashboard"} <= ray_subs
    known = set(ray_cli.cli.commands)
    assert ray_subs <= known, ray_subs - known
    modules = re.findall(r"python -m ([\w.]+)", text)
    assert "launch.train" in modules
    for module in modules:  # runnable with -m: the module exists and has a __main__ block
        spec = importlib.util.find_spec(module)
        assert spec is not None and '__name__ == "__main__"' in open(spec.origin).read(), module
    for sub in re.findall(r"\bfacesr ([a-z]+)", text):
        assert sub in COMMANDS, sub
    for c in _commands(cfg):
        shlex.split(c)  # every command is valid shell quoting
