"""Runs and shards in an object store (issue 14): moto's S3 server on loopback (tests/conftest.py ``s3_server``,
credentials checked), the real pyarrow S3 client, the real prep, loader and training.

Here: prep into the bucket (atomic per shard), the loader streaming from it with its cache, and bad stores
(no server, no bucket, wrong key) refused by the config check before Ray starts. The whole workflow (prep as
a job, both stages with the run and the shards only in the bucket, a worker killed mid-stage-2 resuming from
it, eval/sr/export from the run's URI) runs on the two-node cluster whose worker node has no shared folder:
tests/test_cluster.py, its last section.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_train import BIN, CPU, env_with_venv, face_src, train_cmd


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


class _HangUp:
    """A loopback TCP endpoint that accepts every connection and closes it at once, counting them."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.count = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.count += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("fault", ["unreachable endpoint", "missing bucket", "wrong credentials"])
def test_bad_store_is_refused_by_the_config_check_naming_the_uri(fault, bucket_shards, s3_server, monkeypatch):
    """The config check (run before Ray starts) refuses a store it cannot use, with the URI in the message; an
    endpoint that hangs up on every request is tried a bounded number of times (the client's 3 attempts), not
    retried in a long loop."""
    from cluster.config import ConfigError, check, load_config, resolve

    storage = s3_server.bucket("runs-ok") + "/runs"
    attempts = _HangUp()  # an endpoint that accepts connections and closes them unanswered, counting them
    if fault == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", attempts.endpoint)
    elif fault == "missing bucket":
        storage = "s3://no-such-bucket/runs"
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_server.secret[6:])
    cfg = resolve(load_config(CPU, [f"data.shards={bucket_shards}", f"cluster.storage_path={storage}",
                                    "run.name=bad"]))
    cfg.validate()
    try:
        with pytest.raises(ConfigError) as e:
            check(cfg)
    finally:
        attempts.close()
    assert attempts.count <= 3 and (attempts.count >= 1) == (fault == "unreachable endpoint"), attempts.count
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
