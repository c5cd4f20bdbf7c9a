"""`make demo` says plainly what its stage 1 showed: priors beating the majority class on held-out images of
their classes, or a smoke test (scored on their own training images, or not beating it), naming the config
whose priors recognize."""

from __future__ import annotations

import json

from launch.demo import _priors_verdict


def _run(tmp_path, accs, majority, splits):
    run, shards = tmp_path / "run", tmp_path / "shards"
    run.mkdir()
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"splits": {s: {} for s in splits}}))
    recs = [{"stage": 1, "split": "train", "acc/x8": 0.5},
            {"stage": 1, "split": "val", "acc_majority": majority, **{f"acc/{k}": v for k, v in accs.items()}},
            {"stage": 2, "split": "val", "psnr/x8": 24.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return _priors_verdict(run, shards)


def test_held_out_and_above_the_majority_at_every_scale(tmp_path):
    v = _run(tmp_path, {"x2": 0.03, "x4": 0.04, "x8": 0.05}, 0.02, ["train", "val", "prior_val"])
    assert "beat it at every scale" in v and "held-out" in v and "smoke test" not in v


def test_one_scale_at_the_majority_is_a_smoke_test(tmp_path):
    v = _run(tmp_path, {"x2": 0.02, "x4": 0.04, "x8": 0.05}, 0.02, ["train", "val", "prior_val"])
    assert "smoke test" in v and "cpu-2h.yaml" in v


def test_scored_on_training_images_is_a_smoke_test_whatever_the_figures(tmp_path):
    v = _run(tmp_path, {"x2": 0.09, "x4": 0.09, "x8": 0.09}, 0.076, ["train", "val", "test"])
    assert "smoke test" in v and "images they trained on" in v


def test_no_stage1_record_is_said(tmp_path):
    (tmp_path / "run").mkdir()
    assert "no validation record" in _priors_verdict(tmp_path / "run", tmp_path / "shards")
