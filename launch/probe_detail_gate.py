"""Probe for issue 25 (seventeenth session): the detail strength chosen per input, not once for all inputs.

Not a shipped feature: the figures it gave are in the README ("The identity term as shipped": a strength per
input); building it into training, `facesr sr` and the exports is the next step. One fixed strength cannot serve
every input: the faces JPEG- or WebP-compressed at 24² keep their person best at 0.2-0.4, the paper's row loses
its PSNR gain there. So a small CNN (the "gate") learns, from the 24² input alone, the strength that maximises
PSNR for that face, ``<c, hr - bicubic> / <c, c>`` for the network's full x8 correction ``c``, on training faces
made small by the ``robust`` mix (our degradations, JPEG included: never the evaluation's rows); the output is
``bicubic + clamp(k * gate(lr), 0, 1) * (network - bicubic)``, with ``k`` chosen on the validation identities.

    python -m launch.probe_detail_gate fit RUN GATE.pt [--faces 3000]      # ~3 min on 2 cores
    python -m launch.probe_detail_gate eval GATE.pt 0.6,0.7 identity RUN --judge dlib ...   # facesr eval's args
    python -m launch.probe_detail_gate eval GATE.pt 0.7 quality RUN --data ... --degradations ...

``eval`` runs ``facesr eval identity|quality`` unchanged but for the models it scores: RUN's network at full
strength, gated at each ``k`` (labels ``NAME@gateK``).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn

LFW = "../shared/data/lfw"


def make_gate() -> nn.Sequential:
    """lr (B, 3, 24, 24) in [0, 1] (centred by the caller) -> one strength a face (B, 1)."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 1))


class Gated(nn.Module):
    """``net`` (a cascade at full strength, e.g. ``facesr.infer.Fast``) with its x8 correction scaled per face."""

    def __init__(self, net: nn.Module, gate: nn.Module, k: float, deployed: bool = False):
        super().__init__()
        self.net, self.gate, self.k, self.deployed = net, gate, k, deployed

    def deploy(self) -> "Gated":
        return Gated(self.net.deploy(), self.gate, self.k, deployed=True)

    @torch.no_grad()
    def forward(self, lr: torch.Tensor):
        from facesr.quality import upscale

        sr = self.net(lr)
        sr = sr["hr"] if isinstance(sr, dict) else sr
        bic = upscale(lr, 192, "bicubic")
        d = (self.k * self.gate(lr.float() - 0.5)).clamp(0, 1).view(-1, 1, 1, 1)
        out = bic + d * (sr.float() - bic)
        return out if self.deployed else {"hr": out}


def _full_strength(run: str) -> nn.Module:
    from facesr.detail import at_detail
    from facesr.infer import load_cascade

    return at_detail(load_cascade(run, "cpu"), run, 1.0).deploy().eval()


def _psnr_optimal(net: nn.Module, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    from facesr.quality import upscale

    with torch.no_grad():
        bic = upscale(lr, 192, "bicubic")
        c = (net(lr).float() - bic).flatten(1)
        t = (hr - bic).flatten(1)
        return (c * t).sum(1) / (c * c).sum(1).clamp_min(1e-8)


def fit(args) -> int:
    from facesr.degradations import DEGRADATIONS, EVAL_DEGRADATIONS, degrade_lr
    from facesr.evaluate import folder_batches, list_faces, select
    from launch.eval import _manifest_identities

    torch.manual_seed(0)
    t0 = time.time()
    net = _full_strength(args.run)
    people = _manifest_identities(args.manifest, "train", LFW)
    faces = select(list_faces(LFW, people), args.faces, 0)
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for b in folder_batches(faces, 100):
        hr = b["hr"].float()
        for _ in range(2):  # two draws of the robust mix a face
            lr = degrade_lr(hr, DEGRADATIONS["robust"], g)
            xs.append(lr)
            ys.append(_psnr_optimal(net, lr, hr))
    x, y = torch.cat(xs), torch.cat(ys).clamp(0, 2.5)
    print(f"{len(x)} training inputs in {time.time() - t0:.0f} s; PSNR-optimal strength {y.mean():.3f} ± {y.std():.3f}")
    gate = make_gate()
    opt = torch.optim.Adam(gate.parameters(), 2e-3)
    order = torch.randperm(len(x))
    n_fit = int(0.9 * len(x))
    train, held = order[:n_fit], order[n_fit:]
    for epoch in range(30):
        shuffled = train[torch.randperm(n_fit)]
        for i in range(0, n_fit, 128):
            j = shuffled[i : i + 128]
            loss = ((gate(x[j] - 0.5).squeeze(1) - y[j]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 10 == 9:
            with torch.no_grad():
                rmse = ((gate(x[held] - 0.5).squeeze(1) - y[held]) ** 2).mean().sqrt()
            print(f"epoch {epoch + 1}: held-out RMSE {rmse:.3f} (their spread {y[held].std():.3f})")
    gate.eval()
    torch.save(gate.state_dict(), args.out)
    val = list_faces(LFW, _manifest_identities(args.manifest, "val", LFW))
    pred: dict[str, list[float]] = {r: [] for r in EVAL_DEGRADATIONS}
    best: dict[str, list[float]] = {r: [] for r in EVAL_DEGRADATIONS}
    for b in folder_batches(val, 128):
        hr = b["hr"].float()
        for r, make_lr in EVAL_DEGRADATIONS.items():
            lr = make_lr(hr)
            with torch.no_grad():
                pred[r] += gate(lr - 0.5).squeeze(1).tolist()
            best[r] += _psnr_optimal(net, lr, hr).tolist()
    print("validation faces, each row: predicted strength / PSNR-optimal (means)")
    for r in EVAL_DEGRADATIONS:
        p, t = torch.tensor(pred[r]), torch.tensor(best[r])
        print(f"  {r:15s} {p.mean():.2f} / {t.mean():.2f}")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return 0


def evaluate(args) -> int:
    import launch.eval as eval_cli
    from launch.cli import main

    gate = make_gate()
    gate.load_state_dict(torch.load(args.gate, weights_only=True))
    gate.eval()
    ks = [float(k) for k in args.ks.split(",")]
    load = eval_cli._load_models

    def gated(paths, device, precision="fp32", tta="none", details=None):
        models, where = load(paths, device, precision, tta, [1.0])
        out, src = {}, {}
        for name, net in models.items():
            for k in ks:
                label = f"{name.split('@')[0]}@gate{k:g}"
                out[label], src[label] = Gated(net, gate, k), f"{where[name]} (gate {args.gate}, k {k:g})"
        return out, src

    eval_cli._load_models = gated
    return main(["eval", *args.rest])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.probe_detail_gate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="train the gate on RUN's training faces")
    f.add_argument("run")
    f.add_argument("out")
    f.add_argument("--manifest", default="runs/demo/shards")
    f.add_argument("--faces", type=int, default=3000)
    e = sub.add_parser("eval", help="facesr eval identity|quality with RUN gated")
    e.add_argument("gate")
    e.add_argument("ks")
    e.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    return fit(args) if args.cmd == "fit" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
