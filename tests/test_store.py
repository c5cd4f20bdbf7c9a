"""Runs and shards in an object store (issue 14): moto's S3 server on loopback (tests/conftest.py ``s3_server``,
credentials checked), the real pyarrow S3 client, the real prep, loader and training.

The run and the shards live only in the bucket: nothing is written to a local run folder. Bad stores (no
server, no bucket, wrong key) are refused by the config check, before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_train import BIN, CPU, FAST, done, env_with_venv, face_src, kill_tree, records, start, train_cmd


@pytest.fixture(autouse=True)
def aws(s3_server, monkeypatch):
    """This process as a cloud node: credentials, endpoint and region in the environment."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="module")
def scratch():
    root = Path(tempfile.mkdtemp(prefix="fsr-store-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def bucket_shards(s3_server, scratch) -> str:
    """`facesr prep SRC s3://…` (serial) of the training tests' faces, straight into a bucket."""
    uri = s3_server.bucket("shards") + "/faces"
    res = subprocess.run([str(BIN / "facesr"), "prep", str(face_src(scratch)), uri, "--no-ray", "--shard-size", "16",
                          "--val", "0.2", "--test", "0", "--no-progress"],
                         cwd=scratch, env=env_with_venv(**s3_server.env()), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return uri


def keys(s3_server, bucket: str, prefix: str = "") -> dict[str, int]:
    """Every object under ``prefix`` -> its size, listed with boto3 (not the code under test)."""
    out = {}
    for page in s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


# ---------------------------------------------------------------- prep and manifest


def test_prep_writes_shards_and_manifest_to_the_bucket(bucket_shards, s3_server, scratch):
    """Every shard the manifest lists is in the bucket with its size and sha256; no temporary key is left;
    nothing of OUT lands on the local disk."""
    from shards.manifest import read_manifest

    m = read_manifest(bucket_shards, verify=True)  # sha256 and sample count of every object
    objects = keys(s3_server, "shards", "faces/")
    listed = {s["name"] for d in m["splits"].values() for s in d["shards"]}
    assert listed and {f"faces/{n}" for n in listed} <= set(objects)
    assert "faces/manifest.json" in objects and "faces/rejects.tsv" in objects
    assert not [k for k in objects if ".tmp-" in k or "write-probe" in k]
    assert not (scratch / "s3:").exists()


def test_interrupted_prep_lists_nothing_partial_and_a_rerun_keeps_whole_shards(s3_server, scratch):
    """A prep cut after its first shard leaves no manifest and no object under a shard name that is not
    whole (size and sha256 of its record); the rerun keeps that shard and lists every shard."""
    from shards.plan import SplitConfig
    from shards.prep import PrepConfig, prepare, serial_map
    from shards.writer import write_shard

    class Cut(Exception):
        pass

    def cut_after_first_shard(fn, arglist):
        for i, result in serial_map(fn, arglist):
            yield i, result
            if fn is write_shard:
                raise Cut

    uri = s3_server.bucket("cut") + "/faces"
    cfg = PrepConfig(src=str(face_src(scratch)), out=uri, split=SplitConfig(val=0.2, test=0.0), shard_size=16,
                     progress=False)
    with pytest.raises(Cut):
        prepare(cfg, cut_after_first_shard)
    objects = keys(s3_server, "cut")
    assert "faces/manifest.json" not in objects
    tars = [k for k in objects if k.endswith(".tar")]
    assert len(tars) == 1 and not [k for k in objects if ".tmp-" in k]
    record = json.loads(s3_server.client().get_object(Bucket="cut", Key=f"faces/.parts/{Path(tars[0]).stem}.json")
                        ["Body"].read())
    body = s3_server.client().get_object(Bucket="cut", Key=tars[0])["Body"].read()
    assert (len(body), hashlib.sha256(body).hexdigest()) == (record["bytes"], record["sha256"])
    summary = prepare(cfg)
    assert summary["shards_kept"] == 1 and summary["shards_written"] == summary["shards"] - 1


# ---------------------------------------------------------------- streaming


def test_loader_streams_bucket_shards_and_counts_missing_and_damaged_ones(bucket_shards, s3_server, scratch):
    """Shards stream from the bucket with the training loader; a deleted object and a damaged one are counted
    as decode errors and skipped, as damaged local shards are; the intact ones decode exactly as the same
    bytes read from a local file do."""
    from shards.manifest import shard_urls
    from shards.stream import StreamConfig, build_loader, read_in_order

    urls = shard_urls(bucket_shards, "train")
    assert all(u.startswith("s3://shards/faces/") for u in urls)
    local = scratch / "local.tar"
    local.write_bytes(s3_server.client().get_object(Bucket="shards", Key=urls[0][len("s3://shards/"):])["Body"].read())
    remote, here = list(read_in_order(urls[:1], batch_size=4)), list(read_in_order([str(local)], batch_size=4))
    assert [b["key"] for b in remote] == [b["key"] for b in here]
    assert all((r[k] == h[k]).all() for r, h in zip(remote, here) for k in ("lr", "x2", "x4", "hr", "cls"))

    s3 = s3_server.client()
    for u in urls:  # a copy of the split to damage
        s3.copy_object(Bucket="shards", Key=u.replace("s3://shards/faces/", "damaged/"),
                       CopySource={"Bucket": "shards", "Key": u[len("s3://shards/"):]})
    bad = [u.replace("/faces/", "/damaged/") for u in urls]
    s3.delete_object(Bucket="shards", Key=bad[0][len("s3://shards/"):])
    s3.put_object(Bucket="shards", Key=bad[1][len("s3://shards/"):], Body=b"not a tar" * 100)
    # 40 batches read ~10 intact shards; each read draws a bad one half the time (seeded: the same every run)
    loader = build_loader(bad, StreamConfig(batch_size=4, batches_per_epoch=40, workers=0, shuffle=0),
                          rank=0, world_size=1, epoch=0)
    batches = list(loader)
    assert len(batches) == 40 and loader.decode_errors > 0


def test_shard_cache_keeps_whole_shards_under_its_bound(bucket_shards, s3_server, scratch):
    """With a cache folder, a streamed shard is kept there byte-identical to its object, and the folder stays
    under its bound (least recently used shards dropped); a second epoch reads the cached copies."""
    from shards.manifest import shard_urls
    from shards.stream import StreamConfig, build_loader

    urls = shard_urls(bucket_shards, "train")
    sizes = keys(s3_server, "shards", "faces/")
    bound = int(1.5 * max(sizes[u[len("s3://shards/"):]] for u in urls))
    cache = scratch / "cache"
    cfg = StreamConfig(batch_size=4, batches_per_epoch=16, workers=0, shuffle=0, cache_dir=str(cache),
                       cache_bytes=bound)
    for epoch in range(2):
        assert len(list(build_loader(urls, cfg, rank=0, world_size=1, epoch=epoch))) == 16
    kept = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert kept and sum(p.stat().st_size for p in kept) <= bound
    by_name = {u.rsplit("/", 1)[1]: u for u in urls}
    for p in kept:
        key = by_name[p.name.split("-", 1)[1]][len("s3://shards/"):]
        assert p.read_bytes() == s3_server.client().get_object(Bucket="shards", Key=key)["Body"].read()


# ---------------------------------------------------------------- refused before any worker


@pytest.mark.parametrize("fault", ["unreachable endpoint", "missing bucket", "wrong credentials"])
def test_bad_store_is_refused_by_the_config_check_naming_the_uri(fault, bucket_shards, s3_server, monkeypatch):
    """The config check (run before Ray starts) refuses a store it cannot use, with the URI in the message."""
    from cluster.config import ConfigError, check, load_config, resolve

    storage = s3_server.bucket("runs-ok") + "/runs"
    if fault == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    elif fault == "missing bucket":
        storage = "s3://no-such-bucket/runs"
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_server.secret[6:])
    cfg = resolve(load_config(CPU, [f"data.shards={bucket_shards}", f"cluster.storage_path={storage}",
                                    "run.name=bad"]))
    cfg.validate()  # imports torch and timm: not the store's time
    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert time.time() - t0 < 30  # no long retry loop against a store that cannot answer
    msg = str(e.value)
    assert "s3://" in msg and ("no-such-bucket" in msg if fault == "missing bucket" else True), msg
    assert {"unreachable endpoint": "does not answer", "missing bucket": "does not exist",
            "wrong credentials": "refused the credentials"}[fault] in msg
    assert s3_server.secret not in msg


def test_train_with_wrong_credentials_stops_before_ray(bucket_shards, s3_server, scratch):
    """`facesr train` with a refused key exits with the URI and the reason, without starting Ray."""
    env = env_with_venv(**s3_server.env(AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0"))
    res = subprocess.run(train_cmd(CPU, f"data.shards={bucket_shards}", "cluster.storage_path=s3://shards/runs",
                                   "run.name=denied"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "s3://shards/runs/denied" in out and "refused the credentials" in out, out[-3000:]
    assert "connecting to Ray" not in out


# ---------------------------------------------------------------- a whole run in the bucket


@pytest.fixture(scope="module")
def bucket_run(bucket_shards, s3_server, scratch):
    """Both stages of cpu.yaml, shards and run only in the bucket, started from an empty folder."""
    storage = s3_server.bucket("runs") + "/cloud"
    cwd = scratch / "driver"
    cwd.mkdir()
    res = subprocess.run(train_cmd(str(ROOT / CPU), f"data.shards={bucket_shards}", f"cluster.storage_path={storage}",
                                   "run.name=e2e", *FAST, "run.checkpoint_every=4"),
                         cwd=cwd, env=env_with_venv(**s3_server.env(PYTHONPATH=str(ROOT))), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert list(cwd.iterdir()) == []  # nothing of the run on the driver's disk
    return f"{storage}/e2e"


@pytest.mark.slow
def test_both_stages_train_with_run_and_shards_only_in_the_bucket(bucket_run, s3_server):
    """Config, checkpoints, priors, done markers, metrics, every log, summary and weights are objects of the
    run; the metrics hold both stages and the stage-2 priors check passed from the bucket."""
    from shards.store import path

    objects = keys(s3_server, "runs", "cloud/e2e/")
    names = {k[len("cloud/e2e/"):] for k in objects}
    for name in ("config.yaml", "priors.safetensors", "srnet.safetensors", "stage1.done.json", "stage2.done.json",
                 "metrics.jsonl", "summary.md", "summary.png", "logs/driver.log", "logs/stage1-rank0.log",
                 "logs/stage1-rank1.log", "logs/stage2-rank0.log", "logs/stage2-rank1.log"):
        assert name in names, sorted(names)
    assert any(re.match(r"stage2/checkpoint_[^/]+/", n) for n in names)
    run = path(bucket_run)
    assert {r["stage"] for r in records(run)} == {1, 2}
    assert done(run, 2)["global_step"] == 24
    text = "".join(s3_server.client().get_object(Bucket="runs", Key=k)["Body"].read().decode(errors="replace")
                   for k in objects if k.endswith((".log", ".yaml", ".json", ".jsonl", ".md")))
    assert s3_server.secret not in text and s3_server.key_id not in text  # credentials never in the run


@pytest.mark.slow
def test_eval_sr_and_export_read_the_run_from_the_bucket(bucket_run, bucket_shards, s3_server, scratch):
    """`facesr eval quality`, `facesr sr` and `facesr export` take the run's URI (and eval the shards' URI)."""
    env = env_with_venv(**s3_server.env())
    out = scratch / "eval"
    res = subprocess.run([str(BIN / "facesr"), "eval", "quality", bucket_run, "--data", bucket_shards, "--split", "val",
                          "--limit", "8", "--out", str(out), "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (out / "quality.json").is_file()
    from PIL import Image

    (scratch / "faces").mkdir()
    Image.new("RGB", (24, 24), (120, 90, 60)).save(scratch / "faces" / "a.png")
    res = subprocess.run([str(BIN / "facesr"), "sr", bucket_run, str(scratch / "faces"), str(scratch / "sr"),
                          "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and Image.open(scratch / "sr" / "a.png").size == (192, 192), res.stderr[-3000:]
    res = subprocess.run([str(BIN / "facesr"), "export", bucket_run, str(scratch / "export"), "--format", "torchscript"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (scratch / "export" / "srnet_deploy.pt").is_file(), res.stderr[-3000:]


@pytest.mark.slow
def test_killed_stage2_resumes_from_the_bucket(bucket_shards, s3_server, scratch):
    """A stage-2 run in the bucket, killed (whole process tree) after a checkpoint, resumes from the bucket's
    checkpoint on a driver with an empty disk, and ends at the planned step and LR with no step lost or repeated.
    SSIM only (alpha 0): no priors, so it does not wait for the both-stages run."""
    from shards.store import path

    storage = s3_server.bucket("resume") + "/cloud"
    overrides = [f"data.shards={bucket_shards}", f"cluster.storage_path={storage}", "run.name=resume",
                 "run.stages=[2]", "stage2.alpha=0", "run.checkpoint_every=3", *FAST]
    env = env_with_venv(**s3_server.env(PYTHONPATH=str(ROOT), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25"))
    first = scratch / "first"
    first.mkdir()
    proc = start(train_cmd(str(ROOT / CPU), *overrides), scratch / "first.log", env)
    snapshot = path(f"{storage}/resume/stage2/checkpoint_manager_snapshot.json")
    try:
        deadline = time.time() + 600
        while "checkpoint_s00000009_" not in (snapshot.read_text() if snapshot.exists() else ""):
            assert proc.poll() is None, (scratch / "first.log").read_text()[-4000:]
            assert time.time() < deadline, "no mid-epoch checkpoint in time"
            time.sleep(0.5)
    finally:
        kill_tree(proc)
    run = path(f"{storage}/resume")
    assert not (run / "stage2.done.json").exists()
    t0 = time.time()
    res = subprocess.run(train_cmd(str(ROOT / CPU), *overrides), cwd=first, env=env, capture_output=True, text=True,
                         timeout=600, start_new_session=True)
    resume_s = time.time() - t0
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    logs = (run / "logs" / "stage2-rank0.log").read_text()
    resumed = re.search(r"resumed from .*checkpoint_s(\d+)_e\d+ at epoch (\d+), step (\d+)", logs)
    assert resumed and int(resumed.group(3)) >= 9, logs[-3000:]
    got = done(run, 2)
    assert (got["global_step"], got["restarts"]) == (24, 1)  # 3 epochs of 8 steps (FAST)
    assert got["lr"] == pytest.approx(3.3333333333333335e-3 / 3)  # cpu.yaml's lr after FAST's milestone [2]
    steps = [r["step"] for r in records(run) if r["split"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 25))
    print(f"resume from the bucket (under load): {resume_s:.0f} s from start to stage-2 done")
