"""The driver's checks, before any training worker starts: the cluster can place every worker, and its GPUs train.

``check_placement``: Ray Train asks for ``cluster.num_workers`` bundles of (``cpus_per_worker`` CPUs,
``gpus_per_worker`` GPUs) and, when the cluster cannot hold them, waits for resources forever. Here the
alive nodes are counted first (a worker's bundle lives on one node) and a run that does not fit is refused
with a ``ConfigError`` on ``cluster.num_workers`` naming the shortfall. An autoscaling cluster is asked for
the missing nodes (``ray.autoscaler.sdk.request_resources``) for ``cluster.placement_timeout_s`` first.

With ``cluster.use_gpu`` the driver (on a cloud cluster: the CPU head, which has no GPU itself) asks the Ray
cluster for its GPU nodes and runs ``facesr.hardware.cuda_status`` on one GPU of each: the NVIDIA driver
answers, torch is a CUDA build that sees the device, a tensor op runs. A cluster without any GPU node, or a
GPU node where CUDA does not work, is refused with a ``ConfigError`` on ``cluster.use_gpu`` naming the node
and what is missing, instead of a worker group that fails (or waits) later inside NCCL or DeepSpeed.
"""

from __future__ import annotations

import logging
import math
import time

from .config import ConfigError, TrainConfig

log = logging.getLogger("facesr.train")

FIELD = "cluster.use_gpu"


def _probe() -> dict:
    import ray

    from facesr.hardware import cuda_status

    return {"node": ray.util.get_node_ip_address(), **cuda_status()}


def check_gpus(cfg: TrainConfig, timeout_s: float = 300.0) -> list[dict]:
    """Run the CUDA check on every alive GPU node of the connected Ray cluster; ConfigError when none works.
    Returns each node's status (node IP, nvidia-smi line, torch/CUDA versions, devices)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    c = cfg.cluster
    asked = f"cluster.num_workers={c.num_workers} x gpus_per_worker={c.gpus_per_worker:g}"
    alive = [n for n in ray.nodes() if n.get("Alive")]
    gpu_nodes = [n for n in alive if n["Resources"].get("GPU", 0) > 0]
    if not gpu_nodes:
        where = ", ".join(f"{n['NodeManagerAddress']} ({n['Resources'].get('CPU', 0):g} CPU)" for n in alive)
        raise ConfigError(FIELD, f"the run asks for GPUs ({asked}) but no node of the Ray cluster has one "
                          f"(nodes: {where or 'none'}); start GPU nodes (ray_cluster_gpu.yaml) or set "
                          f"cluster.use_gpu=false")
    probe = ray.remote(_probe)
    refs = [probe.options(num_cpus=0, num_gpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote() for n in gpu_nodes]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        slow = [n["NodeManagerAddress"] for n, r in zip(gpu_nodes, refs) if r in pending]
        for r in pending:
            ray.cancel(r, force=True)
        raise ConfigError(FIELD, f"the CUDA check did not finish within {timeout_s:.0f}s on GPU node(s) "
                          f"{', '.join(slow)} (no free GPU to run it on, or the driver hangs)")
    statuses = ray.get(refs)
    broken = [s for s in statuses if s["problems"]]
    if broken:
        raise ConfigError(FIELD, "CUDA does not work on " + "; ".join(
            f"GPU node {s['node']}: {', '.join(s['problems'])}" for s in broken))
    for s in statuses:
        log.info("CUDA works on %s: %d device(s), %s, torch %s (CUDA %s)", s["node"], s["devices"],
                 s["nvidia_smi"].splitlines()[0] if s["nvidia_smi"] else "?", s["torch"], s["cuda"])
    return statuses


def slots(nodes: list[dict], cpus: float, gpus: float) -> int:
    """Workers of ``cpus`` CPUs and ``gpus`` GPUs each that these nodes (``ray.nodes()`` entries) hold at once."""
    def fit(have: float, need: float) -> float:
        return math.floor(have / need + 1e-9) if need > 0 else math.inf

    return int(sum(min(fit(n["Resources"].get("CPU", 0), cpus), fit(n["Resources"].get("GPU", 0), gpus))
                   for n in nodes if n.get("Alive")) if cpus > 0 or gpus > 0 else 0)


def placement_shortfall(cfg: TrainConfig, nodes: list[dict]) -> str | None:
    """What the run lacks to place its workers on ``nodes`` (one sentence), or None when they fit."""
    c = cfg.cluster
    need = cfg.world_sizes.start  # an elastic run starts with as few as min_workers
    gpus = c.gpus_per_worker if c.use_gpu else 0.0
    have = slots(nodes, c.cpus_per_worker, gpus)
    if have >= need:
        return None
    bundle = f"{c.cpus_per_worker:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    alive = [n for n in nodes if n.get("Alive")]
    where = ", ".join(f"{n['NodeManagerAddress']} ({n['Resources'].get('CPU', 0):g} CPU, "
                      f"{n['Resources'].get('GPU', 0):g} GPU)" for n in alive) or "none"
    workers = f"{need} worker{'s' if need != 1 else ''}"
    return (f"the run needs {workers} of {bundle} each, the Ray cluster's nodes can place {have}: {need - have} "
            f"short (nodes: {where}); lower cluster.num_workers (the global batch must still split) or "
            f"cluster.cpus_per_worker, or add nodes")


def check_placement(cfg: TrainConfig, poll_s: float = 2.0) -> None:
    """Refuse (ConfigError on cluster.num_workers) a run whose workers the connected cluster cannot place, after
    asking an autoscaler for them for ``cluster.placement_timeout_s``."""
    import ray

    short = placement_shortfall(cfg, ray.nodes())
    if short and cfg.cluster.placement_timeout_s > 0:
        from ray.autoscaler.sdk import request_resources

        c = cfg.cluster
        bundle = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.use_gpu else {})}
        request_resources(bundles=[bundle] * c.num_workers)  # no autoscaler: nothing happens, the wait runs out
        log.info("asking the autoscaler for nodes (up to %.0fs): %s", c.placement_timeout_s, short)
        deadline = time.monotonic() + c.placement_timeout_s
        while short and time.monotonic() < deadline:
            time.sleep(poll_s)
            short = placement_shortfall(cfg, ray.nodes())
        if short:
            short += f" (waited {c.placement_timeout_s:g}s for an autoscaler)"
    if short:
        raise ConfigError("cluster.num_workers", short)


# ---------------------------------------------------------------- a GPU node's own checks (ray_cluster_gpu.yaml setup)

# oldest Linux driver branch each CUDA major runs on (minor-version compatibility: any 13.x on R580, 12.x on R525)
DRIVER_FOR_CUDA = {13: 580, 12: 525, 11: 450}


def driver_problem(driver: str, cuda: str | None) -> str | None:
    """Why an NVIDIA ``driver`` (e.g. "575.57.08") cannot run a torch built for ``cuda`` (e.g. "13.0"), or None."""
    if cuda is None:
        return None
    need = DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]))
    if need is None or int(driver.split(".")[0]) >= need:
        return None
    return (f"NVIDIA driver {driver} is older than R{need}, which torch's CUDA {cuda} build needs: boot an image "
            f"with driver >= {need} (ray_cluster_gpu.yaml says how to pick one) or install a torch built for an "
            f"older CUDA")


def nccl_network(log: str) -> dict:
    """What NCCL's INIT/NET debug lines say about its network: {"network", "provider", "efa"}."""
    import re

    nets = re.findall(r"Using network (\w[\w ]*\w)", log)
    provider = re.findall(r"Selected [Pp]rovider is (\w+)", log)
    network, prov = (nets[-1] if nets else None), (provider[-1] if provider else None)
    return {"network": network, "provider": prov, "efa": bool(network and "Libfabric" in network and prov == "efa")}


def _nccl_rank(rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = torch.ones(1, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    dist.destroy_process_group()


def nccl_check() -> dict:
    """NCCL initialised on this node's GPUs (one process each, an all-reduce) with its INIT/NET debug lines in a
    temporary folder; returns ``nccl_network`` of them and the GPU count."""
    import os
    import socket
    import tempfile
    from pathlib import Path

    import torch
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET", NCCL_DEBUG_FILE=f"{tmp}/nccl.%p.log")
        mp.start_processes(_nccl_rank, args=(world, port), nprocs=world, start_method="spawn")
        text = "".join(p.read_text(errors="replace") for p in Path(tmp).glob("nccl.*.log"))
    return {"gpus": world, **nccl_network(text)}


def init_one_rank(backend: str) -> str:
    """A one-process DeepSpeed process group (``nccl`` or ``gloo``) on a free loopback port, for checks and probes
    that run a real engine outside Ray Train; returns DeepSpeed's version."""
    import os
    import socket

    from .engine import set_accelerator_env

    # DeepSpeed's CPU accelerator for gloo, and its ops from where `make venv` built them (torch's default
    # folder would JIT-build the CPU comm op again, ~30 s, or find it stale)
    set_accelerator_env(use_gpu=backend != "gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    return deepspeed.__version__


__all__ = ["check_gpus", "check_placement", "driver_problem", "init_one_rank", "nccl_network", "placement_shortfall",
           "slots"]


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.gpu_check --driver | --nccl [--require-efa]``: one GPU node's checks, one line each."""
    import argparse

    import torch

    from facesr.hardware import cuda_status

    p = argparse.ArgumentParser(prog="python -m cluster.gpu_check", description=main.__doc__.splitlines()[0])
    p.add_argument("--driver", action="store_true", help="the NVIDIA driver runs this torch's CUDA build")
    p.add_argument("--nccl", action="store_true", help="which network NCCL takes on this node's GPUs")
    p.add_argument("--require-efa", action="store_true", help="with --nccl: fail unless it is EFA")
    a = p.parse_args(argv)
    failed = False
    if a.driver:
        status = cuda_status()
        smi = status["nvidia_smi"].splitlines()[0] if status["nvidia_smi"] else ""
        driver = smi.split(",")[1].strip() if smi.count(",") >= 2 else None
        problem = driver_problem(driver, torch.version.cuda) if driver else "; ".join(status["problems"]) or None
        print(f"driver: {smi or 'no nvidia-smi'}; torch {torch.__version__} (CUDA {torch.version.cuda}): "
              f"{problem or 'ok'}")
        failed |= problem is not None
    if a.nccl:
        r = nccl_check()
        via = "EFA (aws-ofi-nccl, provider efa)" if r["efa"] else f"no EFA: {r['network'] or 'no network line'}" + (
            f", provider {r['provider']}" if r["provider"] else "")
        print(f"NCCL on {r['gpus']} GPU(s): network {r['network']}, {via}")
        failed |= a.require_efa and not r["efa"]
    return 1 if failed else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

