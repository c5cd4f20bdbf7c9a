"""Export the deploy network (lr 24² -> hr 192², branches removed) to TorchScript and ONNX.

Both exports take a float32 batch ``lr`` (B, 3, 24, 24) in [0, 1] with a
dynamic batch size and return ``hr`` (B, 3, 192, 192), unclamped — exactly what
``SRNet.deploy()`` returns, so a parity check can compare them bit-for-bit-ish
(max |Δ| within ``TOLERANCE``). BatchNorm runs with its stored statistics.

ONNX goes through ``torch.onnx.export`` (the dynamo exporter, onnxscript);
parity runs on onnxruntime when installed, else on onnx's reference evaluator.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .infer import OnnxUpscaler
from .vocab import SIZES

LR = SIZES["lr"]
TOLERANCE = 1e-4  # max |Δ| on [0, 1] pixels, ≈ 1/40 of an 8-bit step
OPSET = 18


def example_input(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, LR, LR, generator=torch.Generator().manual_seed(seed))  # (B, 3, 24, 24)


def export_torchscript(deploy: nn.Module, path: str | Path) -> Path:
    """Trace the deploy network (no data-dependent control flow in it) and save it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deploy = deploy.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.trace(deploy, example_input(), check_inputs=[(example_input(5, 1),)])
    ts.save(str(path))
    return path


def export_onnx(deploy: nn.Module, path: str | Path, opset: int = OPSET) -> Path:
    """ONNX with input ``lr`` and output ``hr``, batch dimension dynamic; weights embedded in the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deploy = deploy.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            deploy,
            (example_input(),),
            str(path),
            input_names=["lr"],
            output_names=["hr"],
            opset_version=opset,
            dynamo=True,
            verbose=False,
            external_data=False,
            dynamic_shapes=({0: batch},),
        )
    return path


@torch.no_grad()
def max_abs_diff(reference: nn.Module, candidate: Callable[[torch.Tensor], torch.Tensor], batch: int = 3) -> float:
    """max |reference(lr) − candidate(lr)| over a random batch (a batch size other than the traced one)."""
    lr = example_input(batch, seed=123)
    ref = reference.eval()(lr)
    return (ref - candidate(lr).to(ref.dtype)).abs().max().item()


def export(
    deploy: nn.Module,
    out_dir: str | Path,
    formats: tuple[str, ...] = ("torchscript", "onnx"),
    *,
    check: bool = True,
    onnx_backend: str = "auto",
    stem: str = "srnet_deploy",
) -> dict[str, dict]:
    """Write the chosen formats into ``out_dir``; with ``check``, measure parity against ``deploy``.

    Returns {format: {"path", "max_abs_diff", "ok", "runtime"}}. Raises if a parity check fails.
    """
    out_dir = Path(out_dir)
    deploy = deploy.cpu().eval()
    result: dict[str, dict] = {}
    for fmt in formats:
        if fmt == "torchscript":
            path = export_torchscript(deploy, out_dir / f"{stem}.pt")
            with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, still supported
                warnings.simplefilter("ignore", FutureWarning)
                runner, runtime = torch.jit.load(str(path)), "torch.jit"
        elif fmt == "onnx":
            path = export_onnx(deploy, out_dir / f"{stem}.onnx")
            runner = OnnxUpscaler(path, onnx_backend)
            runtime = runner.backend
        else:
            raise ValueError(f"unknown export format {fmt!r} (torchscript, onnx)")
        entry: dict = {"path": str(path), "runtime": runtime}
        if check:
            diff = max_abs_diff(deploy, runner)
            entry.update(max_abs_diff=diff, ok=diff <= TOLERANCE)
            if diff > TOLERANCE:
                raise AssertionError(f"{fmt} export differs from PyTorch by {diff:.2e} > {TOLERANCE:.0e}")
        result[fmt] = entry
    return result
