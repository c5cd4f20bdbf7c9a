"""`python -m launch.gpu_check` (`make gpu-check`): what a GPU machine shows, in one run of a few minutes.

Built for a bare GPU host: Python with torch (CUDA), torchvision, numpy, PIL, safetensors, yaml, pyarrow and
prometheus-client, no network, and this working tree plus what `make gpu-pack` built on another machine
(``.gpupack/``: wheels of DeepSpeed and WebDataset with their missing dependencies, unpacked here on first use,
and a small shard set). It finds out which stages it can run, runs each in a process of its own under a time
limit, and rewrites ``OUT/gpu_check.json`` after every stage, so a run cut short still reports what it did.

Stages, in order of what matters most:
  driver            nvidia-smi, a CUDA build of torch that runs an op, a driver new enough for its CUDA
  worker_step       the worker's train_step (robust degradation, precision auto, cascade + priors, the loader's
                    pinned uint8 batches) under torch.cuda.set_sync_debug_mode("error")
  step:P:M          `facesr bench step` of preset P (tiny, paper) in engine.step_compile mode M (off = eager,
                    reduce-overhead = CUDA graphs, default = compiled): img/s, MFU against the nominal dense bf16
                    peak and the measured conv peak, launches per step
  roofline:P        `facesr bench roofline` of preset P: each op class's FLOPs, bytes, roofline bound on this GPU
                    (datasheet peak and bandwidth) and measured time: where the step's time goes
  deepspeed         a one-process DeepSpeed engine on NCCL: save, load into other weights, same weights
  gpu_tests         pytest -m gpu tests/test_gpu.py
  train_kill_resume needs a full GPU host (Ray, DeepSpeed, WebDataset, 2+ GPUs): a stage-2 run on every GPU
                    present (a power of two), SIGKILLed after its first checkpoint and resumed
A stage whose needs are missing is reported as skipped with the reason. ``--device cpu`` runs the same harness
on the CPU (no driver, no CUDA graphs; host syncs counted instead). Exits 1 if a stage failed or ran out of time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FULL_HOST = ("needs a full GPU host (Ray, DeepSpeed and WebDataset installed, 2 or more GPUs): there, "
             "`python -m launch.gpu_check --faces ../shared/data/celeba-ids` runs it on every GPU present")


def unpack(pack: Path) -> Path | None:
    """``pack/site``: the pack's wheels unpacked (a wheel's files are its installed layout), or None."""
    wheels = sorted((pack / "wheels").glob("*.whl")) if pack.is_dir() else []
    if not wheels:
        return None
    site = pack / "site"
    for w in wheels:
        marker = site / f".{w.name}.done"
        if not marker.exists():
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
            marker.touch()
    return site


def importable(name: str) -> str | None:
    """None if ``name`` can be imported here, else why not."""
    try:
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (make gpu-pack brings DeepSpeed and WebDataset)"
    except (ImportError, ValueError) as e:
        return f"{name} cannot be imported ({e})"
    return None


def plan(a, site: Path | None) -> list[tuple[str, dict, float, str | None]]:
    """(stage, arguments, time cap in s, reason to skip or None) for every stage, in running order."""
    import torch

    cuda = a.device != "cpu"
    gpus = torch.cuda.device_count() if cuda else 0
    no_cuda = None if not cuda or gpus else "torch sees no CUDA device"
    shards = str(Path(a.pack) / "shards") if (Path(a.pack) / "shards" / "manifest.json").is_file() else ""
    wds = importable("webdataset")
    worker = {"shards": shards, "loader": bool(shards) and wds is None, "steps": a.steps,
              "preset": "tiny" if a.quick else "paper", "batch": 16 if cuda else 4, "micro": 8 if cuda else 2}
    presets = ["tiny"] if a.quick else ["tiny", "paper"]
    modes = ["off"] if a.quick else (["off", "reduce-overhead", "default"] if cuda else ["off", "default"])
    # time caps on CUDA from the first run on an H200 (torch 2.11): compiling the paper step takes ~140 s a mode
    caps = {"off": 60, "reduce-overhead": 200, "default": 200}

    def step(preset: str, mode: str):
        return (f"step:{preset}:{mode}", {"preset": preset, "mode": mode, "batch": a.batch, "seconds": a.seconds},
                caps[mode] * (1.5 if preset == "paper" else 1), no_cuda)

    # in order of what matters most, so that the default budget (6 min) runs the first six on one H200 and a
    # larger --budget-s the rest: the paper step eager and in CUDA graphs, DeepSpeed, the GPU tests, then where
    # the paper step's time goes (roofline), the tiny preset, the worker loop's own path to CUDA graphs, and
    # inductor without graphs
    first = [m for m in modes if m != "default"]
    out = [("driver", {}, 60, None), ("worker_step", worker, 120, no_cuda)]
    out += [step(p, m) for p in presets if p == "paper" for m in first]
    out.append(("deepspeed", {"shards": ""}, 120, no_cuda or importable("deepspeed")))
    out.append(("gpu_tests", {}, 180, "needs CUDA (--device cpu)" if not cuda else no_cuda))
    rp = presets[-1]  # where the paper step's time goes against this GPU's roofline (bench roofline)
    out.append((f"roofline:{rp}", {"preset": rp, "batch": a.batch}, 90 if rp == "paper" else 60, no_cuda))
    out += [step(p, m) for p in presets if p != "paper" for m in first]
    if cuda and not a.quick:
        out.append(("worker_step:reduce-overhead", {**worker, "compile_mode": "reduce-overhead"}, 300, no_cuda))
    out += [step(p, "default") for p in sorted(presets, key=lambda p: p != "paper") if "default" in modes]
    full = [importable(m) for m in ("ray", "deepspeed", "webdataset")]
    missing = next((r for r in full if r), None) or (None if gpus >= 2 else f"{gpus} GPU(s) here")
    out.append(("train_kill_resume", {"workers": 1 << (min(gpus, 8).bit_length() - 1) if gpus else 0},
                1200, f"{FULL_HOST} ({missing})" if missing else None))
    slow = 1 if cuda else 5  # the same stages on two CPU cores take minutes where a GPU takes seconds
    return [(n, kw, cap * slow, skip) for n, kw, cap, skip in out
            if not a.stages or n.split(":")[0] in a.stages or n in a.stages]


def run_stage(name: str, kw: dict, device: str, out: Path) -> dict:
    """In the stage's own process: call it, return its figures."""
    from launch import gpu_stages as g

    kind = name.split(":")[0]
    if kind == "driver":
        return g.driver(device)
    if kind == "worker_step":
        return g.worker_step(device, kw["shards"], kw["steps"], kw["preset"], kw["batch"], kw["micro"], kw["loader"],
                             kw.get("compile_mode", "off"))
    if kind == "step":
        return g.step(device, kw["preset"], kw["mode"], kw["batch"], kw["seconds"])
    if kind == "roofline":
        return g.roofline(device, kw["preset"], kw["batch"])
    if kind == "deepspeed":
        return g.deepspeed_engine(device, kw["shards"])
    if kind == "gpu_tests":
        res = subprocess.run([PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"],
                             cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(res.stdout[-3000:])
        return {"pytest": res.stdout.strip().splitlines()[-1]}
    if kind == "train_kill_resume":
        return train_kill_resume(kw["workers"], out)
    raise ValueError(f"unknown stage {name}")


def train_kill_resume(workers: int, out: Path) -> dict:
    """A stage-2 run on ``workers`` GPUs SIGKILLed after its first checkpoint, then resumed to the end."""
    from launch.bench.train import random_priors

    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        packed = ROOT / ".gpupack" / "shards"
        shards = packed if (packed / "manifest.json").exists() else shards
    if not (shards / "manifest.json").exists():
        subprocess.run([PY, "-m", "launch.cli", "prep", os.environ.get("FACESR_FACES", "../shared/data/celeba-ids"),
                        str(shards), "--shard-size", "200"], check=True, cwd=ROOT)
    storage, priors = out / "runs", random_priors(str(shards), "paper", out)
    args = [PY, "-m", "launch.train", "--config", "launch/configs/paper.yaml", f"data.shards={shards}",
            f"cluster.storage_path={storage}", "run.name=gpu-check", "run.stages=[2]", f"stage2.priors={priors}",
            f"cluster.num_workers={workers}", "cluster.cpus_per_worker=2", "data.loader_workers=2",
            "run.log_every=5", "run.checkpoint_every=20", "data.steps_per_epoch=60", "stage2.epochs=2",
            "data.val_batches=4", "run.telemetry_port=null"]
    run_dir, t0 = storage / "gpu-check", time.time()
    with open(out / "train-1.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        while time.time() - t0 < 600 and proc.poll() is None and not list((run_dir / "stage2").glob("checkpoint_*")):
            time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_after = time.time() - t0
    with open(out / "train-2.log", "w") as log:
        subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT, timeout=900)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"][2:]

    def med(k: str) -> float:
        return sorted(r[k] for r in train)[len(train) // 2]

    return {"workers": workers, "killed_after_s": killed_after, "final_step": recs[-1]["step"],
            "images_per_s_per_gpu": med("samples_per_s"), "mfu": med("mfu"),
            "peak_memory_gib": med("peak_memory_bytes") / 2**30, "data_wait_fraction": med("data_wait_fraction")}


def child(a) -> int:
    """``--run-stage``: one stage in this process; its result JSON at ``--result``."""
    kw = json.loads(a.kwargs)
    site = Path(a.pack) / "site"
    if site.is_dir():
        sys.path.append(str(site))
        spec = importlib.util.find_spec("deepspeed") if importable("deepspeed") is None else None
        if spec and spec.origin and spec.origin.startswith(str(site)):
            # the pack's DeepSpeed JIT-builds its ops from its own sources: in a folder of its own, never the
            # shared cache an installed DeepSpeed (built from other paths) would then find stale and rebuild
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(a.pack) / "torch_extensions"))
    try:
        result = {"status": "ok", **run_stage(a.run_stage, kw, a.device, Path(a.out))}
    except Exception as e:  # reported in the summary, with where it came from
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:4000],
                  "traceback": traceback.format_exc()[-4000:]}
    Path(a.result).write_text(json.dumps(result, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default="bench/gpu", help="folder of gpu_check.json and the stages' logs")
    p.add_argument("--pack", default=str(ROOT / ".gpupack"), help="what make gpu-pack built (wheels/, shards/)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="the whole run's time; stages past it are skipped (default 360 on CUDA, 1800 on the CPU)")
    p.add_argument("--seconds", type=float, default=4.0, help="timed steps per step variant")
    p.add_argument("--batch", type=int, default=8, help="images a GPU per step (scale.yaml's per-GPU batch)")
    p.add_argument("--steps", type=int, default=4, help="checked optimizer steps of the worker step")
    p.add_argument("--quick", action="store_true", help="tiny preset, eager only (the CPU test)")
    p.add_argument("--stages", default="", help="comma-separated stage names (default: all)")
    p.add_argument("--run-stage", help=argparse.SUPPRESS)
    p.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.stages = [s for s in a.stages.split(",") if s]
    a.budget_s = a.budget_s or (360.0 if a.device == "cuda" else 1800.0)
    if a.run_stage:
        return child(a)
    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    site = unpack(Path(a.pack))
    if site:  # after everything installed: the pack only fills in what the host lacks
        sys.path.append(str(site))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if a.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    report = {"device": a.device, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pack": str(site or "none"),
              "budget_s": a.budget_s, "stages": {}}
    t_end, failed = time.monotonic() + a.budget_s, False
    broken = None
    for name, kw, cap, skip in plan(a, site):
        left = t_end - time.monotonic()
        skip = skip or (f"the driver stage failed: {broken}" if broken and name != "driver" else None)
        skip = skip or (f"the {a.budget_s:.0f}s budget is spent" if left < 10 else None)
        if skip:
            report["stages"][name] = {"status": "skipped", "reason": skip}
        else:
            report["stages"][name] = r = _spawn(name, kw, a, env, out, min(cap, left))
            failed |= r["status"] != "ok"
            if name == "driver" and r["status"] != "ok" and a.device != "cpu":
                broken = r.get("error", r["status"])
        r = report["stages"][name]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {r['status']}"
              + (f" ({r['seconds']:.0f}s)" if "seconds" in r else "") + _brief(r), flush=True)
        _write(out / "gpu_check.json", report)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write(out / "gpu_check.json", report)
    print(f"wrote {out / 'gpu_check.json'}")
    return 1 if failed else 0


def _spawn(name: str, kw: dict, a, env: dict, out: Path, timeout: float) -> dict:
    """Run one stage in a new process group, killed whole at ``timeout``."""
    result = out / "logs" / f"{name.replace(':', '-')}.json"
    result.unlink(missing_ok=True)
    cmd = [PY, "-m", "launch.gpu_check", "--run-stage", name, "--kwargs", json.dumps(kw), "--device", a.device,
           "--out", str(out), "--result", str(result), "--pack", a.pack]
    t0 = time.monotonic()
    with open(out / "logs" / f"{name.replace(':', '-')}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "reason": f"stopped after {timeout:.0f}s", "seconds": timeout}
    seconds = time.monotonic() - t0
    if not result.exists():
        tail = (out / "logs" / f"{name.replace(':', '-')}.log").read_text(errors="replace")[-3000:]
        return {"status": "failed", "error": f"exit {proc.returncode} without a result", "log": tail,
                "seconds": seconds}
    return {**json.loads(result.read_text()), "seconds": seconds}


def _brief(r: dict) -> str:
    if r["status"] == "skipped" or r["status"] == "timeout":
        return f": {r['reason']}"
    if r["status"] == "failed":
        return f": {r['error'].splitlines()[0][:300]}"
    parts = [f"{r['images_per_s']:.1f} img/s" if "images_per_s" in r else "",
             f"MFU {100 * r['mfu_nominal']:.1f}% of nominal bf16" if "mfu_nominal" in r else "",
             f"{100 * r['mfu']:.1f}% of measured conv peak" if "mfu" in r and "mfu_max_every_op" not in r else "",
             f"MFU {100 * r['mfu']:.1f}% against a roofline of {100 * r['mfu_max_every_op']:.1f}% (each op its own "
             f"kernel) and {100 * r['mfu_max_conv_only']:.1f}% (convolutions only)" if "mfu_max_every_op" in r else "",
             f"{r['launches']} launches/step" if "launches" in r else "",
             f"{r['host_syncs']} host syncs" if "host_syncs" in r else "", r.get("gpu", ""), r.get("pytest", "")]
    return ": " + ", ".join(x for x in parts if x) if any(parts) else ""


def _write(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
