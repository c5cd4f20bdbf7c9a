"""`facesr prep SRC OUT`: shard identity folders of faces into WebDataset tars, as Ray tasks.

On one machine this starts a local Ray; under `ray job submit` it joins the
cluster and spreads over every node (SRC and OUT must then be shared paths).
Rerunning the same command finishes an interrupted run; finished shards are
verified (sha256) and kept.
"""

from __future__ import annotations

import sys


def configure(p) -> None:
    p.add_argument("src", nargs="+", help="folder of identity folders of images (CASIA-WebFace / LFW layout); "
                   "several are combined, their identities named <folder name>/<identity>")
    p.add_argument("out", help="output folder for shards, manifest.json and rejects.tsv, or an object-store URI "
                   "(s3://bucket/prefix; endpoint and region from AWS_ENDPOINT_URL / AWS_REGION, credentials from "
                   "the environment, ~/.aws profile or instance role)")
    p.add_argument("--split-by", default="identity", choices=["identity", "none"],
                   help="identity: identity-disjoint train/val/test (paper protocol); none: all in train")
    p.add_argument("--val", type=float, default=0.05, help="fraction of identities for validation")
    p.add_argument("--test", type=float, default=0.05, help="fraction of identities for testing")
    p.add_argument("--seed", type=int, default=0, help="seeds the identity split and the sample order")
    p.add_argument("--min-images", type=int, default=2,
                   help="train identities with fewer images get no prior class (cls = -1)")
    p.add_argument("--prior-holdout", type=float, default=0.0,
                   help="images of each prior class held out (split prior_val) to score the priors on images "
                        "they never trained on: a share under 1, a count per class from 1 (balanced); 0 = none")
    p.add_argument("--exclude", default="", metavar="SHARDS",
                   help="another shard set (folder or URI): leave out the identities its val and test splits hold "
                        "(matched in the source folders both read), e.g. faces for a recognizer that must not see "
                        "the people SHARDS evaluates on")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--png-level", type=int, default=1, choices=range(10), metavar="0-9", help="PNG zlib level")
    p.add_argument("--members", default="png", choices=("png", "raw"),
                   help="level encoding: png (small) or raw uint8 (2.3x larger, streams ~100x faster; docs/SHARDS.md)")
    p.add_argument("--address", default=None,
                   help="Ray address; default: RAY_ADDRESS (set by ray job submit), else a new local Ray; "
                        "'auto': the cluster started on this machine with ray start; 'local': always a new local Ray")
    p.add_argument("--cpus", type=int, default=None, help="CPUs of a new local Ray (default: all)")
    p.add_argument("--no-ray", action="store_true", help="run every task in this process (debugging)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from shards.plan import SplitConfig
    from shards.prep import PrepConfig, PrepError, check_paths, format_summary, prepare, serial_map

    if args.shard_size < 1:
        print(f"facesr prep: error: --shard-size must be >= 1, got {args.shard_size}", file=sys.stderr)
        return 2
    try:
        split = SplitConfig(by=args.split_by, val=args.val, test=args.test, seed=args.seed,
                            min_images=args.min_images, prior_holdout=args.prior_holdout)
    except ValueError as exn:
        print(f"facesr prep: error: {exn}", file=sys.stderr)
        return 2
    cfg = PrepConfig(src=args.src[0] if len(args.src) == 1 else tuple(args.src), out=args.out, split=split, shard_size=args.shard_size,
                     png_level=args.png_level, members=args.members, progress=not args.no_progress,
                     exclude=args.exclude)
    try:
        check_paths(cfg)
        if args.no_ray:
            summary = prepare(cfg, serial_map)
        else:
            from cluster import ray_connect, shard_prep

            try:
                where = ray_connect.connect(args.address, num_cpus=args.cpus)
            except ConnectionError as exn:
                print(f"facesr prep: error: cannot reach the Ray cluster: {exn}", file=sys.stderr)
                return 2
            print(f"facesr prep: running on {where}", file=sys.stderr)
            try:
                summary = prepare(cfg, shard_prep.ray_map)
            finally:
                ray_connect.shutdown()
    except PrepError as exn:
        print(f"facesr prep: error: {exn}", file=sys.stderr)
        return 2
    except OSError as exn:  # disk full, permissions changed mid-run: finished shards are complete and kept
        print(f"facesr prep: error: {exn}; finished shards are kept, fix this and rerun the same command "
              "to finish", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0
