"""Shift-compensated PSNR: finds a known misregistration on real faces and scores the aligned image."""

import torch

from facesr.degradations import lr_under
from facesr.evaluate import folder_batches, list_faces, select
from facesr.quality import image_scores, shift_compensated_psnr, translate, upscale

from .conftest import LFW


def _faces(n: int = 4) -> dict:
    return next(folder_batches(select(list_faces(LFW), n, seed=1), batch_size=n))


def test_finds_a_known_shift_and_recovers_the_score():
    hr = _faces()["hr"].float()
    moved = translate(hr, 2.5, -1.5)
    plain = image_scores(moved, hr)["psnr"]
    psnr, found = shift_compensated_psnr(moved, hr)
    assert torch.equal(found, torch.tensor([[-2.5, 1.5]] * hr.shape[0]))  # the inverse shift
    assert (psnr > plain + 8).all() and (psnr > 35).all()  # back to (almost) the image: only resampling loss
    same, zero = shift_compensated_psnr(hr, hr)
    assert torch.equal(zero, torch.zeros_like(zero)) and (same == 100.0).all()  # aligned input: no shift, capped


def test_phase0_decimation_misregisters_bicubic_by_3_5_px():
    """The decimate0 row's lr sits 3.5 hr px off the targets' grid (0.5 + 1 + 2 over the three levels)."""
    batch = _faces()
    hr = batch["hr"].float()
    bic = upscale(lr_under("decimate0", batch), 192, "bicubic")
    psnr, found = shift_compensated_psnr(bic, hr)
    assert torch.equal(found, torch.full_like(found, -3.5))
    assert (psnr > image_scores(bic, hr)["psnr"] + 1.5).all()
    ref, _ = shift_compensated_psnr(upscale(batch["lr"].float(), 192, "bicubic"), hr)  # the paper's lr, aligned
    assert (psnr - ref).abs().mean() < 0.5  # once aligned, phase-0 is about as good an input as the paper's


def test_eval_quality_reports_shift_compensated_rows(tiny_run, tmp_path, capsys):
    """`facesr eval quality --shift-compensated`: each robustness row also gets x8 psnr_sc and its gain; on
    decimate0 it lifts bicubic by the misregistration, on the paper's row (no offset) it changes little."""
    import json

    from launch.cli import main

    out = tmp_path / "q"
    assert main(["eval", "quality", str(tiny_run), "--data", str(LFW), "--limit", "4", "--device", "cpu",
                 "--degradations", "decimate0", "--shift-compensated", "--out", str(out)]) == 0
    assert "after undoing each image's global shift" in capsys.readouterr().out
    rows = json.loads((out / "quality.json").read_text())["robustness"]
    dec, paper = rows["decimate0"], rows["paper"]
    bic = {d: r["results"]["bicubic"]["x8"] for d, r in rows.items()}
    assert bic["decimate0"]["psnr_sc"] > bic["decimate0"]["psnr"] + 1.5
    assert abs(bic["paper"]["psnr_sc"] - bic["paper"]["psnr"]) < 1.0  # central crop only, no shift to undo
    for r in (dec, paper):
        name = next(iter(r["gain_over_bicubic"]))
        g = r["gain_over_bicubic"][name]["x8"]
        assert g["psnr_sc"] == r["results"][name]["x8"]["psnr_sc"] - r["results"]["bicubic"]["x8"]["psnr_sc"]
