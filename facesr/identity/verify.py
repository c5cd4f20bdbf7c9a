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
def verify_degradations(
    judge: Judge,
    pairs: list[Pair],
    root: str | Path,
    upscalers: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    degradations: Iterable[str] = ("paper",),
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    drift_faces: Iterable[tuple[str, int]] = (),
) -> dict:
    """Metrics of ``hr`` and, per lr degradation (``facesr.degradations.EVAL_DEGRADATIONS``: the same names as
    ``facesr eval quality --degradations``), of ``bicubic`` and each upscaler (lr (B,3,24,24) -> (B,3,192,192)).

    Returns ``{"hr": metrics, "rows": {degradation: {condition: metrics}}}``; every face is embedded once per
    condition. Drift is measured on every pair's face B and on ``drift_faces`` (more faces of the chosen people:
    a paired comparison on all of them, not only on the few that LFW's pairs name); each upscaler's
    ``drift_minus_bicubic`` is its per-face difference to bicubic's drift under the same degradation, mean and
    standard error.
    """
    from ..degradations import EVAL_DEGRADATIONS

    upscalers = upscalers or {}
    rows = list(dict.fromkeys(degradations))
    unknown = [d for d in rows if d not in EVAL_DEGRADATIONS]
    if unknown or not rows:
        raise ValueError(f"unknown degradation {', '.join(unknown) or '(none)'}; known: {', '.join(EVAL_DEGRADATIONS)}")
    methods = ["bicubic", *upscalers]
    b_set = {p.b for p in pairs} | set(drift_faces)
    hr_faces = sorted({p.a for p in pairs} | b_set)
    hr_emb: dict[tuple[str, int], torch.Tensor] = {}
    emb: dict[tuple[str, str], dict[tuple[str, int], torch.Tensor]] = {(d, m): {} for d in rows for m in methods}
    fallbacks = {("hr", "hr"): 0, **dict.fromkeys(emb, 0)}
    for i in range(0, len(hr_faces), batch_size):
        chunk = hr_faces[i : i + batch_size]
        hr = torch.stack([crop_hr(read_rgb(image_path(root, f))) for f in chunk])  # (B, 3, 192, 192)
        quad = {k: quantize(v) for k, v in degrade(hr).items()}  # batched: what quadruplet gives per image
        outs = {("hr", "hr"): (list(range(len(chunk))), quad["hr"])}
        sel = [j for j, f in enumerate(chunk) if f in b_set]  # only the B side is degraded
        if sel:
            for d in rows:
                lr = (quad["lr"][sel] if d == "paper" else EVAL_DEGRADATIONS[d](quad["hr"][sel])).to(device)  # (b, 3, 24, 24)
                outs[(d, "bicubic")] = (sel, upscale(lr, HR, "bicubic"))
                outs.update({(d, name): (sel, finish(up(lr))) for name, up in upscalers.items()})  # (b, 3, 192, 192)
        for c, (idx, img) in outs.items():
            before = judge.fallbacks
            target = hr_emb if c == ("hr", "hr") else emb[c]
            for j, e in zip(idx, judge.embed(img)):
                target[chunk[j]] = e
            fallbacks[c] += judge.fallbacks - before
        if progress:
            progress(len(chunk), len(hr_faces))  # faces embedded (each under every condition), of all
    same = torch.tensor([p.same for p in pairs])
    folds = torch.tensor([p.fold for p in pairs])
    fixed = -judge.threshold if judge.threshold is not None else None  # score = -distance
    a = torch.stack([hr_emb[p.a] for p in pairs])

    def scores(table: dict) -> dict:
        b = torch.stack([table[p.b] for p in pairs])
        return verification_metrics(-judge.distance(a, b), same, folds, fixed)

    out = {"hr": {**scores(hr_emb), "fallbacks": fallbacks[("hr", "hr")]}, "rows": {}}
    for d in rows:
        row = out["rows"][d] = {}
        for m in methods:
            row[m] = scores(emb[(d, m)]) | {"drift": identity_drift(judge, hr_emb, emb[(d, m)])}
            if m != "bicubic":
                row[m]["drift_minus_bicubic"] = drift_difference(judge, hr_emb, emb[(d, m)], emb[(d, "bicubic")])
            row[m]["fallbacks"] = fallbacks[(d, m)]
    return out


def verify(judge: Judge, pairs: list[Pair], root: str | Path,
           upscalers: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None, **kw) -> dict:
    """The paper degradation's row of ``verify_degradations`` as ``{condition: metrics}`` (hr, bicubic, each
    upscaler): the table ``format_identity_table`` prints."""
    res = verify_degradations(judge, pairs, root, upscalers, ("paper",), **kw)
    return {"hr": res["hr"], **res["rows"]["paper"]}


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


def format_degradation_table(report: dict) -> str:
    """The identity table under each lr degradation (issue 25): per row and method, ROC AUC, accuracy at the
    judge's threshold and 10-fold, drift to the face's own HR, and each model's drift minus bicubic's (paired,
    ± standard error; negative = the model keeps the person better than bicubic)."""
    res, c = report["results"], report["pair_counts"]
    judge = report.get("judge", {})
    thr = judge.get("threshold")
    hr = res["hr"]
    n_drift = next(iter(next(iter(res["rows"].values())).values()))["drift"]["faces"]
    fixed = f"acc@{thr:g}" if thr is not None else "acc@thr"
    lines = [
        f"identity under each lr degradation: judge {judge.get('name', '?')}, {c['used']} LFW pairs "
        f"(face A at HR, face B restored from 24x24), drift over {n_drift} faces",
        f"{'lr made by':<16}{'face B as':<18}{'ROC AUC':>9}{fixed:>10}{'acc 10-fold':>13}{'drift':>9}"
        f"{'drift - bicubic':>26}",
        f"{'':<16}{'hr':<18}{hr['auc']:>9.4f}{_pct(hr.get('accuracy_fixed')):>10}{_pct(hr['accuracy']):>13}",
    ]
    for d, row in res["rows"].items():
        for m, r in row.items():
            diff = ""
            if "drift_minus_bicubic" in r:
                x = r["drift_minus_bicubic"]
                verdict = "better" if x["mean"] + 2 * x["sem"] < 0 else "worse" if x["mean"] - 2 * x["sem"] > 0 else "tie"
                diff = f"{x['mean']:+.4f} ± {x['sem']:.4f} {verdict:>6}"
            lines.append(f"{d:<16}{m:<18}{r['auc']:>9.4f}{_pct(r.get('accuracy_fixed')):>10}{_pct(r['accuracy']):>13}"
                         f"{r['drift']['mean']:>9.4f}{diff:>26}")
    lines.append("drift: mean judge distance of each restored face B to its own HR face (lower keeps the person); "
                 "drift - bicubic: paired per face, ± standard error; better/worse: beyond 2 standard errors")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
