"""Ray side of ``facesr prep``: run prep calls as Ray tasks (``ray_map``) on the Ray that
``cluster.ray_connect.connect`` started or joined."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import ray


def ray_map(fn: Callable, arglist: list[tuple], retries: int = 2) -> Iterator[tuple[int, object]]:
    """Mapper for ``shards.prep.prepare``: one Ray task (1 CPU) per call, results in completion order."""
    task = ray.remote(num_cpus=1, max_retries=retries, scheduling_strategy="SPREAD")(fn)
    refs = [task.remote(*args) for args in arglist]
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield index[done[0]], ray.get(done[0])
