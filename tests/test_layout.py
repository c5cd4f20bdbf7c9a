"""Each top-level package imports only what its job needs (STYLE.md): an AST scan of every import,
function-level ones included, so a boundary cannot be crossed by a lazy import either."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {  # third-party and sibling packages each folder may import (the standard library is free)
    "facesr": {"torch", "torchvision", "timm", "torchmetrics", "numpy", "PIL", "safetensors",
               "tqdm",  # facesr/progress.py: the one progress system (a core dependency)
               "omegaconf",  # facesr/structured.py: typed configs (run configs, degradation mappings; core dependency)
               "onnx", "onnxruntime",  # onnx*: only `facesr export`, imported there lazily (the export extra)
               "dlib"},  # only facesr/identity/dlib_judge.py, imported when that judge is built (the dlib extra)
    # pyarrow: shards/store.py, the one filesystem layer of runs and shards in an object store
    "shards": {"facesr", "shards", "torch", "numpy", "PIL", "webdataset", "tqdm", "pyarrow"},
    "launch": {"facesr", "shards", "cluster", "launch", "torch"},
    # every benchmark: each layer, plus the libraries its naive baselines use; Ray and DeepSpeed only via cluster
    "launch/bench": {"facesr", "shards", "cluster", "launch", "torch", "numpy", "PIL",
                     "torchmetrics"},  # bench eval's naive path: torchmetrics' PSNR and SSIM per image
    "cluster": {"facesr", "shards", "cluster", "torch", "ray", "deepspeed", "prometheus_client", "psutil", "yaml",
                "matplotlib"},
}

# single files that may import one thing more than their folder: the API's Upscaler.load fetches a model given as
# an object-store URI through shards.store (imported only then; pyarrow is the `store` extra)
FILE_EXTRA = {"facesr/upscaler.py": {"shards"}}


def folder_of(f: Path) -> str:
    """The most specific folder of ALLOWED holding file ``f``."""
    rel = f.relative_to(ROOT).parent.as_posix()
    return max((k for k in ALLOWED if rel == k or rel.startswith(k + "/")), key=len)


def imports(folder: str) -> dict[str, set[str]]:
    """Top-level module names imported anywhere in ``folder`` (not in a more specific one) -> files importing them."""
    found: dict[str, set[str]] = {}
    for f in sorted((ROOT / folder).rglob("*.py")):
        if folder_of(f) != folder:
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            rel = f.relative_to(ROOT).as_posix()
            for n in names:
                if n.split(".")[0] not in FILE_EXTRA.get(rel, ()):
                    found.setdefault(n.split(".")[0], set()).add(rel)
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_package_imports_stay_inside_its_boundary(folder):
    """No module outside the folder's allowed set (e.g. ray, deepspeed or prometheus_client outside cluster/)."""
    found = imports(folder)
    foreign = {m: sorted(files) for m, files in found.items()
               if m not in sys.stdlib_module_names and m not in ALLOWED[folder]}
    assert foreign == {}, foreign


def test_benchmarks_live_in_one_place():
    """Every benchmark module is in launch/bench/ (one per `facesr bench` kind), none beside the code it times."""
    from launch.bench import KINDS

    stray = sorted(str(f.relative_to(ROOT)) for pkg in ("facesr", "shards", "cluster", "launch")
                   for f in (ROOT / pkg).rglob("*bench*.py") if "launch/bench/" not in f.as_posix())
    assert stray == []
    assert sorted(KINDS) == sorted(f.stem for f in (ROOT / "launch/bench").glob("*.py") if f.stem != "__init__")
