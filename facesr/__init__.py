"""facesr: C-SRIP face hallucination (24² -> 192²) — model, maths, evaluation.

    from facesr import Upscaler
    up = Upscaler.load("runs/demo", device="cuda")    # facesr.upscaler: the in-memory API
    result = up.enhance(photo)                          # every face found, super-resolved, pasted back

This package imports only torch/torchvision/timm/torchmetrics/numpy/PIL, safetensors for weights,
onnx/onnxruntime inside ``facesr.export`` (the ``export`` extra), dlib inside
``facesr.identity.dlib_judge`` and ``facesr.faces.detect`` (the ``faces`` extra), and ``shards.store`` in
``facesr.upscaler`` for a model given as an object-store URI; tests/test_layout.py checks it.
Orchestration lives in ``cluster/``, shards in ``shards/``, entry points in ``launch/``.
"""

__version__ = "0.1.0"
__all__ = ["Upscaler"]


def __getattr__(name: str):
    if name == "Upscaler":  # imported on first use: `import facesr` stays free of the inference stack
        from .upscaler import Upscaler

        return Upscaler
    raise AttributeError(f"module 'facesr' has no attribute {name!r}")
