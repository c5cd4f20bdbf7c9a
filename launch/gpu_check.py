"""`python -m launch.gpu_check` (`make gpu-check`): everything a GPU machine should show, in one prepared run.

1. the driver and CUDA work (nvidia-smi, a CUDA tensor) — before anything else;
2. `facesr bench step --device cuda` for the tiny and paper presets (img/s, MFU of the chosen dtype,
   peak memory, host syncs per step);
3. the GPU-only tests (`pytest -m gpu`: no CUDA synchronisation in the step, precision auto);
4. a 2-worker stage-2 training on GPUs, killed after its first checkpoint and resumed, with img/s per GPU,
   MFU, peak memory and data wait read from its metrics.

Writes everything under OUT (default bench/gpu/) and prints a summary; exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable


def sh(cmd: list[str], out: Path, timeout: int = 900, **kw) -> str:
    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    out.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        sys.exit(f"FAILED ({res.returncode}): {' '.join(cmd)}\n{(res.stdout + res.stderr)[-3000:]}")
    return res.stdout


def check_driver(out: Path) -> dict:
    from facesr.hardware import cuda_status

    status = cuda_status()
    (out / "nvidia-smi.txt").write_text(status["nvidia_smi"] + "\n")
    if status["problems"]:
        sys.exit("CUDA does not work here: " + "; ".join(status["problems"]))
    return {"nvidia_smi": status["nvidia_smi"], "torch": status["torch"], "cuda": status["cuda"],
            "devices": status["devices"]}


def train_kill_resume(shards: str, out: Path, workers: int) -> dict:
    """A stage-2 run on GPUs killed (SIGKILL) after its first checkpoint, then resumed to the end."""
    storage = out / "runs"
    priors = out / "priors.safetensors"
    from launch.bench.train import random_priors

    shutil.copy(random_priors(shards, "paper", out), priors)
    args = [PY, "-m", "launch.train", "--config", "launch/configs/paper.yaml", f"data.shards={shards}",
            f"cluster.storage_path={storage}", "run.name=gpu-check", "run.stages=[2]", f"stage2.priors={priors}",
            f"cluster.num_workers={workers}", "cluster.cpus_per_worker=2", "data.loader_workers=2",
            "run.log_every=5", "run.checkpoint_every=20", "data.steps_per_epoch=60", "stage2.epochs=2",
            "data.val_batches=4", "run.telemetry_port=null"]
    run_dir = storage / "gpu-check"
    t0 = time.time()
    proc = subprocess.Popen(args, stdout=open(out / "train-1.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    while time.time() - t0 < 900 and proc.poll() is None:
        if list((run_dir / "stage2").glob("checkpoint_*")):
            break
        time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = time.time() - t0
    sh(args, out / "train-2.log", timeout=1800)
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"][2:]
    med = lambda k: sorted(r[k] for r in train)[len(train) // 2]  # noqa: E731
    return {"workers": workers, "killed_after_s": killed_after, "final_step": recs[-1]["step"],
            "images_per_s_per_gpu": med("samples_per_s"), "mfu": med("mfu"),
            "peak_memory_gib": med("peak_memory_bytes") / 2**30, "data_wait_fraction": med("data_wait_fraction")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--faces", default="../shared/data/celeba-ids", help="identity folders to shard for the run")
    p.add_argument("--out", default="bench/gpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-train", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"driver": check_driver(out)}
    for preset in ("tiny", "paper"):
        sh([PY, "-m", "launch.cli", "bench", "step", "--preset", preset, "--device", "cuda", "--seconds", "10",
            "--out", str(out / f"step-{preset}.json")], out / f"step-{preset}.log")
        r = json.loads((out / f"step-{preset}.json").read_text())
        v = r["variants"][r["auto"]["variant"]]
        summary[f"step_{preset}"] = {"precision": r["auto"]["precision"], "images_per_s": v["images_per_s"],
                                     "mfu": v["mfu"], "peak_memory_gib": v.get("peak_memory_gib"),
                                     "host_syncs_per_step": r["host_syncs_per_step"]}
    sh([PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], out / "pytest-gpu.log")
    if not a.skip_train:
        shards = out / "shards"
        if not (shards / "manifest.json").exists():
            sh([PY, "-m", "launch.cli", "prep", a.faces, str(shards), "--shard-size", "200"], out / "prep.log")
        summary["train_kill_resume"] = train_kill_resume(str(shards), out, a.workers)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
