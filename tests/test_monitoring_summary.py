"""cluster.summary on a generated metrics.jsonl: final-value table and plot."""

from __future__ import annotations

import json
import struct

import pytest

from cluster.summary import main, plot, read_metrics, write_summary
from facesr.vocab import SCALES

FINAL_SSIM_VAL = {"x2": 0.9312, "x4": 0.8123, "x8": 0.6421}


def generate(path, steps: int = 30) -> None:
    """Two stages as cluster/recorder.py writes them (1 = priors: ce/acc; 2 = SR: ssim/ce/psnr),
    train every step, val every 10."""
    rows = []
    for stage in (1, 2):
        for step in range(1, steps + 1):
            for split in ("train", "val") if step % 10 == 0 else ("train",):
                row = {"stage": stage, "split": split, "epoch": step // 10, "step": step,
                       "time": 1.8e9 + step, "loss": 1.0 / step}
                for i, s in enumerate(SCALES):
                    row[f"ce/{s}"] = 3.0 / step + i
                    if stage == 1:
                        row[f"acc/{s}"] = step / steps - 0.1 * i
                    else:
                        row[f"ssim/{s}"] = 0.5 + 0.01 * step
                        if split == "val":
                            row[f"psnr/{s}"] = 20.0 + step / 10
                if split == "train":
                    row |= {"lr": 1e-3, "samples_per_s": 100.0}
                rows.append(row)
    rows[-1].update({f"ssim/{s}": v for s, v in FINAL_SSIM_VAL.items()})  # last row is 2/val
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"stage": "sr", "split": "train", "ste')  # killed mid-write


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "runs" / "demo"
    d.mkdir(parents=True)
    generate(d / "metrics.jsonl")
    return d


def table_rows(md: str, stage: str) -> dict[str, dict[str, str]]:
    """scale -> {column: cell} of the per-scale table under the stage's heading."""
    block = md.split(f"## Stage `{stage}`")[1].split("## ")[0]
    lines = [line for line in block.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    return {r[0]: dict(zip(header, r)) for r in rows if r[0] in SCALES}


def test_summary_table_holds_final_values_per_scale(run_dir):
    """summary.md has, per stage, one row per scale with the last train and val values."""
    md, _ = write_summary(run_dir)
    text = md.read_text()
    sr = table_rows(text, "2")
    assert set(sr) == set(SCALES)
    for s in SCALES:
        assert sr[s]["SSIM val"] == f"{FINAL_SSIM_VAL[s]:.4g}"
        assert sr[s]["SSIM train"] == f"{0.5 + 0.01 * 30:.4g}"
        assert sr[s]["PSNR (dB) val"] == f"{23.0:.4g}"
        assert "CE train" in sr[s] and "CE val" in sr[s]
    prior = table_rows(text, "1")
    assert prior["x8"]["Prior acc train"] == f"{1.0 - 0.2:.4g}"
    assert "SSIM train" not in prior["x2"]  # stage 1 has no SSIM column


def test_summary_plot_is_a_png(run_dir):
    """summary.png is a real PNG of a sensible size (rows = stages, columns = loss/SSIM/CE/acc)."""
    _, png = write_summary(run_dir)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 900 and height >= 500


def test_summary_plot_draws_every_panel(run_dir, tmp_path):
    """Every panel (loss, per-scale SSIM/CE/acc) of every stage gets curves, train and val."""
    drawn = plot(read_metrics(run_dir / "metrics.jsonl"), tmp_path / "p.png")
    assert drawn == {"1/loss": 2, "1/ce": 6, "1/acc": 6, "2/loss": 2, "2/ssim": 6, "2/ce": 6}


def test_summary_cli(run_dir, capsys):
    """python -m cluster.summary runs/<name> writes both files and prints their paths."""
    assert main([str(run_dir)]) == 0
    assert "summary.png" in capsys.readouterr().out
    assert (run_dir / "summary.md").exists()


def test_summary_of_empty_run_fails_clearly(tmp_path):
    """A run folder without metrics raises instead of writing an empty summary."""
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metrics"):
        write_summary(tmp_path)
