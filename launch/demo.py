"""`facesr demo`: the whole pipeline on a face folder, on a local Ray cluster.

prep (identity-disjoint shards) -> stage 1 (priors) -> stage 2 (cascade) ->
eval (PSNR/SSIM vs bicubic on the test identities) -> picture grid -> identity (dlib's verification of the
test people's faces restored from 24x24, beside bicubic's).

Each step runs as the same command a user would type (printed before it runs),
so the demo is also the tutorial. Faces come from ``--faces``; by default the
LFW copy beside the checkout (``../shared/data/lfw``), else LFW deep-funneled is
downloaded into ``data/lfw`` when the machine is online.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_LFW = ROOT.parent / "shared" / "data" / "lfw"
LFW_URLS = (  # the official archive (identity folders of 250×250 deep-funneled faces)
    "http://vis-www.cs.umass.edu/lfw/lfw-deepfunneled.tgz",
)


# the robustness table: the paper's lr and six other ways a face gets small (facesr.degradations)
ROBUSTNESS = "paper,decimate0,bicubic_aa,area,bilinear_noise,jpeg50,heldout"
# the identity table: the paper's lr and the most common other way (a judge's embedding costs ~0.06 s a face)
IDENTITY_ROWS = "paper,bicubic_aa"


def _dlib_available() -> bool:
    from facesr.identity import dlib_judge

    return dlib_judge.available()


def configure(p) -> None:
    p.add_argument("--faces", default=None, help="identity folder of faces (default: ../shared/data/lfw, "
                                                 "else LFW downloaded into data/lfw)")
    p.add_argument("--out", default="runs/demo", help="where shards, runs and results go")
    p.add_argument("--config", default=str(ROOT / "launch/configs/demo.yaml"), help="training config")
    p.add_argument("--limit-eval", type=int, default=500, help="test faces scored (0 = all)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")


def _lfw(dest: Path) -> Path:
    """LFW identity folders: the local copy, or a download when online (clear message when not)."""
    if SHARED_LFW.is_dir():
        return SHARED_LFW
    target = dest / "lfw-deepfunneled"
    if target.is_dir():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "lfw-deepfunneled.tgz"
    errors = []
    for url in LFW_URLS:
        try:
            print(f"demo: downloading {url} -> {archive}", flush=True)
            urllib.request.urlretrieve(url, archive)
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
            return target
        except Exception as e:  # network errors come in many types; all mean "not available"
            errors.append(f"{url}: {e}")
    raise SystemExit(
        "demo: no face folder given, ../shared/data/lfw is absent and LFW could not be downloaded "
        f"({'; '.join(errors)}).\nPass one: make demo FACES=/path/to/identity/folders"
    )


def _step(title: str, args: list[str]) -> float:
    cmd = [sys.executable, "-m", "launch.cli", *args]
    print(f"\n=== {title}\n$ facesr {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    dt = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"demo: step '{title}' failed (exit {rc}); rerun `make demo` to resume from here")
    print(f"=== {title}: {dt:.0f}s", flush=True)
    return dt


def _priors_verdict(run_dir: Path, shards: Path) -> str:
    """What the demo's stage 1 showed, from its last validation record: recognizers (top-1 above the majority
    class on held-out images of their classes, prep's prior_val), or a smoke test."""
    import json

    metrics = run_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    val = [r for r in recs if r.get("stage") == 1 and r.get("split") == "val"]
    if not val or "acc_majority" not in val[-1]:
        return "\n=== stage 1: no validation record in " + str(metrics)
    r = val[-1]
    acc = {k: r.get(f"acc/{k}", 0.0) for k in ("x2", "x4", "x8")}
    line = ", ".join(f"{k} {v:.1%}" for k, v in acc.items())
    manifest = shards / "manifest.json"
    held_out = manifest.is_file() and "prior_val" in json.loads(manifest.read_text()).get("splits", {})
    head = (f"\n=== stage 1: priors' top-1 {line} against the majority class's {r['acc_majority']:.1%} on "
            + ("held-out images of their classes" if held_out else "images they trained on (no prior_val split)"))
    if held_out and all(v > r["acc_majority"] for v in acc.values()):
        return head + ": they beat it at every scale"
    return (head + f": this stage 1 is a smoke test of the machinery ({r.get('step', '?')} steps over LFW's "
            "~1,300 classes of ~8 images), not priors that recognize. Those: `make shards-id` (LFW + CelebA, classes of >= 10 images, "
            "a held-out prior_val), then `facesr train --config launch/configs/cpu-2h.yaml` and `facesr eval "
            "priors runs/cpu-2h` (README: Identity priors that recognize)")


def run(args) -> int:
    out = Path(args.out).resolve()
    faces = Path(args.faces).resolve() if args.faces else _lfw(ROOT / "data")
    if not faces.is_dir():
        raise SystemExit(f"demo: --faces {faces}: not a folder")
    shards, runs = out / "shards", out / "runs"
    times = {}
    times["prep"] = _step("prep: identity folders -> WebDataset shards",
                          ["prep", str(faces), str(shards), "--split-by", "identity", "--val", "0.05",
                           "--test", "0.05", "--min-images", "2", "--address", "local",
                           # raw uint8 members: 2.3x the disk (1.7 GiB for LFW), but prep skips PNG's encoding
                           # (3.7 of 6.0 ms a face) and training its decoding, on the same two cores
                           "--members", "raw"])
    times["train"] = _step("train: stage 1 priors + stage 2 cascade (Ray Train + DeepSpeed, CPU)",
                           ["train", "--config", args.config, f"data.shards={shards}",
                            f"cluster.storage_path={runs}", "run.name=demo", *args.overrides])
    run_dir = runs / "demo"
    results = out / "results"
    times["eval"] = _step("eval: PSNR/SSIM per scale vs bicubic on the test identities, lr made 7 ways",
                          ["eval", "quality", str(run_dir), "--data", str(faces), "--manifest", str(shards),
                           "--split", "test", "--limit", str(args.limit_eval), "--grid", "6",
                           "--degradations", ROBUSTNESS, "--out", str(results)])
    if _dlib_available():
        times["identity"] = _step("identity: LFW verification with face B restored, lr made 2 ways (dlib judges)",
                                  ["eval", "identity", str(run_dir), "--judge", "dlib", "--workers", "2",
                                   "--manifest", str(shards), "--split", "test", "--degradations", IDENTITY_ROWS,
                                   "--out", str(results)])
    else:
        print("\n=== identity: skipped (dlib's recognizer is the judge: pip install -e '.[dlib]')", flush=True)
    print(_priors_verdict(run_dir, shards), flush=True)
    print("\n=== demo done in {:.0f}s ({})".format(
        sum(times.values()), ", ".join(f"{k} {v:.0f}s" for k, v in times.items())))
    print(f"shards:   {shards}\nrun:      {run_dir}\nresults:  {results} (quality.json, grid.png, identity.json)")
    return 0
