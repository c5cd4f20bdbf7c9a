"""facesr: C-SRIP face hallucination (24² -> 192²) — model, maths, evaluation.

This package imports only torch/torchvision/timm/torchmetrics/numpy/PIL, safetensors for weights,
onnx/onnxruntime inside ``facesr.export`` (the ``export`` extra) and dlib inside
``facesr.identity.dlib_judge`` (the ``dlib`` extra); tests/test_layout.py checks it.
Orchestration lives in ``cluster/``, shards in ``shards/``, entry points in ``launch/``.
"""

__version__ = "0.1.0"
