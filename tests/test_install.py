"""`pip install '.[faces]'` without the train extra, into a clean virtualenv, gives a working `facesr sr` on a
photo, `facesr export`, `facesr info` and the API; training's stack is not there.

One venv for the module (the install is the cost: torch comes from the machine's local package copy, dlib-bin
and face-recognition-models from the index or pip's cache): 845 s for the venv and 184 s for the test on this
machine's 2 cores at a load average of ~18 (README "Faces in photos"). The launcher's lazy imports are also
checked in the project's own venv (fast)."""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import LFW, ROOT

# training's stack (the train extra); pyyaml comes with timm, and torchmetrics imports matplotlib when present
TRAINING = ("ray", "deepspeed", "webdataset", "prometheus_client", "pyarrow")
SOURCES = ("facesr", "shards", "cluster", "launch", "pyproject.toml", "README.md")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory):
    """A fresh venv with `pip install '<copy of the checkout>[faces]'` (no train, test or export extra)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    for name in SOURCES:  # a copy: the build writes egg-info and build/ beside the sources
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir()
                                        else {}))
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    run([env_dir / "bin" / "python", "-m", "pip", "install", "-q", f"{src}[faces]"], timeout=1800)
    return env_dir / "bin"


@pytest.mark.slow
def test_inference_install_runs_sr_export_info_and_the_api(clean_venv, tmp_path, tiny_run):
    """In the clean venv: no training package is importable; `facesr sr` finds and super-resolves the face in an
    LFW photo (photo x8, aligned face, JSON); `facesr export` writes TorchScript; `facesr info` prints the
    preset; `from facesr import Upscaler` super-resolves a batch."""
    py = clean_venv / "python"
    found = run([py, "-c", f"import importlib.util as u; print([m for m in {TRAINING!r} if u.find_spec(m)])"])
    assert found.stdout.strip() == "[]", found.stdout
    photo = tmp_path / "photo.jpg"
    shutil.copy(sorted((LFW / "Colin_Powell").iterdir())[0], photo)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package, not the checkout
    res = run([clean_venv / "facesr", "sr", tiny_run, photo, tmp_path / "out", "--detector", "hog",
               "--device", "cpu"], env=env, cwd=tmp_path)
    assert "1 faces from 1 photos" in res.stdout, res.stdout + res.stderr
    assert Image.open(tmp_path / "out" / "photo.png").size == (2000, 2000)
    assert Image.open(tmp_path / "out" / "photo-faces" / "0.png").size == (192, 192)
    assert (tmp_path / "out" / "photo.json").is_file()
    res = run([clean_venv / "facesr", "export", tiny_run, tmp_path / "export"], env=env, cwd=tmp_path)
    assert (tmp_path / "export" / "srnet_deploy.pt").is_file() and "onnx: skipped" in res.stderr
    assert "tiny" in run([clean_venv / "facesr", "info", "--preset", "tiny"], env=env, cwd=tmp_path).stdout
    api = run([py, "-c", "import sys, numpy as np; from facesr import Upscaler; "
               f"up = Upscaler.load({str(tiny_run)!r}, 'cpu'); "
               "print(up.faces(np.zeros((2, 24, 24, 3), np.uint8)).shape); "
               f"print(sorted(m for m in {TRAINING!r} if m in sys.modules))"], env=env, cwd=tmp_path)
    assert api.stdout.split("\n")[:2] == ["(2, 192, 192, 3)", "[]"], api.stdout


def test_launcher_imports_no_training_module_for_sr_export_info(tiny_run, tmp_path):
    """`facesr sr`, `facesr export` and `facesr info` import none of ray, deepspeed, webdataset,
    prometheus_client or pyarrow (each subcommand imports only its own module)."""
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "a.png")
    for args in (["sr", tiny_run, tmp_path / "a.png", tmp_path / "a-out.png", "--device", "cpu"],
                 ["export", tiny_run, tmp_path / "exp", "--format", "torchscript", "--no-check"],
                 ["info", "--preset", "tiny"]):
        code = (f"import sys; from launch.cli import main; rc = main({[str(a) for a in args]!r}); "
                f"print('LOADED', sorted(m for m in {TRAINING!r} if m in sys.modules), rc)")
        res = run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert res.stdout.strip().splitlines()[-1] == "LOADED [] 0", (args[0], res.stdout[-500:])


def test_the_venv_carries_deepspeeds_built_op_so_a_first_run_compiles_nothing():
    """`make venv` runs `launch.build_ops`: DeepSpeed's CPU comm op is built inside the venv, where a run looks
    for it, and is current for the ``ninja`` a run's workers use (the venv's), so `make demo`'s first stage does
    not spend 20-60 s compiling it."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not in a venv: `make venv` builds one")
    code = ("from cluster.engine import ops_to_build, set_accelerator_env\n"
            "set_accelerator_env(use_gpu=False)\n"
            "ops, cache = ops_to_build()\n"
            "print(repr(ops), cache)\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))  # as Ray's workers run
    out = run([sys.executable, "-c", code], cwd=ROOT, env=env).stdout.split()
    assert out[0] == "[]", f"a run here would compile {out[0]} first: `make venv` did not build it"
    assert Path(out[1]).resolve().is_relative_to(Path(sys.prefix).resolve()), out[1]
