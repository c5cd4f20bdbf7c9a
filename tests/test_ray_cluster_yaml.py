"""ray_cluster.yaml (shared EFS mount) and ray_cluster_gpu.yaml (8-GPU nodes, EFA, S3): what `ray up` validates,
token auth and a private dashboard, commands that name real things; then what each file alone promises."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from launch.cli import COMMANDS
from tests.conftest import ROOT

PATH = ROOT / "ray_cluster.yaml"
GPU_PATH = ROOT / "ray_cluster_gpu.yaml"


@pytest.fixture(scope="module", params=[PATH, GPU_PATH], ids=lambda p: p.name)
def cluster_file(request) -> Path:
    return request.param


@pytest.fixture(scope="module")
def cfg(cluster_file) -> dict:
    return yaml.safe_load(cluster_file.read_text())


@pytest.fixture(scope="module")
def gpu_cfg() -> dict:
    return yaml.safe_load(GPU_PATH.read_text())


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


def test_token_auth_on_every_node_and_dashboard_on_loopback(cfg, cluster_file):
    """Every `ray start` runs with RAY_AUTH_MODE=token; the head's dashboard binds to 127.0.0.1; the token file
    is shipped to every node and is not part of the repository."""
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in starts)
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in cluster_file.read_text()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not (ROOT / ".ray").exists()


def test_setup_installs_this_project(cfg):
    """This checkout is synced and pip-installed on every node."""
    src = next(k for k, v in cfg["file_mounts"].items() if v == ".")
    assert re.search(rf"pip install .*-e {re.escape(src)}\b", " && ".join(cfg["setup_commands"]))
    assert (ROOT / "pyproject.toml").is_file()


def test_setup_mounts_the_shared_path():
    """ray_cluster.yaml: the shared mount holds paper.yaml's shards and runs."""
    from cluster.config import load_config

    cfg = yaml.safe_load(PATH.read_text())
    mount = re.search(r"mount -t nfs4 .* (/\S+)\)?$", next(c for c in cfg["setup_commands"] if "mount -t" in c))
    assert mount
    paper = load_config(ROOT / "launch/configs/paper.yaml")
    shared = mount.group(1).rstrip(")")
    assert paper.data.shards.startswith(shared) and paper.cluster.storage_path.startswith(shared)


def test_commands_name_real_entry_points(cfg, cluster_file):
    """Every `ray <sub>`, `facesr <sub>` and `python -m <module>` in the file (comments too) exists."""
    import ray.scripts.scripts as ray_cli

    text = cluster_file.read_text()
    ray_subs = set(re.findall(r"\bray ([a-z][a-z-]+)", text))
    assert {"start", "stop", "up", "job", "get-auth-token", "dashboard", "down"} <= ray_subs
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


# ---------------------------------------------------------------- ray_cluster_gpu.yaml alone

EFA_CARDS = {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32, "p5en.48xlarge": 16}


def _gpu_workers(cfg: dict) -> list[dict]:
    return [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]


def test_gpu_nodes_have_8_gpus_an_efa_interface_per_card_and_a_cluster_placement_group(gpu_cfg):
    """p4d/p5-class 8-GPU workers: every network card carries an EFA interface (DeviceIndex 0 only on card 0),
    the nodes share a placement group the file's instructions create with the cluster strategy, and a node
    whose EFA device is missing fails its setup."""
    text = GPU_PATH.read_text()
    for t in _gpu_workers(gpu_cfg):
        node = t["node_config"]
        assert node["InstanceType"] in EFA_CARDS and t["resources"]["GPU"] == 8
        nics = node["NetworkInterfaces"]
        assert [n["NetworkCardIndex"] for n in nics] == list(range(EFA_CARDS[node["InstanceType"]]))
        assert all(n["InterfaceType"] == "efa" for n in nics)
        assert [n["DeviceIndex"] for n in nics] == [0] + [1] * (len(nics) - 1)
        group = node["Placement"]["GroupName"]
        assert re.search(rf"create-placement-group .*--group-name {group} --strategy cluster", text)
    assert any("fi_info -p efa" in c for c in gpu_cfg["worker_setup_commands"])
    assert all("FI_PROVIDER=efa" in c for c in gpu_cfg["worker_start_ray_commands"] if "ray start" in c)


def test_gpu_file_names_no_stale_ami_and_says_how_to_pick_a_current_one(gpu_cfg):
    """Every node boots the one image the user pins (no 'latest' lookup at launch, no id pinned here whose driver
    predates R580, which CUDA 13 needs); the file gives the SSM and describe-images commands that find the current
    Deep Learning Base image of its region and show its driver."""
    text = GPU_PATH.read_text()
    ids = {t["node_config"]["ImageId"] for t in gpu_cfg["available_node_types"].values()}
    assert ids == {"ami-EDIT"} and "ami-03969617445ddf209" not in text
    assert "resolve:ssm" not in "".join(yaml.safe_dump(gpu_cfg)) and "R580" in text
    region = gpu_cfg["provider"]["region"]
    assert re.search(rf"aws ssm get-parameter --region {region} .*\\\n#\s+--name /aws/service/deeplearning/ami/x86_64/"
                     r"base-oss-nvidia-driver-gpu-ubuntu-22\.04/latest/ami-id", text)
    assert f"describe-images --region {region} --image-ids ami-EDIT --query 'Images[0].[Name,Description]'" in text


# options the AWS CLI adds to these EC2 commands beside the API's own (awscli/customizations/ec2/secgroupsimplify)
CLI_EXTRA = {"authorize-security-group-ingress": {"protocol", "port", "cidr", "source-group", "group-owner"},
             "authorize-security-group-egress": {"protocol", "port", "cidr", "source-group", "group-owner"}}
AWS_GLOBAL = {"region", "query", "output", "profile"}


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def test_gpu_file_aws_commands_are_valid(gpu_cfg):
    """Every `aws <service> <command>` in the file names an operation of botocore's model, with options that the
    operation (or the CLI's documented additions, or the global options) takes; `aws s3 mb` takes a bucket URI."""
    import botocore.session

    session = botocore.session.get_session()
    text = re.sub(r"\\\n#\s*", " ", GPU_PATH.read_text())  # continuation lines joined
    cmds = [shlex.split(c) for c in re.findall(r"(aws (?:ec2|ssm|s3) [^\n]*)", text)]
    assert {c[2] for c in cmds} >= {"create-placement-group", "create-security-group", "mb", "get-parameter",
                                    "authorize-security-group-ingress", "authorize-security-group-egress",
                                    "describe-images"}
    for c in cmds:
        service, command, args = c[1], c[2], c[3:]
        if service == "s3":
            assert command == "mb" and args[0].startswith("s3://")
            assert {a[2:] for a in args if a[:2] == "--"} <= AWS_GLOBAL
            continue
        op = session.get_service_model(service).operation_model(re.sub(r"(^|-)(\w)", lambda m: m[2].upper(), command))
        known = {_kebab(m) for m in op.input_shape.members} | CLI_EXTRA.get(command, set()) | AWS_GLOBAL
        used = {a[2:] for a in args if a.startswith("--")}
        assert used <= known, (command, used - known)


def test_gpu_nodes_hold_scale_yaml_and_check_driver_and_nccl(gpu_cfg):
    """The GPU node type and the cluster can grow to scale.yaml's 32 workers (8 CPU + 1 GPU each); every GPU node's
    setup checks the driver against torch's CUDA and that NCCL takes EFA; workers start with NCCL's INIT/NET
    lines on (once per start, nothing per step)."""
    from cluster.config import load_config

    scale = load_config(ROOT / "launch/configs/scale.yaml")
    nodes = _gpu_workers(gpu_cfg)
    slots = sum(t["max_workers"] * min(int(t["resources"]["GPU"] // scale.cluster.gpus_per_worker),
                                       int(t["resources"]["CPU"] // scale.cluster.cpus_per_worker)) for t in nodes)
    assert slots >= scale.cluster.num_workers and gpu_cfg["max_workers"] >= sum(t["max_workers"] for t in nodes)
    setup = " && ".join(gpu_cfg["worker_setup_commands"])
    assert "python -m cluster.gpu_check --driver" in setup
    assert "python -m cluster.gpu_check --nccl --require-efa" in setup
    start = next(c for c in gpu_cfg["worker_start_ray_commands"] if "ray start" in c)
    assert "NCCL_DEBUG=INFO" in start and "NCCL_DEBUG_SUBSYS=INIT,NET" in start


def test_driver_and_nccl_checks_read_what_they_are_given():
    """CUDA 13 needs R580 (575 refused naming both, 580 passes; CUDA 12 runs on 535); NCCL's debug lines with the
    OFI plugin on provider efa mean EFA, the socket fallback does not."""
    from cluster.gpu_check import driver_problem, nccl_network

    assert "older than R580" in driver_problem("575.57.08", "13.0") and driver_problem("580.65.06", "13.0") is None
    assert driver_problem("535.104.05", "12.4") is None and driver_problem("anything", None) is None
    efa = ("node:1:1 [0] NCCL INFO NET/OFI Selected provider is efa, fabric is efa (found 4 nics)\n"
           "node:1:1 [0] NCCL INFO Using network Libfabric\n")
    sock = ("node:1:1 [0] NCCL INFO NET/Socket : Using [0]ens32:10.0.0.5<0>\n"
            "node:1:1 [0] NCCL INFO Using network Socket\n")
    assert nccl_network(efa) == {"network": "Libfabric", "provider": "efa", "efa": True}
    assert nccl_network(sock) == {"network": "Socket", "provider": None, "efa": False}


def test_gpu_file_keeps_runs_and_shards_in_a_bucket_with_the_instance_role(gpu_cfg):
    """No shared mount; workers get an instance profile (credentials from the instance role, none in the file);
    the documented training job puts data.shards and cluster.storage_path in s3:// and is a valid config."""
    from cluster.config import load_config

    text = GPU_PATH.read_text()
    assert not any("mount" in c or "nfs" in c for c in _commands(gpu_cfg))
    assert all("IamInstanceProfile" in t["node_config"] for t in _gpu_workers(gpu_cfg))
    assert not re.search(r"(?i)aws_(secret_)?access_key|AKIA[0-9A-Z]{16}", text)
    job = re.search(r"python -m launch\.train --config (\S+) \\\n#\s+(.+)$", text, re.M)
    overrides = job.group(2).split()
    assert {o.split("=")[0] for o in overrides if "=s3://" in o} == {"data.shards", "cluster.storage_path"}
    cfg = load_config(ROOT / job.group(1), overrides)
    cfg.validate()
    assert cfg.cluster.use_gpu and cfg.cluster.storage_path.startswith("s3://")
