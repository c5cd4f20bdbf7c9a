"""Super-resolve images with a trained model: 24×24 faces in, 192×192 PNGs out.

``MODEL`` is a run folder (its ``srnet.safetensors``), an SR-net ``.safetensors``
file, or an export from ``facesr.export`` (TorchScript ``.pt``, ``.onnx``).

Inputs of 24×24 go straight in. Anything else does not match what the network
was trained on, so it is brought to 24×24 one of two ways:

* default: centre-cropped to a square and resized (bicubic, antialiased) to
  24×24, with a warning naming the file — for small faces of roughly the
  training framing that are just not 24 px;
* ``fit=True``: treated as a face photo framed like LFW/CASIA (face in the
  central ~120 px of 250): the central 192² crop is degraded to 24² by the
  training degradation (``degrade.quadruplet``) — exactly what evaluation
  feeds the network. No warning, since this is the intended use for large
  photos. Sources under 192 px fall back to the resize, with a warning.

``compare=True`` writes, instead of the bare 192×192 output, a before/after panel per input: the
24×24 face the network was given (shown enlarged, pixels visible), bicubic ×8 of it, and the
network's ×8 — what a user looks at to judge the model on their own photos.

Inputs are read by ``facesr.imageio`` (formats by content from an allowlist, a
pixel limit, EXIF orientation, modes to RGB); what it refuses is reported with
the reason and skipped; the run goes on. Outputs are named and written by
``facesr.outputs`` (distinct names, OUT apart from IN, no link in OUT followed).

This is ``facesr sr --faces-only``: inputs that are face crops. Photos with faces
anywhere in them go through ``facesr.upscaler.Upscaler.enhance``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .degrade import TooSmallError, quadruplet, quantize, to_uint8
from .grid import render, show
from .imageio import ImageReadError, read_rgb
from .models import SRNet
from .outputs import check_apart, check_links, list_inputs, output_names, shown, write_atomic
from .quality import upscale
from .vocab import SIZES
from .weights import load_srnet, read_meta

LR, HR = SIZES["lr"], SIZES["hr"]
SRNET_FILE = "srnet.safetensors"  # what the training job writes into runs/<name>/
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")


def write_png(img: torch.Tensor | Image.Image, path: str | Path, out: str | Path | None = None) -> None:
    """[0, 1] float (3, H, W) (or a PIL image) -> PNG, written through a temporary file inside ``out``
    (default: the PNG's folder), so a link planted at ``path`` is replaced, never followed."""
    path = Path(path)
    pil = img if isinstance(img, Image.Image) else Image.fromarray(to_uint8(img).permute(1, 2, 0).cpu().numpy())
    write_atomic(path, lambda f: pil.save(f, format="PNG"), Path(out) if out is not None else path.parent)


class ModelOutputError(ValueError):
    """A model whose output is not (B, 3, 192, 192) for a (B, 3, 24, 24) input: the message names it."""


def check_output(hr, batch: int, name: str) -> torch.Tensor:
    """``hr`` if it is a (batch, 3, 192, 192) tensor, else ``ModelOutputError`` naming the model."""
    shape = tuple(hr.shape) if isinstance(hr, torch.Tensor) else type(hr).__name__
    if shape != (batch, 3, HR, HR):
        raise ModelOutputError(f"{shown(name)}: gives {shape} for a ({batch}, 3, {LR}, {LR}) input; a facesr model "
                               f"gives ({batch}, 3, {HR}, {HR})")
    return hr


# ---------------------------------------------------------------- models


def find_srnet(run: str | Path) -> Path:
    """The SR-net weights of a run folder: ``srnet.safetensors``, else the one safetensors file of kind srnet."""
    run = Path(run)
    if (run / SRNET_FILE).is_file():
        return run / SRNET_FILE
    found = []
    for p in sorted(run.rglob("*.safetensors")):
        try:
            if read_meta(p)["kind"] == "srnet":
                found.append(p)
        except (ValueError, FileNotFoundError):
            continue
    if not found:
        raise FileNotFoundError(f"{run}: no {SRNET_FILE} (nor any SR-net safetensors) in this run folder")
    return max(found, key=lambda p: p.stat().st_mtime)  # the latest save


def load_cascade(path: str | Path, device: str | torch.device = "cpu") -> SRNet:
    """The full cascade (x2, x4, hr outputs) from a run folder or SR-net safetensors, in eval mode."""
    path = Path(path)
    return load_srnet(find_srnet(path) if path.is_dir() else path, device).eval()


PRECISIONS = ("auto", "fp32", "bf16")


def inference_bf16(precision: str, device: str | torch.device) -> bool:
    """Whether inference runs in bf16 autocast: ``bf16``, ``fp32``, or ``auto`` = where the device computes bf16
    natively (AMX / AVX512-BF16 CPUs, CUDA sm80+), as training's ``engine.precision: auto`` chooses."""
    from .hardware import native_bf16

    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``net`` with every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential``
    folded into that convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``: the running statistics and affine
    become the conv's weight scale and bias) and replaced by Identity; ``net`` itself is left as it was.
    Inference then skips a full pass over every block's activations per BatchNorm."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()
    for seq in [m for m in net.modules() if isinstance(m, torch.nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d) and bn.track_running_stats:
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn), torch.nn.Identity()
    return net


class Fast(torch.nn.Module):
    """``net`` for inference in its fastest exact-enough form: BatchNorm folded into the convolutions (a copy:
    ``net`` is not changed), channels_last activations and weights (oneDNN's and cuDNN's preferred layout) and,
    with ``bf16``, bf16 autocast (outputs back in fp32). On a 2-core AVX512-BF16
    EPYC the tiny cascade runs 1.6× faster channels_last and 2.7× in bf16; bf16 moves an 8-bit output pixel by
    0.09 levels on average (evaluation: ``facesr eval quality --precision``)."""

    def __init__(self, net: torch.nn.Module, bf16: bool = False):
        super().__init__()
        self.net, self.bf16 = fold_batchnorm(net).to(memory_format=torch.channels_last), bf16

    def forward(self, lr: torch.Tensor):
        with torch.autocast(lr.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(lr.contiguous(memory_format=torch.channels_last))
        return {k: v.float() for k, v in out.items()} if isinstance(out, dict) else out.float()

    def deploy(self) -> "Fast":
        return Fast(self.net.deploy(), self.bf16) if hasattr(self.net, "deploy") else self


class FlipEnsemble(torch.nn.Module):
    """Self-ensemble at inference (Lim et al. 2017, EDSR+), with the one transform a face stays a face under: the
    mean of ``net(lr)`` and the mirror of ``net(lr mirrored)``, both halves in one batch of 2B. Twice the
    arithmetic; what one network hallucinates differently on the two sides of a face averages out. Works on
    the cascade's {x2, x4, hr} dict and on a deploy network's hr tensor alike."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    @property
    def bf16(self) -> bool:
        return bool(getattr(self.net, "bf16", False))

    def forward(self, lr: torch.Tensor):
        both = self.net(torch.cat([lr, lr.flip(-1)]))
        b = lr.shape[0]
        mean = lambda t: (t[:b] + t[b:].flip(-1)) * 0.5  # noqa: E731
        return {k: mean(v) for k, v in both.items()} if isinstance(both, dict) else mean(both)

    def deploy(self) -> "FlipEnsemble":
        return FlipEnsemble(self.net.deploy()) if hasattr(self.net, "deploy") else self


def with_tta(net, tta: str):
    """``net`` as is (``none``) or flip-averaged (``flip``); ``both`` is the caller's: one of each."""
    if tta not in ("none", "flip"):
        raise ValueError(f"tta: expected none or flip, got {tta!r}")
    return FlipEnsemble(net) if tta == "flip" else net


class OnnxUpscaler:
    """An exported ONNX deploy network as a callable lr -> hr.

    Runs on onnxruntime when it is installed, otherwise on onnx's reference
    evaluator (pure numpy: exact but slow, fine for parity checks).
    """

    def __init__(self, path: str | Path, backend: str = "auto"):
        self.path = str(path)
        if backend == "auto":
            try:
                import onnxruntime  # noqa: F401

                backend = "onnxruntime"
            except ImportError:
                backend = "reference"
        self.backend = backend
        if backend == "onnxruntime":
            import onnxruntime as ort

            self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
        elif backend == "reference":
            import onnx
            from onnx.reference import ReferenceEvaluator

            model = onnx.load(self.path)
            self.session = ReferenceEvaluator(model)
            self.input_name = model.graph.input[0].name
        else:
            raise ValueError(f"unknown ONNX backend {backend!r} (auto, onnxruntime, reference)")

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        x = lr.detach().float().cpu().numpy()
        out = self.session.run(None, {self.input_name: x})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(lr.device)


def load_upscaler(path: str | Path, device: str | torch.device = "cpu", tta: str = "none",
                  detail: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable lr (B, 3, 24, 24) -> hr (B, 3, 192, 192) from a run folder, safetensors, TorchScript or ONNX file;
    ``tta="flip"``: flip-averaged (``FlipEnsemble``); ``detail``: the cascade at this detail strength
    (``facesr.detail``; absolute, 1 = as trained; None = as the file ships it), run folder or safetensors only."""
    return with_tta(_load_upscaler(Path(path), device, detail), tta)


def _load_upscaler(path: Path, device, detail: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model (run folder, .safetensors, .pt or .onnx)")
    if path.is_dir() or path.suffix == ".safetensors":
        net = load_cascade(path, device)
        if detail is not None:
            from .detail import at_detail

            net = at_detail(net, path, detail)
        return net.deploy().eval()
    if detail is not None:
        raise ValueError(f"{path}: an export's detail strength is fixed in its graph; give the run folder or "
                         f".safetensors to choose another")
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, still supported
            warnings.simplefilter("ignore", FutureWarning)
            return probed(torch.jit.load(str(path), map_location=device).eval(), path, device)
    if path.suffix == ".onnx":
        return probed(OnnxUpscaler(path), path, "cpu")
    raise ValueError(f"{path}: unknown model format (run folder, .safetensors, {', '.join(TORCHSCRIPT_SUFFIXES)}, .onnx)")


@torch.inference_mode()
def probed(model, path: Path, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """An exported graph is whatever its file says: run it once on two black faces and check the output shape
    before any input is read (a wrong export would otherwise fail, or write wrong PNGs, image by image)."""
    try:
        out = model(torch.zeros(2, 3, LR, LR, device=device))
    except Exception as e:  # a graph that cannot run on this input at all
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelOutputError(f"{shown(path)}: fails on a (2, 3, {LR}, {LR}) input: {first}") from None
    check_output(out, 2, str(path))
    return model


# ---------------------------------------------------------------- inputs


def to_lr(img: torch.Tensor, fit: bool = False) -> tuple[torch.Tensor, str | None]:
    """uint8 (3, H, W) -> (lr float (3, 24, 24), note); note says what was done to a non-24² input, else None."""
    h, w = img.shape[-2:]
    if (h, w) == (LR, LR):
        return img.float() / 255, None
    if fit:
        try:
            return quadruplet(img)["lr"], None
        except TooSmallError:
            pass  # fall through to the plain resize, with a warning
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    sq = img[:, top : top + side, left : left + side].float().unsqueeze(0) / 255
    lr = F.interpolate(sq, size=(LR, LR), mode="bicubic", align_corners=False, antialias=True)
    crop = f" (centre square {side}x{side})" if h != w else ""
    return quantize(lr[0]), f"{w}x{h} input resized to {LR}x{LR}{crop}; the model expects {LR}x{LR} faces"


@dataclass
class SRReport:
    written: list[Path] = field(default_factory=list)  # PNGs written
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (input, reason) not processed
    resized: list[tuple[Path, str]] = field(default_factory=list)  # (input, what was done) non-24² inputs


def out_paths(src: Path, files: list[Path], out: Path, suffix: str = ".png") -> dict[Path, Path]:
    """input -> its output: ``out`` itself for one image given with OUT ending in ``suffix``, else under ``out``
    by ``outputs.output_names`` (colliding stems keep their extension)."""
    if src.is_file() and out.suffix.lower() == suffix:
        return {src: out}
    return {f: out / f"{n}{suffix}" for f, n in output_names(src, files).items()}


def reference(img: torch.Tensor, fit: bool = False) -> torch.Tensor | None:
    """The source at 192x192 for a before/after panel: what ``to_lr`` shrank (its central 192 crop with
    ``fit``, else the centre square resized), None for a 24x24 input (there is nothing larger to show)."""
    h, w = img.shape[-2:]
    if (h, w) == (LR, LR):
        return None
    if fit and min(h, w) >= HR:
        top, left = (h - HR) // 2, (w - HR) // 2
        return img[:, top : top + HR, left : left + HR].float() / 255
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    sq = img[:, top : top + side, left : left + side].float().unsqueeze(0) / 255
    return F.interpolate(sq, size=(HR, HR), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)


def comparison_panel(lr: torch.Tensor, sr: torch.Tensor, ref: torch.Tensor | None = None) -> Image.Image:
    """One row: the (1, 3, 24, 24) input enlarged by nearest neighbour, its bicubic x8, the model's x8, and
    the source photo at 192 (``reference``) when there is one."""
    cols = [("input 24x24", show(lr.float())), ("bicubic x8", upscale(lr, HR, "bicubic")), ("facesr x8", sr.float())]
    if ref is not None:
        cols.append(("source photo", ref.unsqueeze(0)))
    return render(cols)


@torch.inference_mode()
def super_resolve(
    model: Callable[[torch.Tensor], torch.Tensor],
    src: str | Path,
    out: str | Path,
    *,
    fit: bool = False,
    compare: bool = False,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> SRReport:
    """Super-resolve ``src`` (image or folder) into PNGs under ``out`` (a folder, or a .png for one image)."""
    src, out = Path(src), Path(out)
    files = list_inputs(src)
    dst_of = out_paths(src, files, out)
    check_apart(src, out, list(dst_of.values()))
    root = out.parent if out.suffix.lower() == ".png" and src.is_file() else out
    check_links(root, list(dst_of.values()))
    report = SRReport()
    pending: list[tuple[Path, torch.Tensor, torch.Tensor | None]] = []  # (file, lr, reference)

    def flush() -> None:
        if not pending:
            return
        lr = torch.stack([x for _, x, _ in pending]).to(device)  # (B, 3, 24, 24)
        hr = check_output(model(lr), len(lr), "the model").float().clamp(0, 1)  # (B, 3, 192, 192)
        for i, ((f, _, ref), img) in enumerate(zip(pending, hr)):
            dst = dst_of[f]
            write_png(comparison_panel(lr[i : i + 1].cpu(), img.unsqueeze(0).cpu(), ref) if compare else img, dst, root)
            report.written.append(dst)
        pending.clear()

    for f in files:
        try:
            img = read_rgb(f)
        except ImageReadError as e:
            report.skipped.append((f, str(e)))
            log(f"skipped {shown(str(e))}")
            continue
        lr, note = to_lr(img, fit)
        if note:
            report.resized.append((f, note))
            log(f"warning: {shown(f)}: {note}; use --fit for face photos framed like LFW")
        pending.append((f, lr, reference(img, fit) if compare else None))
        if len(pending) >= batch_size:
            flush()
    flush()
    return report
