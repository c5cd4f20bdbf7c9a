"""Each top-level package imports only what its job needs (STYLE.md): an AST scan of every import,
function-level ones included, so a boundary cannot be crossed by a lazy import either."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {  # third-party and sibling packages each package may import (the standard library is free)
    "facesr": {"torch", "torchvision", "timm", "torchmetrics", "numpy", "PIL", "safetensors",
               "onnx", "onnxruntime"},  # onnx*: only `facesr export`, imported there lazily (the export extra)
    "shards": {"facesr", "torch", "numpy", "PIL", "webdataset", "tqdm"},
    "launch": {"facesr", "shards", "cluster", "torch"},
    "cluster": {"facesr", "shards", "torch", "ray", "deepspeed", "prometheus_client", "psutil", "yaml", "matplotlib"},
}


def imports(package: str) -> dict[str, set[str]]:
    """Top-level module names imported anywhere in ``package`` -> files importing them."""
    found: dict[str, set[str]] = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                found.setdefault(n.split(".")[0], set()).add(str(f.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_stay_inside_its_boundary(package):
    """No module outside the package's allowed set (e.g. ray, deepspeed or prometheus_client outside cluster/)."""
    found = imports(package)
    foreign = {m: sorted(files) for m, files in found.items()
               if m != package and m not in sys.stdlib_module_names and m not in ALLOWED[package]}
    assert foreign == {}, foreign
