"""Image quality against the ground truth: PSNR and SSIM per scale, with torchmetrics.

Every upscaler (the model, bicubic, nearest) starts from the same ``lr`` and is
compared with the quadruplet level of its output size: ``x2`` at 48², ``x4`` at
96², ``x8`` (``hr``) at 192². Scores are computed per image and then averaged
over images, which is how SR papers report a dataset mean (Table 1); a PSNR
computed from the pooled MSE would weight badly reconstructed faces less.

Two SSIMs are reported:

* ``ssim``: the standard one (Wang et al. 2004) as torchmetrics computes it —
  Gaussian window 11, σ = 1.5, K1 = 0.01, K2 = 0.03, ``data_range = 1`` on
  [0, 1] pixels (i.e. L = 255 on 8-bit values);
* ``ssim_paper``: the paper's constants C1 ≈ 6.55, C2 ≈ 58.98 on 0-255 values,
  i.e. L = 256 — the same as ``data_range = 256/255`` on [0, 1] pixels. It is
  what the training loss (``facesr.losses.ssim``) optimises and is slightly
  higher than ``ssim``.

Outputs are clamped to [0, 1] and rounded to the 8-bit grid before scoring, as
an image written to disk would be; the targets are already 8-bit (shards and
``degrade.quadruplet`` quantise them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio

from .degrade import quantize
from .losses import PIXEL_MAX, window_matrix
from .resample import upsample_bicubic
from .vocab import KEY_OF, SCALES, SIZES

BASELINES = ("nearest", "bicubic")  # interpolation baselines, computed from the same lr
METRICS = ("psnr", "ssim", "ssim_paper")  # per-image scores, averaged over images
PAPER_DATA_RANGE = 256.0 / PIXEL_MAX  # L = 256 on 0-255 values -> C1 = (0.01·256)², C2 = (0.03·256)²
PSNR_CAP = 100.0  # dB; a pixel-identical output would give +inf and swamp the mean
# (C1, C2) on [0, 1] pixels: torchmetrics' at data_range 1 (ssim), and the paper's (ssim_paper, L = 256 on 0-255)
SSIM_CONSTANTS = ((0.01**2, 0.03**2), ((0.01 * PAPER_DATA_RANGE) ** 2, (0.03 * PAPER_DATA_RANGE) ** 2))


def finish(x: torch.Tensor) -> torch.Tensor:
    """What an upscaler's output becomes when saved: clamped to [0, 1], rounded to 8 bits."""
    return quantize(x.float())


def upscale(lr: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Interpolate lr (B, 3, 24, 24) to (B, 3, size, size) with ``mode`` in {bicubic, nearest}, finished."""
    if mode == "bicubic":
        # align_corners=False: the pixel-centre convention the degradation uses (degrade.py), no half-pixel shift
        out = upsample_bicubic(lr.float(), size)  # F.interpolate's bicubic as matmuls (facesr/resample.py)
    elif mode == "nearest":
        out = F.interpolate(lr.float(), size=(size, size), mode="nearest-exact")
    else:
        raise ValueError(f"unknown baseline {mode!r}; choose one of {BASELINES}")
    return finish(out)


def baselines(lr: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """{method: {scale: image}} for every baseline and scale label x2, x4, x8."""
    return {m: {s: upscale(lr, SIZES[KEY_OF[s]], m) for s in SCALES} for m in BASELINES}


class Reference:
    """A target batch (B, 3, H, W) in [0, 1] with its own half of the SSIM moments filtered once.

    Scoring several outputs against one target (every method, every degradation row of an evaluation: each
    scores against the same clean hr) then filters three moment maps per output instead of five, each map on
    its own (three small products run faster than one over their concatenation, which a 2-core CPU's caches
    do not hold), and combines them in place.
    """

    def __init__(self, target: torch.Tensor):
        self.image = target.float()
        h, w = self.image.shape[-2:]
        self.mh = window_matrix(h, 1.5, 11, torch.float32, self.image.device)
        self.mwt = (self.mh if w == h else window_matrix(w, 1.5, 11, torch.float32, self.image.device)).t()
        with torch.autocast(self.image.device.type, enabled=False):
            y = self.image
            self.mu = self.filter(y)
            self.mu_sq = self.mu * self.mu
            self.var = (self.filter(y * y) - self.mu_sq).clamp_(min=0)  # σy²

    def filter(self, x: torch.Tensor) -> torch.Tensor:
        """The reflect-padded 11x11 Gaussian (σ 1.5) of every map of x, as two matmuls."""
        return self.mh @ x @ self.mwt

    def ssim(self, x: torch.Tensor, constants: tuple[tuple[float, float], ...]) -> list[torch.Tensor]:
        """Per-image mean SSIM of x against this target for each (C1, C2): ``ssim_from_moments`` of
        ``losses.ssim_moments(x, self.image)``, the target's half reused."""
        mu1 = self.filter(x)
        mu12 = mu1 * self.mu
        mu1_sq = mu1.mul_(mu1)
        a = mu12.mul(2)  # 2 μx μy
        b = mu1_sq + self.mu_sq  # μx² + μy²
        s11 = self.filter(x * x).sub_(mu1_sq).clamp_(min=0)
        c = self.filter(x * self.image).sub_(mu12).mul_(2)  # 2 σxy
        d = s11.add_(self.var)  # σx² + σy²
        out = []
        for c1, c2 in constants:
            num = (a + c1).mul_(c + c2)
            out.append(num.div_((b + c1).mul_(d + c2)).mean(dim=(1, 2, 3)))
        return out


def image_scores(pred: torch.Tensor, target: torch.Tensor | Reference) -> dict[str, torch.Tensor]:
    """Per-image PSNR [dB], standard SSIM and paper-constant SSIM. (B, 3, H, W) ×2 in [0, 1] -> {metric: (B,)}.

    Both SSIMs are torchmetrics' ``structural_similarity_index_measure`` (Gaussian 11, σ 1.5, reflect padding,
    whole-image mean) at data_range 1 and 256/255, computed from one set of local moments with a separable
    Gaussian: the same numbers to 1e-6 (tests/test_quality_fast.py) at a tenth of the time, which is what
    evaluating many faces under many degradations costs (issue 27). ``target`` as a ``Reference`` reuses its
    moments across calls.
    """
    ref = target if isinstance(target, Reference) else Reference(target)
    pred = pred.float()
    psnr = peak_signal_noise_ratio(pred, ref.image, data_range=1.0, reduction="none", dim=(1, 2, 3))
    with torch.autocast(pred.device.type, enabled=False):
        ssim, paper = ref.ssim(pred, SSIM_CONSTANTS)
    return {"psnr": psnr.clamp(max=PSNR_CAP), "ssim": ssim, "ssim_paper": paper}


class QualityMeter:
    """Accumulates per-image scores by (method, scale); ``summary()`` gives means and spreads."""

    def __init__(self, shift_compensated: tuple[str, ...] = ()):
        self.scores: dict[tuple[str, str], dict[str, list[torch.Tensor]]] = {}
        self.shift_compensated = shift_compensated  # scales that also get ``psnr_sc`` (shift_compensated_psnr)

    def update(self, method: str, scale: str, pred: torch.Tensor, target: torch.Tensor | Reference) -> None:
        image = target.image if isinstance(target, Reference) else target
        if pred.shape != image.shape:
            raise ValueError(f"{method}/{scale}: output {tuple(pred.shape)} vs target {tuple(image.shape)}")
        pred = pred.detach().to(image.device)
        scores = image_scores(pred, target)
        if scale in self.shift_compensated:
            scores["psnr_sc"] = shift_compensated_psnr(pred.cpu(), image.cpu())[0]
        scores = {m: v.cpu() for m, v in scores.items()}
        cell = self.scores.setdefault((method, scale), {m: [] for m in scores})
        for m, v in scores.items():
            cell[m].append(v)

    def methods(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.scores))

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """{method: {scale: {"psnr", "ssim", "ssim_paper", "<metric>_std", "<metric>_sem", "n"}}}."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for (method, scale), cell in self.scores.items():
            row: dict[str, float] = {}
            for m in cell:
                v = torch.cat(cell[m]).double()
                row[m] = v.mean().item()
                row[f"{m}_std"] = v.std().item() if v.numel() > 1 else 0.0
                row[f"{m}_sem"] = row[f"{m}_std"] / math.sqrt(v.numel())  # standard error of the mean
                row["n"] = v.numel()
            out.setdefault(method, {})[scale] = row
        return out


def translate(x: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """(B, C, H, W) moved by (dy, dx) px (content goes down/right for positive values), bicubic, borders repeated."""
    b, _, h, w = x.shape
    ys = (torch.arange(h, dtype=torch.float32) - dy + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) - dx + 0.5) / w * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).to(x.device).expand(b, h, w, 2)
    return F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)


SHIFTS = tuple(s / 2 for s in range(-9, 10))  # -4.5 ... 4.5 px in half-pixel steps


def shift_compensated_psnr(
    pred: torch.Tensor, target: torch.Tensor, shifts: tuple[float, ...] = SHIFTS, border: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """PSNR after undoing a global misregistration: per image, the best (dy, dx) from ``shifts`` on each axis
    (coordinate search: dx at dy = 0, dy at that dx, dx again), scored on the image less ``border`` px each
    side so that no shifted-in border is counted. Returns ((B,) PSNR [dB], (B, 2) shift found).

    A downscaler whose sampling grid is offset from the target's (e.g. decimation keeping even pixels)
    misregisters every upscaler's output by the same sub-pixel amount; plain PSNR then mostly measures that
    offset, which no upscaler can see in its input. Real-world SR benchmarks (RealSR, NTIRE) align the same way.
    """
    c = slice(border, -border)
    pred, target = pred.float(), target.float()

    def psnr_at(dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        moved = torch.stack([translate(p[None], float(y), float(x))[0] for p, y, x in zip(pred, dy, dx)])
        moved = quantize(moved.clamp(0, 1))
        mse = ((moved[..., c, c] - target[..., c, c]) ** 2).mean(dim=(1, 2, 3))
        return (-10 * torch.log10(mse.clamp_min(1e-10))).clamp(max=PSNR_CAP)

    n = pred.shape[0]
    grid = torch.tensor(shifts)
    dy, dx = torch.zeros(n), torch.zeros(n)
    best = psnr_at(dy, dx)
    for axis in ("x", "y", "x"):
        scores = torch.stack([psnr_at(dy, torch.full((n,), s)) if axis == "x" else psnr_at(torch.full((n,), s), dx)
                              for s in shifts])  # (S, B)
        top, i = scores.max(0)
        better = top > best
        if axis == "x":
            dx = torch.where(better, grid[i], dx)
        else:
            dy = torch.where(better, grid[i], dy)
        best = torch.maximum(best, top)
    return best, torch.stack([dy, dx], 1)
