"""dlib's pretrained face recognizer as the verification judge (the ``dlib`` extra).

dlib's ResNet (``dlib_face_recognition_resnet_model_v1``, 99.38% on LFW in dlib's own test) maps an
aligned 150×150 face chip to a 128-d embedding; two faces are the same person when their Euclidean
distance is below 0.6. Nothing in facesr trained it, so an SR model cannot have been tuned to please it.

Alignment follows dlib's pipeline: the HOG frontal detector (upsampled once) finds the face, the 5-point
shape predictor finds eyes and nose, and ``get_face_chip`` warps the face to the chip (padding 0.25).
The faces judged here are LFW-framed 192² crops, so the detector finds exactly one face in nearly every HR
crop; where it finds none (it can miss a blurred restored face) the landmarks are searched from the box the
detector gives for a typical LFW crop (``LFW_BOX``), and the face is counted as a fallback (per condition in
the report). Measured on
the 617 HR faces of 400 usable View 2 pairs (40 a fold): the detector found one face in 607, two in 7 and
none in 3; HR accuracy at 0.6 was 100% with the detector, 99.75% with ``LFW_BOX`` for every face, and 76.5%
with the whole 192² image as the box (the landmarks are then lost). So the detector is the rule and the
fixed box only the fallback's starting point.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

LFW_BOX = (44, 56, 151, 163)  # (left, top, right, bottom) on a 192² LFW crop: the median detector box (617 HR faces)
MODEL_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "recognizer": "dlib_face_recognition_resnet_model_v1.dat",
}


def model_dir(files: tuple[str, ...] = tuple(MODEL_FILES.values())) -> Path:
    """The folder of the ``face_recognition_models`` package's .dat files (``files`` checked), found without importing it.

    Importing ``face_recognition_models`` runs its ``__init__``, which imports ``pkg_resources`` (gone from
    current setuptools), so ``import face_recognition_models`` fails here. ``find_spec`` of a top-level
    package only locates it (it executes nothing), and the .dat files sit in its ``models/`` folder.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("face_recognition_models is not installed: pip install -e '.[faces]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: face_recognition_models lacks {', '.join(missing)}")
    return folder


def available() -> bool:
    """dlib and its model files are installed (the ``dlib`` extra)."""
    try:
        return importlib.util.find_spec("dlib") is not None and model_dir().is_dir()
    except (ModuleNotFoundError, FileNotFoundError):
        return False


def to_hwc_uint8(faces: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) float [0, 1] -> B contiguous uint8 (H, W, 3) RGB arrays, as dlib takes images."""
    x = (faces.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return [np.ascontiguousarray(img.permute(1, 2, 0).numpy()) for img in x]


class DlibJudge:
    """dlib's ResNet with its 5-point alignment; Euclidean distance, same person below 0.6.

    dlib's pip wheel runs the ResNet on one core (~0.06 s a face here), so ``workers`` > 1 spreads each
    batch over that many processes (each loads the models once); embeddings do not depend on it.
    """

    threshold = 0.6  # dlib's documented decision threshold for this model

    def __init__(self, upsample: int = 1, chip_size: int = 150, padding: float = 0.25, jitters: int = 0,
                 workers: int = 1):
        import dlib

        folder = model_dir()
        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(folder / MODEL_FILES["landmarks"]))
        self.recognizer = dlib.face_recognition_model_v1(str(folder / MODEL_FILES["recognizer"]))
        self.upsample, self.chip_size, self.padding, self.jitters = upsample, chip_size, padding, jitters
        self.name = "dlib"
        self.fallbacks = 0
        self.folder = folder
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None

    def face_box(self, img: np.ndarray):
        """The detected face nearest the image centre, or the typical LFW box scaled to the image (a fallback)."""
        h, w = img.shape[:2]
        found = self.detector(img, self.upsample)
        if len(found):
            return min(found, key=lambda r: (r.center().x - w / 2) ** 2 + (r.center().y - h / 2) ** 2), True
        sx, sy = w / 192, h / 192
        left, top, right, bottom = LFW_BOX
        return self.dlib.rectangle(round(left * sx), round(top * sy), round(right * sx), round(bottom * sy)), False

    def embed_images(self, images: list[np.ndarray]) -> tuple[np.ndarray, int]:
        """uint8 (H, W, 3) RGB images -> (embeddings (B, 128), faces embedded from the fallback box), here."""
        chips, fallbacks = [], 0
        for img in images:
            box, detected = self.face_box(img)
            fallbacks += not detected
            shape = self.landmarks(img, box)
            chips.append(self.dlib.get_face_chip(img, shape, size=self.chip_size, padding=self.padding))
        if not chips:
            return np.zeros((0, 128), np.float32), 0
        desc = self.recognizer.compute_face_descriptor(chips, self.jitters)  # batched over the chips
        return np.array([np.array(d) for d in desc], dtype=np.float32), fallbacks

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        images = to_hwc_uint8(faces)
        if self.workers > 1 and len(images) > 1:
            if self._pool is None:
                settings = (self.upsample, self.chip_size, self.padding, self.jitters)
                # fork, not spawn: a worker runs only dlib and numpy (no torch threads to inherit), and spawn would
                # re-run the caller's main module (a script without a __main__ guard would start itself again)
                self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"),
                                                 initializer=_start_worker, initargs=settings)
            parts = [images[i :: self.workers] for i in range(self.workers)]  # interleaved, re-ordered below
            done = list(self._pool.map(_worker_embed, parts))
            out = np.zeros((len(images), 128), np.float32)
            for i, (emb, fallbacks) in enumerate(done):
                out[i :: self.workers] = emb
                self.fallbacks += fallbacks
        else:
            out, fallbacks = self.embed_images(images)
            self.fallbacks += fallbacks
        return torch.from_numpy(out)  # (B, 128)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).norm(dim=1)

    def describe(self) -> dict:
        return {"name": self.name, "model": MODEL_FILES["recognizer"], "models_dir": str(self.folder),
                "distance": "Euclidean", "threshold": self.threshold,
                "alignment": f"HOG detector (upsample {self.upsample}; fallback box {LFW_BOX} per 192 px) + "
                f"5-point landmarks + get_face_chip({self.chip_size}, padding {self.padding})",
                "jitters": self.jitters}


_worker_judge: DlibJudge | None = None  # one per worker process of DlibJudge(workers=N)


def _start_worker(*settings) -> None:
    global _worker_judge
    _worker_judge = DlibJudge(*settings)


def _worker_embed(images: list[np.ndarray]) -> tuple[np.ndarray, int]:
    return _worker_judge.embed_images(images)
