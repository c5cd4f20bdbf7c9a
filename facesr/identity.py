"""Identity preservation: LFW face verification when one face of each pair is super-resolved.

A face-embedding network — a small timm ResNet, deliberately *not* the
SqueezeNet priors used in training, so the SR model cannot have been optimised
against the judge — is trained with cross-entropy on identities that never
appear in the evaluation pairs (CelebA identities plus the LFW people absent
from ``lfw-pairs.txt``). Embeddings are the L2-normalised pooled features (with
a horizontal-flip average); a pair's score is their cosine similarity.

For each LFW View 2 pair (A, B) the first face A is always the HR crop; the
second face B is, by condition, its HR crop (``hr``), bicubic ×8 of its 24²
``lr`` (``bicubic``), or a model's ×8 output from the same ``lr``. Pairs whose
images are absent from the folder (withheld identities) are skipped and
counted. Reported per condition:

* ``accuracy``: the LFW protocol — 10-fold cross-validation over the official
  folds, the threshold chosen on 9 folds and applied to the held-out one; mean
  and std over folds;
* ``accuracy_best``: accuracy at the single best threshold on all pairs
  (optimistic, for reference);
* ``auc``: ROC AUC of the scores (torchmetrics ``binary_auroc``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torchmetrics.functional.classification import binary_auroc

from .degrade import crop_hr, degrade, quantize
from .imageio import ImageReadError, read_rgb
from .quality import finish, upscale
from .vocab import SIZES

HR = SIZES["hr"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- LFW pairs


@dataclass(frozen=True)
class Pair:
    fold: int  # official View 2 fold, 0..9
    same: bool  # same person
    a: tuple[str, int]  # (name, image number) of the face kept at HR
    b: tuple[str, int]  # (name, image number) of the face that is degraded and restored


def read_pairs(path: str | Path) -> list[Pair]:
    """LFW ``pairs.txt`` (View 2): a ``folds<TAB>n`` header, then per fold n same-person and n different pairs."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    head = lines[0].split()
    folds, per = int(head[0]), int(head[1])
    pairs = []
    for i, line in enumerate(lines[1:]):
        f = line.split("\t") if "\t" in line else line.split()
        fold = i // (2 * per)
        if len(f) == 3:
            pairs.append(Pair(fold, True, (f[0], int(f[1])), (f[0], int(f[2]))))
        elif len(f) == 4:
            pairs.append(Pair(fold, False, (f[0], int(f[1])), (f[2], int(f[3]))))
        else:
            raise ValueError(f"{path}:{i + 2}: expected 3 or 4 fields, got {len(f)}: {line!r}")
    if len(pairs) != folds * 2 * per:
        raise ValueError(f"{path}: header promises {folds}x{2 * per} pairs, found {len(pairs)}")
    return pairs


def image_path(root: str | Path, face: tuple[str, int]) -> Path:
    name, idx = face
    return Path(root) / name / f"{name}_{idx:04d}.jpg"


def pair_identities(pairs: Iterable[Pair]) -> set[str]:
    return {n for p in pairs for n in (p.a[0], p.b[0])}


def usable_pairs(
    pairs: list[Pair], root: str | Path, identities: Iterable[str] | None = None, per_fold: int = 0
) -> tuple[list[Pair], dict[str, int]]:
    """Pairs whose two images exist and, when ``identities`` is given, whose face B's person is one of them.

    Only face B is degraded and super-resolved, so only B's person must be unseen by the SR model
    (its test split); face A stays HR. Requiring both would leave almost no different-person pairs.

    ``per_fold`` > 0 keeps at most that many per fold, half same and half different, in file order
    (a quick run that keeps the protocol's balance and folds). Returns (pairs, counts).
    """
    wanted = set(identities) if identities is not None else None
    counts = {"total": len(pairs), "absent": 0, "outside_selection": 0, "over_per_fold": 0, "used": 0}
    kept, taken = [], {}
    for p in pairs:
        if not (image_path(root, p.a).is_file() and image_path(root, p.b).is_file()):
            counts["absent"] += 1
            continue
        if wanted is not None and p.b[0] not in wanted:
            counts["outside_selection"] += 1
            continue
        k = (p.fold, p.same)
        if per_fold and taken.get(k, 0) >= per_fold // 2:
            counts["over_per_fold"] += 1
            continue
        taken[k] = taken.get(k, 0) + 1
        kept.append(p)
    counts["used"] = len(kept)
    return kept, counts


# ---------------------------------------------------------------- accuracy and AUC


def best_threshold(scores: torch.Tensor, same: torch.Tensor) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``score > threshold`` == same on these pairs."""
    s, order = scores.double().sort()
    y = same[order].bool()
    n = len(s)
    # Threshold below sorted index i: pairs 0..i-1 predicted different, i..n-1 same.
    neg_left = torch.cat([torch.zeros(1, dtype=torch.long), (~y).long().cumsum(0)])  # correct "different" left of i
    pos_right = torch.cat([y.long().flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.long)])  # correct "same"
    correct = neg_left + pos_right  # (n+1,)
    i = int(correct.argmax())
    lo = s[i - 1] if i > 0 else s[0] - 1.0
    hi = s[i] if i < n else s[-1] + 1.0
    return float((lo + hi) / 2), correct[i].item() / n


def verification_metrics(scores: torch.Tensor, same: torch.Tensor, folds: torch.Tensor) -> dict:
    """LFW 10-fold accuracy (threshold from the other folds), best-threshold accuracy, ROC AUC."""
    same = same.bool()
    accs, thresholds = [], []
    for k in folds.unique().tolist():
        test, train = folds == k, folds != k
        if not train.any() or not test.any():
            continue
        thr, _ = best_threshold(scores[train], same[train])
        accs.append(((scores[test] > thr) == same[test]).double().mean().item())
        thresholds.append(thr)
    thr_all, acc_all = best_threshold(scores, same)
    both = bool(same.any() and (~same).any())
    out = {
        "pairs": int(len(scores)),
        "folds": len(accs),
        "accuracy": float(torch.tensor(accs).mean()) if accs else float("nan"),
        "accuracy_std": float(torch.tensor(accs).std()) if len(accs) > 1 else 0.0,
        "threshold_mean": float(torch.tensor(thresholds).mean()) if thresholds else thr_all,
        "accuracy_best": acc_all,
        "threshold_best": thr_all,
        "auc": float(binary_auroc(scores.float(), same.long())) if both else float("nan"),
        "score_same_mean": float(scores[same].mean()) if same.any() else float("nan"),
        "score_diff_mean": float(scores[~same].mean()) if (~same).any() else float("nan"),
    }
    return out


# ---------------------------------------------------------------- the embedding network


@dataclass(frozen=True)
class EmbedderConfig:
    arch: str = "resnet10t"  # timm small ResNet (4.9 M params): trains on CPU, unlike the SqueezeNet priors
    size: int = 96  # network input side; 192² faces are resized to size·8/7 and centre-cropped (CPU-sized)
    epochs: int = 8  # passes over the training faces; ~3.9k faces, a few minutes each on 2 CPU cores
    batch_size: int = 64  # faces per step
    lr: float = 2e-3  # AdamW peak learning rate, cosine decay
    weight_decay: float = 0.05  # AdamW; the training set is small, regularise
    label_smoothing: float = 0.1  # softer targets generalise better to unseen identities
    lowres_p: float = 0.3  # share of training faces blurred by a random down-up resize, so identity not sharpness is learnt
    min_images: int = 2  # identities with fewer images are left out of training
    seed: int = 0  # shuffling and augmentation


class FaceEmbedder(nn.Module):
    """Faces (B, 3, S, S) in [0, 1], any S -> L2-normalised embeddings (B, D), flip-averaged."""

    def __init__(self, cfg: EmbedderConfig = EmbedderConfig(), num_classes: int = 1):
        super().__init__()
        self.cfg = cfg
        self.frozen = False  # set by freeze(): the judge must not drift (BN statistics, dropout)
        self.net = timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FaceEmbedder":
        return super().train(mode and not self.frozen)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to size·8/7, centre-crop to size, normalise. (B, 3, S, S) -> (B, 3, size, size)."""
        pad = self.cfg.size * 8 // 7
        x = F.interpolate(x.float(), size=(pad, pad), mode="bilinear", align_corners=False, antialias=True)
        o = (pad - self.cfg.size) // 2
        x = x[..., o : o + self.cfg.size, o : o + self.cfg.size]
        return (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Already prepared input -> class logits (training)."""
        return self.net(x)

    def embed_prepared(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        e = self.embed_prepared(x) + self.embed_prepared(x.flip(-1))
        return F.normalize(e, dim=1)


def freeze(model: FaceEmbedder) -> FaceEmbedder:
    """The judge is fixed: eval mode that stays eval, no gradients."""
    model.frozen = True
    model.eval().requires_grad_(False)
    return model


def save_embedder(path: str | Path, model: FaceEmbedder, classes: list[str], extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "embedder", "config": dataclasses.asdict(model.cfg), "classes": classes, **(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)
    return path


def load_embedder(path: str | Path, device: str | torch.device = "cpu") -> tuple[FaceEmbedder, dict]:
    """A frozen embedder and its metadata (training identities, excluded identities, …)."""
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    if meta.get("kind") != "embedder":
        raise ValueError(f"{path}: not a face-embedder weights file (kind={meta.get('kind')!r})")
    model = FaceEmbedder(EmbedderConfig(**meta["config"]), num_classes=len(meta["classes"]))
    model.net.load_state_dict(load_file(str(path)))
    return freeze(model.to(device)), meta


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
    *,
    steps: int = 0,
    log: Callable[[str], None] = print,
) -> FaceEmbedder:
    """Cross-entropy training on the given faces (CPU is fine). ``steps`` > 0 caps the optimizer steps (tests)."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = FaceEmbedder(cfg, num_classes=len(classes))
    pad = cfg.size * 8 // 7
    t0 = time.time()
    x, y = _load_training_tensor(faces, pad, log)  # (N, 3, pad, pad) uint8, (N,)
    log(f"embedder: {len(y)} faces of {len(classes)} identities decoded in {time.time() - t0:.0f} s")
    per_epoch = max(1, len(y) // cfg.batch_size)
    total = steps or cfg.epochs * per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    mean, std = model.mean, model.std
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(len(y), generator=g)
        for i in range(per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = (_augment(x[idx], cfg.size, cfg.lowres_p, g) - mean) / std  # (B, 3, size, size)
            loss = F.cross_entropy(model.logits(xb), y[idx], label_smoothing=cfg.label_smoothing)
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


# ---------------------------------------------------------------- verification


@torch.inference_mode()
def verify(
    embedder: FaceEmbedder,
    pairs: list[Pair],
    root: str | Path,
    upscalers: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Verification metrics per condition: ``hr``, ``bicubic`` and each upscaler (lr (B,3,24,24) -> (B,3,192,192))."""
    upscalers = upscalers or {}
    conditions = ["hr", "bicubic", *upscalers]
    a_faces = sorted({p.a for p in pairs})
    b_faces = sorted({p.b for p in pairs})
    emb: dict[str, dict[tuple[str, int], torch.Tensor]] = {c: {} for c in conditions}
    hr_faces = sorted(set(a_faces) | set(b_faces))
    t0 = time.time()
    b_set = set(b_faces)
    for i in range(0, len(hr_faces), batch_size):
        chunk = hr_faces[i : i + batch_size]
        hr = torch.stack([crop_hr(read_rgb(image_path(root, f))) for f in chunk])  # (B, 3, 192, 192)
        quad = {k: quantize(v) for k, v in degrade(hr).items()}  # batched: what quadruplet gives per image
        hr = quad["hr"].to(device)
        for f, e in zip(chunk, embedder(hr).cpu()):
            emb["hr"][f] = e
        sel = [j for j, f in enumerate(chunk) if f in b_set]  # only the B side is degraded
        if sel:
            lr = quad["lr"][sel].to(device)  # (b, 3, 24, 24)
            outs = {"bicubic": upscale(lr, HR, "bicubic")}
            outs.update({name: finish(up(lr)) for name, up in upscalers.items()})
            for c, img in outs.items():
                for j, e in zip(sel, embedder(img.to(device)).cpu()):
                    emb[c][chunk[j]] = e
        if log:
            log(f"  embedded {min(i + batch_size, len(hr_faces))}/{len(hr_faces)} faces ({time.time() - t0:.0f} s)")
    same = torch.tensor([p.same for p in pairs])
    folds = torch.tensor([p.fold for p in pairs])
    out = {}
    for c in conditions:
        a = torch.stack([emb["hr"][p.a] for p in pairs])
        b = torch.stack([emb[c][p.b] for p in pairs])
        out[c] = verification_metrics((a * b).sum(1), same, folds)
    return out


def format_identity_table(report: dict) -> str:
    """One row per condition: 10-fold accuracy ± std, best-threshold accuracy, ROC AUC."""
    c = report["pair_counts"]
    lines = [
        f"LFW verification, {c['used']} of {c['total']} pairs ({c['absent']} skipped: image absent; "
        f"{c['outside_selection']} with face B outside the chosen identities; {c['over_per_fold']} over the per-fold cap)",
        "face A at HR; face B as: HR crop | bicubic x8 of its 24x24 lr | the model's x8 SR of the same lr",
        f"{'condition':<24}{'acc (10-fold)':>16}{'acc (best thr)':>16}{'ROC AUC':>10}",
    ]
    for name, m in report["results"].items():
        acc = f"{100 * m['accuracy']:.2f}±{100 * m['accuracy_std']:.2f}%"
        lines.append(f"{name:<24}{acc:>16}{100 * m['accuracy_best']:>15.2f}%{m['auc']:>10.4f}")
    lines.append(
        "accuracy: LFW protocol, threshold on cosine similarity chosen on 9 folds and tested on the 10th, "
        "mean±std over folds; best thr: one threshold fitted on all pairs (optimistic)"
    )
    return "\n".join(lines)
