"""`facesr info --preset NAME [--json]`: what a preset builds."""

from __future__ import annotations

import json

from facesr.models import PRESETS
from facesr.profile import describe


def configure(p) -> None:
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--classes", type=int, default=10575, help="prior classes (CASIA-WebFace: 10,575)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    d = describe(args.preset, args.classes)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    sr, pr = d["sr"], d["prior"]
    print(f"preset {d['preset']}")
    print(f"SR cascade: input {tuple(sr['input'])}")
    for key, s in sr["stages"].items():
        print(f"  {key:>3}: features {tuple(s['features'])} -> image {tuple(s['image'])}")
    print(f"  conv layers: {sr['conv_layers_total']} (depth LR->x8: {sr['conv_depth_lr_to_x8']})")
    print(f"  params: {sr['params']:,} (deploy {sr['params_deploy']:,})")
    print(f"  forward GFLOPs/image: {sr['gflops_train_forward']:.2f} (deploy {sr['gflops_deploy_forward']:.2f})")
    print(f"prior {pr['name']} ({pr['num_classes']} classes): {pr['conv_layers']} conv layers, {pr['params']:,} params")
    for key, s in pr["per_scale"].items():
        print(f"  {key:>3}: input {tuple(s['input'])}, forward GFLOPs/image {s['gflops_forward']:.3f}")
    return 0
