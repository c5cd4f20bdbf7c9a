"""facesr: C-SRIP face hallucination (24² -> 192²) — model, maths, evaluation.

This package imports only torch/torchvision/timm/torchmetrics/numpy/PIL;
orchestration lives in ``cluster/``, shards in ``shards/``, entry points in ``launch/``.
"""

__version__ = "0.1.0"
