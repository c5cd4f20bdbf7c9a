"""What verification asks of a face recognizer (a *judge*), and the judge facesr trains itself.

A judge embeds faces and measures how far apart two embeddings are; a pair's score is minus that
distance, so a higher score means "more likely the same person" for every judge. Two judges exist:
``DlibJudge`` (``facesr.identity.dlib_judge``, dlib's pretrained ResNet: the default where the ``dlib``
extra is installed) and ``EmbedderJudge`` below (the ResNet that ``facesr eval embedder`` trains).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..models.embedder import FaceEmbedder


class Judge(Protocol):
    name: str  # shown in reports
    threshold: float | None  # the judge's own published decision rule, distance < threshold = same; None if none
    fallbacks: int  # faces so far that the judge could not locate itself and embedded from a fixed box (0 if N/A)

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """Faces (B, 3, S, S) in [0, 1] (any device) -> embeddings (B, D) on the CPU."""
        ...

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise distance of embeddings (N, D), (N, D) -> (N,)."""
        ...

    def describe(self) -> dict:
        """What the judge is, for the report (JSON-serialisable)."""
        ...


class EmbedderJudge:
    """facesr's own embedder: cosine distance (1 − cosine similarity) of flip-averaged unit embeddings."""

    threshold = None  # trained here: no published threshold; the 10-fold protocol picks one
    fallbacks = 0  # needs no face detection: LFW framing is what it was trained on

    def __init__(self, model: FaceEmbedder, meta: dict | None = None, path: str | None = None, device="cpu"):
        self.model, self.meta, self.path, self.device = model, meta or {}, path, device
        self.name = "embedder"

    @torch.inference_mode()
    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        return self.model(faces.to(self.device)).cpu()  # (B, D)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1 - (a * b).sum(1)

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "config": self.meta.get("config"),
                "training": self.meta.get("training"), "identities": len(self.meta.get("classes", [])),
                "distance": "1 - cosine similarity"}
