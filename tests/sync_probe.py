"""Run by tests/test_host_syncs.py in a fresh process (it initialises torch.distributed): a few real training
steps of each stage through DeepSpeed on the CPU, counting host synchronisations; prints JSON."""

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(zero_stage: int) -> dict:
    import torch

    from cluster.config import TrainConfig
    from cluster.engine import initialize
    from cluster.loop import train_step
    from cluster.stages import STAGES
    from facesr.models import build_prior, get_preset
    from facesr.step import TermSums, resolve_precision
    from facesr.syncs import SyncCounter
    from facesr.vocab import SIZES, TARGETS
    from facesr.weights import save_priors

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    classes = [f"id{i}" for i in range(10)]
    tmp = Path(tempfile.mkdtemp())
    prior_cfg = get_preset("tiny").prior
    save_priors(tmp / "priors.safetensors", {k: build_prior(prior_cfg, len(classes)) for k in TARGETS}, prior_cfg, classes)
    cfg = TrainConfig()
    cfg.stage1.batch_size, cfg.stage1.max_micro_batch = 8, 4  # two micro-batches a step: accumulation counts too
    cfg.stage2.batch_size, cfg.stage2.max_micro_batch = 8, 4
    cfg.stage2.priors = str(tmp / "priors.safetensors")
    cfg.engine.zero_stage = zero_stage
    device = torch.device("cpu")
    precision = resolve_precision("fp32", device)
    out = {}
    for number in (1, 2):
        stage = STAGES[number](cfg, classes, device, precision)
        eng, b = initialize(stage.build_model(), stage.stage_cfg, cfg.engine, 1)
        gen = torch.Generator().manual_seed(number)

        def micro():
            batch = {k: torch.randint(0, 256, (b.micro_batch, 3, s, s), dtype=torch.uint8, generator=gen)
                     for k, s in SIZES.items()}
            batch["cls"] = torch.tensor([0, -1, 3, 9][: b.micro_batch])
            return batch

        sums = TermSums()
        train_step(eng, stage, [micro() for _ in range(b.accumulation)], sums, device, precision, (0, 0, 0, 0))
        sums.mean()  # warm-up step outside the count
        with SyncCounter() as c:
            for i in range(3):
                train_step(eng, stage, [micro() for _ in range(b.accumulation)], sums, device, precision, (0, 0, 0, i))
        step_syncs = sorted(set(c.where))[:20]  # distinct places, a few
        with SyncCounter() as c:
            terms = sums.mean()
        out[f"stage{number}"] = {"step_syncs": step_syncs, "log_syncs": c.total, "terms": sorted(terms),
                                 "accumulation": b.accumulation}
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)))
