"""Putting super-resolved faces back into the enlarged photo.

The photo is enlarged by bicubic (PIL, on uint8: no float copy of a large picture). Each face's 192² output is
warped back by the inverse of its alignment, composed with the enlargement, through a feathered mask: 1 over
the face and its surroundings, falling to 0 by a raised cosine towards the crop's edges, so no seam shows where
the network's output meets bicubic. Pixels the mask does not reach are the enlarged photo's, untouched
(``paste`` only writes where the mask is above 0). Faces are pasted in turn; an overlap takes the later one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .align import HR, as3, scale_of, warp


@dataclass(frozen=True)
class PasteConfig:
    margin: float = 4.0  # hr px at the crop's edge left out (the warp's black border of LFW lives there)
    feather: float = 28.0  # hr px over which the mask rises from 0 to 1: a soft seam; the face box (38-146) is inside
    rows: int = 512  # enlarged-photo rows sampled at a time, bounding the memory a large face takes


def feather_mask(cfg: PasteConfig = PasteConfig(), size: int = HR) -> torch.Tensor:
    """(size, size) float: 0 at the edges, a raised-cosine ramp over ``feather`` px after ``margin``, then 1."""
    d = torch.arange(size, dtype=torch.float32) + 0.5
    edge = torch.minimum(d, size - d) - cfg.margin  # distance into the crop past the margin
    ramp = (0.5 - 0.5 * torch.cos(math.pi * (edge / cfg.feather).clamp(0, 1)))
    return ramp[:, None] * ramp[None, :]


def enlarge(photo: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (round(H·scale), round(W·scale), 3) by PIL's bicubic."""
    h, w = photo.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(photo).resize(size, Image.BICUBIC)).copy()


def photo_to_canvas(photo_shape: tuple[int, int], canvas_shape: tuple[int, int]) -> np.ndarray:
    """(3, 3) map of pixel indices from the photo to its enlargement (per axis, as ``enlarge`` rounds sizes)."""
    fy, fx = canvas_shape[0] / photo_shape[0], canvas_shape[1] / photo_shape[1]
    return np.array([[fx, 0, 0.5 * fx - 0.5], [0, fy, 0.5 * fy - 0.5], [0, 0, 1.0]])


def paste(canvas: np.ndarray, face: torch.Tensor, transform: np.ndarray, photo_shape: tuple[int, int],
          mask: torch.Tensor, rows: int = PasteConfig.rows) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Blend ``face`` (3, 192, 192) float [0, 1], aligned by ``transform`` (photo -> hr framing), into ``canvas``
    (the photo enlarged, uint8 (H', W', 3)) in place through ``mask`` (192, 192), ``rows`` canvas rows at a time.
    Returns the region written (x0, y0, x1, y1) in canvas pixels and the mask there (h, w) float32."""
    to_canvas = photo_to_canvas(photo_shape, canvas.shape[:2])
    m = (as3(transform) @ np.linalg.inv(to_canvas))[:2]  # canvas -> hr framing
    inv = np.linalg.inv(as3(m))
    corners = np.array([[-0.5, -0.5, 1], [HR - 0.5, -0.5, 1], [-0.5, HR - 0.5, 1], [HR - 0.5, HR - 0.5, 1]]) @ inv.T
    H, W = canvas.shape[:2]
    x0, y0 = max(0, math.floor(corners[:, 0].min())), max(0, math.floor(corners[:, 1].min()))
    x1, y1 = min(W, math.ceil(corners[:, 0].max()) + 1), min(H, math.ceil(corners[:, 1].max()) + 1)
    if x1 <= x0 or y1 <= y0:
        return (0, 0, 0, 0), np.zeros((0, 0), np.float32)
    src, alpha_src = face.float().cpu(), mask.float().cpu()[None]
    s = scale_of(m)  # hr px per canvas px; over 1 means the face is drawn smaller than the network made it
    if s > 1:  # shrink the face and its mask with antialiasing first, so the warp never decimates
        n = max(1, round(HR / s))
        src = F.interpolate(src[None], size=(n, n), mode="bicubic", align_corners=False, antialias=True)[0]
        alpha_src = F.interpolate(alpha_src[None], size=(n, n), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
        m = (np.array([[n / HR, 0, 0.5 * n / HR - 0.5], [0, n / HR, 0.5 * n / HR - 0.5], [0, 0, 1]]) @ as3(m))[:2]
    alpha_out = np.zeros((y1 - y0, x1 - x0), np.float32)
    for r0 in range(y0, y1, rows):
        r1 = min(y1, r0 + rows)
        shift = np.array([[1, 0, x0], [0, 1, r0], [0, 0, 1.0]])  # region pixel -> canvas pixel
        region = (as3(m) @ shift)[:2]  # region -> face
        # warp() takes photo -> output; here the "photo" is the face and the output the region: invert
        to_region = np.linalg.inv(as3(region))[:2]
        rgb = warp(src, to_region, (r1 - r0, x1 - x0)).clamp(0, 1)  # (3, h, w)
        a = warp(alpha_src, to_region, (r1 - r0, x1 - x0), mode="bilinear").clamp(0, 1)[0]  # (h, w)
        under = torch.from_numpy(canvas[r0:r1, x0:x1]).float().permute(2, 0, 1)  # (3, h, w)
        blend = (under * (1 - a) + rgb * 255 * a).round().clamp(0, 255)
        out = torch.where(a > 0, blend, under).to(torch.uint8).permute(1, 2, 0).numpy()
        canvas[r0:r1, x0:x1] = out
        alpha_out[r0 - y0 : r1 - y0] = a.numpy()
    return (x0, y0, x1, y1), alpha_out
