"""Evaluation speed: face-rows scored per second by `facesr eval quality --degradations`, against the naive path.

Both score the same real faces under the same lr degradations with the same model in one process:

* naive: what evaluation did before issue 27 — for every degradation row, nearest, bicubic and the model's full
  cascade at every scale, each image scored by torchmetrics' PSNR and its SSIM twice (standard and paper
  constants, each a 2-D 11x11 Gaussian convolution);
* facesr: ``facesr.evaluate.score_degradations`` — both SSIMs from one set of moments (separable Gaussian as
  matmuls), the clean target's moments once per batch for every row and method, every scale and nearest in the
  paper row only, the robustness rows x8 of bicubic and the model's deploy network, the model channels_last and
  in bf16 autocast where the CPU computes bf16 natively (``--precision``, as `facesr eval` chooses).

The naive path runs twice: in a fresh process with glibc's allocator as it comes (how evaluation ran before;
the headline ratio), and in this one, after ``facesr.hardware.retain_freed_memory`` (what the allocator
setting alone gives the naive path: it halves its time, so the ratio against it shows the code's own share).
A face-row is one face under one degradation. Figures go to ``bench/eval.json`` with the machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

ROOT = Path(__file__).resolve().parents[2]
ROWS = "paper,decimate0,bicubic_aa,area,bilinear_noise,jpeg50,heldout"


def configure(p) -> None:
    p.add_argument("--faces", default=str(ROOT.parent / "shared" / "data" / "lfw"), help="identity folder")
    p.add_argument("--model", default="", help="SR weights or run folder (default: a tiny cascade, random weights)")
    p.add_argument("-n", "--images", type=int, default=64, help="faces scored by each path")
    p.add_argument("--degradations", default=ROWS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="facesr path's models")
    p.add_argument("--out", default="bench/eval.json")


def _naive_scores(pred: torch.Tensor, target: torch.Tensor) -> dict:
    from facesr.quality import PAPER_DATA_RANGE

    return {"psnr": peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3)),
            "ssim": structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none"),
            "ssim_paper": structural_similarity_index_measure(pred, target, data_range=PAPER_DATA_RANGE,
                                                              reduction="none")}


@torch.inference_mode()
def naive(model, batches: list[dict], rows: list[str]) -> dict:
    """Every method at every scale for every row, two torchmetrics SSIMs per image; returns the mean x8 PSNR per
    (row, method), to check that both paths score the same numbers."""
    from facesr.degradations import lr_under
    from facesr.quality import baselines, finish
    from facesr.vocab import KEY_OF, SCALES

    sums: dict = {}
    for batch in batches:
        for d in rows:
            lr = lr_under(d, batch)
            outs = baselines(lr)
            sr = model(lr)
            outs["model"] = {s: finish(sr[KEY_OF[s]]) for s in SCALES}
            for method, by_scale in outs.items():
                for s, img in by_scale.items():
                    sc = _naive_scores(img, batch[KEY_OF[s]])
                    if s == "x8":
                        sums[(d, method)] = sums.get((d, method), 0.0) + float(sc["psnr"].sum())
    n = sum(len(b["lr"]) for b in batches)
    return {k: v / n for k, v in sums.items()}


def _setup(faces_dir: str, images: int, batch_size: int, model_path: str):
    """The decoded batches (both paths time scoring, not JPEG reading) and the model, the same in any process."""
    from facesr.evaluate import folder_batches, list_faces, select
    from facesr.infer import load_cascade
    from facesr.models import PRESETS, SRNet

    batches = list(folder_batches(select(list_faces(faces_dir), images, 0), batch_size))
    if model_path:
        return batches, load_cascade(model_path, "cpu")
    torch.manual_seed(0)
    return batches, SRNet(PRESETS["tiny"].sr).eval()


def _naive_timed(faces_dir: str, images: int, batch_size: int, model_path: str, rows: list[str],
                 threads: int) -> tuple[dict, float, dict]:
    """``naive`` on freshly set-up inputs: (mean x8 PSNRs, seconds, this process's machine_info)."""
    from facesr.hardware import machine_info

    torch.set_num_threads(threads)
    batches, model = _setup(faces_dir, images, batch_size, model_path)
    t0 = time.perf_counter()
    ref = naive(model, batches, rows)
    return ref, time.perf_counter() - t0, machine_info()


def run(args) -> int:
    import multiprocessing

    from facesr.evaluate import score_degradations
    from facesr.hardware import machine_info
    from facesr.infer import Fast, inference_bf16

    rows = [r for r in args.degradations.split(",") if r]
    batches, model = _setup(args.faces, args.images, args.batch_size, args.model)
    n = sum(len(b["lr"]) for b in batches)
    print(f"bench eval: {n} faces x {len(rows)} rows ({', '.join(rows)}), {torch.get_num_threads()} threads", flush=True)

    bf16 = inference_bf16(args.precision, "cpu")
    fast = Fast(model, bf16)  # a BatchNorm-folded copy of the naive path's network
    t0 = time.perf_counter()
    ours, _ = score_degradations({"model": fast}, iter(batches), rows)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = naive(model, batches, rows)
    t_naive = time.perf_counter() - t0
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh interpreter: glibc's allocator as it comes
        ref_default, t_default, child = pool.apply(
            _naive_timed, (args.faces, args.images, args.batch_size, args.model, rows, torch.get_num_threads()))
    worst = max(abs(ours[d][m]["x8"]["psnr"] - r[(d, m)]) for r in (ref, ref_default) for d in rows
                for m in ("bicubic", "model"))
    rate = n * len(rows)
    result = {
        "machine": machine_info(),
        "faces": n, "rows": rows, "threads": torch.get_num_threads(), "model": args.model or "tiny (random)",
        "facesr_models": "bf16 autocast" if bf16 else "fp32", "naive_models": "fp32",
        "naive_default_allocator_s": t_default, "naive_s": t_naive, "facesr_s": t_ours,
        "naive_default_allocator_freed_memory_retained": child["freed_memory_retained"],
        "naive_default_allocator_face_rows_per_s": rate / t_default,
        "naive_face_rows_per_s": rate / t_naive, "facesr_face_rows_per_s": rate / t_ours,
        "speedup": t_default / t_ours, "speedup_same_allocator": t_naive / t_ours,
        "max_x8_psnr_difference_db": worst,
    }
    print(f"naive, allocator as it comes  {result['naive_default_allocator_face_rows_per_s']:8.1f} face-rows/s  "
          f"({t_default:.1f} s, a fresh process)\n"
          f"naive, freed memory retained  {result['naive_face_rows_per_s']:8.1f} face-rows/s  ({t_naive:.1f} s)\n"
          f"facesr                        {result['facesr_face_rows_per_s']:8.1f} face-rows/s  ({t_ours:.1f} s)\n"
          f"speedup {result['speedup']:.1f}x over evaluation as it ran before, {result['speedup_same_allocator']:.1f}x "
          f"with the allocator setting given to both; x8 PSNR agrees within {worst:.2e} dB "
          f"(facesr's models in {result['facesr_models']}, naive's in fp32)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
