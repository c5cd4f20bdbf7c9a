"""Host syncs per training step of every configuration the shipped configs train: ours against the naive step.

For each ``launch/configs/*.yaml`` and each stage it trains, the settings that change what a step runs (stage,
network, loss, identity priors, degradation, augmentation, class balance, precision, BatchNorm, ZeRO) make its
signature; each distinct signature runs real optimizer steps of two micro-batches (accumulation 2) through
DeepSpeed on the CPU accelerator (one gloo rank, so ``batchnorm: sync`` runs its collectives), uint8 batches as
the loader gives them, under ``facesr.syncs.SyncCounter``. The tiny preset: the same layers and code as
``paper``, narrower. ``auto`` precision is bf16, what it resolves to on a GPU of compute capability 8.0 or
later (one signature also runs fp32, what older GPUs get).

"naive" is the same step with what issue 24 replaced: the robust degradation drawing its parameters on the
device and reading them back to choose subsets, kernel sizes and JPEG qualities (``naive_degrade_lr``, the
code as it was), and torch's ``nn.SyncBatchNorm``, which cannot run on a CPU: its count is read from its source
(a boolean mask on the gathered counts in every BN layer's forward, ``torch/nn/modules/_functions.py``), one
per BatchNorm layer of the trained networks, and marked as such.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "launch" / "configs"
BATCH, MICRO = 8, 4  # two micro-batches a step: accumulation is part of every probe


def signature(cfg, number: int) -> dict:
    """The settings of ``cfg`` that change what a stage-``number`` training step runs."""
    e = cfg.engine
    common = {"stage": number, "precision": "fp32" if e.precision == "fp32" else "bf16", "batchnorm": e.batchnorm,
              "zero_stage": e.zero_stage, "compile": e.compile, "ema": bool(cfg.stage_cfg(number).ema_decay)}
    if number == 1:
        s = cfg.stage1
        return {**common, "model": s.model, "augment": s.augment, "crop_pad": s.crop_pad if s.augment else 0,
                "class_balance": s.class_balance, "input": s.input}
    if number == 3:  # the detail gate: its inputs' degradation; the frozen cascade and the gate are fixed
        deg = cfg.stage3.degradation or cfg.data.degradation
        return {**common, "model": "gate", "degradation": deg if isinstance(deg, str) else "custom"}
    s = cfg.stage2
    deg = cfg.data.degradation if isinstance(cfg.data.degradation, str) else "custom"
    weights = s.perceptual_weights if s.loss == "perceptual" else ""
    return {**common, "model": s.model, "loss": s.loss, "priors": s.uses_priors, "degradation": deg,
            "identity": sorted(s.identity_scales) if s.identity_weight else [],
            "perceptual_weights": "priors" if weights == "priors" else ("file" if weights else "")}


def shipped(folder: Path = CONFIGS) -> list[tuple[dict, list[str]]]:
    """Every distinct step signature of the configs in ``folder``, with the config/stage names that train it."""
    from cluster.config import load_config

    found: dict[str, tuple[dict, list[str]]] = {}
    for path in sorted(folder.glob("*.yaml")):
        cfg = load_config(path)
        for number in cfg.run.stages:
            sig = signature(cfg, number)
            found.setdefault(json.dumps(sig, sort_keys=True), (sig, []))[1].append(f"{path.stem}:stage{number}")
    return list(found.values())


# ---------------------------------------------------------------- the naive robust degradation (before issue 24)


def naive_degrade_lr(hr: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """``facesr.degradations.degrade_lr`` as it was: parameters drawn on the generator's device and copied to the
    host (.cpu), subsets found with .nonzero(), the widest kernel read with .item(), JPEG qualities with .tolist()
    and each encoded image brought back (.cpu) for the decoder. Same operations otherwise."""
    from facesr.degradations import FACTOR, _blur, blur_kernels, resample
    from facesr.degrade import to_uint8
    from facesr.jpeg import jpeg_round_trip

    x = hr.float() / 255 if hr.dtype == torch.uint8 else hr.float()
    n, _, h, w = x.shape
    dev, g = x.device, generator

    def rand():
        return torch.rand(n, generator=g, device=g.device, dtype=torch.float64).cpu()

    def uniform(r):
        return r[0] + (r[1] - r[0]) * rand()

    def pick(weights):
        w = torch.tensor(weights, dtype=torch.float64, device=g.device)
        return torch.multinomial(w, n, True, generator=g).cpu()

    b, nz = cfg.blur, cfg.noise
    blurred = rand() < b.p
    aniso = torch.tensor([b.kinds[i] == "aniso" for i in pick(b.weights).tolist()], dtype=torch.bool)
    s1, s2 = uniform(b.sigma), uniform(b.sigma)
    theta = torch.deg2rad(uniform(b.rotation)).float()
    sigma = (torch.stack([s1, torch.where(aniso, s2, s1)], 1) * blurred[:, None]).float()
    resize = pick(cfg.resize.weights)
    phase = torch.randint(0, FACTOR, (n, 2), generator=g, device=g.device).cpu()
    gaussian = (uniform(nz.gaussian_sigma) * (rand() < nz.gaussian_p)).float()
    gray = rand() < nz.gray_p
    poisson = (uniform(nz.poisson_scale) * (rand() < nz.poisson_p)).float()
    at_hr = rand() < nz.hr_p
    quality = torch.randint(cfg.jpeg.quality[0], cfg.jpeg.quality[1] + 1, (n,), generator=g, device=g.device).cpu()
    jpeg = quality * (rand() < cfg.jpeg.p)

    def noise(y, idx):
        for scale_of, gray_too in ((poisson[idx], False), (gaussian[idx], True)):
            on = (scale_of > 0).nonzero().flatten()
            if on.numel():
                z = torch.randn((on.numel(), *y.shape[1:]), generator=g, device=g.device).to(y)
                if gray_too:
                    z = torch.where(gray[idx][on].to(dev).view(-1, 1, 1, 1), z[:, :1].expand_as(z), z)
                    y = y.index_put((on.to(dev),), y[on.to(dev)] + z * (scale_of[on].to(y) / 255).view(-1, 1, 1, 1))
                else:
                    c = y[on.to(dev)].clamp(0, 1)
                    y = y.index_put((on.to(dev),), c + (c / 255).sqrt() * z * scale_of[on].to(y).view(-1, 1, 1, 1))
        return y.clamp(0, 1)

    on = (sigma[:, 0] > 0).nonzero().flatten()
    if on.numel():
        size = min(cfg.blur.kernel_size, 2 * max(int(np.ceil(3 * sigma[on].max().item())), 1) + 1)
        x = x.index_put((on.to(dev),), _blur(x[on.to(dev)], blur_kernels(sigma[on].to(dev), theta[on].to(dev), size)))
    noisy = (gaussian > 0) | (poisson > 0)
    on = (noisy & at_hr).nonzero().flatten()
    if on.numel():
        x = x.index_put((on.to(dev),), noise(x[on.to(dev)], on))
    lr = torch.empty(n, 3, h // FACTOR, w // FACTOR, device=dev)
    for i, kind in enumerate(cfg.resize.kinds):
        idx = (resize == i).nonzero().flatten()
        if idx.numel():
            lr[idx.to(dev)] = resample(x[idx.to(dev)], (h // FACTOR, w // FACTOR), kind, phase[idx])
    on = (noisy & ~at_hr).nonzero().flatten()
    if on.numel():
        lr = lr.index_put((on.to(dev),), noise(lr[on.to(dev)], on))
    u8 = to_uint8(lr)
    on = (jpeg > 0).nonzero().flatten()
    if on.numel():
        qualities = jpeg[on].tolist()
        coded = [u8[i].cpu() for i in on.to(dev)]  # nvjpeg's encoded bytes, brought back for the decoder
        u8[on.to(dev)] = jpeg_round_trip(torch.stack(coded).to(dev), qualities)
    return u8.float() / 255


def _bn_layers(*modules) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for mod in modules if mod is not None
               for m in mod.modules())


# ---------------------------------------------------------------- the probe


def _files(tmp: Path, classes: list[str]) -> tuple[Path, Path, Path, Path]:
    """Random tiny identity priors, a random tiny face recognizer, random SqueezeNet 1.1 weights and a random tiny
    cascade: the frozen networks a step reads."""
    from facesr.models import build_prior, build_recognizer, build_sr, get_preset
    from facesr.models.perceptual import squeezenet1_1
    from facesr.vocab import TARGETS
    from facesr.weights import save_priors, save_recognizer, save_srnet

    torch.manual_seed(0)
    prior = get_preset("tiny").prior
    priors = tmp / "priors.safetensors"
    save_priors(priors, {k: build_prior(prior, len(classes)) for k in TARGETS}, prior, classes)
    recognizer = save_recognizer(tmp / "recognizer.safetensors",
                                 build_recognizer(get_preset("tiny").recognizer, len(classes)), classes)
    squeeze = tmp / "squeezenet1_1-random.pth"
    torch.save(squeezenet1_1(weights=None).state_dict(), squeeze)
    srnet = tmp / "srnet.safetensors"
    save_srnet(srnet, build_sr("cascade", preset="tiny"))
    return priors, recognizer, squeeze, srnet


def probe(sig: dict, tmp: Path, steps: int = 2, naive: bool = False) -> dict:
    """Syncs of ``steps`` optimizer steps (after one warm-up step) of the signature's stage, and of the log step."""
    from cluster.config import TrainConfig, load_config
    from cluster.engine import initialize
    from cluster.loop import train_step
    from cluster.stages import STAGES
    from facesr.losses import PriorLoss
    from facesr.step import TermSums, build_ema, resolve_precision
    from facesr.syncs import SyncCounter
    from facesr.vocab import SIZES

    classes = [f"id{i}" for i in range(10)]
    priors, recognizer, squeeze, srnet = _files(tmp, classes)
    number = sig["stage"]
    over = [f"engine.precision={sig['precision']}", f"engine.batchnorm={sig['batchnorm']}",
            f"engine.zero_stage={sig['zero_stage']}", f"engine.compile={str(sig['compile']).lower()}",
            f"stage{number}.batch_size={BATCH}", f"stage{number}.max_micro_batch={MICRO}", f"run.stages=[{number}]"]
    if number == 1:
        over += [f"stage1.augment={str(sig['augment']).lower()}", f"stage1.crop_pad={sig['crop_pad']}",
                 f"stage1.input={sig['input']}", f"stage1.model={sig['model']}"]
    elif number == 3:
        over += [f"stage3.srnet={srnet}", f"stage3.degradation={sig['degradation']}"]
    else:
        over += [f"stage2.model={sig['model']}", f"stage2.loss={sig['loss']}", f"data.degradation={sig['degradation']}",
                 f"stage2.alpha={0.001 if sig['priors'] and sig['loss'] == 'csrip' else 0}"]
        if sig["perceptual_weights"]:
            weights = "priors" if sig["perceptual_weights"] == "priors" else squeeze
            over.append(f"stage2.perceptual_weights={weights}")
        if sig["priors"]:
            over.append(f"stage2.priors={priors}")
        if sig["identity"]:
            over += ["stage2.identity_weight=0.1", f"stage2.identity_scales=[{','.join(sig['identity'])}]",
                     f"stage2.recognizer={recognizer}"]
    cfg: TrainConfig = load_config(None, over)
    device = torch.device("cpu")
    precision = resolve_precision(sig["precision"], device)
    stage = STAGES[number](cfg, classes, device, precision)
    if number == 1 and sig["class_balance"]:  # the weights come from the manifest; the step uses them the same way
        stage.loss_fn = PriorLoss(torch.linspace(0.5, 2.0, len(classes)))
    if naive and number == 2 and not stage.fixed:
        stage.train_batch = lambda batch, g: {**batch, "lr": precision.tensor(naive_degrade_lr(batch["hr"],
                                                                                               stage.degradation, g))}
    torch.manual_seed(0)
    model = stage.build_model()
    critic = stage.build_critic()
    eng, b = initialize(model, stage.stage_cfg, cfg.engine, 1)
    critic_eng = initialize(critic, stage.stage_cfg, cfg.engine, 1)[0] if critic is not None else None
    ema = build_ema(model, 0.999 if sig.get("ema") else 0)  # the weights' moving average, updated after each step
    gen = torch.Generator().manual_seed(number)

    def micro() -> dict:
        batch = {k: torch.randint(0, 256, (b.micro_batch, 3, s, s), dtype=torch.uint8, generator=gen)
                 for k, s in SIZES.items()}
        batch["cls"] = torch.tensor([0, -1, 3, 9, 1, 2, 5, 7][: b.micro_batch])
        return batch

    sums = TermSums()
    train_step(eng, stage, [micro() for _ in range(b.accumulation)], sums, device, precision, (0, 0, 0, 0), critic_eng)
    if ema is not None:
        ema.update(eng.module, step=1)
    sums.mean()  # warm-up step (optimizer state, cached kernels) outside the count
    with SyncCounter() as c:
        for i in range(1, steps + 1):
            train_step(eng, stage, [micro() for _ in range(b.accumulation)], sums, device, precision,
                       (0, 0, 0, i * b.accumulation), critic_eng)
            if ema is not None:
                ema.update(eng.module, step=i + 1)
    step_syncs = c.total / steps
    where = sorted(set(c.where))[:20]
    with SyncCounter() as c:
        terms = sums.mean()
    out = {"syncs_per_step": step_syncs, "step_syncs": where, "log_syncs": c.total, "terms": sorted(terms),
           "accumulation": b.accumulation}
    if naive and sig["batchnorm"] == "sync":  # torch's SyncBatchNorm: one masked gather per BN layer and forward
        bn = _bn_layers(eng.module, critic)
        out["syncs_per_step"] += bn * b.accumulation
        out["torch_syncbatchnorm_from_source"] = bn * b.accumulation
    return out


def run_bench(steps: int = 2, naive: bool = True, folder: Path = CONFIGS, log=print) -> dict:
    """Every shipped signature (and the first stage-2 one in fp32), ours and naive; the figures and the JSON."""
    from cluster.gpu_check import init_one_rank

    init_one_rank("gloo")
    sigs = shipped(folder)
    first2 = next(s for s, _ in sigs if s["stage"] == 2)  # + the full robust mix (its JPEG step; no shipped
    sigs.append(({**first2, "precision": "fp32", "degradation": "robust"},  # config trains it since issue 25)
                 ["(data.degradation=robust; fp32: auto on GPUs before compute capability 8.0)"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sig, names in sigs:
            t0 = time.perf_counter()
            ours = probe(sig, Path(tmp), steps)
            row = {"signature": sig, "configs": names, "ours": ours}
            if naive:
                row["naive"] = probe(sig, Path(tmp), steps, naive=True)
            rows.append(row)
            label = ", ".join(f"{k}={v}" for k, v in sig.items() if v not in ("", False) and k != "stage")
            naive_s = f"{row['naive']['syncs_per_step']:g} -> " if naive else ""
            log(f"stage {sig['stage']} [{label}]: host syncs/step {naive_s}{ours['syncs_per_step']:g}, "
                f"log step {ours['log_syncs']} ({', '.join(names)}; {time.perf_counter() - t0:.0f}s)")
            for w in ours["step_syncs"]:
                log(f"    {w}")
    return {"bench": "syncs", "torch": torch.__version__, "steps": steps, "micro_batches_per_step": BATCH // MICRO,
            "rows": rows}


def configure(p) -> None:
    p.add_argument("--steps", type=int, default=2, help="counted optimizer steps per configuration")
    p.add_argument("--no-naive", action="store_true", help="only this code's step")
    p.add_argument("--out", default="bench/syncs.json")


def run(args) -> int:
    result = run_bench(args.steps, not args.no_naive)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0
