"""`facesr sr MODEL IN OUT`: super-resolve the faces in a photo, or a folder of photos.

MODEL: run folder, SR-net .safetensors, or an export (.pt TorchScript, .onnx); or its s3:// URI.
By default every face in each photo is found (dlib's HOG and CNN detectors, the ``faces`` extra), aligned to
the training framing, super-resolved and pasted back into the photo enlarged x8 (``--scale``); the aligned
faces and a JSON of boxes, sizes and scores are written beside it (facesr.faces.photos). ``--boxes FILE``
gives the faces' boxes instead, for faces smaller than the detectors find. ``--faces-only`` (or ``--fit``)
takes each input as one face crop, as before: 24x24 in, 192x192 PNG out (facesr.infer).
Inputs are read by facesr.imageio (formats by content from an allowlist, a pixel limit, EXIF orientation);
each file it refuses gets a ``skipped`` line with the reason. OUT must lie outside IN; nothing is written
through a link planted in OUT.
"""

from __future__ import annotations

import sys

import torch


def configure(p) -> None:
    p.add_argument("model", metavar="MODEL", help="run folder, SR-net .safetensors, .pt (TorchScript) or .onnx; "
                   "or its s3:// URI")
    p.add_argument("src", metavar="IN", help="image file or folder (searched recursively)")
    p.add_argument("out", metavar="OUT", help="output folder (or a .png path when IN is one image)")
    p.add_argument("--faces-only", action="store_true",
                   help="inputs are face crops: each is shrunk to 24x24 and super-resolved whole (no detection)")
    p.add_argument("--fit", action="store_true", help="with --faces-only (implied): inputs are LFW-framed face "
                   "photos: crop 192 and degrade to 24")
    p.add_argument("--boxes", metavar="FILE", help="JSON of face boxes [left, top, right, bottom] (photo px): a list "
                   "for one photo, or {photo: [boxes]}; used instead of the detectors")
    p.add_argument("--scale", type=float, default=8.0, help="enlargement of the photo the faces are pasted into "
                   "(bicubic; default 8, the network's)")
    p.add_argument("--detector", default="hog,cnn", help="dlib detectors to run: hog, cnn or hog,cnn (HOG finds "
                   "the small faces; the CNN adds poses HOG misses, from larger sizes, ~100x slower on a CPU)")
    p.add_argument("--compare", action="store_true",
                   help="also write a before/after panel per face: the 24x24 input, bicubic x8, facesr x8")
    p.add_argument("--batch-size", type=int, default=16, help="crops per batch with --faces-only (on photos, "
                   "each photo's faces are one batch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="flip: each face's output averaged with the mirror of its mirror's output (twice the "
                   "arithmetic; README: identity section)")
    p.add_argument("--detail", type=float, default=None, metavar="D",
                   help="the network's corrections to bicubic times D for every face (1 = as trained; default: as "
                   "the model ships, e.g. the demo's 0.6, or a detail gate's strength per face, which D replaces; "
                   "README: identity section); run folder or .safetensors only")


def run(args) -> int:
    from facesr.faces.photos import BoxesError
    from facesr.infer import ModelOutputError
    from facesr.outputs import OutputError, shown

    try:
        return _faces_only(args) if args.faces_only or args.fit else _photos(args)
    except (OutputError, BoxesError, ModelOutputError) as e:  # one line naming the file; nothing half-written
        print(f"facesr sr: {shown(str(e))}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # dlib missing: the message says which extra to install
        print(f"facesr sr: {e}", file=sys.stderr)
        return 2


def log(message: str) -> None:
    from facesr.outputs import shown

    print(shown(message), file=sys.stderr)  # names arrive escaped already; a message cannot forge a line either


def _photos(args) -> int:
    from facesr.faces.detect import DetectConfig
    from facesr.outputs import shown
    from facesr.faces.photos import enhance_photos
    from facesr.upscaler import Upscaler

    try:
        detect = DetectConfig(detectors=tuple(d.strip() for d in args.detector.split(",") if d.strip()))
    except ValueError as e:
        print(f"facesr sr: --detector: {e}", file=sys.stderr)
        return 2
    up = Upscaler.load(args.model, args.device, detect=detect, tta=args.tta, detail=args.detail)
    rep = enhance_photos(up, args.src, args.out, boxes_file=args.boxes, scale=args.scale, compare=args.compare,
                         log=log)
    print(f"{rep.faces} faces from {rep.photos} photos written to {shown(args.out)} ({len(rep.written)} files); "
          f"{len(rep.no_face)} photos without a face found, {len(rep.failed)} faces failed, "
          f"{len(rep.skipped)} inputs skipped (reasons above)")
    return 0 if rep.faces or not (rep.skipped or rep.no_face or rep.failed) else 1


def _faces_only(args) -> int:
    from facesr.infer import load_upscaler, super_resolve
    from facesr.outputs import shown

    model = args.model
    if "://" in model:
        from shards.store import local_model

        model = local_model(model)
    device = "cpu" if model.endswith(".onnx") else args.device  # ONNX runs on the CPU runtime
    report = super_resolve(load_upscaler(model, device, args.tta, args.detail), args.src, args.out, fit=args.fit, compare=args.compare,
                           batch_size=args.batch_size, device=device, log=log)
    print(f"wrote {len(report.written)} PNGs to {shown(args.out)}; {len(report.resized)} resized, "
          f"{len(report.skipped)} skipped (refused by the image reader, reasons above)")
    return 0 if report.written or not (report.skipped or report.resized) else 1
