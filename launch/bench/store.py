"""Streaming shards from an S3-compatible store against the same shards in a local folder, same loader.

The faces are prepped twice by the same serial prep, into a local folder and into a bucket (byte-identical
shards); the training loader (``shards.stream``, one process, one core) then reads the train split three ways,
timed in alternation (``launch.bench.data.interleaved_rates``): local files, objects streamed from the store,
and objects through a local shard cache (``data.shard_cache``). Without ``--uri`` the store is moto's server
started on loopback (the test extra): a single-threaded Python server, so its figure is a floor for a real
store on a LAN, not an estimate of one. With ``--uri s3://bucket/prefix`` (an existing bucket; endpoint,
region and credentials from the AWS variables) the real store is measured.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def configure(p) -> None:
    p.add_argument("--faces", default="../shared/data/lfw", help="folder of identity folders")
    p.add_argument("--images", type=int, default=200, help="faces to use (first identities by name)")
    p.add_argument("--shard-size", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="stream batch (the paper's stage 2)")
    p.add_argument("--batches", type=int, default=15, help="batches timed per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each variant keeps its best")
    p.add_argument("--uri", default="", help="s3://bucket/prefix of an existing bucket; default: moto on loopback")
    p.add_argument("--out", default="bench/store.json")


def _moto(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto's S3 server did not start (pip install 'moto[server]'): "
                                   f"{log.read_text()[-1000:]}") from None
            time.sleep(0.2)


def run(args) -> int:
    from launch.bench.data import _faces, _link_src, interleaved_rates
    from shards.manifest import shard_urls
    from shards.plan import SplitConfig
    from shards.prep import PrepConfig, prepare, serial_map
    from shards.store import create_bucket
    from shards.stream import StreamConfig, build_loader

    files = _faces(Path(args.faces), args.images)
    if not files:
        print(f"facesr bench store: error: no faces under {args.faces}")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="facesr-bench-store-"))
    server = None
    result = {"bench": "store", "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "load_average_start": os.getloadavg()}
    try:
        uri = args.uri
        if not uri:
            server, endpoint = _moto(tmp / "moto.log")
            os.environ.update(AWS_ENDPOINT_URL_S3=endpoint, AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="bench",
                              AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true")
            uri = "s3://facesr-bench/shards"
            create_bucket(uri)
        result["store"] = "moto on loopback" if server else "given --uri"
        _link_src(files, tmp / "src")
        split = SplitConfig(val=0.05, test=0.05)
        t0 = time.perf_counter()
        prepare(PrepConfig(src=str(tmp / "src"), out=str(tmp / "local"), split=split, shard_size=args.shard_size,
                           progress=False), serial_map)
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare(PrepConfig(src=str(tmp / "src"), out=uri, split=split, shard_size=args.shard_size, progress=False),
                serial_map)
        result["prep_s"] = {"local": local_s, "store": time.perf_counter() - t0}
        cfg = StreamConfig(batch_size=args.batch, batches_per_epoch=10**9, workers=0, shuffle=200)
        cached = StreamConfig(batch_size=args.batch, batches_per_epoch=10**9, workers=0, shuffle=200,
                              cache_dir=str(tmp / "cache"))
        local, remote = shard_urls(tmp / "local", "train"), shard_urls(uri, "train")
        streams = {"local": build_loader(local, cfg, rank=0, world_size=1, epoch=0),
                   "store": build_loader(remote, cfg, rank=0, world_size=1, epoch=0),
                   "store_cached": build_loader(remote, cached, rank=0, world_size=1, epoch=0)}
        rates = interleaved_rates(streams, args.batch, args.batches, args.rounds)
        result["stream"] = rates | {"store_over_local": rates["store"]["samples_per_s_per_worker"]
                                    / rates["local"]["samples_per_s_per_worker"],
                                    "shards": len(local)}
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    s = result["stream"]
    print(f"stream, samples/s per loader core ({result['store']}): local files "
          f"{s['local']['samples_per_s_per_worker']:.0f}, store {s['store']['samples_per_s_per_worker']:.0f} "
          f"(x{s['store_over_local']:.2f}), store through the local cache "
          f"{s['store_cached']['samples_per_s_per_worker']:.0f}")
    print(f"load average {result['load_average_start']} -> {result['load_average_end']} (under load on a shared "
          f"machine: rates are lower bounds)")
    print(f"wrote {out}")
    return 0
