"""Saving and loading trained networks as safetensors (no pickle anywhere).

A weights file carries its own description in the safetensors metadata: what
it is (``kind``), the preset / config it was built from, and for priors the
class map they were trained on (its names and a sha256), so a stage-2 run or
an evaluation can refuse priors trained on another class map.

The metadata decides what is built, so it is checked against the file's own
tensors first (``_verify``): every number it holds must fit the tensors' count
and sizes (a 164-byte file saying ``width=12000`` is refused before anything
is allocated), then the network is built on the meta device (no memory) and
its state dict's names and shapes must equal the file's, read from the header.
Only then is it built for real and loaded. Every refusal is a ``ValueError``
naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, safe_open, save_file

from .models import (
    SR_MODELS, EmbedderConfig, FaceEmbedder, FrozenPrior, PriorConfig, Recognizer, RecognizerConfig, build_prior,
    build_sr, get_preset, sr_config, sr_model_name,
)
from .models.embedder import freeze
from .models.perceptual import SqueezeFeatures
from .vocab import TARGETS


def classes_digest(classes: list[str]) -> str:
    """sha256 of the class map (index order matters)."""
    return hashlib.sha256("\n".join(classes).encode()).hexdigest()


def _save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)  # never a half-written file under the final name


def read_meta(path: str | Path) -> dict:
    """The metadata of a weights file; clear error if it is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a safetensors weights file ({_short(e)})") from None
    if "kind" not in raw:
        raise ValueError(f"{path}: safetensors file without facesr metadata (kind)")
    try:
        return {k: json.loads(v) for k, v in raw.items()}
    except ValueError as e:
        raise ValueError(f"{path}: facesr metadata is not JSON ({_short(e)})") from None


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _shapes(path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the file's header alone (no tensor data read)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _numbers(value) -> list[int]:
    """Every integer in a metadata value (nested lists and mappings)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [n for v in value for n in _numbers(v)] if isinstance(value, list) else []


def _check(path, config, build, part=lambda net: net) -> None:
    """Check the metadata ``config`` that ``build()`` builds from against the file's tensors: a network whose every count and width fits no more than the file's tensors hold (no number larger than
    their count or their largest side), built on the meta device, must have exactly the file's tensor names and
    shapes (those of ``part(network)``, the piece the file holds)."""
    shapes = _shapes(path)
    bound = max([len(shapes)] + [d for s in shapes.values() for d in s])
    big = [n for n in _numbers(config) if n > bound]
    if big:
        raise ValueError(f"{path}: metadata asks for a network with a size of {max(big):,}, but the file's "
                         f"{len(shapes)} tensors are at most {bound:,} wide: metadata and weights do not belong together")
    try:
        with torch.device("meta"):  # shapes only: nothing allocated whatever the metadata says
            want = {k: tuple(v.shape) for k, v in part(build()).state_dict().items()}
    except Exception as e:  # metadata of the wrong types or values for this network
        if isinstance(e, ValueError) and str(e).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: metadata does not describe a network this facesr builds ({_short(e)})") from None
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or extra:
        raise ValueError(f"{path}: tensors do not match its metadata ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    for k, shape in want.items():
        if shapes[k] != shape:
            raise ValueError(f"{path}: tensor {k} has shape {list(shapes[k])}, its metadata builds {list(shape)}")


def _verify(path, config, build, part=lambda net: net) -> nn.Module:
    """``build()``'s network with the file's weights, built for real only once ``_check`` passed: what it
    allocates is then the size of the file."""
    _check(path, config, build, part)
    net = build()
    part(net).load_state_dict(load_file(str(path), device="cpu"))
    return net


def save_priors(path, priors: dict[str, nn.Module], cfg: PriorConfig, classes: list[str], extra: dict | None = None):
    """Three priors (keys x2, x4, hr) in one file, with the class map they were trained on."""
    tensors = {f"{k}.{n}": t for k, m in priors.items() for n, t in _unwrap(m).state_dict().items()}
    meta = {
        "kind": "priors",
        "keys": sorted(priors),
        "prior": dataclasses.asdict(cfg),
        "num_classes": len(classes),
        "classes": classes,
        "classes_sha256": classes_digest(classes),
        **(extra or {}),
    }
    _save(path, tensors, meta)


def check_priors(path, classes: list[str] | None = None, preset: str | None = None) -> dict:
    """The metadata of a priors file from ``save_priors``; ValueError unless it holds priors, trained on
    ``classes`` (when given) and built as model preset ``preset``'s priors (when given). The one check of a
    priors file: the run's config check and every loader use it."""
    meta = read_meta(path)
    if meta.get("kind") != "priors":
        raise ValueError(f"{path}: holds {str(meta.get('kind'))[:40]!r}, not priors")
    if not isinstance(meta.get("prior"), dict) or not isinstance(meta.get("classes"), list):
        raise ValueError(f"{path}: priors metadata without its prior config and class list")
    _check(path, meta, lambda: _PriorSet(meta, path))
    if classes is not None and meta.get("classes_sha256") != classes_digest(classes):
        raise ValueError(
            f"{path}: priors were trained on another class map ({meta.get('num_classes')} classes, "
            f"sha256 {str(meta.get('classes_sha256'))[:12]}) than this data ({len(classes)} classes, "
            f"sha256 {classes_digest(classes)[:12]})"
        )
    if preset is not None:
        want = dataclasses.asdict(get_preset(preset).prior)
        # fields added since a file was written take their defaults (priors from before `norm` had none)
        if dataclasses.asdict(PriorConfig(**meta.get("prior", {}))) != want:
            raise ValueError(f"{path}: priors built as {meta.get('prior')}, preset {preset!r} wants {want} "
                             "(priors from an older facesr or another preset: train stage 1 again)")
    return meta


def load_priors(path, device: str | torch.device = "cpu", classes: list[str] | None = None) -> dict[str, FrozenPrior]:
    """Frozen priors from ``save_priors``; with ``classes`` given, refuse priors of another class map."""
    meta = check_priors(path, classes)  # metadata and tensor shapes checked there
    both = _PriorSet(meta, path)
    both.load_state_dict(load_file(str(path), device="cpu"))
    return {k: FrozenPrior(m.to(device), input=meta.get("input", "residual")) for k, m in both.items()}  # older: residual


class _PriorSet(nn.ModuleDict):
    """The priors a priors file's metadata describes, under the names ``save_priors`` gave their tensors."""

    def __init__(self, meta: dict, path):
        keys, n = meta.get("keys"), meta.get("num_classes")
        if not isinstance(keys, list) or not keys or not set(keys) <= set(TARGETS) or len(set(keys)) != len(keys):
            raise ValueError(f"{path}: metadata keys {str(keys)[:80]} are not distinct names among {list(TARGETS)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n != len(meta.get("classes") or []):
            raise ValueError(f"{path}: metadata num_classes {str(n)[:40]} does not match its class list")
        cfg = PriorConfig(**meta["prior"])
        super().__init__({k: build_prior(cfg, n) for k in keys})


def save_srnet(path, net: nn.Module, extra: dict | None = None) -> None:
    """An SR network of ``SR_MODELS`` (the cascade with all branches, or a Table 1 peer) with its name and config."""
    net = _unwrap(net)
    meta = {"kind": "srnet", "model": sr_model_name(net), "sr": dataclasses.asdict(net.cfg), **(extra or {})}
    _save(path, net.state_dict(), meta)


def load_srnet(path, device: str | torch.device = "cpu") -> nn.Module:
    """The SR network of a ``save_srnet`` file, in eval mode: ``model(lr)`` gives its outputs by target."""
    meta = read_meta(path)
    if meta["kind"] != "srnet":
        raise ValueError(f"{path}: holds {str(meta['kind'])[:40]!r}, not an SR network")
    model = meta.get("model", "cascade")  # files written before the peers existed hold the cascade
    if not isinstance(model, str) or model not in SR_MODELS:
        raise ValueError(f"{path}: SR model {str(model)[:40]!r} unknown to this facesr ({', '.join(SR_MODELS)})")
    sr = meta.get("sr")
    if not isinstance(sr, dict):
        raise ValueError(f"{path}: srnet metadata without its network config (sr)")
    if model == "cascade":
        sr = {"branch_act": "relu", **sr}  # files written before branch_act existed had ReLU branches
    cfg_cls = type(sr_config("tiny", model))
    net = _verify(path, sr, lambda: build_sr(model, cfg_cls(**{k: tuple(v) if isinstance(v, list) else v
                                                                for k, v in sr.items()})))
    return net.to(device).eval()


# torchvision's ImageNet squeezenet1_1 (SqueezeNet1_1_Weights.IMAGENET1K_V1), the feature network of ℓp
SQUEEZENET_URL = "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"


def squeezenet_file(spec: str, download: bool = True, url: str = SQUEEZENET_URL) -> Path:
    """The file of ℓp's SqueezeNet weights: ``spec`` a local file (torchvision's ``.pth`` or a ``.safetensors``
    of the same state dict), or ``imagenet``: torchvision's ImageNet weights in torch hub's cache
    (``$TORCH_HOME/hub/checkpoints``), downloaded there when absent and ``download`` by torch hub's own
    ``download_url_to_file``, which checks the file's sha256 against the hash prefix in its name (torchvision's
    convention) and moves it into place only then. FileNotFoundError saying what to do when neither is there."""
    if spec != "imagenet":
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such SqueezeNet weights file")
        return path
    name = url.rsplit("/", 1)[1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if path.is_file():
        return path
    hint = (f"download {url} (torchvision's ImageNet squeezenet1_1) to {path}, or give its path "
            "(stage2.perceptual_weights=FILE)")
    if not download:
        raise FileNotFoundError(f"SqueezeNet ImageNet weights not in torch hub's cache: {hint}")
    prefix = torch.hub.HASH_REGEX.search(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix.group(1) if prefix else None)
    except OSError as e:
        raise FileNotFoundError(f"cannot download SqueezeNet ImageNet weights ({e}): {hint}") from None
    except RuntimeError as e:  # torch.hub's hash check: the partial file is already removed
        raise ValueError(f"{url}: downloaded file fails its sha256 check ({' '.join(str(e).split())[:200]})") from None
    return path


def load_squeezenet(spec: str, device: str | torch.device = "cpu", download: bool = True) -> SqueezeFeatures:
    """ℓp's frozen fire2-4 feature network from ``squeezenet_file(spec)``: safetensors, or a torch file read
    with ``weights_only=True`` (plain tensors only: no code runs); ValueError naming the file otherwise."""
    path = squeezenet_file(spec, download)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        return SqueezeFeatures(state).to(device)
    except Exception as e:  # a wrong file: not a squeezenet1_1 state dict, or not loadable without pickle code
        raise ValueError(f"{path}: not torchvision squeezenet1_1 weights ({' '.join(str(e).split())[:300]})") from None


def save_embedder(path, model: FaceEmbedder, classes: list[str], extra: dict | None = None) -> Path:
    """facesr's own verification judge with its architecture and the identities it was trained on."""
    meta = {"kind": "embedder", "config": dataclasses.asdict(model.cfg), "classes": classes, **(extra or {})}
    _save(path, model.net.state_dict(), meta)
    return Path(path)


def load_embedder(path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A frozen embedder and its metadata (training identities, training settings, exclusions, …): ``facesr eval
    embedder``'s, or stage 1's recognizer (flip-averaged unit embeddings, as the embedder gives)."""
    meta = read_meta(path)
    if meta["kind"] == "recognizer":  # stage 1's recognizer verifies faces too (held-out verification, issue 25)
        model, meta = load_recognizer(path, device)
        return _FlipAveraged(model), {**meta, "config": meta["recognizer"]}
    if meta["kind"] != "embedder":
        raise ValueError(f"{path}: holds {str(meta['kind'])[:40]!r}, not a face embedder")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("classes"), list):
        raise ValueError(f"{path}: embedder metadata without its config and class list")
    fields = {f.name for f in dataclasses.fields(EmbedderConfig)}  # files written before the split also held training settings
    cfg = EmbedderConfig(**{k: v for k, v in meta["config"].items() if k in fields})
    size = {"config": meta["config"], "classes": len(meta["classes"])}
    model = _verify(path, size, lambda: FaceEmbedder(cfg, num_classes=len(meta["classes"])), lambda m: m.net)
    return freeze(model.to(device)), meta


def save_recognizer(path, model: Recognizer, classes: list[str], extra: dict | None = None) -> Path:
    """Stage 1's face recognizer (trunk and class centres) with its architecture and the class map it learnt."""
    model = _unwrap(model)
    meta = {"kind": "recognizer", "recognizer": dataclasses.asdict(model.cfg), "num_classes": len(classes),
            "classes": classes, "classes_sha256": classes_digest(classes), **(extra or {})}
    _save(path, model.state_dict(), meta)
    return Path(path)


def check_recognizer(path) -> dict:
    """The metadata of a ``save_recognizer`` file; ValueError unless it holds a recognizer."""
    meta = read_meta(path)
    if meta.get("kind") != "recognizer":
        raise ValueError(f"{path}: holds {meta.get('kind')!r}, not a face recognizer (stage1.model=recognizer)")
    return meta


def load_recognizer(path, device: str | torch.device = "cpu") -> tuple[Recognizer, dict]:
    """A frozen recognizer (eval mode that stays eval, no weight gradients; gradients still reach its input)
    and its metadata."""
    meta = check_recognizer(path)
    model = Recognizer(RecognizerConfig(**meta["recognizer"]), num_classes=meta["num_classes"])
    model.load_state_dict(load_file(str(path), device="cpu"))
    model.frozen = True
    model.eval().requires_grad_(False)
    return model.to(device), meta


class _FlipAveraged(nn.Module):
    """A recognizer as a verification judge's embedder: unit embeddings of each face and its mirror, averaged."""

    def __init__(self, recognizer: Recognizer):
        super().__init__()
        self.recognizer = recognizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.recognizer.embed(x) + self.recognizer.embed(x.flip(-1)), dim=1)


def _unwrap(m: nn.Module) -> nn.Module:
    while hasattr(m, "module") and isinstance(m.module, nn.Module):  # DeepSpeed / DDP
        m = m.module
    return m.model if isinstance(m, FrozenPrior) else m
