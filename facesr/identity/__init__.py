"""Identity preservation measured by LFW face verification, in its parts:

- ``pairs``: LFW View 2 ``pairs.txt`` parsing and the pairs an evaluation can use (absent people skipped, counted);
- ``metrics``: 10-fold, fixed- and best-threshold accuracy and ROC AUC from pair scores;
- ``judge``: what a face recognizer must offer (``Judge``) and facesr's own trained embedder as one;
- ``dlib_judge``: dlib's pretrained ResNet as the judge (the ``dlib`` extra; the default where installed);
- ``verify``: HR / bicubic / SR face B against HR face A, identity drift, the printed table;
- ``train``: the training loop of facesr's own embedder (architecture in ``facesr.models.embedder``,
  weights through ``facesr.weights``).
"""

from .judge import EmbedderJudge, Judge
from .metrics import best_threshold, verification_metrics
from .pairs import Pair, drawn_pairs, image_path, pair_identities, read_pairs, usable_pairs
from .train import EmbedderTraining, train_embedder, training_faces
from .verify import format_degradation_table, format_identity_table, identity_drift, verify, verify_degradations

__all__ = [
    "Pair", "read_pairs", "drawn_pairs", "image_path", "pair_identities", "usable_pairs",
    "best_threshold", "verification_metrics",
    "Judge", "EmbedderJudge",
    "EmbedderTraining", "train_embedder", "training_faces",
    "verify", "verify_degradations", "identity_drift", "format_identity_table", "format_degradation_table",
]
