"""`facesr eval priors RUN`: the identity priors' top-1/top-5 on held-out images, beside chance and majority.

The images are prep's ``prior_val`` split (``facesr prep --prior-holdout``):
images of the priors' own classes that stage 1 never trained on. Shards without
it fall back to ``train`` and say so: that measures fit, not recognition.
"""

from __future__ import annotations

import json
import sys


def configure(p) -> None:
    p.add_argument("run", help="run folder holding priors.safetensors, or the priors file itself (either may be "
                               "an s3:// URI)")
    p.add_argument("--shards", help="shard root (default: the shards stage 1 of the run's config.yaml trained on: "
                   "stage1.shards, else data.shards)")
    p.add_argument("--split", default="auto", help="manifest split; auto = prior_val where the shards have it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=0, help="at most N images (in shard order); 0 = all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON report (default: <run>/results/priors.json when RUN is a folder)")


def _shards_of(run) -> str:
    from cluster.config import load_config
    from shards.store import local_copy

    if not (run / "config.yaml").is_file():
        raise SystemExit(f"{run}: no config.yaml to find the shards in; pass --shards")
    # the run's resolved config: an absolute shard root (downloaded first for a run in a bucket)
    return load_config(local_copy(str(run / "config.yaml"))).shards_of(1)


def run(args) -> int:
    import itertools

    from cluster.stages import prior_baselines
    from facesr.evaluate import score_priors
    from facesr.vocab import TARGETS
    from facesr.weights import load_priors
    from shards.manifest import read_manifest, shard_urls
    from shards.store import local_copy, path as store_path
    from shards.stream import read_in_order

    run_path = store_path(args.run)  # a local path or an object-store URI
    path = run_path / "priors.safetensors" if run_path.is_dir() else run_path
    if not path.is_file():
        raise SystemExit(f"{path}: no priors file (stage 1 writes <run>/priors.safetensors)")
    shards = args.shards or _shards_of(run_path if run_path.is_dir() else run_path.parent)
    manifest = read_manifest(shards)
    split = args.split if args.split != "auto" else ("prior_val" if "prior_val" in manifest["splits"] else "train")
    if split not in manifest["splits"]:
        raise SystemExit(f"{shards}: no split {split!r} (has {sorted(manifest['splits'])})")
    try:
        priors = load_priors(local_copy(str(path)), args.device, classes=manifest["classes"])
    except ValueError as exn:
        raise SystemExit(str(exn)) from None
    damaged: list = []  # (sample key or shard, reason): reported below, never a silently smaller evaluation
    batches = ({k: b[k].float() / 255 for k in TARGETS} | {"cls": b["cls"]}
               for b in read_in_order(shard_urls(shards, split, manifest=manifest), TARGETS, args.batch_size,
                                      damaged, manifest["num_classes"]))
    if args.limit:
        batches = itertools.islice(batches, -(-args.limit // args.batch_size))
    scores = score_priors(priors, batches, args.device)
    base = prior_baselines(manifest, split)
    expected = manifest["splits"][split].get("labelled", scores["images"])
    report = {"priors": str(path), "shards": str(shards), "split": split, "classes": manifest["num_classes"],
              "held_out": split == "prior_val", **base, **scores, "damaged": len(damaged)}
    if damaged:  # the count and the first reason, escaped: a sample key is a name from the shard
        from .cli import printable

        where, why = damaged[0]
        print(printable(f"facesr eval priors: warning: {len(damaged)} damaged samples or shards skipped, scored "
                        f"{scores['images']:,} of the split's {expected:,} labelled images (first: {where}: {why})"),
              file=sys.stderr)
    print(f"priors {path} on {scores['images']:,} images of split {split!r} ({manifest['num_classes']:,} classes"
          f"{'' if split == 'prior_val' else '; NOT held out: these images trained the priors'})")
    print(f"{'scale':<6} {'top-1':>7} {'top-5':>7} {'chance':>7} {'majority':>9} {'top-1/majority':>15}")
    for scale in ("x2", "x4", "x8"):
        s = scores.get(scale)
        if s:
            ratio = s["top1"] / base["acc_majority"] if base["acc_majority"] else float("nan")
            print(f"{scale:<6} {s['top1']:>7.4f} {s['top5']:>7.4f} {base['acc_chance']:>7.4f} "
                  f"{base['acc_majority']:>9.4f} {ratio:>14.2f}x")
    out = store_path(args.out) if args.out else (run_path / "results" / "priors.json" if run_path.is_dir() else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0
