"""`python -m launch.gpu_pack` (`make gpu-pack`): what a bare GPU host lacks for `make gpu-check`, built here.

The borrowed GPU machines have Python 3.12 with torch (CUDA 13), torchvision, timm, torchmetrics, numpy, PIL,
safetensors, pyyaml, pyarrow, prometheus-client, pytest and tqdm, no network, and take this working tree plus at
most 64 MiB of other files. This writes, into ``OUT`` (default ``.gpupack/``, git-ignored):

* ``wheels/``: DeepSpeed (PyPI has only its source: built here into a pure-Python wheel, its CUDA ops compiled
  on first use, none of which the check needs), WebDataset and OmegaConf, with the dependencies such a host lacks, each
  at the version this venv runs, as CPython 3.12 manylinux x86_64 wheels where they are binary
  (``pip download --python-version 3.12 --only-binary=:all:``); `launch.gpu_check` unpacks them there;
* ``shards/``: a few CelebA identities sharded by `facesr prep` (PNG members, as training reads them).

Prints what it wrote and the total size, and fails above 64 MiB. Needs PyPI (pip) and ../shared/data.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20
# what DeepSpeed and WebDataset require that a bare host lacks (packaging, numpy, tqdm, pyyaml, torch it has), and
# omegaconf: facesr's own configs (facesr/structured.py; a core dependency the GPU hosts do not have)
DEPS = ("hjson", "msgpack", "ninja", "psutil", "py-cpuinfo", "pydantic", "pydantic-core", "annotated-types",
        "typing-inspection", "einops", "braceexpand", "webdataset", "omegaconf")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "DS_BUILD_OPS": "0"})


def wheels(out: Path, python: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), f"deepspeed=={md.version('deepspeed')}")
    pins = [f"{name}=={md.version(name)}" for name in DEPS]
    platform = [x for p in PLATFORMS for x in ("--platform", p)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
        *platform, "-d", str(out), *pins)


def shards(out: Path, faces: Path, identities: int) -> None:
    """`facesr prep` (in this process, no Ray) over the ``identities`` identities with most images."""
    ids = sorted((d for d in faces.iterdir() if d.is_dir()), key=lambda d: (-len(list(d.iterdir())), d.name))
    with tempfile.TemporaryDirectory() as tmp:
        for d in ids[:identities]:
            (Path(tmp) / d.name).symlink_to(d.resolve())
        subprocess.run([sys.executable, "-m", "launch.cli", "prep", tmp, str(out), "--shard-size", "64",
                        "--val", "0.2", "--test", "0", "--no-ray", "--no-progress"], check=True, cwd=ROOT)


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.gpu_pack", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / ".gpupack"))
    p.add_argument("--faces", default=str(ROOT.parent / "shared" / "data" / "celeba-ids"))
    p.add_argument("--identities", type=int, default=6, help="identities to shard (the ones with most images)")
    p.add_argument("--python-version", default="3.12", help="the GPU host's Python")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    wheels(out / "wheels", a.python_version)
    shards(out / "shards", Path(a.faces), a.identities)
    for f in sorted((out / "wheels").iterdir()):
        print(f"  {f.stat().st_size / 2**20:6.2f} MiB  {f.name}")
    total = size(out)
    print(f"{out}: wheels {size(out / 'wheels') / 2**20:.1f} MiB, shards {size(out / 'shards') / 2**20:.1f} MiB, "
          f"total {total / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB that may travel")
    if total > LIMIT:
        print(f"gpu-pack: {total / 2**20:.1f} MiB is over the limit; use fewer --identities", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
