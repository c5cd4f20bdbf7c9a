"""Identity preservation: LFW verification when one face of each pair is super-resolved.

For each LFW View 2 pair (A, B) face A is always the HR crop; face B is, by condition, its HR crop
(``hr``), bicubic ×8 of its 24² ``lr`` (``bicubic``), or a model's ×8 output from the same ``lr``.
A judge (``facesr.identity.judge``) embeds every face; a pair's score is minus the judge's distance.
Pairs whose images are absent from the folder (withheld identities) are skipped and counted by
``usable_pairs``. Reported per condition:

* ``accuracy``: the LFW protocol — 10-fold cross-validation over the official folds, the threshold
  chosen on 9 folds and applied to the held-out one; mean and std over folds;
* ``accuracy_fixed``: accuracy at the judge's own published threshold (dlib: distance < 0.6);
* ``accuracy_best``: accuracy at the single best threshold on all pairs (optimistic, for reference);
* ``auc``: ROC AUC of the scores (torchmetrics ``binary_auroc``);
* ``drift`` (bicubic and models): the judge's distance of each restored face B to its own HR face —
  how far restoration moved the identity (mean, std, and the share still under the judge's threshold).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..degrade import crop_hr, degrade, quantize
from ..imageio import read_rgb
from ..quality import finish, upscale
from ..vocab import SIZES
from .judge import Judge
from .metrics import verification_metrics
from .pairs import Pair, image_path

HR = SIZES["hr"]


@torch.inference_mode()
def verify(
    judge: Judge,
    pairs: list[Pair],
    root: str | Path,
    upscalers: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
    drift_faces: Iterable[tuple[str, int]] = (),
) -> dict:
    """Metrics per condition: ``hr``, ``bicubic`` and each upscaler (lr (B,3,24,24) -> (B,3,192,192)).

    Returns ``{condition: {accuracy, auc, …, [drift], fallbacks}}``; every face is embedded once. Drift is
    measured on every pair's face B and on ``drift_faces`` (more faces of the chosen people: a paired
    comparison of the upscalers on all of them, not only on the few that LFW's pairs name); each upscaler's
    ``drift_minus_bicubic`` is its per-face difference to bicubic's drift, mean and standard error.
    """
    upscalers = upscalers or {}
    conditions = ["hr", "bicubic", *upscalers]
    b_set = {p.b for p in pairs} | set(drift_faces)
    hr_faces = sorted({p.a for p in pairs} | b_set)
    emb: dict[str, dict[tuple[str, int], torch.Tensor]] = {c: {} for c in conditions}
    fallbacks = dict.fromkeys(conditions, 0)
    t0 = time.time()
    for i in range(0, len(hr_faces), batch_size):
        chunk = hr_faces[i : i + batch_size]
        hr = torch.stack([crop_hr(read_rgb(image_path(root, f))) for f in chunk])  # (B, 3, 192, 192)
        quad = {k: quantize(v) for k, v in degrade(hr).items()}  # batched: what quadruplet gives per image
        outs = {"hr": (list(range(len(chunk))), quad["hr"])}
        sel = [j for j, f in enumerate(chunk) if f in b_set]  # only the B side is degraded
        if sel:
            lr = quad["lr"][sel].to(device)  # (b, 3, 24, 24)
            outs["bicubic"] = (sel, upscale(lr, HR, "bicubic"))
            outs.update({name: (sel, finish(up(lr))) for name, up in upscalers.items()})  # (b, 3, 192, 192)
        for c, (idx, img) in outs.items():
            before = judge.fallbacks
            for j, e in zip(idx, judge.embed(img)):
                emb[c][chunk[j]] = e
            fallbacks[c] += judge.fallbacks - before
        if log:
            log(f"  embedded {min(i + batch_size, len(hr_faces))}/{len(hr_faces)} faces ({time.time() - t0:.0f} s)")
    same = torch.tensor([p.same for p in pairs])
    folds = torch.tensor([p.fold for p in pairs])
    fixed = -judge.threshold if judge.threshold is not None else None  # score = -distance
    out = {}
    for c in conditions:
        a = torch.stack([emb["hr"][p.a] for p in pairs])
        b = torch.stack([emb[c][p.b] for p in pairs])
        out[c] = verification_metrics(-judge.distance(a, b), same, folds, fixed)
        if c != "hr":
            out[c]["drift"] = identity_drift(judge, emb["hr"], emb[c])
        if c not in ("hr", "bicubic"):
            out[c]["drift_minus_bicubic"] = drift_difference(judge, emb["hr"], emb[c], emb["bicubic"])
        out[c]["fallbacks"] = fallbacks[c]
    return out


def identity_drift(judge: Judge, hr: dict, restored: dict) -> dict:
    """The judge's distance of each restored face to its own HR face: mean, std, share under the threshold."""
    faces = sorted(restored)
    d = judge.distance(torch.stack([restored[f] for f in faces]), torch.stack([hr[f] for f in faces]))
    std = float(d.std()) if len(d) > 1 else 0.0
    out = {"faces": len(faces), "mean": float(d.mean()), "std": std, "sem": std / max(len(d), 1) ** 0.5}
    if judge.threshold is not None:
        out["under_threshold"] = float((d < judge.threshold).double().mean())
    return out


def drift_difference(judge: Judge, hr: dict, restored: dict, baseline: dict) -> dict:
    """Per face, restored's drift minus baseline's (same faces): mean and standard error of the difference."""
    faces = sorted(restored)
    ref = torch.stack([hr[f] for f in faces])
    d = judge.distance(torch.stack([restored[f] for f in faces]), ref) - judge.distance(
        torch.stack([baseline[f] for f in faces]), ref)
    std = float(d.std()) if len(d) > 1 else 0.0
    return {"faces": len(faces), "mean": float(d.mean()), "sem": std / max(len(d), 1) ** 0.5}


def format_identity_table(report: dict) -> str:
    """One row per condition: 10-fold accuracy ± std, fixed- and best-threshold accuracy, ROC AUC, drift."""
    c = report["pair_counts"]
    judge = report.get("judge", {})
    thr = judge.get("threshold")
    lines = [
        f"LFW verification, {c['used']} of {c['total']} pairs ({c['absent']} skipped: image absent; "
        f"{c['outside_selection']} with face B outside the chosen identities; {c['over_per_fold']} over the per-fold cap)",
        f"judge: {judge.get('name', '?')} ({judge.get('distance', 'distance')})",
        "face A at HR; face B as: HR crop | bicubic x8 of its 24x24 lr | the model's x8 SR of the same lr",
        f"{'condition':<24}{'acc (10-fold)':>16}{f'acc (d<{thr:g})' if thr is not None else '':>14}"
        f"{'acc (best thr)':>16}{'ROC AUC':>10}{'drift to HR':>14}",
    ]
    for name, m in report["results"].items():
        acc = f"{100 * m['accuracy']:.2f}±{100 * m['accuracy_std']:.2f}%"
        fixed = f"{100 * m['accuracy_fixed']:.2f}%" if "accuracy_fixed" in m else ""
        drift = f"{m['drift']['mean']:.4f}" if "drift" in m else "-"
        lines.append(f"{name:<24}{acc:>16}{fixed:>14}{100 * m['accuracy_best']:>15.2f}%{m['auc']:>10.4f}{drift:>14}")
    for name, m in report["results"].items():
        if "drift_minus_bicubic" in m:
            d = m["drift_minus_bicubic"]
            lines.append(f"  {name}: drift minus bicubic's {d['mean']:+.4f} ± {d['sem']:.4f} (paired, {d['faces']} faces)")
    lines.append(
        "accuracy: LFW protocol, threshold chosen on 9 folds and tested on the 10th, mean±std over folds; "
        "best thr: one threshold fitted on all pairs (optimistic); drift: mean judge distance of each "
        "restored face to its own HR face (every pair's face B, and with --drift-all every face of the chosen people)"
    )
    return "\n".join(lines)
