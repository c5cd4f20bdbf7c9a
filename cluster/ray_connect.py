"""Starting or joining Ray: the one function every facesr command uses (prep, train, benchmarks).

Where, in order:
* Ray already initialised in this process: that one.
* ``address="local"``: always a new local Ray (tests, laptops, the demo).
* an address (the argument, ``cluster.address``, or ``RAY_ADDRESS``, which ``ray job submit`` sets for the
  driver): join that cluster; unreachable is an error (``ConnectionError``). ``"auto"`` joins a cluster
  started on this machine with ``ray start``.
* nothing: a new local Ray. A cluster someone else started on the same machine is never joined unasked.

Token auth stays on: ``RAY_AUTH_MODE=token`` unless the environment already says otherwise, so a new local
Ray reads (or generates) ``~/.ray/auth_token`` and refuses drivers without it, and joining a cluster presents
the token. Ray 2.60 also turns it on by default for a new local Ray, but then warns about it on every start;
stating the mode keeps it on whatever Ray's default becomes, and says nothing.

A new local Ray runs with its dashboard on 127.0.0.1 (token-protected like the rest), and its workers are told
where (``RAY_API_SERVER_ADDRESS``): Ray Train's ``PlacementGroupCleaner`` asks the State API, which the
dashboard serves, every second whether the training controller is alive, and finds it by that variable or
else by looking for *the* Ray on the machine. Without a dashboard, or with a second Ray on the same machine
(another user's, a test's), every question failed ("Failed to query Ray Train Controller actor state",
~300 lines in one demo) and a crashed controller's placement group would never have been freed.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import ray
from ray._raylet import Config

ROOT = Path(__file__).resolve().parents[1]  # this checkout: workers of a new local Ray import it from here
HEALTH_CHECK_INTERVAL_S = "0.5"  # Ray Train's controller polls its workers this often (module docstring)


def connect(address: str | None = None, *, num_cpus: int | None = None, use_gpu: bool = False) -> str:
    """Initialise Ray by the rules above; returns a phrase saying what it connected to (for the log).

    ``use_gpu``: False makes a new local Ray's workers use DeepSpeed's CPU accelerator. Workers' stdout and
    stderr reach this console (log_to_driver): their warnings and tracebacks; facesr's workers print little.
    """
    set_train_defaults()
    if ray.is_initialized():
        return "the Ray instance this process already uses"
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray read its config at import; re-read it, as Ray does when it turns auth on itself
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}  # Ray's INFO start-up lines stay out
    target = None if address == "local" else (address or os.environ.get("RAY_ADDRESS") or None)
    if target:  # an existing cluster; under `ray job submit` its runtime env is the job's
        ray.init(address=target, **quiet)
        return f"Ray cluster at {target} ({_cpus()} CPUs)"
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)
    dashboard = _free_port()
    env = {"PYTHONPATH": path, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}", "PATH": _venv_first()}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env}, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard, **quiet)
    return f"a new local Ray ({_cpus()} CPUs, dashboard http://127.0.0.1:{dashboard})"


def set_train_defaults() -> None:
    """Ray Train settings this driver's trainers pass on to their controller, where the environment is silent."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def _cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def _venv_first() -> str:
    """PATH with this interpreter's bin folder first, so workers build DeepSpeed's ops with the ``ninja`` of this
    environment, as the tests (and an activated venv) do. With another ``ninja`` first (/usr/bin's) every
    switch between the two rebuilt the cached shm op from scratch (20-90 s): each version finds the other's
    build log stale."""
    return os.pathsep.join(p for p in (str(Path(sys.executable).parent), os.environ.get("PATH", "")) if p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
