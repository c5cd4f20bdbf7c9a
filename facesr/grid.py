"""Comparison grid like the paper's Fig. 3: one row per face, LR | bicubic | SR x2, x4, x8 | HR; with several
models (the cascade and its Table 1 peers) their columns side by side, each at the scales it has.

Every cell is shown at 192² so columns line up: the 24² input and the model's
48²/96² intermediate outputs are enlarged with nearest neighbour (their pixels
stay visible — nothing is added by the display), bicubic is the ×8 baseline
from the same ``lr``. Several models give several groups of SR columns.
``per_degradation`` turns a batch into one row per (face, lr degradation).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .degradations import lr_under
from .degrade import to_uint8
from .quality import finish, upscale
from .vocab import SCALES, SIZES, TARGETS, SCALE_OF

CELL = SIZES["hr"]
HEADER = 22  # px of label strip above the columns
GAP = 2  # px between cells


def show(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, s, s) -> (B, 3, 192, 192) by nearest neighbour (display only)."""
    return x if x.shape[-1] == CELL else F.interpolate(x, size=(CELL, CELL), mode="nearest-exact")


@torch.inference_mode()
def grid_columns(
    batch: dict, models: dict[str, nn.Module], device: str | torch.device = "cpu", scales: tuple[str, ...] = SCALES
) -> list[tuple[str, torch.Tensor]]:
    """[(label, (N, 3, 192, 192))] in display order for the quadruplets in ``batch``: each model's outputs at
    ``scales`` that it has (a Table 1 peer has x8 only; ``scales=("x8",)`` gives one column per model, Fig. 3)."""
    lr = batch["lr"].float()
    cols = [("LR 24x24", show(lr)), ("bicubic x8", upscale(lr, CELL, "bicubic"))]
    for name, net in models.items():
        sr = net.to(device).eval()(lr.to(device))
        prefix = f"{name} " if len(models) > 1 else "SR "
        cols += [(f"{prefix}{SCALE_OF[k]}", show(finish(sr[k]).cpu())) for k in TARGETS
                 if k in sr and SCALE_OF[k] in scales]
    cols.append(("HR 192x192", batch["hr"].float()))
    return cols


def render(columns: list[tuple[str, torch.Tensor]], row_labels: list[str] | None = None) -> Image.Image:
    """Lay the columns out as a white-background PNG image with a label strip."""
    n = columns[0][1].shape[0]
    w = len(columns) * (CELL + GAP) - GAP
    h = HEADER + n * (CELL + GAP) - GAP
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, (label, imgs) in enumerate(columns):
        x0 = c * (CELL + GAP)
        draw.text((x0 + 4, 4), label, fill="black", font=font)
        for r in range(n):
            tile = Image.fromarray(to_uint8(imgs[r]).permute(1, 2, 0).numpy())
            canvas.paste(tile, (x0, HEADER + r * (CELL + GAP)))
    if row_labels:
        for r, text in enumerate(row_labels):
            xy = (4, HEADER + r * (CELL + GAP) + CELL - 14)
            draw.rectangle(draw.textbbox(xy, text, font=font), fill="black")  # readable on any background
            draw.text(xy, text, fill="white", font=font)
    return canvas


def per_degradation(batch: dict, degradations: list[str]) -> dict:
    """One row per face and eval degradation (face-major): lr made by each, x2/x4/hr repeated, rows labelled."""
    lrs = torch.stack([lr_under(d, batch) for d in degradations], 1)  # (N, D, 3, 24, 24)
    out = {k: batch[k].repeat_interleave(len(degradations), 0) for k in TARGETS}
    out["lr"] = lrs.flatten(0, 1)  # (N·D, 3, 24, 24)
    names = batch.get("name") or [""] * lrs.shape[0]
    out["label"] = [f"{d}: {n.split('/')[0]}"[:28] for n in names for d in degradations]
    return out


def comparison_grid(
    batch: dict, models: dict[str, nn.Module], path: str | Path, device: str | torch.device = "cpu",
    scales: tuple[str, ...] = SCALES,
) -> Path:
    """Write the grid for ``batch`` (quadruplets, optional ``name`` list) to ``path`` (PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = batch.get("name")
    labels = batch.get("label") or ([n.split("/")[0][:28] for n in names] if names else None)
    render(grid_columns(batch, models, device, scales), labels).save(path)
    return path
