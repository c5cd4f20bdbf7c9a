"""Verification figures from pair scores (higher = more alike): LFW 10-fold accuracy, fixed-threshold
accuracy, ROC AUC."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc


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


def verification_metrics(
    scores: torch.Tensor, same: torch.Tensor, folds: torch.Tensor, fixed_threshold: float | None = None
) -> dict:
    """LFW 10-fold accuracy (threshold from the other folds), best-threshold accuracy, ROC AUC; with
    ``fixed_threshold`` (a judge's published decision rule, on the same scale as ``scores``) also the
    accuracy of ``score > fixed_threshold`` (``accuracy_fixed``)."""
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
    if fixed_threshold is not None:
        out["accuracy_fixed"] = float(((scores > fixed_threshold) == same).double().mean())
    return out
