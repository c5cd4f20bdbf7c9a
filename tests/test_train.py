"""Training in miniature, real Ray and real DeepSpeed on CPU: both stages, `ray job submit` with token auth,
kill-and-resume. Tiny real shards, a few steps; every Ray process started here is ended by process group.

Shards are written by the real prep (serially, no Ray) from symlinks to a few CelebA identities of
../shared/data in a temporary folder: nothing is copied into the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import CELEBA, ROOT

PY = sys.executable
BIN = Path(sys.executable).parent
IDENTITIES, IMAGES = 5, 16  # 4 train identities (64 labelled faces), 1 val identity (16 faces)

# A few steps of both stages: the 64 labelled faces make 4 steps an epoch in stage 1 (batch 16), the cap
# 8 in stage 2 (batch 8); stage 2 spans an LR milestone so the final LR is not the first one.
FAST = [
    "data.steps_per_epoch=8", "data.val_batches=1", "run.log_every=1", "cluster.max_failures=0",
    "stage1.epochs=6", "stage1.lr=0.001", "stage1.augment=false",
    "stage2.epochs=3", "stage2.lr_milestones=[2]",
]


def make_shards(tmp: Path, name: str = "shards", prior_holdout: float = 0) -> Path:
    """Real prep over symlinks to ``IDENTITIES`` CelebA identities (the ones with most images)."""
    from shards.plan import SplitConfig
    from shards.prep import PrepConfig, prepare

    src, out = face_src(tmp), tmp / name
    split = SplitConfig(val=0.2, test=0.0, seed=0, prior_holdout=prior_holdout, min_images=2 + int(prior_holdout))
    prepare(PrepConfig(src=str(src), out=str(out), split=split, shard_size=16, progress=False))
    return out


def face_src(tmp: Path) -> Path:
    """``tmp/src``: symlinks to the first ``IMAGES`` faces of the ``IDENTITIES`` largest CelebA identities."""
    src = tmp / "src"
    ids = sorted(os.listdir(CELEBA), key=lambda i: (-len(os.listdir(CELEBA / i)), i))[:IDENTITIES]
    for ident in ids:
        (src / ident).mkdir(parents=True, exist_ok=True)
        for f in sorted(os.listdir(CELEBA / ident))[:IMAGES]:
            if not (src / ident / f).is_symlink():
                (src / ident / f).symlink_to(CELEBA / ident / f)
    return src


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def env_with_venv(**extra: str) -> dict:
    """This venv first on PATH; DeepSpeed's JIT-built CPU comm op where this venv keeps it (the head runs with
    a private HOME, which must not move it)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", _torch_extensions_dir())
    env.update(extra)
    return env


def _torch_extensions_dir() -> str:
    """Where this venv's runs find DeepSpeed's built CPU comm op (``make venv`` builds it there)."""
    from cluster.engine import extensions_dir

    return extensions_dir()


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A process in its own session (so its whole tree can be ended), output to ``log``."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env or env_with_venv(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(proc: subprocess.Popen, sig=signal.SIGKILL, grace: float = 8) -> None:
    """Signal the process group ``proc`` leads; SIGKILL it all after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also the children that outlived their parent
    except ProcessLookupError:
        pass
    proc.wait()


def train_cmd(config: str, *overrides: str) -> list[str]:
    return [PY, "-m", "launch.train", "--config", config, *overrides]


class TokenHead:
    """``ray start --head --block`` with RAY_AUTH_MODE=token, a generated token and a private HOME."""

    def __init__(self, tmp: Path):
        self.home = tmp / "home"
        self.home.mkdir(parents=True)
        gcs, dash, agent, client, metrics = free_ports(5)
        self.url = f"http://127.0.0.1:{dash}"
        self.env = env_with_venv(HOME=str(self.home), RAY_AUTH_MODE="token")
        self.env.pop("RAY_ADDRESS", None)
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env, check=True,
                       capture_output=True, timeout=60)
        self.token = (self.home / ".ray" / "auth_token").read_text().strip()
        self.log = tmp / "head.log"
        self.proc = start(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
             "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
             f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}", "--num-cpus=2",
             f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"],
            self.log, self.env)
        self._wait_up()

    def _wait_up(self, timeout: float = 120) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {self.log.read_text()[-2000:]}")
            try:
                self.status(token=self.token)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise TimeoutError(f"ray head not up after {timeout}s: {self.log.read_text()[-2000:]}")

    def status(self, token: str | None) -> int:
        """HTTP status of the dashboard's version endpoint with or without the token."""
        req = urllib.request.Request(f"{self.url}/api/version")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def stop(self) -> None:
        kill_tree(self.proc, signal.SIGTERM)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``folder``, read back by TensorBoard's own reader (which
    applies a resumed writer's purge): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def done(run_dir: Path, stage: int) -> dict:
    return json.loads((run_dir / f"stage{stage}.done.json").read_text())


# ---------------------------------------------------------------- fixtures

pytestmark = pytest.mark.slow
CPU = "launch/configs/cpu.yaml"


@pytest.fixture(scope="module")
def scratch():
    """A private temporary folder: pytest's own basetemp is pruned by any other pytest session of the same
    user (it keeps the latest three), which on a shared machine can delete a run folder mid-test."""
    root = Path(tempfile.mkdtemp(prefix="fsr-train-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(scratch) -> Path:
    return make_shards(scratch / "data")


@pytest.fixture(scope="module")
def head(scratch):
    h = TokenHead(scratch / "head")
    yield h
    h.stop()


@pytest.fixture(scope="module")
def job_run(monitored_job) -> Path:
    """Both stages of cpu.yaml on 2 workers with ZeRO-1, submitted with `ray job submit` to a token-auth head,
    exporters on: the session's monitored job (tests/conftest.py), which tests/test_monitoring_prometheus.py
    watches through Prometheus."""
    return monitored_job["run"]


# ---------------------------------------------------------------- tests


def test_head_refuses_requests_without_token(head):
    """The head started with RAY_AUTH_MODE=token answers 401 without the token and 200 with it."""
    assert head.status(token=None) == 401
    assert head.status(token=head.token) == 200


def test_job_submit_trains_all_three_stages_on_two_workers(job_run):
    """`ray job submit` of the cpu config completes: run folder with resolved config, priors, weights, logs; stage
    3 rewrote srnet.safetensors as the cascade with its detail gate, whose checkpoints hold the gate alone."""
    import torch

    from cluster.engine import TAG, _safe_globals
    from facesr.weights import load_srnet, read_meta

    for name in ("config.yaml", "metrics.jsonl", "priors.safetensors", "srnet.safetensors",
                 "logs/driver.log", "logs/stage1-rank0.log", "logs/stage1-rank1.log", "logs/stage2-rank1.log",
                 "logs/stage3-rank1.log"):
        assert (job_run / name).is_file(), name
    for stage in (1, 2, 3):
        assert list((job_run / f"stage{stage}").glob("checkpoint_*")), stage
    for stage, steps in ((1, 6 * 4), (2, 3 * 8), (3, 2 * 4)):
        d = done(job_run, stage)
        assert d["world_size"] == 2 and d["global_step"] == steps
    assert done(job_run, 2)["lr"] == pytest.approx(10 / 3 * 1e-3 / 3)  # one milestone passed
    meta = read_meta(job_run / "priors.safetensors")
    assert meta["kind"] == "priors" and meta["preset"] == "tiny" and meta["num_classes"] == 4
    meta = read_meta(job_run / "srnet.safetensors")
    assert meta["gate_strength"] == 0.7 and meta["sr"]["gate"] and meta["loss"] == "csrip"
    assert load_srnet(job_run / "srnet.safetensors").gate is not None
    latest = sorted((job_run / "stage3").glob("checkpoint_*"))[-1] / TAG
    with torch.serialization.safe_globals(_safe_globals()):
        module = torch.load(latest / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    assert module and all(k.startswith("body.") for k in module)  # the gate alone: the frozen cascade is not in it


def test_checkpoints_load_weights_only_and_hold_no_priors(job_run):
    """Every file of a stage-2 checkpoint loads with torch.load(weights_only=True) (DeepSpeed's three plain
    record types allowed); it holds one ZeRO partition per rank and the cascade alone: the frozen priors
    are neither in the module state nor in the optimizer."""
    import torch

    from cluster.engine import TAG, _safe_globals

    latest = sorted((job_run / "stage2").glob("checkpoint_*"))[-1] / TAG
    files = sorted(p.name for p in latest.glob("*.pt"))
    assert files == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    with torch.serialization.safe_globals(_safe_globals()):
        states = {f: torch.load(latest / f, map_location="cpu", weights_only=True) for f in files}
    module = states["mp_rank_00_model_states.pt"]["module"]
    assert module and all(k.startswith(("stages.", "branches.")) for k in module)
    assert states["mp_rank_00_model_states.pt"]["train_state"]["global_step"] == 24
    n_params = sum(v.numel() for k, v in module.items() if "running" not in k and "num_batches" not in k)
    n_opt = sum(sum(t.numel() for t in s["optimizer_state_dict"]["single_partition_of_fp32_groups"])
                for f, s in states.items() if f.startswith("zero_"))
    assert n_params <= n_opt <= n_params + 64  # the two ZeRO partitions cover the cascade (plus alignment)


def test_resuming_zero1_checkpoints_at_another_world_size_is_refused_before_ray(job_run, shards, scratch):
    """The 2-worker ZeRO-1 run's checkpoints hold one optimizer partition per worker: restarting that run with
    one worker is refused by the driver (field, folder, the fix) before Ray starts and before anything in the
    run folder changes; with two it goes ahead."""
    from cluster.config import ConfigError, load_config, resolve
    from cluster.trainer import check_resume_world

    def cfg(*more):
        return resolve(load_config(CPU, [f"data.shards={shards}", f"run.run_dir={job_run}", *more]))

    with pytest.raises(ConfigError, match="written by 2 workers") as e:
        check_resume_world(job_run / "stage2", cfg("cluster.num_workers=1"))
    assert e.value.field == "cluster.num_workers" and "cluster.num_workers=2" in str(e.value)
    check_resume_world(job_run / "stage2", cfg())  # the world size that wrote it
    # the user's path: stage 2 interrupted (its checkpoints, no done marker), restarted with one worker
    again = scratch / "interrupted"
    shutil.copytree(job_run / "stage2", again / "stage2")
    res = subprocess.run([PY, "-m", "launch.train", "--config", CPU, f"data.shards={shards}",
                          f"run.run_dir={again}", "cluster.num_workers=1", "run.stages=[2]",
                          f"stage2.priors={job_run / 'priors.safetensors'}"],
                         cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "cluster.num_workers: " in res.stderr and "written by 2 workers" in res.stderr
    assert "Ray instance" not in res.stderr + res.stdout and not (again / "config.yaml").exists()
    assert sorted(p.name for p in (again / "stage2").iterdir()) == sorted(p.name for p in (job_run / "stage2").iterdir())


def test_losses_fall_and_metrics_are_recorded(job_run):
    """Train losses fall in stages 1 and 2; validation reports top-1 per scale (stage 1), SSIM/PSNR per scale (2),
    the gate's figures (3), at the epochs run.val_every names."""
    recs = records(job_run)
    for r in recs:
        assert {"stage", "split", "epoch", "step", "time"} <= set(r)
    val1 = [r for r in recs if r["stage"] == 1 and r["split"] == "val"]
    val2 = [r for r in recs if r["stage"] == 2 and r["split"] == "val"]
    # run.val_every=2: every second epoch and always the last (stage 2 has 3)
    assert [r["epoch"] for r in val1] == [1, 3, 5] and [r["epoch"] for r in val2] == [1, 2]
    # Both stages' train losses fall (thirds of the run compared: single steps are noisy). Stage 1's eval-mode
    # validation loss is not a signal over 24 steps of the BatchNorm priors: the running statistics lag the
    # batch statistics of so short a run (measured: train CE falls while eval CE rises on these 64 faces).
    for stage in (1, 2):
        train = [r["loss"] for r in recs if r["stage"] == stage and r["split"] == "train"]
        third = len(train) // 3
        assert sum(train[-third:]) / third < sum(train[:third]) / third, (stage, train)
    assert {"acc/x2", "acc/x4", "acc/x8", "acc5/x8", "acc_chance", "acc_majority", "ce/x8", "loss"} <= set(val1[-1])
    assert val1[-1]["acc_chance"] == 0.25  # 4 classes
    assert {"ssim/x2", "ssim/x4", "ssim/x8", "psnr/x2", "psnr/x4", "psnr/x8", "loss"} <= set(val2[-1])
    assert val2[-1]["loss"] < val2[0]["loss"]
    # stage 3: the gate's prediction and target, and x8 PSNR of the gated output, the full correction and bicubic
    val3 = [r for r in recs if r["stage"] == 3 and r["split"] == "val"]
    assert [r["epoch"] for r in val3] == [1]
    assert {"loss", "strength/x8", "optimal/x8", "psnr/x8", "psnr_full/x8", "psnr_bicubic/x8"} <= set(val3[-1])
    assert val3[-1]["psnr_full/x8"] != val3[-1]["psnr_bicubic/x8"] and 0 <= val3[-1]["optimal/x8"] <= 2.5


def test_tensorboard_event_files_hold_every_record(job_run):
    """Rank 0 writes each stage's records as TensorBoard scalars (`tensorboard --logdir RUN`): read back with
    TensorBoard's reader, every number of metrics.jsonl is there at its step, per-scale terms as
    ``<term>/<split>/<scale>`` (the SSIM and CE curves per scale), plain ones as ``<key>/<split>``."""
    recs = records(job_run)
    for stage in (1, 2):
        got = tensorboard_scalars(job_run / "tensorboard" / f"stage{stage}")
        want: dict[str, list[tuple[int, float]]] = {}
        for r in (r for r in recs if r["stage"] == stage):
            for k, v in r.items():
                if k in ("stage", "split", "epoch", "step", "time") or isinstance(v, bool) or \
                        not isinstance(v, (int, float)):
                    continue
                name, _, scale = k.partition("/")
                want.setdefault(f"{name}/{r['split']}/{scale}" if scale else f"{k}/{r['split']}", []).append(
                    (r["step"], v))
        assert set(got) == set(want), set(got) ^ set(want)
        for tag, points in want.items():
            assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
            assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-6), tag
    assert {"ssim/train/x2", "ssim/train/x4", "ssim/train/x8", "ce/train/x8", "ssim/val/x8"} <= \
        set(tensorboard_scalars(job_run / "tensorboard" / "stage2"))


def test_eval_priors_scores_held_out_images_beside_chance_and_majority(job_run, shards, scratch):
    """`facesr eval priors`: top-1 per scale on prep's prior_val split equals a direct count with the saved
    priors; chance and majority come from the manifest (2 held out per class: balanced, both 1/4)."""
    import torch

    from facesr.degrade import residual
    from facesr.weights import load_priors
    from shards.manifest import read_manifest, shard_urls
    from shards.stream import read_in_order

    held = make_shards(scratch / "data", "held", prior_holdout=2)  # same identities, same class map
    out = scratch / "priors.json"
    res = subprocess.run([str(BIN / "facesr"), "eval", "priors", str(job_run), "--shards", str(held),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["split"] == "prior_val" and rep["held_out"] and rep["images"] == 4 * 2
    assert rep["acc_chance"] == rep["acc_majority"] == 0.25
    priors = load_priors(job_run / "priors.safetensors", classes=read_manifest(held)["classes"])
    batch = next(iter(read_in_order(shard_urls(held, "prior_val"), ("x2", "x4", "hr"), 64)))
    with torch.no_grad():
        for key, scale in (("x2", "x2"), ("x4", "x4"), ("hr", "x8")):
            logits = priors[key](residual(batch[key].float() / 255, key))
            rank = (logits > logits.gather(1, batch["cls"][:, None])).sum(1)
            assert rep[scale]["top1"] == pytest.approx((rank == 0).float().mean().item())
            # top-5 of 4 classes is 1 whatever the priors do: it is tested on 8 classes in tests/test_eval.py
            assert f"{scale:<6} {rep[scale]['top1']:>7.4f}" in res.stdout
    bad = subprocess.run([str(BIN / "facesr"), "eval", "priors", str(scratch / "nothing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no priors file" in bad.stderr


def test_killed_stage2_resumes_to_the_same_step_and_lr(job_run, shards, scratch):
    """A stage-2 run killed (SIGKILL, whole process tree) half-way, after Ray Train registered a checkpoint,
    started again with the same name, resumes from its latest checkpoint (mid-epoch ones replay the data
    epoch up to their step) and ends at the step count and learning rate of the uninterrupted run
    (this one in bf16 + channels_last, so that path goes through DeepSpeed, checkpoint and resume too)."""
    tmp_path = scratch / "kill"
    tmp_path.mkdir()
    overrides = [f"data.shards={shards}", f"cluster.storage_path={tmp_path}", "run.name=resume", "run.stages=[2]",
                 f"stage2.priors={job_run / 'priors.safetensors'}", "run.checkpoint_every=3", *FAST,
                 "engine.precision=bf16", "engine.channels_last=true"]  # the fast path; step count and LR must not care
    run_dir = tmp_path / "resume"
    # The Ray Train controller collects reports at its health-check interval (2 s); polled faster here, step 6
    # is registered before the run gets far past it, so the kill usually lands mid-epoch
    proc = start(train_cmd(CPU, *overrides), tmp_path / "first.log", env_with_venv(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25"))
    try:
        deadline = time.time() + 300
        snapshot = run_dir / "stage2" / "checkpoint_manager_snapshot.json"
        while "checkpoint_s00000009_" not in (snapshot.read_text() if snapshot.exists() else ""):
            # Ray Train registered the step-9 checkpoint (first of epoch 1, 8 steps an epoch); with the next
            # ones at 12 and 15 the kill lands mid-epoch unless registration lags by over 6 steps
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() < deadline, "no mid-epoch checkpoint in time"
            time.sleep(0.2)
    finally:
        kill_tree(proc)
    assert not (run_dir / "stage2.done.json").exists()
    res = subprocess.run(train_cmd(CPU, *overrides), cwd=ROOT, env=env_with_venv(), capture_output=True,
                         text=True, timeout=400, start_new_session=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    logs = (run_dir / "logs" / "stage2-rank0.log").read_text()
    resumed = re.search(r"resumed from .*checkpoint_s(\d+)_e\d+ at epoch (\d+), step (\d+) \((\d+) in epoch\)", logs)
    assert resumed, logs[-3000:]
    ckpt_step, epoch, step, in_epoch = map(int, resumed.groups())
    assert ckpt_step == step and 9 <= step < 24 and step == 8 * epoch + in_epoch
    ref, got = done(job_run, 2), done(run_dir, 2)
    assert (got["global_step"], got["epoch"]) == (ref["global_step"], ref["epoch"])
    assert (ref["restarts"], got["restarts"]) == (0, 1)  # the run's own count, carried by its checkpoints
    assert got["lr"] == pytest.approx(ref["lr"])
    steps = [r["step"] for r in records(run_dir) if r["split"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, ref["global_step"] + 1))  # no step lost or repeated
    tb = [step for step, _ in tensorboard_scalars(run_dir / "tensorboard" / "stage2")["loss/train"]]
    assert tb == steps  # the resumed writer purged what the killed one wrote after the checkpoint


def test_table1_peer_trains_through_facesr_train_without_priors(shards, scratch):
    """A Table 1 peer goes the real `facesr train` path (local Ray, 2 DeepSpeed workers) with no stage 1 and no
    priors: VDSR (x8 output only) with the perceptual loss (its frozen SqueezeNet loaded on every worker from a
    local file), as one cheap run covering both. Its weights file loads as VDSR, its checkpoints hold VDSR alone,
    metrics speak the x8-only vocabulary, and its train loss falls.

    Its console, as `make demo` trains on a new local Ray: the stage ends with its progress line naming the
    peer, and none of the noise it used to print comes back (Ray Train's PlacementGroupCleaner failing to
    reach the State API every second, its per-checkpoint reports, the per-step lines, torch's "No CUDA
    runtime" warning on CPU workers, Ray's token-auth notice); the line's fields are tested in test_console.py."""
    import torch
    from safetensors.torch import save_file
    from torchvision.models import squeezenet1_1

    from cluster.engine import TAG, _safe_globals
    from facesr.models import VDSR
    from facesr.weights import load_srnet, read_meta

    torch.manual_seed(0)
    weights = scratch / "squeezenet1_1.safetensors"
    save_file(squeezenet1_1(weights=None).state_dict(), str(weights))
    storage = scratch / "peer"
    res = subprocess.run(train_cmd(CPU, f"data.shards={shards}", f"cluster.storage_path={storage}", "run.name=vdsr",
                                   "run.stages=[2]", "stage2.model=vdsr", "stage2.loss=perceptual",
                                   f"stage2.perceptual_weights={weights}", "stage2.epochs=3",
                                   "stage2.steps_per_epoch=4",  # the stage's own cap (8 steps an epoch uncapped)
                                   "data.val_batches=1", "run.log_every=1", "cluster.max_failures=0"),
                         cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600,
                         start_new_session=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    for noise in ("PlacementGroupCleaner", "Failed to query", "Reporting training result", "] epoch 0 step 1 ",
                  "checkpoint part written", "No CUDA runtime", "Token authentication is enabled"):
        assert noise not in out, out
    assert re.search(r"^stage 2 \(VDSR\) +100% 12/12 steps +epoch 3/3 +loss \S+ +val psnr/x8 .*ETA 0s", out, re.M), out
    assert len(out.splitlines()) < 25, out
    run_dir = storage / "vdsr"
    assert not (run_dir / "priors.safetensors").exists() and done(run_dir, 2)["global_step"] == 12
    assert isinstance(load_srnet(run_dir / "srnet.safetensors"), VDSR)
    assert read_meta(run_dir / "srnet.safetensors")["loss"] == "perceptual"
    latest = sorted((run_dir / "stage2").glob("checkpoint_*"))[-1] / TAG
    with torch.serialization.safe_globals(_safe_globals()):
        module = torch.load(latest / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    assert module and all(k.startswith("body.") for k in module)  # VDSR alone: no frozen SqueezeNet in it
    recs = records(run_dir)
    train = [r for r in recs if r["split"] == "train"]
    val = [r for r in recs if r["split"] == "val"]
    assert len(val) == 3 and {"psnr/x8", "ssim/x8", "loss"} <= set(val[-1]) and "psnr/x2" not in val[-1]
    assert "perceptual/x8" in train[-1] and "perceptual/x2" not in train[-1]
    losses = [r["loss"] for r in train]
    assert sum(losses[-4:]) < sum(losses[:4]), losses


def test_srgan_trains_two_engines_and_resumes_both(shards, scratch):
    """SRGAN through `facesr train` on 2 workers: its generator (SRResNet) and its discriminator, each in a
    DeepSpeed engine of its own, stepped in alternation. Every checkpoint holds both (the discriminator in
    ``critic/``), the weights file the generator alone, the metrics both players' terms; a finished run given one
    more epoch resumes both engines from its last checkpoint (their Adam step counts carry on, not restart)."""
    import torch

    from cluster.engine import TAG, _safe_globals
    from cluster.loop import CRITIC
    from facesr.models import SRResNet
    from facesr.weights import load_srnet

    def states(ckpt: Path, sub: str = "") -> dict:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(ckpt / sub / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)

    def adam_steps(state: dict) -> set[float]:
        return {float(s["step"]) for s in state["optimizer"]["state"].values()}

    storage = scratch / "srgan"
    base = [f"data.shards={shards}", f"cluster.storage_path={storage}", "run.name=srgan", "run.stages=[2]",
            "stage2.model=srresnet", "stage2.loss=adversarial", "data.steps_per_epoch=4", "data.val_batches=1",
            "run.log_every=1", "cluster.max_failures=0"]
    run_dir = storage / "srgan"
    for epochs in (1, 2):
        res = subprocess.run(train_cmd(CPU, *base, f"stage2.epochs={epochs}"), cwd=ROOT, env=env_with_venv(),
                             capture_output=True, text=True, timeout=600, start_new_session=True)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        out = res.stdout + res.stderr
        assert re.search(rf"^stage 2 \(SRResNet \+ discriminator\) +100% {4 * epochs}/{4 * epochs} steps", out, re.M), out
        last = sorted((run_dir / "stage2").glob("checkpoint_*"))[-1]
        g, d = states(last), states(last, CRITIC)
        assert g["module"] and all(k.split(".")[0] in ("head", "blocks", "fuse", "up", "tail") for k in g["module"])
        assert d["module"] and all(k.split(".")[0] in ("features", "head") for k in d["module"])
        assert adam_steps(g) == adam_steps(d) == {4.0 * epochs}  # one optimizer step each per global step
        if epochs == 1:
            first_critic = d["module"]
            (run_dir / "stage2.done.json").unlink()  # the finished run, given one more epoch
    logs = (run_dir / "logs" / "stage2-rank0.log").read_text()
    assert re.search(r"resumed from .*checkpoint_s00000004_e0001 at epoch 1, step 4", logs), logs[-3000:]
    assert done(run_dir, 2)["global_step"] == 8
    assert any(not torch.equal(first_critic[k], d["module"][k]) for k in first_critic)  # the critic trained on
    assert isinstance(load_srnet(run_dir / "srnet.safetensors"), SRResNet)
    recs = records(run_dir)
    train = [r for r in recs if r["split"] == "train"]
    val = [r for r in recs if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert {"mse/x8", "adv/x8", "critic/x8", "critic_real/x8", "critic_fake/x8", "loss"} <= set(train[-1])
    assert "critic_loss" not in train[-1] and {"psnr/x8", "critic/x8"} <= set(val[-1])


def test_snapshot_cut_by_a_kill_is_rebuilt_from_the_complete_checkpoints(tmp_path, caplog):
    """A process killed while Ray Train rewrote ``checkpoint_manager_snapshot.json`` left it empty (a CI run:
    the resume then died with "Expecting value: line 1 column 1"). The driver rebuilds it, in Ray's own schema,
    from the complete checkpoint folders, keeps the unreadable file, and leaves a readable snapshot alone."""
    import logging

    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    from cluster.trainer import SNAPSHOT, repair_snapshot

    stage = tmp_path / "stage2"
    for name, complete in (("checkpoint_s00000003_e0000", True), ("checkpoint_s00000006_e0000", True),
                           ("checkpoint_s00000009_e0001", False)):  # the last one's upload was cut: no tag
        (stage / name / "state").mkdir(parents=True)
        (stage / name / "state" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if complete:
            (stage / name / "latest").write_text("state")
    for cut in ("", '{"ray_version":"2.60.0","checkpoint_res'):
        (stage / SNAPSHOT).write_text(cut)
        for old in stage.glob(f"{SNAPSHOT}.unreadable-*"):
            old.unlink()
        with caplog.at_level(logging.WARNING, logger="facesr.train"):
            assert repair_snapshot(stage) == "checkpoint_s00000006_e0000"
        state = _CheckpointManagerState.parse_obj(json.loads((stage / SNAPSHOT).read_text()))
        assert state.latest_checkpoint_result.checkpoint_dir_name == "checkpoint_s00000006_e0000"
        assert [r.checkpoint_dir_name for r in state.checkpoint_results] == ["checkpoint_s00000003_e0000",
                                                                             "checkpoint_s00000006_e0000"]
        assert [p.read_text() for p in stage.glob(f"{SNAPSHOT}.unreadable-*")] == [cut]
        assert "rebuilt from 2 complete checkpoint folders, resuming from checkpoint_s00000006_e0000" in caplog.text
    good = (stage / SNAPSHOT).read_text()
    assert repair_snapshot(stage) is None and (stage / SNAPSHOT).read_text() == good  # readable: untouched
    assert repair_snapshot(tmp_path / "stage1") is None  # no snapshot: a stage that never checkpointed
