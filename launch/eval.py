"""`facesr eval quality|identity|grid|embedder`: numbers against bicubic, identity preservation, pictures.

  facesr eval quality [MODEL ...] --data ../shared/data/lfw [--ids FILE] [--limit N] [--out DIR]
                      [--degradations paper,decimate0,bicubic_aa,area,bilinear_noise,jpeg50,heldout]
  facesr eval grid MODEL [...] --data ../shared/data/lfw [--rows 6] [--degradations ...] [--out DIR]
  facesr eval embedder runs/embedder.safetensors            # train the verification judge (CPU, minutes)
  facesr eval identity [MODEL ...] [--judge dlib | --embedder runs/embedder.safetensors] [--per-fold 100]

MODEL is a run folder (its srnet.safetensors) or an SR-net .safetensors file; several models
(e.g. the alpha=0 and alpha=0.001 runs, or the Table 1 peers: SRCNN, VDSR, ℓp) become several
columns/rows, each at the scales it has (a peer: x8 only; `--scales x8` gives Fig. 3's grid). --data is an identity folder
(ROOT/<identity>/<image>) or a shard root with a manifest (its --split is streamed).
--degradations makes the same faces' lr several ways (facesr.degradations.EVAL_DEGRADATIONS; the
x2/x4/hr targets stay the clean cascade): quality adds a robustness table, grid one row per way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the checkout


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _common(p, data: bool = True) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL", help="run folder or SR-net .safetensors (several allowed)")
    if data:
        p.add_argument("--data", default=str(DATA / "lfw"), help="identity folder, or shard root with a manifest")
    p.add_argument("--ids", help="file of identity names, one per line: evaluate only these people "
                   "(identity: pairs whose degraded face B is one of them)")
    p.add_argument("--manifest", help="shard root whose manifest names the identities of --split")
    p.add_argument("--split", default="test", help="manifest split to evaluate (with --manifest or a shard --data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit / --rows draw")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the models' arithmetic: auto = bf16 autocast where the device computes bf16 natively "
                   "(as training chose), else fp32; scores are always computed in fp32")
    p.add_argument("--out", default="runs/eval", help="folder for the JSON/PNG written")
    p.add_argument("--tta", choices=["none", "flip", "both"], default="none",
                   help="test-time augmentation: flip = each model's output averaged with the mirror of its "
                   "output on the mirrored input (twice the arithmetic); both = each model scored both ways, "
                   "as NAME and NAME+flip, on the same faces")
    p.add_argument("--detail", type=_details, default=None, metavar="D[,D...]",
                   help="each model at these detail strengths (facesr.detail: every output = bicubic + D x the "
                   "network's correction to it; 1 = as trained, whatever the file ships with), as NAME@detailD; "
                   "choose on validation identities (--split val); a detail gate, if the file has one, replaced")
    p.add_argument("--gate-strength", type=_details, default=None, metavar="K[,K...]",
                   help="a gated network (training's stage 3) with its per-face strength scaled by K instead of "
                   "the one it ships with, as NAME@gateK; beside --detail's variants")


def _details(text: str) -> list[float]:
    """--detail's comma-separated strengths, each positive."""
    from facesr.detail import check_detail

    try:
        return list(dict.fromkeys(check_detail(v.strip(), "--detail") for v in text.split(",")))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_degradations(p) -> None:
    p.add_argument("--degradations", default="paper", metavar="NAMES",
                   help="comma-separated lr degradations (paper,decimate0,bicubic_aa,area,bilinear_noise,jpeg50,"
                   "heldout); quality: one robustness row each, paper always included; default: paper only")


def _add_scales(p) -> None:
    p.add_argument("--scales", default="x2,x4,x8", metavar="SCALES",
                   help="grid: each model's outputs shown, comma-separated (x8 = one column per model, as the "
                   "paper's Fig. 3; the Table 1 peers have x8 only)")


def _scales(text: str) -> tuple[str, ...]:
    from facesr.vocab import SCALES

    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not names or any(n not in SCALES for n in names):
        raise SystemExit(f"--scales: expected some of {', '.join(SCALES)}, got {text!r}")
    return names


def _degradations(text: str) -> list[str]:
    from facesr.degradations import EVAL_DEGRADATIONS

    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in EVAL_DEGRADATIONS]
    if unknown or not names:
        raise SystemExit(f"--degradations: unknown {', '.join(map(repr, unknown)) or 'empty list'} "
                         f"(known: {', '.join(EVAL_DEGRADATIONS)})")
    return names


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    q = sub.add_parser("quality", help="PSNR/SSIM per scale vs bicubic and nearest (Table 1 style) + JSON")
    _common(q)
    q.add_argument("--limit", type=int, default=0, help="at most N faces (seeded draw); 0 = all")
    q.add_argument("--grid", type=int, default=0, metavar="ROWS", help="also write grid.png with ROWS faces")
    _add_degradations(q)
    q.add_argument("--shift-compensated", action="store_true",
                   help="robustness rows also give x8 PSNR after undoing each image's global sub-pixel shift "
                   "(a downscaler's grid offset, e.g. decimate0); slower")
    _add_scales(q)

    g = sub.add_parser("grid", help="comparison grid PNG: LR | bicubic | SR x2, x4, x8 | HR")
    _common(g)
    g.add_argument("--rows", type=int, default=6, help="faces drawn at random (seeded) from the selection")
    g.add_argument("--faces", nargs="*", default=[], help="chosen faces as identity/file.jpg (overrides --rows)")
    _add_degradations(g)
    _add_scales(g)

    i = sub.add_parser("identity", help="LFW verification with one face HR / bicubic / SR, and identity drift")
    _common(i, data=False)
    i.add_argument("--judge", choices=["auto", "dlib", "embedder"], default="auto",
                   help="face recognizer: dlib's pretrained ResNet (the dlib extra) or an embedder trained by "
                   "`facesr eval embedder`; auto = embedder when --embedder is given, else dlib")
    i.add_argument("--embedder", help="face-embedder weights from `facesr eval embedder` (--judge embedder)")
    i.add_argument("--workers", type=int, default=1, help="dlib judge: processes embedding faces in parallel "
                   "(dlib's wheel uses one core)")
    i.add_argument("--lfw", default=str(DATA / "lfw"), help="LFW identity folder")
    i.add_argument("--pairs", default=str(DATA / "lfw-pairs.txt"), help="LFW View 2 pairs.txt")
    i.add_argument("--per-fold", type=int, default=0, help="at most N pairs per fold (half same); 0 = all")
    i.add_argument("--drift-all", action="store_true",
                   help="measure drift on every LFW image of the chosen people (--manifest/--ids), not only the "
                   "pairs' faces B: more faces for the paired comparison of upscalers")
    _add_degradations(i)
    i.add_argument("--drawn-pairs", type=int, default=0, metavar="N",
                   help="instead of --pairs, N same-person and N different-person pairs drawn among the chosen "
                   "people only (--manifest/--ids): both faces unseen by a model trained on the other splits "
                   "(e.g. a stage-1 recognizer as --embedder: its held-out verification)")

    from . import eval_priors

    eval_priors.configure(sub.add_parser("priors", help="identity priors' top-1/top-5 on held-out images, "
                                                        "beside chance and the majority class"))

    e = sub.add_parser("embedder", help="train the verification network on identities outside the LFW pairs")
    e.add_argument("out", help="weights file to write (.safetensors)")
    e.add_argument("--lfw", default=str(DATA / "lfw"))
    e.add_argument("--pairs", default=str(DATA / "lfw-pairs.txt"), help="every person in these pairs is excluded")
    e.add_argument("--celeba", default=str(DATA / "celeba-ids"), help="extra identity folder ('' = none)")
    e.add_argument("--exclude-ids", help="file of further identities to exclude (e.g. the SR test split)")
    e.add_argument("--epochs", type=int, default=None)
    e.add_argument("--size", type=int, default=None, help="network input side")
    e.add_argument("--steps", type=int, default=0, help="cap on optimizer steps (smoke tests)")


def run(args) -> int:
    from . import eval_priors

    return {"quality": run_quality, "grid": run_grid, "identity": run_identity, "embedder": run_embedder,
            "priors": eval_priors.run}[args.what](args)


# ---------------------------------------------------------------- selection and data


def _manifest_identities(root: str, split: str, folder: str | None = None) -> list[str]:
    """Identity names of a manifest split (manifest ``identities``: name -> {split, images, cls}). A prep of
    several folders names identities ``<folder name>/<identity>``: those of ``folder``, unprefixed, are kept."""
    from shards.manifest import read_manifest

    m = read_manifest(root)
    names = sorted(n for n, info in m["identities"].items() if info.get("split") == split)
    roots = m.get("source", {}).get("roots")
    if roots and folder is not None:
        here = Path(folder).resolve()
        label = next((k for k, r in roots.items() if Path(r).resolve() == here), here.name)
        names = [n.split("/", 1)[1] for n in names if n.startswith(f"{label}/")]
    if not names:
        splits = sorted({info.get("split") for info in m["identities"].values()})
        raise SystemExit(f"{root}: manifest has no identity in split {split!r} (splits: {splits})")
    return names


def _identities(args) -> list[str] | None:
    from facesr.evaluate import read_identities

    if args.ids:
        return read_identities(args.ids)
    if args.manifest:
        return _manifest_identities(args.manifest, args.split, getattr(args, "data", None) or getattr(args, "lfw", None))
    return None


def _is_shard_root(path: str) -> bool:
    from shards.store import path as store_path

    return (store_path(path) / "manifest.json").is_file()


def _shard_batches(root: str, split: str, batch_size: int):
    """Every sample of a split exactly once, in shard order, read by the shard reader training uses
    (``shards.stream.read_in_order``: the same member checks and decoders, PNG or raw levels)."""
    from facesr.vocab import LEVELS
    from shards.manifest import shard_urls
    from shards.stream import read_in_order

    from .cli import printable

    errors: list = []
    skipped = 0

    def report() -> None:  # damage is said where it is met, and counted: the evaluation never shrinks silently
        nonlocal skipped
        for key, why in errors:
            _log(printable(f"skipped damaged shard sample or shard {key}: {why}"))
        skipped += len(errors)
        errors.clear()

    for b in read_in_order(shard_urls(root, split), LEVELS, batch_size, errors):
        report()
        yield {**{k: b[k].float() / 255 for k in LEVELS}, "name": b["key"]}
    report()
    if skipped:
        _log(f"warning: {skipped} damaged samples or shards of split {split!r} were skipped: the scores above "
             "and below cover fewer faces than the split holds")


def _faces(args, n: int = 0):
    from facesr.evaluate import list_faces, select

    faces = list_faces(args.data, _identities(args))
    if not faces:
        raise SystemExit(f"{args.data}: no faces for the chosen identities")
    return faces, select(faces, n, args.seed)


def _load_models(paths: list[str], device: str, precision: str = "fp32", tta: str = "none",
                 details: list[float] | None = None, gates: list[float] | None = None):
    """{label: the cascade ready for inference (channels_last, bf16 autocast per ``precision``, flip-averaged per
    ``tta``)}, {label: path}. ``tta="both"``: each model twice, ``NAME`` and ``NAME+flip``. ``details``: each
    model at each of these detail strengths (absolute: the file's own ``detail`` undone first, a gate removed),
    ``NAME@detailD``; ``gates``: a gated model at each of these gate strengths, ``NAME@gateK``."""
    from facesr.detail import at_detail, at_gate_strength
    from facesr.evaluate import model_label
    from facesr.infer import FlipEnsemble, Fast, inference_bf16, load_cascade
    from shards.store import local_model

    bf16 = inference_bf16(precision, device)
    models, where = {}, {}
    for p in paths:
        name = model_label(p, models)
        local = Path(local_model(p))  # a run in a bucket: its srnet downloaded
        cascade = load_cascade(local, device)
        variants = [(name, str(p), cascade)]
        if details is not None or gates is not None:
            try:
                variants = [(f"{name}@detail{d:g}", f"{p} (detail {d:g})", at_detail(cascade, local, d))
                            for d in details or []]
            except ValueError as e:
                raise SystemExit(f"{p}: --detail: {e}") from None
            try:
                variants += [(f"{name}@gate{k:g}", f"{p} (gate strength {k:g})", at_gate_strength(cascade, local, k))
                             for k in gates or []]
            except ValueError as e:
                raise SystemExit(f"{p}: --gate-strength: {e}") from None
        for label, src, net in variants:
            net = Fast(net, bf16)
            if tta in ("none", "both"):
                models[label], where[label] = net, src
            if tta in ("flip", "both"):
                models[f"{label}+flip"], where[f"{label}+flip"] = FlipEnsemble(net), f"{src} (flip-averaged)"
    return models, where


def _arithmetic(models: dict) -> str:
    """How the models computed, for the report's protocol."""
    bf16 = any(getattr(m, "bf16", False) for m in models.values())
    return "models: " + ("bf16 autocast (native on this device)" if bf16 else "fp32") + ", channels_last"


# ---------------------------------------------------------------- subcommands


def run_quality(args) -> int:
    from facesr.evaluate import (
        add_robustness, build_report, folder_batches, format_robustness, format_table, score_degradations, write_json,
    )
    from facesr.grid import comparison_grid, per_degradation

    names = _degradations(args.degradations)
    rows = list(dict.fromkeys(["paper", *names])) if names != ["paper"] else []  # robustness rows; none by default
    models, where = _load_models(args.models, args.device, args.precision, args.tta, args.detail, args.gate_strength)
    skipped: list = []
    if _is_shard_root(args.data):
        source = f"shards {args.data} split {args.split}"
        batches = _shard_batches(args.data, args.split, args.batch_size)
        n_ids = None
    else:
        everything, faces = _faces(args, args.limit)
        n_ids = len({f.identity for f in faces})
        source = f"identity folder {args.data}: {len(faces)} of {len(everything)} faces, {n_ids} identities"
        source += f" (seeded draw, seed {args.seed})" if args.limit else ""
        batches = folder_batches(faces, args.batch_size, skipped=skipped)
    from facesr.progress import bar, console

    total = len(faces) if n_ids is not None else (args.limit or None)
    with console() as stream, bar(total, "eval", "face", stream=stream) as line:  # in place, or a line a minute
        by_degradation, n = score_degradations(models, batches, rows or ["paper"], limit=args.limit,
                                               device=args.device, progress=line.update,
                                               shift_compensated=("x8",) if args.shift_compensated and rows else ())
    report = build_report(by_degradation["paper"], n, source, where, {"skipped": skipped, "identities": n_ids})
    report["protocol"]["arithmetic"] = _arithmetic(models) + "; scores in fp32"
    print(format_table(report))
    if rows:
        add_robustness(report, by_degradation)
        print(format_robustness(report))
    out = Path(args.out)
    path = write_json(report, out / "quality.json")
    print(f"wrote {path}")
    if args.grid:
        from facesr.evaluate import select

        batch = next(folder_batches(select(faces, args.grid, args.seed), args.grid)) if n_ids is not None else None
        if batch is not None and rows:
            batch = per_degradation(batch, rows)
        if batch is not None:
            print(f"wrote {comparison_grid(batch, models, out / 'grid.png', args.device, _scales(args.scales))}")
        else:
            _log("--grid: pictures need an identity folder as --data (use --manifest for its split); none written")
    return 0


def run_grid(args) -> int:
    from facesr.evaluate import Face, folder_batches
    from facesr.grid import comparison_grid, per_degradation

    names = _degradations(args.degradations)
    if not args.models:
        raise SystemExit("facesr eval grid: give at least one MODEL")
    models, _ = _load_models(args.models, args.device, args.precision, args.tta, args.detail, args.gate_strength)
    if args.faces:
        faces = [Face(f.split("/")[0], Path(args.data) / f) for f in args.faces]
    else:
        _, faces = _faces(args, args.rows)
    skipped: list = []
    batch = next(folder_batches(faces, len(faces), skipped=skipped), None)
    from .cli import printable

    for path, why in skipped:
        _log(printable(f"skipped {path}: {why}"))
    if batch is None:
        raise SystemExit("no readable faces for the grid")
    if names != ["paper"]:
        batch = per_degradation(batch, names)
    print(f"wrote {comparison_grid(batch, models, Path(args.out) / 'grid.png', args.device, _scales(args.scales))}")
    return 0


def _judge(args, pairs):
    """The verification judge the flags ask for (see --judge), refusing an embedder trained on pair people."""
    from facesr.identity import EmbedderJudge
    from facesr.identity import dlib_judge

    kind = args.judge if args.judge != "auto" else ("embedder" if args.embedder else "dlib")
    if kind == "dlib":
        if not dlib_judge.available():
            raise SystemExit("the dlib judge needs the dlib extra (pip install -e '.[dlib]'), "
                             "or pass --embedder WEIGHTS from `facesr eval embedder`")
        return dlib_judge.DlibJudge(workers=args.workers)
    if not args.embedder:
        raise SystemExit("--judge embedder needs --embedder WEIGHTS (train one with `facesr eval embedder`)")
    from facesr.weights import load_embedder

    model, meta = load_embedder(args.embedder, args.device)
    people = {n for p in pairs for n in (p.a[0], p.b[0])}
    leaked = set(meta.get("classes", [])) & (people | {f"lfw/{n}" for n in people})  # one folder's prep, or several
    if leaked:
        raise SystemExit(f"{args.embedder} was trained on {len(leaked)} people of the pairs: not a fair judge "
                         f"(e.g. {sorted(leaked)[0]}); choose people it never saw (--drawn-pairs with --manifest)")
    return EmbedderJudge(model, meta, args.embedder, args.device)


def _drift_faces(lfw: str, identities: list[str] | None) -> list[tuple[str, int]]:
    """Every LFW image (name, number) of the chosen people, for --drift-all."""
    if identities is None:
        raise SystemExit("--drift-all needs chosen people (--manifest with --split, or --ids): all of LFW would "
                         "include the SR model's training identities")
    faces = []
    for name in sorted(identities):
        for f in sorted((Path(lfw) / name).glob(f"{name}_[0-9][0-9][0-9][0-9].jpg")):
            faces.append((name, int(f.stem[-4:])))
    return faces


def run_identity(args) -> int:
    from facesr.evaluate import write_json
    from facesr.identity import (drawn_pairs, format_degradation_table, format_identity_table, read_pairs,
                                 usable_pairs, verify_degradations)

    extra = _drift_faces(args.lfw, _identities(args)) if args.drift_all else []  # refused before any loading
    models, where = _load_models(args.models, args.device, args.precision, args.tta, args.detail, args.gate_strength)
    if args.drawn_pairs:
        if _identities(args) is None:
            raise SystemExit("--drawn-pairs needs chosen people (--manifest with --split, or --ids)")
        pairs = drawn_pairs(args.lfw, _identities(args), args.drawn_pairs, args.seed)
    else:
        pairs = read_pairs(args.pairs)
    kept, counts = usable_pairs(pairs, args.lfw, _identities(args), args.per_fold)
    judge = _judge(args, kept)
    _log(f"{counts['used']} pairs used; {counts['absent']} skipped (image absent), "
         f"{counts['outside_selection']} with face B outside the chosen identities, "
         f"{counts['over_per_fold']} over --per-fold")
    if not kept:
        raise SystemExit("no usable pairs")
    if args.drift_all:
        _log(f"--drift-all: drift measured on {len(extra)} faces of the chosen people (and every pair's face B)")
    upscalers = {name: net.deploy() for name, net in models.items()}
    rows = _degradations(args.degradations)
    from facesr.progress import bar, console

    conditions = 1 + len(rows) * (1 + len(upscalers))
    try:
        with console() as stream, bar(None, f"identity, {conditions} conditions a face", "face", stream=stream) as line:
            def progress(n: int, total: int) -> None:
                line.total = total
                line.update(n)

            results = verify_degradations(judge, kept, args.lfw, upscalers, rows, batch_size=args.batch_size,
                                          device=args.device, progress=progress, drift_faces=extra)
    finally:
        getattr(judge, "close", lambda: None)()
    report = {
        "protocol": "LFW View 2 pairs; face A = HR 192x192 crop, face B = HR | bicubic x8 | model x8 from B's "
        "24x24 lr (facesr.degrade.quadruplet); score = minus the judge's distance; "
        "accuracy = 10-fold CV threshold (LFW protocol); accuracy_fixed = the judge's own threshold; "
        "accuracy_best = best single threshold; ROC AUC; drift = judge distance of restored face B to its HR; "
        "results.rows: face B's 24x24 lr made by each named degradation (facesr.degradations.EVAL_DEGRADATIONS)",
        "arithmetic": _arithmetic(models),
        "judge": judge.describe(),
        "pairs": (f"{args.drawn_pairs} same + {args.drawn_pairs} different drawn among the chosen people "
                  f"(seed {args.seed})" if args.drawn_pairs else str(args.pairs)),
        "pair_counts": counts,
        "models": where,
        # the paper's lr row as the LFW-protocol table has always had it (hr, bicubic, each model) ...
        "results": {"hr": results["hr"], **results["rows"].get("paper", {})},
        "rows": results["rows"],  # ... and every --degradations row: {degradation: {bicubic|model: metrics}}
    }
    if rows == ["paper"]:  # the paper's lr only: the LFW-protocol table, as before the rows existed
        print(format_identity_table(report))
    else:
        print(format_degradation_table({**report, "results": results}))
    print(f"wrote {write_json(report, Path(args.out) / 'identity.json')}")
    return 0


def run_embedder(args) -> int:
    import dataclasses

    from facesr.evaluate import read_identities
    from facesr.identity import EmbedderTraining, pair_identities, read_pairs, train_embedder, training_faces
    from facesr.models import EmbedderConfig
    from facesr.weights import save_embedder

    exclude = pair_identities(read_pairs(args.pairs))
    if args.exclude_ids:
        exclude |= set(read_identities(args.exclude_ids))
    cfg = EmbedderConfig(**({"size": args.size} if args.size else {}))
    train = EmbedderTraining(**({"epochs": args.epochs} if args.epochs else {}))
    sources = {"lfw": args.lfw, **({"celeba": args.celeba} if args.celeba else {})}
    faces, classes, counts = training_faces(sources, exclude, train.min_images)
    _log(f"embedder training set: {counts}")
    model = train_embedder(faces, classes, cfg, train, steps=args.steps, log=_log)
    extra = {"training": dataclasses.asdict(train), "excluded": len(exclude), "counts": counts, "sources": sources}
    print(f"wrote {save_embedder(args.out, model, classes, extra)}")
    return 0
