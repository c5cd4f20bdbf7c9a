"""Losses of C-SRIP (paper Sec. 2.3): SSIM loss (eqs. 2-3), identity cross-entropy (eq. 1), total (eq. 4);
and those of the Table 1 peers: the perceptual loss ℓp on SqueezeNet fire2-4 features, and the MSE that
SRCNN and VDSR train with. SR losses score the outputs a network has (the cascade x2, x4, hr; a peer hr).

Every loss returns named terms keyed in the shared vocabulary
(``loss``, ``ssim/x2``, ``ce/x8``, ``acc/x4`` …) so the same names reach logs,
Prometheus and dashboards. Losses run in fp32 even inside a bf16 autocast region.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import tensor_cache
from .degrade import prior_view
from .vocab import SCALE_OF, TARGETS

# The paper's constants on 0-255 pixel values: (0.01·256)² and (0.03·256)².
C1 = (0.01 * 256) ** 2  # ≈ 6.55
C2 = (0.03 * 256) ** 2  # ≈ 58.98
PIXEL_MAX = 255.0


@tensor_cache(maxsize=32)
def window_matrix(n: int, sigma: float, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, n) matrix of a reflect-padded Gaussian filter along one axis: ``M @ x`` filters x's rows as padding by
    (window-1)/2 with mode="reflect" and convolving would, as one matmul."""
    r = (window - 1) // 2
    t = torch.arange(window, dtype=torch.float64) - r
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    rows = torch.arange(n).view(n, 1).expand(n, window)
    src = rows + torch.arange(window).view(1, window) - r  # (n, window) source index before reflection
    src = torch.where(src < 0, -src, torch.where(src >= n, 2 * (n - 1) - src, src))
    m = torch.zeros(n, n, dtype=torch.float64).index_put_((rows, src), k.expand(n, window), accumulate=True)
    return m.to(device=device, dtype=dtype)


def ssim_moments(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> tuple[torch.Tensor, ...]:
    """Local Gaussian moments of eq. (3): (μx, μy, σx², σy², σxy), each (B, C, H, W). x, y: (B, C, H, W).

    Borders are reflect-padded (as torchmetrics does), so the whole image counts — on a 48² output a 'valid'
    window would ignore 40% of the pixels. The separable Gaussian runs as two matmuls with the padding folded
    into the matrices: on a CPU three times faster than a depthwise convolution, and closer to a float64
    reference than torchmetrics' float32 2-D convolution (tests/test_quality_fast.py).
    """
    c, h, w = x.shape[1], x.shape[-2], x.shape[-1]
    mh = window_matrix(h, float(sigma), window, x.dtype, x.device)
    mw = mh if w == h else window_matrix(w, float(sigma), window, x.dtype, x.device)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1).contiguous()  # (B, 5C, H, W): all moments in one product
    stack = mh @ stack @ mw.t()
    mu1, mu2, e11, e22, e12 = stack.split(c, dim=1)
    mu11, mu22, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    return mu1, mu2, (e11 - mu11).clamp(min=0), (e22 - mu22).clamp(min=0), e12 - mu12


def ssim_from_moments(moments: tuple[torch.Tensor, ...], c1: float, c2: float) -> torch.Tensor:
    """Eq. (3)'s map from ``ssim_moments`` with constants c1, c2 (on the moments' pixel scale)."""
    return ssim_from_terms(ssim_terms(moments), c1, c2)


def ssim_terms(moments: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """(2μxμy, μx²+μy², 2σxy, σx²+σy²): what eq. (3) needs of the moments, whatever its constants."""
    mu1, mu2, s11, s22, s12 = moments
    return 2 * mu1 * mu2, mu1 * mu1 + mu2 * mu2, 2 * s12, s11 + s22


def ssim_from_terms(terms: tuple[torch.Tensor, ...], c1: float, c2: float) -> torch.Tensor:
    a, b, c, d = terms
    return ((a + c1) * (c + c2)) / ((b + c1) * (d + c2))


def ssim_map(
    x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5, c1: float = C1, c2: float = C2
) -> torch.Tensor:
    """SSIM map of eq. (3) with a Gaussian window. x, y: (B, C, H, W) on 0-255 -> (B, C, H, W)."""
    return ssim_from_moments(ssim_moments(x, y, window, sigma), c1, c2)


def ssim(sr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM with the paper's constants; inputs in [0, 1], computed in fp32 on 0-255. Made contiguous first:
    a channels_last output would otherwise make its five moments channels_last, and the matmuls copy all five."""
    with torch.autocast(sr.device.type, enabled=False):
        return ssim_map(sr.float().contiguous() * PIXEL_MAX, target.float().contiguous() * PIXEL_MAX).mean()


def ssim_loss(sr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. (2): ½ (1 − E[SSIM])."""
    return 0.5 * (1.0 - ssim(sr, target))


def identity_ce(logits: torch.Tensor, cls: torch.Tensor, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (1) averaged over the labelled samples; cls = -1 (identity outside the class map) is ignored.

    Masked sum over a clamped count rather than ``ignore_index``'s mean, which is NaN on a batch with no
    labelled sample: testing for that case would cost a host synchronisation every step. Zero then,
    with the graph kept. ``class_weight`` (C,): a weighted mean, as ``F.cross_entropy(weight=...)``.
    """
    keep = cls >= 0
    target = cls.clamp(min=0)
    ce = F.cross_entropy(logits.float(), target, reduction="none")  # (B,)
    if class_weight is None:
        return (ce * keep).sum() / keep.sum().clamp(min=1)
    w = class_weight[target] * keep
    return (ce * w).sum() / w.sum().clamp(min=1e-12)


class CSRIPLoss(nn.Module):
    """Eq. (4): Σ_{j ∈ {x2, x4, hr}} L_SSIM(x^j) + α L_CE(θ_SN^j, Δx^j), plus facesr's identity term
    Σ_j β_j (1 − cos(E(x̂^j), E(x^j))) when a face recognizer E is given (issue 25).

    ``priors`` maps a target key (x2, x4, hr) to a frozen prior; with ``priors=None``
    or ``alpha=0`` only the SSIM terms are computed (the α = 0 ablation).

    ``recognizer`` (frozen, ``facesr.models.Recognizer``) and ``identity`` (target key -> weight β): the cosine
    distance between the recognizer's embeddings of each SR output and of its own ground truth. Unlike eq. (4)'s
    cross-entropy it needs no class label, so it acts on every face, including people outside the class map.
    ``identity_scale`` (a 0-d tensor, set by the stage each step: its warm-up) multiplies every β. A batch that
    holds ``id_weight`` (B,) weighs each face's distance by it (0 = SSIM alone for that face; the mean stays over
    the whole batch, so β is each counted face's weight).
    """

    def __init__(self, priors: dict[str, nn.Module] | None = None, alpha: float = 0.001,
                 recognizer: nn.Module | None = None, identity: dict[str, float] | None = None):
        super().__init__()
        self.alpha = alpha
        self.priors = nn.ModuleDict(priors) if priors and alpha > 0 else None
        self.identity = {k: w for k, w in (identity or {}).items() if w > 0} if recognizer is not None else {}
        self.recognizer = recognizer if self.identity else None
        self.register_buffer("identity_scale", torch.ones(()), persistent=False)

    def forward(self, sr: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for key in outputs(sr):
            scale = SCALE_OF[key]
            s = ssim(sr[key], batch[key])  # once per scale: the term and the loss share it
            terms[f"ssim/{scale}"] = s.detach()
            total = total + 0.5 * (1.0 - s)  # eq. (2)
            if key in self.identity:
                d = identity_distance(self.recognizer, sr[key], batch[key], batch.get("id_weight"))
                terms[f"id/{scale}"] = d.detach()
                total = total + self.identity[key] * self.identity_scale * d
            if self.priors is not None:
                with torch.autocast(sr[key].device.type, enabled=False):
                    # high-pass of the SR output (or the output itself, for priors on whole images), fp32
                    delta = prior_view(sr[key].float(), key, getattr(self.priors[key], "input", "residual"))
                logits = self.priors[key](delta.to(memory_format=torch.channels_last) if _is_cl(sr[key]) else delta)
                ce = identity_ce(logits, batch["cls"])
                terms[f"ce/{scale}"] = ce.detach()
                total = total + self.alpha * ce
        terms["loss"] = total
        return terms


def identity_distance(recognizer: nn.Module, sr: torch.Tensor, target: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine distance 1 − cos(E(sr), E(target)) of a frozen recognizer's unit embeddings; gradients reach
    ``sr`` only (the target's embedding is a constant). ``weight`` (B,): each face's share, the mean still
    over all B."""
    with torch.no_grad():
        want = recognizer.embed(target)  # (B, D)
    got = recognizer.embed(sr)  # (B, D)
    d = 1.0 - (got.float() * want.float()).sum(1)  # (B,)
    return (d * weight.float()).mean() if weight is not None else d.mean()


class PerceptualLoss(nn.Module):
    """ℓp (Johnson et al. 2016, as the paper trains it): Σ_outputs Σ_{fire2, fire3, fire4} mean((φ(sr) − φ(target))²).

    Johnson's feature reconstruction loss ‖φ(ŷ) − φ(y)‖² / (C·H·W) per layer, i.e. the mean squared feature
    difference, summed over the layers with equal weights and over the network's outputs. ``features`` is
    the frozen SqueezeNet (``facesr.models.perceptual.SqueezeFeatures``), or one feature network per output
    (``{"x2": PriorFeatures, ...}``: the frozen identity priors of that scale); it runs in the caller's
    autocast (a convnet, as fast in bf16 as the SR network), the differences in fp32.
    """

    def __init__(self, features: nn.Module | dict[str, nn.Module]):
        super().__init__()
        self.features = nn.ModuleDict(features) if isinstance(features, dict) else features

    def _features(self, key: str) -> nn.Module:
        if isinstance(self.features, nn.ModuleDict):
            if key not in self.features:
                raise KeyError(f"perceptual loss has feature networks for {list(self.features)}, not output {key!r}")
            return self.features[key]
        return self.features

    def forward(self, sr: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for key in outputs(sr):
            features = self._features(key)
            with torch.no_grad():
                want = features(batch[key])
            got = features(sr[key])
            term = sum(F.mse_loss(g.float(), w.float()) for g, w in zip(got, want))
            terms[f"perceptual/{SCALE_OF[key]}"] = term.detach()
            total = total + term
        terms["loss"] = total
        return terms


class MSELoss(nn.Module):
    """The pixel MSE SRCNN and VDSR train with, on [0, 1] pixels, summed over the network's outputs."""

    def forward(self, sr: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for key in outputs(sr):
            with torch.autocast(sr[key].device.type, enabled=False):
                term = F.mse_loss(sr[key].float(), batch[key].float())
            terms[f"mse/{SCALE_OF[key]}"] = term.detach()
            total = total + term
        terms["loss"] = total
        return terms


CONTENT_SCALE = 4.0  # MSE on [-1, 1] images / MSE on [0, 1] images


class AdversarialLoss(nn.Module):
    """SRGAN (Ledig et al., CVPR 2017), as Table 1 trains it: the generator's content loss (pixel MSE at every
    output: Ledig's SRGAN-MSE; their VGG content loss needs ImageNet weights) + ``weight`` · −log D(G(lr)) at
    hr (Ledig's 10⁻³), and the discriminator's own loss −log D(hr) − log(1 − D(G(lr))).

    Ledig compute the MSE on hr images in [−1, 1], 4x its value on our [0, 1] pixels, and weigh the adversarial
    term against that: the content term here is 4 · MSE (``mse/*`` stays reported in [0, 1] units). On [0, 1]
    pixels unscaled the adversarial term would weigh 4x Ledig's (measured: x8 SSIM 0.52 against 0.69 for SRResNet
    on MSE alone, issue 17).

    ``critic`` is the discriminator, trained by an engine of its own; the generator's term reads it with its
    weights as constants, so neither loss sends gradients into the other's network. Returns the terms with
    ``loss`` (the generator's) and ``critic_loss`` (the discriminator's), each carrying its own graph.
    """

    def __init__(self, critic: nn.Module | None = None, weight: float = 1e-3):
        super().__init__()
        self.critic = critic  # set by the stage once the discriminator is built (cluster.stages)
        self.weight = weight
        self.content = MSELoss()

    def forward(self, sr: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.critic is None:
            raise RuntimeError("AdversarialLoss has no discriminator: set .critic first")
        terms = self.content(sr, batch)
        terms["loss"] = CONTENT_SCALE * terms["loss"]  # Ledig's MSE on [-1, 1] images
        fake = sr["hr"]
        fixed = {n: p.detach() for n, p in self.critic.named_parameters()}
        g_logits = torch.func.functional_call(self.critic, fixed, (fake,)).float()  # (B,)
        adv = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits))
        real = self.critic(batch["hr"]).float()
        forged = self.critic(fake.detach()).float()
        critic_loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                       + F.binary_cross_entropy_with_logits(forged, torch.zeros_like(forged)))
        terms["adv/x8"] = adv.detach()
        terms["critic/x8"] = critic_loss.detach()
        terms["critic_real/x8"] = torch.sigmoid(real.detach()).mean()  # D's "real" probability on real faces
        terms["critic_fake/x8"] = torch.sigmoid(forged.detach()).mean()  # ... and on the generator's
        terms["loss"] = terms["loss"] + self.weight * adv
        terms["critic_loss"] = critic_loss
        return terms


def outputs(sr: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The targets a network's output dict has, coarse to fine (the cascade: x2, x4, hr; a peer: hr)."""
    keys = tuple(k for k in TARGETS if k in sr)
    if not keys or len(keys) != len(sr):
        raise ValueError(f"SR outputs must be keyed by targets {TARGETS}, got {sorted(sr)}")
    return keys


class PriorLoss(nn.Module):
    """Stage 1: cross-entropy, top-1 (``acc``) and top-5 (``acc5``) accuracy of each prior on its residual images.

    ``class_weight`` (C,) weights each class's cross-entropy (class-balanced training: inverse frequency);
    ``None`` = the paper's plain mean.
    """

    def __init__(self, class_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("class_weight", class_weight, persistent=False)

    def forward(self, logits: dict[str, torch.Tensor], cls: torch.Tensor) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        keep = cls >= 0
        n = keep.sum().clamp(min=1)
        for key, lg in logits.items():
            scale = SCALE_OF[key]
            ce = identity_ce(lg, cls, self.class_weight)
            terms[f"ce/{scale}"] = ce.detach()
            top = lg.detach().topk(min(5, lg.shape[1]), dim=1).indices  # (B, 5)
            hit = top == cls[:, None]
            terms[f"acc/{scale}"] = (hit[:, 0] & keep).sum().float() / n
            terms[f"acc5/{scale}"] = (hit.any(1) & keep).sum().float() / n
            total = total + ce
        terms["loss"] = total
        return terms


MARGINS = ("cosface", "arcface")


class MarginLoss(nn.Module):
    """Stage 1 for a face recognizer: a margin softmax on the cosines to each class centre (B, C), reported in
    PriorLoss's vocabulary (``ce``, ``acc``, ``acc5`` at its scale) so the console and dashboards read it alike.

    ``cosface`` (Wang et al. 2018): s·(cos θ_y − m); ``arcface`` (Deng et al. 2019): s·cos(θ_y + m), with
    ArcFace's fallback s·(cos θ_y − m·sin m) where θ_y + m would pass π. Accuracy uses the plain cosines.
    """

    def __init__(self, kind: str = "cosface", margin: float = 0.35, scale: float = 30.0,
                 class_weight: torch.Tensor | None = None):
        super().__init__()
        if kind not in MARGINS:
            raise ValueError(f"unknown margin loss {kind!r}; choose one of {', '.join(MARGINS)}")
        self.kind, self.margin, self.scale = kind, margin, scale
        self.report = PriorLoss(class_weight)

    def _target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        if self.kind == "cosface":
            return cos - self.margin
        sin = (1.0 - cos * cos).clamp(min=1e-7).sqrt()
        shifted = cos * math.cos(self.margin) - sin * math.sin(self.margin)  # cos(θ + m)
        return torch.where(cos > math.cos(math.pi - self.margin), shifted, cos - self.margin * math.sin(self.margin))

    def forward(self, cosines: dict[str, torch.Tensor], cls: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = {}
        for key, cos in cosines.items():
            cos = cos.float()
            target = cls.clamp(min=0).view(-1, 1)  # (B, 1); unlabelled rows are ignored by identity_ce
            tgt = self._target_logit(cos.gather(1, target))
            logits[key] = self.scale * cos.scatter(1, target, tgt)  # (B, C): margin on the true class only
        terms = self.report(logits, cls)
        for key, cos in cosines.items():  # top-1/top-5 of the plain cosines, not of the margin logits
            scale = SCALE_OF[key]
            keep = cls >= 0
            n = keep.sum().clamp(min=1)
            top = cos.detach().topk(min(5, cos.shape[1]), dim=1).indices
            hit = top == cls[:, None]
            terms[f"acc/{scale}"] = (hit[:, 0] & keep).sum().float() / n
            terms[f"acc5/{scale}"] = (hit.any(1) & keep).sum().float() / n
        return terms


def _is_cl(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
