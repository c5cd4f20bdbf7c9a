"""`facesr export MODEL OUT_DIR`: the deploy network (branches removed) as TorchScript and ONNX, parity-checked."""

from __future__ import annotations

import importlib.util
import json
import sys


def configure(p) -> None:
    p.add_argument("model", metavar="MODEL", help="run folder or SR-net .safetensors (or its s3:// URI)")
    p.add_argument("out", metavar="OUT_DIR", help="folder for srnet_deploy.pt / srnet_deploy.onnx")
    p.add_argument("--format", nargs="+", choices=["torchscript", "onnx"],
                   help="default: torchscript, and onnx when the export extra (onnx, onnxscript) is installed")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--onnx-backend", default="auto", choices=["auto", "onnxruntime", "reference"],
                   help="runtime of the ONNX parity check (auto: onnxruntime if installed)")


def run(args) -> int:
    from facesr.export import TOLERANCE, export
    from facesr.infer import load_cascade

    formats = args.format or ["torchscript"] + (["onnx"] if _onnx_installed() else [])
    if not args.format and "onnx" not in formats:
        print("onnx: skipped, the export extra is not installed (pip install 'facesr[export]')", file=sys.stderr)
    model = args.model
    if "://" in model:  # the store extra (pyarrow); a plain install exports local files
        from shards.store import local_model

        model = local_model(model)
    deploy = load_cascade(model, "cpu").deploy()
    result = export(deploy, args.out, tuple(formats), check=not args.no_check, onnx_backend=args.onnx_backend)
    for fmt, r in result.items():
        parity = f", max |diff| vs PyTorch {r['max_abs_diff']:.2e} (tolerance {TOLERANCE:.0e}, {r['runtime']})" \
            if "max_abs_diff" in r else ""
        print(f"{fmt}: {r['path']}{parity}")
    print(json.dumps(result))
    return 0


def _onnx_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
