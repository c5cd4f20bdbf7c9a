"""Nothing let in: weights never unpickled, no unsafe loaders in the source, exporters bound where configured.

Elsewhere: a planted pickle given as stage2.priors or as a model to `facesr export` / `eval`, and a run config
carrying a !!python tag (tests/test_hostile_inputs.py); the job API's token check on a real two-node cluster (tests/test_cluster.py::
test_job_api_refuses_requests_without_the_token, ::test_dashboard_binds_the_configured_address_only);
shard decoding refusing pickle members (tests/test_shards_stream.py::test_pickle_members_refused_and_counted);
DeepSpeed checkpoints loading weights-only (tests/test_train.py::test_checkpoints_load_weights_only_and_hold_no_priors);
ray_cluster.yaml keeping token auth and a loopback dashboard (tests/test_ray_cluster_yaml.py);
user images read by content from a format allowlist, so EPS never reaches Ghostscript, and decompression
bombs refused (tests/test_image_io.py).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

SOURCE_DIRS = ("facesr", "shards", "cluster", "launch")


class _Payload:
    """Unpickling this creates a file: proof that something ran pickle.loads on our bytes."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path(self.target).touch, ())


def _planted(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A torch.save'd pickle bearing the payload, under a weights file's name; and the payload's target."""
    target = tmp_path / "pwned"
    path = tmp_path / name
    torch.save({"x2.weight": torch.zeros(1), "evil": _Payload(str(target))}, path)
    return path, target


@pytest.mark.parametrize("name", ["priors.safetensors", "srnet.safetensors"])
def test_pickle_planted_as_weights_refused_unread(tmp_path, name):
    """A pickle file planted where safetensors weights belong is refused with a message naming it; the payload
    never runs (safetensors reads a JSON header and raw tensors, nothing else)."""
    from facesr.weights import load_priors, load_srnet, read_meta

    path, target = _planted(tmp_path, name)
    for load in (read_meta, load_priors, load_srnet):
        with pytest.raises(ValueError, match=rf"{path}: not a safetensors weights file"):
            load(path)
    assert not target.exists()
    proof = tmp_path / "proof.pt"  # torch.load reads *.safetensors names with safetensors: another name
    proof.write_bytes(path.read_bytes())
    torch.load(proof, weights_only=False)  # the payload is real: an unpickling load runs it
    assert target.exists()


def test_sr_refuses_pickle_posing_as_torchscript(tmp_path, capsys):
    """`facesr sr` given a torch.save pickle named model.pt: TorchScript's loader refuses it without running the
    payload (it resolves only TorchScript types), and the command fails in one line instead of producing images."""
    from launch.cli import main

    path, target = _planted(tmp_path, "model.pt")
    (tmp_path / "in").mkdir()
    assert main(["sr", str(path), str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "constants.pkl" in err or "archive" in err.lower() or "TorchScript" in err, err
    assert not target.exists()
    assert not (tmp_path / "out").exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = []
            while isinstance(f, ast.Attribute):
                dotted.append(f.attr)
                f = f.value
            dotted.append(f.id if isinstance(f, ast.Name) else "?")  # "?": a method of a computed value
            yield ".".join(reversed(dotted)), node


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def test_no_unpickling_loader_in_the_source():
    """Every torch.load passes weights_only=True; no pickle/marshal/dill/joblib load, no np.load with
    allow_pickle, no yaml.load outside a SafeLoader subclass, no eval/exec, in facesr/ shards/ cluster/ launch/."""
    offences = []
    n_torch_load = 0
    for d in SOURCE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for name, node in _calls(tree):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if name == "torch.load":
                    n_torch_load += 1
                    wo = _kw(node, "weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        offences.append(f"{where}: torch.load without weights_only=True")
                elif name.split(".")[-1] in ("load", "loads", "Unpickler") and name.split(".")[0] in (
                        "pickle", "cPickle", "marshal", "dill", "joblib", "cloudpickle", "shelve"):
                    offences.append(f"{where}: {name}")
                elif name in ("np.load", "numpy.load"):
                    ap = _kw(node, "allow_pickle")
                    if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                        offences.append(f"{where}: np.load with allow_pickle")
                elif name in ("yaml.load", "yaml.load_all"):
                    loader = _kw(node, "Loader")
                    if not (isinstance(loader, ast.Name) and loader.id in ("_Loader", "SafeLoader", "CSafeLoader")):
                        offences.append(f"{where}: yaml.load without a safe loader")
                elif name in ("eval", "exec", "yaml.unsafe_load", "yaml.full_load"):
                    offences.append(f"{where}: {name}")
    assert not offences, offences
    assert n_torch_load >= 1  # the walk does find calls (cluster/engine.py's weights-only checkpoint loader)
    from cluster.config import _Loader
    import yaml

    assert issubclass(_Loader, yaml.SafeLoader)


# ---------------------------------------------------------------- exporters bind where configured

_SERVE = """
import sys, time
from cluster.telemetry import Telemetry
t = Telemetry(run="sec", stage="sr", rank=0, node="n", port=int(sys.argv[2]), host=sys.argv[1])
print(t.port, flush=True)
time.sleep(120)
"""

_PROBE = """
import socket, sys
s = socket.socket(); s.settimeout(3)
print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))
"""


@pytest.fixture
def netns(tmp_path):
    """A namespace of our own with loopback and one other address (10.213.1.1 on a veth pair whose both ends
    stay inside): two addresses of one machine, and nothing outside it."""
    name = f"fsr-sec{os.getpid() % 100000}"
    cmds = [["ip", "netns", "add", name], ["ip", "-n", name, "link", "set", "lo", "up"],
            ["ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1"],
            ["ip", "-n", name, "addr", "add", "10.213.1.1/24", "dev", "d0"], ["ip", "-n", name, "link", "set", "d0", "up"],
            ["ip", "-n", name, "link", "set", "d1", "up"]]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield name
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="ip netns needs root")
@pytest.mark.parametrize("bind, other", [("127.0.0.1", "10.213.1.1"), ("10.213.1.1", "127.0.0.1")])
def test_exporter_reachable_only_on_its_configured_address(netns, bind, other):
    """cluster.telemetry.Telemetry serves on the address it was given and refuses connections on the machine's
    other address (same port): an exporter configured for loopback is not exposed on the network, and one on
    the node IP is not on loopback either."""
    ns = ["ip", "netns", "exec", netns]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([*ns, sys.executable, "-c", _SERVE, bind, "9464"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().strip() or 0)
        assert port, server.stderr.read()[-2000:]

        def probe(addr: str) -> int:
            out = subprocess.run([*ns, sys.executable, "-c", _PROBE, addr, str(port)], capture_output=True, text=True,
                                 timeout=30)
            return int(out.stdout.strip())

        assert probe(bind) == 0
        assert probe(other) != 0  # ECONNREFUSED: nothing listens on that address
    finally:
        server.kill()
        server.wait()
