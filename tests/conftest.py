"""Shared test fixtures: where the real faces are, and skipping only the tests that need them.

The faces live in ``../shared/data`` beside the checkout (``FACESR_TEST_DATA``
points elsewhere). A test needs them when its code, its fixtures' code, or the
functions of tests/ these call (``tests.fixtures_faces.make_src``, a module's
``_face`` helper, ...) name a path under ``DATA`` (``LFW``, ``CELEBA``, a file
such as ``DATA / "lfw-pairs.txt"``). Such tests get the ``needs_faces`` marker
(``pytest -m "not needs_faces"`` runs the rest) and are skipped, with the
missing folder as the reason, when it is absent; every other test runs. Under ``CI=true`` a missing data
folder or system part fails those tests instead: a CI run that skipped half the suite has not tested it.

The system parts (Prometheus, promtool, iproute2) are installed at session start (``tests/system.py``), so no
test depends on another having installed them first; the session ends with the skips counted by reason.
"""

from __future__ import annotations

import dis
import importlib
import inspect
import os
import shutil
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACESR_TEST_DATA") or ROOT.parent / "shared" / "data").resolve()
LFW = DATA / "lfw"
CELEBA = DATA / "celeba-ids"


CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MISSING_SYSTEM: dict[str, str] = {}  # binary -> package, still missing after tests.system.ensure()


def pytest_sessionstart(session):
    from tests import system

    MISSING_SYSTEM.update(system.ensure(log=lambda m: print(m, flush=True)))
    from facesr.hardware import retain_freed_memory

    retain_freed_memory()  # in-process training and evaluation run as the CLI and the workers do (hardware.py)


def needs_system(binary: str) -> None:
    """Skip the calling test when a system part is missing (a failure under CI=true)."""
    from tests.system import skip_reason

    if binary in MISSING_SYSTEM or shutil.which(binary) is None:
        pytest.skip(skip_reason(binary))  # a failure under CI (pytest_runtest_makereport)


def _under_data(p: object) -> bool:
    return isinstance(p, (str, Path)) and (Path(p) == DATA or DATA in Path(p).parents)


def _top(p: Path) -> Path:
    """The folder (or file) directly under DATA that ``p`` lives in: what must exist for ``p`` to."""
    rel = Path(p).relative_to(DATA).parts
    return DATA / rel[0] if rel else DATA


def _data_paths(fn: object, seen: set) -> set[Path]:
    """Paths under DATA that ``fn``'s code names, following the functions of tests/ it calls."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))  # bound methods, lru_cache wrappers
    code = getattr(fn, "__code__", None)
    if code is None or fn in seen:
        return set()
    seen.add(fn)
    found, stack = set(), [code]
    while stack:
        c = stack.pop()
        stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]  # nested functions, comprehensions
        named = [fn.__globals__.get(name) for name in c.co_names]
        module = None
        for ins in dis.get_instructions(c):  # `from tests.x import helper` inside a function or fixture
            if ins.opname == "IMPORT_NAME":
                module = ins.argval
            elif ins.opname == "IMPORT_FROM" and str(module).startswith("tests"):
                named.append(getattr(importlib.import_module(module), ins.argval, None))
        for v in named:
            if isinstance(v, Path) and _under_data(v):
                found.add(v)
            elif callable(v) and str(getattr(v, "__module__", "")).startswith("tests"):
                found |= _data_paths(v, seen)
    return found


def _skip_reason(missing: list[Path]) -> str:
    return (f"needs real faces: {', '.join(map(str, missing))} not found "
            "(../shared/data beside the checkout, or set FACESR_TEST_DATA)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        funcs = [getattr(item, "function", None)]
        funcs += [defs[-1].func for defs in (info.name2fixturedefs.values() if info else ()) if defs]
        paths = set().union(*(_data_paths(f, set()) for f in funcs if f is not None))
        if not paths:
            continue
        item.add_marker(pytest.mark.needs_faces)
        missing = sorted({_top(p) for p in paths if not _top(p).exists()})
        if missing:
            if CI:
                item.stash[_MISSING] = _skip_reason(missing)
            else:
                item.add_marker(pytest.mark.skip(reason=_skip_reason(missing)))


_MISSING = pytest.StashKey[str]()


def pytest_runtest_setup(item):
    """Under CI=true a test whose faces are missing fails at setup, naming the folder."""
    if _MISSING in item.stash:
        pytest.fail(f"CI=true: {item.stash[_MISSING]}")


def pytest_terminal_summary(terminalreporter):
    """How many tests skipped, and why (one line per reason), whatever -r was asked for."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        terminalreporter.write_line("facesr: 0 tests skipped")
        return
    reasons: dict[str, int] = {}
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    terminalreporter.write_line(f"facesr: {len(skipped)} tests skipped")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"  {n:4d}  {reason}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that builds a data path by hand (so the scan above cannot see it) and finds it missing is
    reported skipped with the same reason, not failed. Only when the data is really absent: with the data in
    place a missing file under it stays a failure."""
    rep = yield
    exc = call.excinfo.value if call.excinfo else None
    if not CI and rep.failed and isinstance(exc, FileNotFoundError) and _under_data(exc.filename):
        top = _top(Path(exc.filename))
        if not top.exists():
            rep.outcome = "skipped"
            rep.longrepr = (str(item.path), item.location[1], f"Skipped: {_skip_reason([top])}")
    if CI and rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("gpu") is None:
        # CI runs as root with the data and every extra installed: only a missing GPU may skip a test
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"CI=true: a skip is a failure here (only -m gpu tests may skip): {reason}"
    return rep


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder as the training job writes it: srnet.safetensors of a tiny cascade with non-trivial output."""
    from facesr.weights import save_srnet

    d = tmp_path_factory.mktemp("runs") / "demo"
    save_srnet(d / "srnet.safetensors", tiny_net())
    return d


def tiny_net(seed: int = 0):
    """A tiny SR cascade whose branches are not the zero-initialised skip-only output, in eval mode."""
    import torch

    from facesr.models import PRESETS, SRNet

    torch.manual_seed(seed)
    net = SRNet(PRESETS["tiny"].sr)
    with torch.no_grad():
        for b in net.branches:
            b.body[-1].weight.normal_(0, 1e-3)
    return net.eval()


class S3Server:
    """moto's standalone S3 server on loopback, checking credentials like a real store: its first
    ``INITIAL_NO_AUTH_ACTION_COUNT`` requests create an IAM user with an access key, every later request
    must be signed with that key (moto accepts any key otherwise)."""

    def __init__(self, log: Path):
        import socket
        import subprocess
        import sys
        import time

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        iam = self.client("iam", "unused", "unused")  # the three unauthenticated actions
        iam.create_user(UserName="facesr")
        iam.put_user_policy(UserName="facesr", PolicyName="all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
        key = iam.create_access_key(UserName="facesr")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def env(self, **extra: str) -> dict:
        """What a process on a cloud node has: credentials in the environment, endpoint and region too."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", **extra}

    def client(self, service: str = "s3", key_id: str | None = None, secret: str | None = None):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key_id or self.key_id, aws_secret_access_key=secret or self.secret)

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3-compatible server for the session (tests/test_store.py)."""
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


# ---------------------------------------------------------------- one monitored training job for the session


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory):
    """A real Prometheus on 127.0.0.1 finding exporters through a temporary file_sd dir and an HTTP SD table
    (cluster/discovery.py's, served on loopback); yields (url, sd_dir, sd_table). For the session: the job below
    is scraped by it, tests/test_monitoring_prometheus.py queries it."""
    from cluster import monitor
    from cluster.discovery import SDServer, TargetTable

    needs_system("prometheus")  # installed at session start (tests/system.py)
    tmp = tmp_path_factory.mktemp("prometheus")
    sd_dir = tmp / "sd"
    sd_dir.mkdir()
    ray_sd = tmp / "ray_sd.json"
    ray_sd.write_text("[]")  # no Ray cluster scraped: an empty target list
    table = TargetTable()
    server = SDServer(table, "127.0.0.1", 0)
    port = monitor.free_port()
    text = monitor.render_config(str(sd_dir), str(ray_sd), scrape_interval="1s", sd_url=server.url)
    log = open(tmp / "prometheus.log", "w")
    proc = monitor.start(text, str(tmp / "data"), port=port, log_file=log)
    url = f"http://127.0.0.1:{port}"
    try:
        monitor.wait_ready(url, proc)
        yield url, sd_dir, table
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        server.close()


@pytest.fixture(scope="session")
def monitored_job(request) -> dict:
    """The three stages of cpu.yaml on 2 workers with ZeRO-1, submitted with `ray job submit` to a token-auth head,
    exporters on and found by the session's Prometheus: one run that tests/test_train.py checks as a training
    job and tests/test_monitoring_prometheus.py as a monitored one (each used to train its own).
    Without Prometheus on the machine (outside CI) the job runs unwatched and the monitoring tests skip.
    Returns {"run": run folder, "window": (start, end) Unix times of the job}."""
    import subprocess
    import tempfile
    import time

    from cluster import monitor
    from tests.test_train import BIN, CPU, FAST, TokenHead, make_shards

    scratch = Path(tempfile.mkdtemp(prefix="fsr-job-"))  # private: pytest's basetemp is pruned by other sessions
    watched = "prometheus" not in MISSING_SYSTEM and shutil.which("prometheus")
    sd_dir = request.getfixturevalue("prometheus")[1] if watched else scratch / "sd"
    sd_dir.mkdir(exist_ok=True)  # unwatched: the exporters still advertise, into a folder nobody reads
    head = TokenHead(scratch / "head")
    try:
        shards, storage = make_shards(scratch / "data"), scratch / "runs"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", head.url, "--working-dir", ".", "--",
               "python", "-m", "launch.train", "--config", CPU, f"data.shards={shards}",
               f"cluster.storage_path={storage}", "run.name=job", f"run.telemetry_port={monitor.free_port()}",
               f"run.telemetry_sd_dir={sd_dir}", *FAST,
               "engine.zero_stage=1",  # the configs use 0; this run keeps the sharded-optimizer path tested
               "run.val_every=2",  # validation after epochs 2, 4, 6 of stage 1 and 2, 3 (the last) of stage 2
               # and the cascade's detail gate (stage 3): 2 epochs of 4 steps, validated after the last
               "run.stages=[1,2,3]", "stage3.epochs=2", "stage3.steps_per_epoch=4", "stage3.batch_size=8",
               "stage3.max_micro_batch=4"]
        start = time.time()
        res = subprocess.run(cmd, cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=600)
        end = time.time()
    finally:
        head.stop()  # the tests read the run folder only: no idle Ray head for the rest of the session
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()
    yield {"run": storage / "job", "window": (start, end)}
    shutil.rmtree(scratch, ignore_errors=True)
