"""Faces in photos: detection recall by face size, and the x8 gain over bicubic per face (`facesr sr` on photos).

Scenes are made, so that every face's size and place are known: a photo of an LFW test identity (the demo's
split, never trained on), cut out by a soft ellipse around the face, pasted at a random place into a background
cut from a CelebA-ids photo (another data set), composed at an integer multiple of the final size and then
shrunk to it with antialiased bicubic, so the face measures ``d`` px between its outer eye corners (dlib's
landmarks on the original photo give its size; LFW's faces measure ~57 px there, so sizes above that are
enlarged from the original, bicubic, and said so in the JSON).

* recall: per size, the share of pasted faces each detector finds (a detection within IoU 0.3 of the face's HOG
  box), with the settings `facesr sr` uses (``DetectConfig``'s upsampling and pixel budgets), its time per
  photo, and the landmark error of the faces found (mean over the 5 points, in % of the eye distance);
* gain: faces small enough that the composite at 8x the photo holds them at or under their native size
  (d <= ~7 px), so the 8x ground truth is real pixels: the photo goes through ``Upscaler.enhance`` with the
  face's box given (as ``--boxes`` would) and the output, and the photo's bicubic x8, are scored against the
  composite inside the face's box (PSNR, SSIM); and once more aligned from the face's true landmarks (what
  dlib's landmark error on such small faces costs).

Baseline: the naive alternative to finding faces is to run nothing; bicubic is the baseline of the gain.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facesr.faces.align import REFERENCE_EYE_PX
from facesr.faces.detect import DetectConfig, FaceDetector, iou
from facesr.faces.paste import enlarge
from facesr.hardware import machine_info
from facesr.quality import image_scores
from shards.plan import SplitConfig, split_identities

RECALL_SIZES = (6, 8, 10, 12, 16, 24, 32, 48, 64, 96)
GAIN_SIZES = (4, 5, 6, 7)


def configure(p) -> None:
    p.add_argument("--faces", default="../shared/data/lfw", help="LFW folder (its test identities are used)")
    p.add_argument("--backgrounds", default="../shared/data/celeba-ids", help="photos the backgrounds are cut from")
    p.add_argument("--model", help="run folder or SR-net file for the gain (omit: recall only)")
    p.add_argument("--n", type=int, default=16, help="faces per size")
    p.add_argument("--sizes", type=int, nargs="*", default=list(RECALL_SIZES),
                   help="recall: px between the outer eye corners (none: no recall)")
    p.add_argument("--gain-sizes", type=int, nargs="*", default=list(GAIN_SIZES), help="gain: the same (<= 7)")
    p.add_argument("--detectors", default="hog,cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/faces.json")


def lfw_test_faces(lfw: Path, n: int, seed: int, detector: FaceDetector) -> list[dict]:
    """One photo each of ``n`` LFW test identities whose face HOG finds: image, box, landmarks, eye distance."""
    ids = sorted(p.name for p in lfw.iterdir() if p.is_dir())
    split = split_identities(ids, SplitConfig())
    test = sorted(i for i in ids if split[i] == "test")
    random.Random(seed).shuffle(test)
    faces = []
    for ident in test:
        img = np.asarray(Image.open(sorted((lfw / ident).glob("*.jpg"))[0]).convert("RGB"))
        found = detector.detect(img)
        if found:
            f = min(found, key=lambda f: (f.box[0] + f.box[2] - 250) ** 2 + (f.box[1] + f.box[3] - 250) ** 2)
            faces.append({"id": ident, "img": img, "box": np.array(f.box), "lm": f.landmarks, "eye": f.eye_px})
        if len(faces) == n:
            break
    return faces


def ellipse_mask(face: dict) -> np.ndarray:
    """(250, 250) float: 1 over the face and hair, a soft edge, 0 beyond (in the original photo's pixels)."""
    cx, cy = face["lm"].mean(0) + np.array([0, 0.25 * face["eye"]])
    a, b, soft = 1.1 * face["eye"], 1.45 * face["eye"], 0.25 * face["eye"]
    y, x = np.mgrid[0:250, 0:250]
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)  # 1 on the ellipse
    return np.clip((1 + soft / a - r) / (soft / a), 0, 1)


def compose(face: dict, bg: np.ndarray, d: float, size: tuple[int, int], factor: int, rng: random.Random):
    """The scene at ``factor`` x ``size`` (W, H) with the face at ``factor``·d px between the eye corners, and the
    photo (the scene shrunk to ``size``); the face's box (edges) and landmarks in photo px."""
    w, h = size
    cw, ch = w * factor, h * factor
    z = factor * d / face["eye"]  # original -> scene
    side = max(1, round(250 * z))
    z = side / 250
    small = np.asarray(Image.fromarray(face["img"]).resize((side, side), Image.BICUBIC)).astype(np.float32)
    mask = np.asarray(Image.fromarray((ellipse_mask(face) * 255).astype(np.uint8)).resize((side, side),
                                                                                        Image.BILINEAR)) / 255.0
    box = face["box"] * z  # edges in the face's resized photo
    x0 = rng.uniform(-box[0], cw - box[2])
    y0 = rng.uniform(-box[1], ch - box[3])
    ox, oy = round(x0), round(y0)
    scene = np.asarray(Image.fromarray(bg).resize((cw, ch), Image.BICUBIC)).astype(np.float32)
    # the part of the resized face inside the scene
    sx0, sy0, sx1, sy1 = max(0, -ox), max(0, -oy), min(side, cw - ox), min(side, ch - oy)
    region = scene[oy + sy0 : oy + sy1, ox + sx0 : ox + sx1]
    m = mask[sy0:sy1, sx0:sx1, None]
    region[:] = region * (1 - m) + small[sy0:sy1, sx0:sx1] * m
    scene = scene.round().clip(0, 255).astype(np.uint8)
    photo = np.asarray(Image.fromarray(scene).resize((w, h), Image.BICUBIC)) if factor > 1 else scene
    box_photo = (box + np.array([ox, oy, ox, oy])) / factor
    lm_photo = ((face["lm"] + 0.5) * z - 0.5 + np.array([ox, oy]) + 0.5) / factor - 0.5
    return scene, photo, tuple(box_photo), lm_photo


def backgrounds(root: Path, n: int, seed: int) -> list[np.ndarray]:
    files = sorted(root.glob("*/*.jpg"))
    random.Random(seed).shuffle(files)
    return [np.asarray(Image.open(f).convert("RGB")) for f in files[:n]]


def recall(faces, bgs, sizes, detectors, seed, log) -> list[dict]:
    dets = {d: FaceDetector(DetectConfig(detectors=(d,))) for d in detectors}
    rows = []
    for d in sizes:
        factor = max(1, math.floor(REFERENCE_EYE_PX / d))
        w = max(96, 4 * d)
        size = (w, w * 3 // 4)
        hits = {k: 0 for k in dets} | {"any": 0}
        secs = {k: 0.0 for k in dets}
        err = {k: [] for k in dets}
        rng = random.Random(f"{seed}:{d}")
        for i, face in enumerate(faces):
            _, photo, box, lm = compose(face, bgs[i % len(bgs)], d, size, factor, rng)
            any_hit = False
            for name, det in dets.items():
                t0 = time.perf_counter()
                found = det.detect(photo)
                secs[name] += time.perf_counter() - t0
                match = [f for f in found if iou(f.box, box) > 0.3]
                if match:
                    hits[name] += 1
                    any_hit = True
                    err[name].append(float(np.linalg.norm(match[0].landmarks - lm, axis=1).mean()) / d)
            hits["any"] += any_hit
        row = {"eye_px": d, "photo": list(size), "faces": len(faces), "enlarged_from_original": d > REFERENCE_EYE_PX,
               "recall": {k: v / len(faces) for k, v in hits.items()},
               "seconds_per_photo": {k: v / len(faces) for k, v in secs.items()},
               "landmark_error_pct_of_eye": {k: (100 * float(np.mean(v)) if v else None) for k, v in err.items()}}
        rows.append(row)
        log(f"recall  d={d:3d}px  photo {size[0]}x{size[1]}  " + "  ".join(
            f"{k} {row['recall'][k]:.2f}" for k in [*dets, "any"]) + "  s/photo " + " ".join(
            f"{k} {v:.2f}" for k, v in row["seconds_per_photo"].items()))
    return rows


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None] / 255  # (1, 3, H, W)


def gain(upscaler, faces, bgs, sizes, seed, log) -> list[dict]:
    rows = []
    for d in sizes:
        w = 64
        size, rng, scores, oracle = (w, w * 3 // 4), random.Random(f"gain:{seed}:{d}"), [], []
        for i, face in enumerate(faces):
            if 8 * d > face["eye"]:  # the 8x truth would be enlarged from the original: not real pixels
                continue
            scene, photo, box, lm = compose(face, bgs[(i + 7) % len(bgs)], d, size, 8, rng)
            res = upscaler.enhance(photo, boxes=[box], scale=8)
            true = upscaler.enhance(photo, boxes=[box], scale=8, landmarks=[lm])  # the alignment's ceiling
            if res.faces[0].error or true.faces[0].error:
                continue
            x0, y0 = max(0, math.floor(box[0] * 8)), max(0, math.floor(box[1] * 8))
            x1, y1 = min(scene.shape[1], math.ceil(box[2] * 8)), min(scene.shape[0], math.ceil(box[3] * 8))
            crop = (slice(y0, y1), slice(x0, x1))
            sr, bic = (image_scores(_t(res.image[crop]), _t(scene[crop])),
                       image_scores(_t(enlarge(photo, 8)[crop]), _t(scene[crop])))
            scores.append({k: (float(sr[k]), float(bic[k])) for k in ("psnr", "ssim")})
            oracle.append(float(image_scores(_t(true.image[crop]), _t(scene[crop]))["psnr"]))
        if not scores:
            continue
        mean = {k: [float(np.mean([s[k][j] for s in scores])) for j in (0, 1)] for k in ("psnr", "ssim")}
        wins = sum(s["psnr"][0] > s["psnr"][1] for s in scores)
        row = {"eye_px": d, "faces": len(scores), "psnr_sr": mean["psnr"][0], "psnr_bicubic": mean["psnr"][1],
               "ssim_sr": mean["ssim"][0], "ssim_bicubic": mean["ssim"][1],
               "gain_db": mean["psnr"][0] - mean["psnr"][1], "faces_sr_better": wins,
               "psnr_sr_true_landmarks": float(np.mean(oracle))}
        rows.append(row)
        log(f"gain    d={d}px  {len(scores)} faces  PSNR {row['psnr_sr']:.2f} vs bicubic {row['psnr_bicubic']:.2f} "
            f"({row['gain_db']:+.2f} dB)  SSIM {row['ssim_sr']:.4f} vs {row['ssim_bicubic']:.4f}  "
            f"better on {wins}/{len(scores)}  (true landmarks: PSNR {row['psnr_sr_true_landmarks']:.2f})")
    return rows


def run(args) -> int:
    log = print
    hog1 = FaceDetector(DetectConfig(detectors=("hog",), hog_upsample=1))
    n_gain = args.n
    faces = lfw_test_faces(Path(args.faces), max(args.n, n_gain), args.seed, hog1)
    bgs = backgrounds(Path(args.backgrounds), 64, args.seed)
    detectors = tuple(d for d in args.detectors.split(",") if d)
    t0 = time.time()
    result = {"command": "facesr bench faces", "machine": machine_info("cpu"), "faces": len(faces),
              "test_identities": [f["id"] for f in faces], "detect_config": dataclasses.asdict(DetectConfig()),
              "recall": recall(faces[: args.n], bgs, args.sizes, detectors, args.seed, log)}
    if args.model:
        from facesr.upscaler import Upscaler

        up = Upscaler.load(args.model, "cpu")
        result["model"] = args.model
        result["gain"] = gain(up, faces[:n_gain], bgs, args.gain_sizes, args.seed, log)
    result["seconds"] = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0
