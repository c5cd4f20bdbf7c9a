"""Training facesr's own verification judge (``facesr eval embedder``): cross-entropy on identities that
never appear in the evaluation pairs (CelebA identities plus the LFW people absent from ``lfw-pairs.txt``).
The network is ``facesr.models.embedder.FaceEmbedder``; its weights go through ``facesr.weights``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..degrade import crop_hr
from ..imageio import ImageReadError, read_rgb
from ..models.embedder import EmbedderConfig, FaceEmbedder, freeze


@dataclass(frozen=True)
class EmbedderTraining:
    epochs: int = 8  # passes over the training faces; ~3.9k faces, a few minutes each on 2 CPU cores
    batch_size: int = 64  # faces per step
    lr: float = 2e-3  # AdamW peak learning rate, cosine decay
    weight_decay: float = 0.05  # AdamW; the training set is small, regularise
    label_smoothing: float = 0.1  # softer targets generalise better to unseen identities
    lowres_p: float = 0.3  # share of training faces blurred by a random down-up resize, so identity not sharpness is learnt
    min_images: int = 2  # identities with fewer images are left out of training
    seed: int = 0  # shuffling and augmentation


def training_faces(
    sources: dict[str, str | Path], exclude: Iterable[str], min_images: int = 2
) -> tuple[list[tuple[int, Path]], list[str], dict]:
    """(label, file) of every identity in the identity folders ``sources`` (prefix -> root) not in ``exclude``.

    Classes are named ``prefix/identity``; ``exclude`` holds bare identity names (LFW people in the
    pairs or in an evaluation split). Returns (faces, classes, counts).
    """
    exclude = set(exclude)
    faces, classes, counts = [], [], {"excluded_identities": 0, "too_few_images": 0}
    for prefix, root in sources.items():
        for d in sorted(p for p in Path(root).iterdir() if p.is_dir()):
            if d.name in exclude:
                counts["excluded_identities"] += 1
                continue
            files = sorted(f for f in d.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if len(files) < min_images:
                counts["too_few_images"] += 1
                continue
            label = len(classes)
            classes.append(f"{prefix}/{d.name}")
            faces += [(label, f) for f in files]
    counts.update(identities=len(classes), images=len(faces))
    return faces, classes, counts


def _load_training_tensor(faces: list[tuple[int, Path]], side: int, log) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode, crop (as hr) and resize every training face once: uint8 (N, 3, side, side), labels (N,)."""
    imgs, labels = [], []
    for i, (label, path) in enumerate(faces):
        try:
            hr = crop_hr(read_rgb(path))  # (3, 192, 192)
        except (ImageReadError, ValueError) as e:
            log(f"  skipped {e}")
            continue
        x = F.interpolate(hr[None], size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        imgs.append((x[0] * 255).round().to(torch.uint8))
        labels.append(label)
        if (i + 1) % 1000 == 0:
            log(f"  decoded {i + 1}/{len(faces)} faces")
    return torch.stack(imgs), torch.tensor(labels)


def _augment(x: torch.Tensor, size: int, lowres_p: float, g: torch.Generator) -> torch.Tensor:
    """uint8 (B, 3, P, P) -> float (B, 3, size, size): random crop, flip, and sometimes a low-resolution blur."""
    b, _, p, _ = x.shape
    out = torch.empty(b, 3, size, size)
    for i in range(b):
        t, l = (torch.randint(0, p - size + 1, (2,), generator=g)).tolist()
        img = x[i, :, t : t + size, l : l + size].float() / 255
        if torch.rand(1, generator=g) < 0.5:
            img = img.flip(-1)
        if torch.rand(1, generator=g) < lowres_p:
            s = int(torch.randint(size // 8, size // 2 + 1, (1,), generator=g))
            img = F.interpolate(img[None], size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            img = F.interpolate(img, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        out[i] = img
    return out


def train_embedder(
    faces: list[tuple[int, Path]],
    classes: list[str],
    cfg: EmbedderConfig = EmbedderConfig(),
    train: EmbedderTraining = EmbedderTraining(),
    *,
    steps: int = 0,
    log: Callable[[str], None] = print,
) -> FaceEmbedder:
    """Cross-entropy training on the given faces (CPU is fine). ``steps`` > 0 caps the optimizer steps (tests)."""
    torch.manual_seed(train.seed)
    g = torch.Generator().manual_seed(train.seed)
    model = FaceEmbedder(cfg, num_classes=len(classes))
    pad = cfg.size * 8 // 7
    t0 = time.time()
    x, y = _load_training_tensor(faces, pad, log)  # (N, 3, pad, pad) uint8, (N,)
    log(f"embedder: {len(y)} faces of {len(classes)} identities decoded in {time.time() - t0:.0f} s")
    per_epoch = max(1, len(y) // train.batch_size)
    total = steps or train.epochs * per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=total, pct_start=0.1)
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(len(y), generator=g)
        for i in range(per_epoch):
            idx = order[i * train.batch_size : (i + 1) * train.batch_size]
            xb = model.normalize(_augment(x[idx], cfg.size, train.lowres_p, g))  # (B, 3, size, size)
            loss = F.cross_entropy(model.logits(xb), y[idx], label_smoothing=train.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0 or step == total:
                log(f"  step {step}/{total} (epoch {step / per_epoch:.1f}) loss {loss.item():.3f} "
                    f"({time.time() - t0:.0f} s)")
            if step >= total:
                break
    return freeze(model)
