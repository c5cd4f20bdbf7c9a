"""One set of metrics: stage-2 validation (what the dashboard shows as val ssim/x8, psnr/x8) and
`facesr eval quality` give the same numbers on the same images."""

import pytest
import torch

from facesr.evaluate import score
from facesr.models import PRESETS, SRNet
from facesr.step import resolve_precision, to_device
from facesr.vocab import LEVELS, SCALE_OF, TARGETS
from shards.manifest import shard_urls
from shards.stream import read_in_order
from tests.fixtures_faces import prepared


def test_validation_and_eval_report_the_same_psnr_and_ssim():
    """A tiny cascade's per-scale PSNR/SSIM from SRStage.validate_batch over a split, read in shard order in
    equal batches, equal the eval table's over the same images (to float precision)."""
    from cluster.stages import SRStage

    _, out, _ = prepared()
    torch.manual_seed(0)
    net = SRNet(PRESETS["tiny"].sr).eval()
    stage = SRStage.__new__(SRStage)  # validation needs only the precision and a loss without priors
    from facesr.losses import CSRIPLoss

    stage.precision, stage.loss_fn = resolve_precision("fp32", "cpu"), CSRIPLoss(None, alpha=0)
    batches = [b for b in read_in_order(shard_urls(out, "val"), LEVELS, batch_size=4)]
    batches = [b for b in batches if len(b["key"]) == 4]  # equal batches: a mean of batch means is the mean
    assert batches
    val = {}
    for b in batches:
        for k, v in stage.validate_batch(net, to_device(b, "cpu", stage.precision)).items():
            val[k] = val.get(k, 0.0) + float(v) / len(batches)
    table, n = score({"tiny": net}, ({k: b[k].float() / 255 for k in LEVELS} for b in batches))
    assert n == 4 * len(batches)
    for key in TARGETS:
        scale = SCALE_OF[key]
        assert val[f"psnr/{scale}"] == pytest.approx(table["tiny"][scale]["psnr"], abs=1e-4)
        assert val[f"ssim/{scale}"] == pytest.approx(table["tiny"][scale]["ssim"], abs=1e-5)
