"""Aligning a face in a photo to the framing the network was trained on, and making its 24×24 input.

The training framing is LFW deep-funneled's: the central 192² crop of a 250² photo (``degrade.crop_hr``).
``REFERENCE`` is where dlib's 5 landmarks sit in that crop — measured, not assumed: the mean over 2,000 LFW
photos (``measure_reference``; ``SPREAD``, an RMS 5-6.5 px per point, is how much LFW's own faces vary). A face
found in a photo is mapped there by the least-squares similarity (rotation, one scale, shift; Umeyama) from its
landmarks to ``REFERENCE``.

Its 24×24 input is the photo resampled onto the lr grid of that framing: when the face is larger than the lr
framing (the usual case) the aligned 192² view is shrunk by antialiased bicubic (the shrink the robust model is
trained on); when the face is already that small (the transform enlarges by 8 or more) the photo is sampled
onto the 24² grid directly, as it is. A face larger than the 192² framing is first shrunk with antialiasing,
so no warp ever decimates without a low-pass.

Coordinates are pixel indices (a pixel's centre is an integer, as dlib's landmarks are); boxes are edges
(pixel i spans [i, i + 1)). Transforms are (2, 3) float64 matrices taking photo to framing coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..degrade import quantize
from ..vocab import SIZES

LR, HR = SIZES["lr"], SIZES["hr"]
# dlib's 5 points (x, y) in the 192² hr crop: outer and inner corner of the image-right eye, outer and inner
# corner of the image-left eye, base of the nose. Mean over 2,000 random LFW deep-funneled photos (seed 0; the
# face FaceDetector finds nearest the centre, HOG at upsample 1, 78 s); ``measure_reference`` reproduces it.
REFERENCE = np.array([[124.23, 83.59], [108.16, 84.29], [67.36, 84.83], [83.42, 84.84], [96.43, 115.57]])
SPREAD = np.array([5.78, 5.01, 5.65, 4.98, 6.52])  # per point, RMS distance of LFW's own faces to REFERENCE (px)
REFERENCE_EYE_PX = float(np.linalg.norm(REFERENCE[0] - REFERENCE[2]))  # outer eye corners, ~57 px at hr


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The similarity (rotation, scale, shift; no reflection) taking points ``src`` (N, 2) nearest to ``dst``
    in least squares (Umeyama 1991), as a (2, 3) matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs**2).sum() / len(src)
    if not np.isfinite(var_s) or var_s < 1e-6:
        raise ValueError("landmarks coincide: no transform")
    u, d, vt = np.linalg.svd(xd.T @ xs / len(src))
    s = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rot = u @ s @ vt
    c = np.trace(np.diag(d) @ s) / var_s
    return np.hstack([c * rot, (mu_d - c * rot @ mu_s)[:, None]])


def scale_of(m: np.ndarray) -> float:
    """How much a transform enlarges (output px per input px)."""
    return math.sqrt(abs(np.linalg.det(m[:, :2])))


def as3(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def resample(src_size: int | float, dst_size: int | float) -> np.ndarray:
    """(3, 3) map of pixel indices when a side of ``src_size`` px is resized to ``dst_size`` (centres aligned)."""
    f = dst_size / src_size
    return np.array([[f, 0, 0.5 * f - 0.5], [0, f, 0.5 * f - 0.5], [0, 0, 1.0]])


def warp(img: torch.Tensor, m: np.ndarray, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Sample float (C, H, W) onto a (C, h, w) grid whose pixel (x, y) is ``m`` (2, 3) applied to a photo point;
    outside the photo is black (as LFW's warp borders are). Upsampling or mild shrinking only: no low-pass."""
    h, w = size
    inv = np.linalg.inv(as3(m))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    px = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    py = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    H, W = img.shape[-2:]
    grid = torch.stack([(2 * px + 1) / W - 1, (2 * py + 1) / H - 1], -1).to(img.dtype)  # (h, w, 2)
    out = F.grid_sample(img[None], grid[None].to(img.device), mode=mode, padding_mode="zeros", align_corners=False)
    return out[0]  # (C, h, w)


def shrink(img: torch.Tensor, m: np.ndarray, factor: float, out_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Before a warp that would shrink by ``factor`` < 1: the part of ``img`` the warp reads (its output square
    of ``out_size`` mapped back, plus a margin), shrunk by ``factor`` with antialiasing; and ``m`` for it."""
    inv = np.linalg.inv(as3(m))
    corners = np.array([[-0.5, -0.5, 1], [out_size - 0.5, -0.5, 1], [-0.5, out_size - 0.5, 1],
                        [out_size - 0.5, out_size - 0.5, 1]]) @ inv.T
    margin = 4 / factor
    H, W = img.shape[-2:]
    x0 = int(max(0, math.floor(corners[:, 0].min() - margin)))
    y0 = int(max(0, math.floor(corners[:, 1].min() - margin)))
    x1 = int(min(W, math.ceil(corners[:, 0].max() + margin)))
    y1 = int(min(H, math.ceil(corners[:, 1].max() + margin)))
    if x1 <= x0 or y1 <= y0:  # the face lies wholly outside the photo
        return img[:, :1, :1] * 0, m
    part = img[:, y0:y1, x0:x1]
    h, w = max(1, round((y1 - y0) * factor)), max(1, round((x1 - x0) * factor))
    small = F.interpolate(part[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
    fx, fy = w / (x1 - x0), h / (y1 - y0)
    crop_to_small = np.array([[fx, 0, (0.5 - x0) * fx - 0.5], [0, fy, (0.5 - y0) * fy - 0.5], [0, 0, 1.0]])
    return small, (as3(m) @ np.linalg.inv(crop_to_small))[:2]


@dataclass
class Aligned:
    transform: np.ndarray  # (2, 3) photo -> 192² hr framing
    hr: torch.Tensor  # (3, 192, 192) float [0, 1]: the photo in the training framing (an upsampling if small)
    lr: torch.Tensor  # (3, 24, 24) float [0, 1] on 8-bit levels: the network's input
    scale: float  # hr framing px per photo px; 8 or more means the face is at or under the lr framing's size


def align(img: torch.Tensor, landmarks: np.ndarray) -> Aligned:
    """uint8 or float (3, H, W) photo and a face's 5 landmarks (photo px) -> its aligned views and input."""
    x = img.float() / 255 if img.dtype == torch.uint8 else img.float()
    m = similarity(np.asarray(landmarks, np.float64), REFERENCE)
    s = scale_of(m)
    src, m_hr = shrink(x, m, s, HR) if s < 1 else (x, m)
    hr = warp(src, m_hr, (HR, HR)).clamp(0, 1)  # (3, 192, 192)
    if s >= HR / LR:  # already as small as the lr framing: sample the photo onto the 24² grid as it is
        lr = warp(x, (resample(HR, LR) @ as3(m))[:2], (LR, LR)).clamp(0, 1)
    else:
        lr = F.interpolate(hr[None], size=(LR, LR), mode="bicubic", align_corners=False, antialias=True)[0]
    return Aligned(m, hr, quantize(lr.clamp(0, 1)), s)


def measure_reference(images, landmarks_of) -> tuple[np.ndarray, np.ndarray]:
    """(mean (5, 2), per-point std (5,)) of the landmarks of 250² LFW photos in 192² crop coordinates;
    ``landmarks_of(img)`` gives one face's (5, 2) landmarks or None when none is found."""
    off = (250 - HR) / 2  # crop_hr's central crop of a 250² photo; an integer, so pixel indices shift exactly
    pts = np.array([p - off for p in (landmarks_of(im) for im in images) if p is not None])
    mean = pts.mean(0)
    return mean, np.sqrt(((pts - mean) ** 2).sum(-1).mean(0))
