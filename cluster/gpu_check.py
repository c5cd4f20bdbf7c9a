"""The driver's check, before any training worker starts, that the GPUs a run asks for can train.

With ``cluster.use_gpu`` the driver (on a cloud cluster: the CPU head, which has no GPU itself) asks the Ray
cluster for its GPU nodes and runs ``facesr.hardware.cuda_status`` on one GPU of each: the NVIDIA driver
answers, torch is a CUDA build that sees the device, a tensor op runs. A cluster without any GPU node, or a
GPU node where CUDA does not work, is refused with a ``ConfigError`` on ``cluster.use_gpu`` naming the node
and what is missing, instead of a worker group that fails (or waits) later inside NCCL or DeepSpeed.
"""

from __future__ import annotations

import logging

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
    total = sum(n["Resources"]["GPU"] for n in gpu_nodes)
    for s in statuses:
        log.info("CUDA works on %s: %d device(s), %s, torch %s (CUDA %s)", s["node"], s["devices"],
                 s["nvidia_smi"].splitlines()[0] if s["nvidia_smi"] else "?", s["torch"], s["cuda"])
    if total < c.num_workers * c.gpus_per_worker:  # an autoscaler may still add nodes: said, not refused
        log.warning("the cluster has %g GPUs now and the run asks for %s: training waits for more GPU nodes",
                    total, asked)
    return statuses


__all__ = ["check_gpus"]
