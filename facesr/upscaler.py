"""The in-memory API: ``from facesr import Upscaler``.

    up = Upscaler.load("runs/demo", device="cuda")      # a run folder, .safetensors, .pt, .onnx or an s3:// URI
    result = up.enhance(photo)                            # NumPy (H, W, 3) uint8 or a PIL image
    result.image                                          # the photo x8 (bicubic) with every face super-resolved
    for face in result.faces: face.box, face.lr, face.sr  # per face: where, the 24x24 input, the 192x192 output
    sr = up.faces(batch)                                  # (B, 3, 24, 24) aligned faces -> (B, 3, 192, 192), one call

``enhance`` finds the faces (``facesr.faces.detect``; or takes ``boxes``), aligns each to the training framing
(``facesr.faces.align``), super-resolves all of them in one batch and pastes each back (``facesr.faces.paste``).
A face that fails (degenerate landmarks, a non-finite output) carries its ``error`` and the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .faces.align import HR, LR, align
from .faces.detect import DetectConfig, Face, detectable_eye_px
from .faces.paste import PasteConfig, enlarge, feather_mask, paste
from .imageio import MAX_PIXELS, to_rgb
from .infer import ModelOutputError, check_output, load_upscaler


@dataclass
class EnhancedFace:
    box: tuple[float, float, float, float]  # (left, top, right, bottom) in photo px
    detector: str  # hog, cnn, hog+cnn, or given
    scores: dict  # detector -> score
    landmarks: np.ndarray | None  # (5, 2) photo px
    eye_px: float | None = None  # outer eye corners apart, photo px: the face's size
    scale: float | None = None  # hr-framing px per photo px (8 or more: the face is no larger than the 24² input)
    transform: np.ndarray | None = None  # (2, 3) photo -> 192² framing
    lr: np.ndarray | None = None  # (24, 24, 3) uint8: the network's input
    sr: np.ndarray | None = None  # (192, 192, 3) uint8: the network's output, aligned
    region: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) of the enlarged photo the face was pasted in
    alpha: np.ndarray | None = None  # (y1 - y0, x1 - x0) float32: the mask it was pasted through
    error: str | None = None  # why this face gave no output (the others are unaffected)

    def summary(self) -> dict:
        """What the JSON beside the outputs says of this face."""
        r = _rounded
        return {"box": [r(v) for v in self.box], "detector": self.detector,
                "scores": {k: r(v) for k, v in self.scores.items()},
                "eye_px": r(self.eye_px), "width_px": r(self.box[2] - self.box[0]),
                "input_px_per_lr_px": None if self.scale is None else r(HR / LR / self.scale),
                "landmarks": None if self.landmarks is None else np.round(self.landmarks, 2).tolist(),
                "pasted": list(self.region) if self.region else None, "error": self.error}


def _rounded(v) -> float | None:
    return None if v is None else round(float(v), 2)


@dataclass
class Enhanced:
    image: np.ndarray | None  # (round(H·scale), round(W·scale), 3) uint8; None when over ``max_pixels``
    faces: list[EnhancedFace]
    scale: float
    detectable_eye_px: float  # the smallest face (outer eye corners, px) the detectors find in this photo
    notes: list[str] = field(default_factory=list)


def rgb_array(image) -> np.ndarray:
    """A PIL image (any mode, by facesr.imageio's rules) or a NumPy (H, W, 3) / (H, W) array -> uint8 (H, W, 3)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image of shape {a.shape}: expected (H, W, 3) RGB or (H, W) grey")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"image of dtype {a.dtype}: expected uint8, or floats in [0, 1]")
        a = (a * 255).round().astype(np.uint8)
    return np.array(a, copy=True, order="C")  # ours: torch may view it, the caller's array stays untouched


class Upscaler:
    """A trained model with the face pipeline around it; ``load`` builds one."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], device: str | torch.device = "cpu",
                 detect: DetectConfig = DetectConfig(), paste_cfg: PasteConfig = PasteConfig(), name: str = "model"):
        self.model, self.device, self.name = model, torch.device(device), name
        self.detect_cfg, self.paste_cfg = detect, paste_cfg
        self.mask = feather_mask(paste_cfg)
        self._detector = None

    @classmethod
    def load(cls, model: str | Path, device: str | torch.device = "cpu", tta: str = "none",
             detail: float | None = None, **kwargs) -> "Upscaler":
        """From a run folder, SR-net .safetensors, TorchScript .pt, ONNX (runs on the CPU) or an object-store URI;
        ``tta="flip"`` averages each face's output with the mirror of its mirror's (``infer.FlipEnsemble``);
        ``detail``: another detail strength than the file ships with (``facesr.detail``; 1 = as trained)."""
        path = str(model)
        if "://" in path:
            from shards.store import local_model  # pyarrow.fs: the `store` extra

            path = local_model(path)
        if path.endswith(".onnx"):
            device = "cpu"
        return cls(load_upscaler(path, device, tta, detail), device, name=str(model), **kwargs)

    @property
    def detector(self):
        if self._detector is None:
            from .faces.detect import FaceDetector

            try:
                self._detector = FaceDetector(self.detect_cfg)
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError(f"finding faces and their landmarks needs dlib ({e}): "
                                          "pip install 'facesr[faces]'; aligned 24x24 crops need no detector "
                                          "(facesr sr --faces-only, Upscaler.faces)") from None
        return self._detector

    @torch.inference_mode()
    def faces(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Aligned 24×24 faces -> their 192×192 outputs in one call on the device.

        A tensor (B, 3, 24, 24) float in [0, 1] (or uint8) gives a float tensor (B, 3, 192, 192) in [0, 1] on the
        device; a NumPy uint8 (B, 24, 24, 3) array gives uint8 (B, 192, 192, 3)."""
        as_numpy = isinstance(batch, np.ndarray)
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2) if as_numpy else batch
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, LR, LR):
            raise ValueError(f"faces: batch of shape {tuple(batch.shape)}; expected (B, 3, {LR}, {LR}) "
                             f"(or a NumPy (B, {LR}, {LR}, 3) uint8 array)")
        # contiguous: a permuted NumPy batch is channels-last in memory, and the convolutions would pick other
        # kernels, changing the last bit of a few outputs against the same faces given as a tensor
        x = (x.float() / 255 if x.dtype == torch.uint8 else x.float()).contiguous().to(self.device)
        out = check_output(self.model(x), len(x), self.name).float().clamp(0, 1)  # (B, 3, 192, 192)
        if as_numpy:
            return (out * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return out

    def detect(self, image) -> list[Face]:
        return self.detector.detect(rgb_array(image))

    def enhance(self, image, boxes: Sequence[Sequence[float]] | None = None, scale: float = 8.0,
                max_pixels: int = MAX_PIXELS, landmarks: Sequence[np.ndarray] | None = None) -> Enhanced:
        """Find (or take ``boxes``: (left, top, right, bottom) photo px), align, super-resolve and paste back
        every face of ``image``; the enlarged photo is skipped (``image`` None, a note) over ``max_pixels``.
        ``landmarks`` (one (5, 2) array per box, dlib's 5-point order) skips dlib's landmark predictor."""
        photo = rgb_array(image)
        h, w = photo.shape[:2]
        if not scale > 0:
            raise ValueError(f"scale {scale}: must be above 0")
        detectable = detectable_eye_px(self.detect_cfg, (h, w))
        if boxes is None:
            found = self.detector.detect(photo)
        else:
            found = [Face(tuple(float(v) for v in b), "given") for b in boxes]
            for face, pts in zip(found, landmarks or ()):
                face.landmarks = np.asarray(pts, np.float64).reshape(5, 2)
        faces = [EnhancedFace(f.box, f.detector, f.scores, f.landmarks) for f in found]
        inputs: list[tuple[EnhancedFace, torch.Tensor]] = []
        tensor = torch.from_numpy(photo).permute(2, 0, 1)  # (3, H, W) uint8
        for face in faces:
            try:
                if face.landmarks is None:
                    face.landmarks = self.detector.landmarks(photo, face.box)
                face.eye_px = float(np.linalg.norm(face.landmarks[0] - face.landmarks[2]))
                a = align(tensor, face.landmarks)
                face.transform, face.scale = a.transform, a.scale
                face.lr = (a.lr * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                inputs.append((face, a.lr))
            except (ValueError, np.linalg.LinAlgError, RuntimeError) as e:
                face.error = f"alignment failed: {e}"
        outputs = self._outputs([lr for _, lr in inputs])
        notes = []
        big_pixels = round(h * scale) * round(w * scale)
        canvas = enlarge(photo, scale) if big_pixels <= max_pixels else None
        if canvas is None:
            notes.append(f"the photo enlarged x{scale:g} would be {big_pixels:,} pixels, over the limit of "
                         f"{max_pixels:,}: no enlarged photo (the faces are written); give a smaller scale")
        for (face, _), out in zip(inputs, outputs):
            if isinstance(out, str):
                face.error = out
                continue
            face.sr = (out * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            if canvas is not None:
                try:
                    face.region, face.alpha = paste(canvas, out, face.transform, (h, w), self.mask,
                                                    self.paste_cfg.rows)
                except (ValueError, np.linalg.LinAlgError, RuntimeError) as e:
                    face.error = f"paste failed: {e}"
        return Enhanced(canvas, faces, scale, detectable, notes)

    def _outputs(self, lrs: list[torch.Tensor]) -> list[torch.Tensor | str]:
        """The network's output per face (one batch; face by face if the batch fails), or why there is none.
        A wrong output shape is the model's fault, not a face's: it is raised."""
        if not lrs:
            return []
        try:
            out = self.faces(torch.stack(lrs)).cpu()  # (B, 3, 192, 192)
            per_face = list(out)
        except ModelOutputError:
            raise
        except RuntimeError:  # e.g. out of memory for the batch: one face at a time
            per_face = []
            for lr in lrs:
                try:
                    per_face.append(self.faces(lr[None]).cpu()[0])
                except ModelOutputError:
                    raise
                except RuntimeError as e:
                    per_face.append(f"super-resolution failed: {e}")
        return [o if isinstance(o, str) or torch.isfinite(o).all() else "the network's output is not finite"
                for o in per_face]
