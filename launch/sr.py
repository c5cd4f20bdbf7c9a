"""`facesr sr MODEL IN OUT`: super-resolve a 24x24 face image, or a folder of them, to 192x192 PNGs.

MODEL: run folder, SR-net .safetensors, or an export (.pt TorchScript, .onnx).
Inputs other than 24x24 are resized with a warning; --fit instead treats them as face photos
framed like LFW (central 192 crop, degraded to 24x24 as in training and evaluation).
Inputs are read by facesr.imageio (formats by content from an allowlist, a pixel limit, EXIF
orientation); each file it refuses is reported with the reason and skipped.
"""

from __future__ import annotations

import sys

import torch


def configure(p) -> None:
    p.add_argument("model", metavar="MODEL", help="run folder, SR-net .safetensors, .pt (TorchScript) or .onnx; "
                   "or its s3:// URI")
    p.add_argument("src", metavar="IN", help="image file or folder (searched recursively)")
    p.add_argument("out", metavar="OUT", help="output folder (or a .png path when IN is one image)")
    p.add_argument("--fit", action="store_true", help="inputs are LFW-framed face photos: crop 192 and degrade to 24")
    p.add_argument("--compare", action="store_true",
                   help="write a before/after panel per input: the 24x24 input, bicubic x8, facesr x8")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> int:
    from facesr.infer import load_upscaler, super_resolve
    from shards.store import local_model

    device = "cpu" if args.model.endswith(".onnx") else args.device  # ONNX runs on the CPU runtime
    model = load_upscaler(local_model(args.model), device)
    report = super_resolve(
        model, args.src, args.out, fit=args.fit, compare=args.compare, batch_size=args.batch_size, device=device,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(f"wrote {len(report.written)} PNGs to {args.out}; {len(report.resized)} resized, "
          f"{len(report.skipped)} skipped (refused by the image reader, reasons above)")
    return 0 if report.written or not (report.skipped or report.resized) else 1
