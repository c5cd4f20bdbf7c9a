"""Evaluation protocol: PSNR/SSIM of trained cascades against bicubic and nearest, per scale.

Test faces come from an identity folder (``ROOT/<identity>/<image>``, e.g. LFW)
read and turned into quadruplets here with ``degrade.quadruplet`` — the same
crop and degradation the shards store — or from any iterable of quadruplet
batches (the launcher passes a shard stream). Each model's ``x2``/``x4``
branch outputs and its ``hr`` (deploy path) output, and bicubic/nearest
upsampling of the same ``lr``, are scored with ``facesr.quality``.

``report`` dicts are what ``facesr eval quality`` prints (``format_table``) and
writes as JSON; their ``protocol`` entry says exactly how the numbers were made.
``score_degradations`` scores the same faces with lr made by several named
degradations (``facesr.degradations.EVAL_DEGRADATIONS``), keeping the clean
targets; ``add_robustness`` and ``format_robustness`` report one row each.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .degradations import describe, lr_under
from .degrade import DEFAULT, DegradeConfig, TooSmallError, crop_hr, degrade, quantize
from .imageio import ImageReadError, read_rgb
from .models import SRNet
from .prefetch import prefetched
from .quality import BASELINES, PAPER_DATA_RANGE, QualityMeter, Reference, baselines, finish, upscale
from .vocab import KEY_OF, LEVELS, SCALE_OF, SCALES, SIZES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# The paper's Table 1 (LFW, 8×, their own crop/degradation, not stated in detail). The SSIM
# cell of "our model" is missing from our copy of the paper, so it is not quoted.
PAPER_TABLE1 = {"x8": {"bicubic": {"psnr": 24.256, "ssim": 0.7060}, "C-SRIP (paper)": {"psnr": 27.164}}}


@dataclass(frozen=True)
class Face:
    identity: str  # folder name = identity label
    path: Path  # image file


def list_faces(root: str | Path, identities: Iterable[str] | None = None) -> list[Face]:
    """Image files of an identity folder, sorted; restricted to ``identities`` when given."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such identity folder")
    wanted = set(identities) if identities is not None else None
    faces = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if wanted is not None and d.name not in wanted:
            continue
        faces += [Face(d.name, f) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return faces


def read_identities(path: str | Path) -> list[str]:
    """An identity list file: one name per line; blank lines and ``#`` comments ignored."""
    lines = Path(path).read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def select(faces: list[Face], limit: int = 0, seed: int = 0) -> list[Face]:
    """``limit`` faces drawn without replacement by a seeded shuffle (all when 0), back in sorted order.

    A seeded draw rather than the first N: sorted order would take only names starting with A.
    """
    if not limit or limit >= len(faces):
        return list(faces)
    chosen = random.Random(seed).sample(range(len(faces)), limit)
    return [faces[i] for i in sorted(chosen)]


def folder_batches(
    faces: list[Face],
    batch_size: int = 32,
    cfg: DegradeConfig = DEFAULT,
    skipped: list[tuple[str, str]] | None = None,
) -> Iterator[dict]:
    """Quadruplet batches {"lr","x2","x4","hr": (B,3,S,S), "name": [str]} from face files.

    Unreadable or too-small images are appended to ``skipped`` as (path, reason) and left out.
    """
    buf: list[torch.Tensor] = []
    names: list[str] = []
    for face in faces:
        try:
            hr = crop_hr(read_rgb(face.path), cfg)  # (3, 192, 192)
        except (ImageReadError, TooSmallError, ValueError) as e:
            if skipped is not None:
                skipped.append((str(face.path), str(e)))
            continue
        buf.append(hr)
        names.append(f"{face.identity}/{face.path.name}")
        if len(buf) == batch_size:
            yield _degrade(buf, names, cfg)
            buf, names = [], []
    if buf:
        yield _degrade(buf, names, cfg)


def _degrade(hrs: list[torch.Tensor], names: list[str], cfg: DegradeConfig) -> dict:
    """Batched ``quadruplet``: the crops degraded together (one conv per level instead of one per face)."""
    out = {k: quantize(v) for k, v in degrade(torch.stack(hrs), cfg).items()}  # (B, 3, S, S) per level
    out["name"] = list(names)
    return out


def model_label(path: str | Path, taken: Iterable[str] = ()) -> str:
    """A short column name for a model path: the run folder's or file's name, the full path if that clashes."""
    p = Path(path)
    name = p.name if p.is_dir() else (p.parent.name if p.name == "srnet.safetensors" else p.stem)
    return str(path) if name in set(taken) or name in BASELINES else name


def score(
    models: dict[str, SRNet],
    batches: Iterable[dict],
    *,
    limit: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> tuple[dict, int]:
    """Score every model and baseline on ``batches``; returns (QualityMeter.summary(), images scored)."""
    results, seen = score_degradations(models, batches, ("paper",), limit=limit, device=device, progress=progress)
    return results["paper"], seen


@torch.inference_mode()
def score_degradations(
    models: dict[str, SRNet],
    batches: Iterable[dict],
    degradations: Iterable[str],
    *,
    limit: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
    shift_compensated: tuple[str, ...] = (),
) -> tuple[dict[str, dict], int]:
    """Score under each named lr degradation (``EVAL_DEGRADATIONS``): ({name: QualityMeter.summary()}, images).

    Only lr is replaced (``degradations.lr_under``); the x2/x4/hr targets stay the batch's clean cascade, and
    bicubic, nearest and every model start from the same degraded lr. At the scales in ``shift_compensated``
    every method also gets ``psnr_sc``: PSNR after undoing a global misregistration (quality.shift_compensated_psnr).
    """
    names = list(dict.fromkeys(degradations))
    meters = {d: QualityMeter(shift_compensated) for d in names}
    deployed = {name: net.deploy() if hasattr(net, "deploy") else net for name, net in models.items()}
    seen = 0
    for m in models.values():
        m.to(device).eval()
    for quad, lrs in prefetched(_inputs(batches, names, limit)):  # reading and degrading overlap the scoring
        hr = Reference(quad["hr"])  # every row and method scores against the same clean hr: its moments once
        for d in names:
            if d == "paper":  # the main table: every scale, nearest too
                _score_quad(meters[d], models, {**quad, "lr": lrs[d]}, hr, device)
            else:  # a robustness row is x8 of bicubic and each model: the deploy path, three times less scoring
                _score_x8(meters[d], deployed, hr, lrs[d], device)
        seen += len(quad["hr"])
        if progress:
            progress(len(quad["hr"]))  # faces scored in this batch (a progress bar's update)
    if not seen:
        raise ValueError("no test faces could be read: nothing to evaluate")
    return {d: meters[d].summary() for d in names}, seen


def _inputs(batches: Iterable[dict], names: list[str], limit: int) -> Iterator[tuple[dict, dict]]:
    """(quadruplet as float, {degradation: its lr}) per batch, up to ``limit`` faces."""
    seen = 0
    for batch in batches:
        if limit and seen >= limit:
            break
        take = batch["lr"].shape[0] if not limit else min(batch["lr"].shape[0], limit - seen)
        quad = {k: batch[k][:take].float() for k in LEVELS}
        seen += take
        yield quad, {d: lr_under(d, quad) for d in names}


def _score_quad(meter: QualityMeter, models: dict[str, SRNet], quad: dict, hr: Reference, device) -> None:
    """Baselines and every model from ``quad["lr"]``, each scale against its quadruplet level (hr: ``hr``)."""
    targets = {**{k: Reference(quad[k]) for k in ("x2", "x4")}, "hr": hr}
    for method, outs in baselines(quad["lr"]).items():
        for scale, img in outs.items():
            meter.update(method, scale, img, targets[KEY_OF[scale]])
    lr = quad["lr"].to(device)
    for name, net in models.items():
        sr = net(lr)  # the cascade {"x2": 48², "x4": 96², "hr": 192²}; a Table 1 peer {"hr": 192²}
        for scale in SCALES:
            key = KEY_OF[scale]
            if key in sr:
                meter.update(name, scale, finish(sr[key]).cpu(), targets[key])


def _score_x8(meter: QualityMeter, deployed: dict, hr: Reference, lr: torch.Tensor, device) -> None:
    """x8 only, bicubic and each model's deploy network (no x2/x4 branches) from the same lr."""
    meter.update("bicubic", "x8", upscale(lr, SIZES["hr"], "bicubic"), hr)
    lr = lr.to(device)
    for name, net in deployed.items():
        meter.update(name, "x8", finish(net(lr)).cpu(), hr)


def protocol(source: str, cfg: DegradeConfig = DEFAULT) -> dict:
    """How the numbers were made, stated in every table and JSON."""
    return {
        "source": source,
        "crop": f"central {cfg.crop}x{cfg.crop} of the source, after scaling its shorter side to "
        f"{cfg.source_size} px (none for 250x250 LFW: every hr pixel is a camera pixel)",
        "degradation": f"cascade hr->x4->x2->lr, each 2x step = Gaussian blur sigma={cfg.blur_sigma} "
        "(finer-image px, even kernel centred at 2i+0.5) + decimation; every level rounded to 8 bit",
        "degradation_config": cfg.to_dict(),
        "colour_space": "RGB, all three channels (no Y-channel conversion, no border shave)",
        "data_range": "pixels in [0, 1] from 8-bit; outputs clamped to [0, 1] and rounded to 8 bit before scoring",
        "scales": "x2: 24->48 vs the x2 level, x4: 24->96 vs x4, x8: 24->192 vs hr; model x2/x4 from its branches "
        "(models with an x8 output only, the Table 1 peers, are scored at x8)",
        "psnr": "torchmetrics peak_signal_noise_ratio, data_range=1, per image (capped at 100 dB), mean over images",
        "ssim": "torchmetrics structural_similarity_index_measure, Gaussian 11x11 sigma=1.5, K1=0.01, K2=0.03, "
        "data_range=1, per image, mean over images",
        "ssim_paper": "as ssim but the paper's C1=(0.01*256)^2=6.55, C2=(0.03*256)^2=58.98 on 0-255 "
        f"(data_range={PAPER_DATA_RANGE:.6f} on [0, 1])",
        "baselines": "bicubic: torch interpolate mode=bicubic (a=-0.75), align_corners=False; "
        "nearest: nearest-exact; both from the same 8-bit lr",
    }


GAIN_METRICS = ("psnr", "ssim", "ssim_paper", "psnr_sc")


def _gains(results: dict, models: Iterable[str]) -> dict:
    """{model: {scale: {metric: model minus bicubic}}}, at the scales the model has (a peer: x8 only)."""
    return {
        name: {
            s: {m: results[name][s][m] - results["bicubic"][s][m] for m in GAIN_METRICS if m in results[name][s]}
            for s in SCALES if s in results[name]
        }
        for name in models
    }


def _cell(table: dict, method: str, scale: str, key: str, fmt: str, width: int, sign: str = "") -> str:
    """One right-aligned figure (``sign="+"``: signed), or a dash where ``method`` has no output at ``scale``."""
    row = table.get(method, {}).get(scale)
    return f"{row[key]:>{sign}{width}{fmt}}" if row is not None else f"{'—':>{width}}"


def build_report(results: dict, n_images: int, source: str, models: dict[str, str], extra: dict | None = None) -> dict:
    """The JSON report: protocol, data, models (label -> path), results, gains over bicubic, paper figures."""
    return {
        "protocol": protocol(source),
        "images": n_images,
        "models": models,
        "results": results,
        "gain_over_bicubic": _gains(results, models),
        "paper_table1": PAPER_TABLE1,
        **(extra or {}),
    }


def format_table(report: dict) -> str:
    """Table 1 style: methods as columns, PSNR / SSIM / SSIM with the paper's constants as rows, per scale; a
    model without an output at a scale (a peer's x2, x4) shows a dash there."""
    res = report["results"]
    methods = [*BASELINES, *report["models"]]
    gains = [f"Δ {n}" for n in report["models"]]  # each model's gain column, named after it
    width = max(10, *(len(m) + 1 for m in [*methods, *gains]))
    head = f"{'scale':<6}{'metric':<13}" + "".join(f"{m:>{width}}" for m in [*methods, *gains])
    lines = [
        f"PSNR [dB] and SSIM on {report['images']} faces — {report['protocol']['source']}",
        "(Δ = model minus bicubic; SSIM* = paper's constants C1=6.55, C2=58.98 on 0-255)",
        head,
        "-" * len(head),
    ]
    rows = (("psnr", "PSNR [dB]", ".3f"), ("ssim", "SSIM", ".4f"), ("ssim_paper", "SSIM*", ".4f"))
    for s in SCALES:
        for i, (key, label, fmt) in enumerate(rows):
            cells = "".join(_cell(res, m, s, key, fmt, width) for m in methods)
            cells += "".join(_cell(report["gain_over_bicubic"], n, s, key, fmt, width, "+") for n in report["models"])
            lines.append(f"{s if i == 0 else '':<6}{label:<13}{cells}")
    p = report["paper_table1"]["x8"]
    lines.append(
        f"paper, Table 1 (x8, LFW, their protocol): bicubic {p['bicubic']['psnr']:.3f} dB / "
        f"SSIM {p['bicubic']['ssim']:.4f}; C-SRIP {p['C-SRIP (paper)']['psnr']:.3f} dB"
    )
    pr = report["protocol"]
    lines.append("protocol: " + "; ".join(pr[k] for k in ("crop", "degradation", "colour_space", "data_range", "arithmetic")
                                          if k in pr))
    if report.get("skipped"):
        lines.append(f"skipped {len(report['skipped'])} unreadable or too-small images (listed in the JSON)")
    return "\n".join(lines)


def add_robustness(report: dict, by_degradation: dict[str, dict]) -> dict:
    """Add the robustness rows (``score_degradations``' results) and how each lr was made to a report."""
    report["robustness"] = {
        d: {"results": res, "gain_over_bicubic": _gains(res, report["models"])} for d, res in by_degradation.items()
    }
    report["protocol"]["robustness"] = (
        "one row per lr degradation: lr made from the 8-bit hr as described (paper: the batch's own lr); the x2/x4/hr "
        "targets stay the clean paper cascade; bicubic, nearest and every model start from that lr; scored as above"
    )
    report["protocol"]["lr_degradations"] = {d: describe(d) for d in by_degradation}
    return report


def format_robustness(report: dict, scale: str = "x8") -> str:
    """One row per lr degradation: PSNR / SSIM of bicubic and of each model at ``scale``, and each model's gain."""
    rows = report["robustness"]
    models = list(report["models"])
    cols = ["bicubic", *models, *(f"Δ {m}" for m in models)]
    width = max(18, *(len(c) + 2 for c in cols))
    first = max(14, *(len(d) + 2 for d in rows))
    head = f"{'lr made by':<{first}}" + "".join(f"{c:>{width}}" for c in cols)
    lines = [
        f"{scale} PSNR [dB] / SSIM under each lr degradation on {report['images']} faces "
        "(x2/x4/hr targets: clean paper cascade; Δ = model minus bicubic)",
        head,
        "-" * len(head),
    ]
    for d, row in rows.items():
        res, gain = row["results"], row["gain_over_bicubic"]
        cells = [f"{res[m][scale]['psnr']:.3f} / {res[m][scale]['ssim']:.4f}" for m in ["bicubic", *models]]
        cells += [f"{gain[m][scale]['psnr']:+.3f} / {gain[m][scale]['ssim']:+.4f}" for m in models]
        lines.append(f"{d:<{first}}" + "".join(f"{c:>{width}}" for c in cells))
    if all("psnr_sc" in row["results"]["bicubic"][scale] for row in rows.values()):
        lines += ["", f"{scale} PSNR [dB] after undoing each image's global shift (best of ±4.5 px in half-pixel steps "
                  "per axis, central 160x160): misregistration left out", head, "-" * len(head)]
        for d, row in rows.items():
            res, gain = row["results"], row["gain_over_bicubic"]
            cells = [f"{res[m][scale]['psnr_sc']:.3f}" for m in ["bicubic", *models]]
            cells += [f"{gain[m][scale]['psnr_sc']:+.3f}" for m in models]
            lines.append(f"{d:<{first}}" + "".join(f"{c:>{width}}" for c in cells))
    lines += [f"  {d}: {text}" for d, text in report["protocol"]["lr_degradations"].items()]
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


@torch.no_grad()
def score_priors(priors: dict[str, torch.nn.Module], batches: Iterable[dict], device="cpu") -> dict:
    """Top-1 and top-5 accuracy of each prior (key ``x2|x4|hr``) on its residual images (or whole images, as the
    prior was trained: ``FrozenPrior.input``) of labelled batches (``{level: float [0, 1], "cls"}``; cls = -1
    skipped). Returns ``{"images", scale: {"top1", "top5"}}``."""
    from .degrade import prior_view

    hits = {k: torch.zeros(2, dtype=torch.long) for k in priors}
    n = 0
    for batch in batches:
        keep = batch["cls"] >= 0
        if not keep.any():
            continue
        cls = batch["cls"][keep].to(device)
        n += len(cls)
        for key, prior in priors.items():
            view = prior_view(batch[key][keep].to(device).float(), key, getattr(prior, "input", "residual"))
            logits = prior(view)  # (B, C)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices == cls[:, None]  # (B, 5)
            hits[key] += torch.stack([top[:, 0].sum(), top.any(1).sum()]).cpu()
    out: dict = {"images": n}
    for key, (h1, h5) in hits.items():
        out[SCALE_OF[key]] = {"top1": h1.item() / max(n, 1), "top5": h5.item() / max(n, 1)}
    return out
