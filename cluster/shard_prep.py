"""Ray side of ``facesr prep``: connect to (or start) a cluster and run prep tasks as Ray tasks.

Connection rules, in order:
* ``address="local"``: always start a private local Ray (tests, laptops).
* ``RAY_ADDRESS`` set (``ray job submit`` sets it for the driver) or an explicit
  address: connect there; the tasks then spread over every node.
* otherwise ``address="auto"``: join a cluster started on this machine with
  ``ray start``; when none is reachable, start a local Ray with ``num_cpus``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import ray


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Initialise Ray; returns a phrase saying what it connected to (for the log)."""
    if ray.is_initialized():
        return "the Ray instance this process already uses"
    quiet = {"include_dashboard": False, "log_to_driver": True, "logging_level": "warning"}
    if address == "local":
        ray.init(num_cpus=num_cpus, **quiet)
        return f"a new local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=target, logging_level="warning", log_to_driver=True)
        return f"Ray cluster at {target} ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    except ConnectionError:
        if address not in (None, "auto") or os.environ.get("RAY_ADDRESS"):
            raise
    ray.init(num_cpus=num_cpus, **quiet)
    return f"a new local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs; no cluster was reachable)"


def ray_map(fn: Callable, arglist: list[tuple], retries: int = 2) -> Iterator[tuple[int, object]]:
    """Mapper for ``shards.prep.prepare``: one Ray task (1 CPU) per call, results in completion order."""
    task = ray.remote(num_cpus=1, max_retries=retries, scheduling_strategy="SPREAD")(fn)
    refs = [task.remote(*args) for args in arglist]
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield index[done[0]], ray.get(done[0])


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
