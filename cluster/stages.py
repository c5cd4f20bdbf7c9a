"""What differs between the training stages: model, forward, validation, final artefact.

The generic worker loop (``cluster.loop``) asks a ``Stage`` for these and does
the rest (engine, data, checkpoints, logging) the same way for all three: 1 the
priors (or the recognizer), 2 the cascade, 3 the cascade's detail gate.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Protocol

import torch
import torch.nn as nn

from facesr.augment import flip_crop
from facesr.detail import at_detail, with_detail, with_gate
from facesr.degradations import PAPER, degrade_lr, sample_params
from facesr.losses import AdversarialLoss, CSRIPLoss, MarginLoss, MSELoss, PerceptualLoss, PriorLoss
from facesr.models import DetailGate, build_critic, build_prior, build_recognizer, build_sr, get_preset
from facesr.models.perceptual import PriorFeatures
from facesr.quality import finish, image_scores
from facesr.resample import upsample_bicubic
from facesr.step import Precision, gate_forward, prior_forward, sr_forward
from facesr.vocab import KEY_OF, SCALE_OF, TARGETS
from facesr.weights import (load_priors, load_recognizer, load_squeezenet, load_srnet, read_meta, save_priors,
                            save_recognizer, save_srnet)
from shards.manifest import class_counts, read_manifest
from shards.store import local_copy, staged

from .config import StageConfig, TrainConfig


class Stage(Protocol):
    """What the worker loop needs from a training stage (``STAGES[number](cfg, classes, device, precision)``)."""

    number: ClassVar[int]  # 1 = priors, 2 = cascade, 3 = its gate: run.stages, done markers, checkpoint folders
    telemetry_name: ClassVar[str]  # the `stage` label of its metrics
    stage_cfg: StageConfig  # its optimiser and schedule (cfg.stage1 / cfg.stage2 / cfg.stage3)

    def build_model(self) -> nn.Module: ...  # the trained module (DeepSpeed wraps it)

    def build_critic(self) -> nn.Module | None: ...  # a second network trained beside it (SRGAN's discriminator)

    def begin_epoch(self, epoch: int) -> None: ...  # before each training epoch (schedules inside the loss)

    def train_batch(self, batch: dict, generator: torch.Generator) -> dict: ...  # on the device: augment/degrade

    def val_batch(self, batch: dict, generator: torch.Generator) -> dict: ...

    # named terms, "loss" among them (and "critic_loss", the critic's, when there is one)
    def forward(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]: ...

    def validate_batch(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]: ...

    def finish(self, model: nn.Module, run_dir: Path) -> Path: ...  # rank 0: the stage's artefact


def prior_baselines(manifest: dict, split: str) -> dict[str, float]:
    """What a prior that ignores its input scores on ``split``: chance (1/C) and always the largest class."""
    counts = class_counts(manifest, split) if split in ("train", "prior_val") else []
    c = manifest["num_classes"]
    return {"acc_chance": 1 / max(c, 1), "acc_majority": max(counts, default=0) / max(sum(counts), 1)}


class PriorStage:
    """Stage 1: three SqueezeNet priors on residual images of x2, x4, hr (or whole images: stage1.input);
    cross-entropy. Or (stage1.model=recognizer) one face recognizer on whole hr faces with a margin loss, for
    stage 2's identity term; same data, loop, metrics (ce, acc, acc5 at x8) and validation."""

    number = 1
    telemetry_name = "prior"

    def __init__(self, cfg: TrainConfig, classes: list[str], device: torch.device, precision: Precision):
        self.cfg, self.classes, self.device, self.precision = cfg, classes, device, precision
        self.stage_cfg = cfg.stage1
        weight = self._class_weight() if self.stage_cfg.class_balance else None
        if self.stage_cfg.model == "recognizer":
            self.loss_fn = MarginLoss(self.stage_cfg.margin, self.stage_cfg.margin_m, self.stage_cfg.margin_s, weight)
        else:
            self.loss_fn = PriorLoss(weight)
        self.baselines: dict[str, float] | None = None  # chance and majority rates, read at the first validation

    def _class_weight(self) -> torch.Tensor:
        """Inverse class frequency in the training split, mean 1 over the classes that have training images."""
        manifest = read_manifest(self.cfg.shards_of(1), check_files=False)
        n = torch.tensor(class_counts(manifest, self.cfg.data.train_split), dtype=torch.float32)
        weight = torch.where(n > 0, 1 / n.clamp(min=1), torch.zeros_like(n))
        return (weight * (n > 0).sum() / weight.sum()).to(self.device)

    def build_model(self) -> nn.Module:
        preset = get_preset(self.cfg.preset)
        if self.stage_cfg.model == "recognizer":  # one network, judged at hr: metrics ce/x8, acc/x8
            cfg = dataclasses.replace(preset.recognizer, input=self.stage_cfg.input)  # it makes its own view
            return nn.ModuleDict({"hr": build_recognizer(cfg, len(self.classes))})
        return nn.ModuleDict({k: build_prior(preset.prior, len(self.classes)) for k in TARGETS})

    def build_critic(self) -> None:
        return None

    def begin_epoch(self, epoch: int) -> None:
        pass

    def train_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """The paper's random flips and crops, on the device (the loader only decodes)."""
        if not self.stage_cfg.augment:
            return batch
        return flip_crop(batch, generator, flip=True, crop_pad=self.stage_cfg.crop_pad)

    def val_batch(self, batch: dict, generator: torch.Generator) -> dict:
        return batch  # validation images unaugmented

    @property
    def view(self) -> str:
        """What the loop hands the networks: the priors' input, or the whole image for a recognizer, which makes
        its own view (Recognizer.prepare), so that stage 2 feeds it SR outputs the same way."""
        return "image" if self.stage_cfg.model == "recognizer" else self.stage_cfg.input

    def forward(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return prior_forward(model, self.loss_fn, batch, self.precision, self.view)

    @torch.no_grad()
    def validate_batch(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Loss, cross-entropy, top-1 and top-5 accuracy per scale, beside the split's chance and majority rates."""
        if self.baselines is None:
            manifest = read_manifest(self.cfg.shards_of(1), check_files=False)
            self.baselines = prior_baselines(manifest, self.cfg.data.prior_split(manifest))
        terms = prior_forward(model, self.loss_fn, batch, self.precision, self.view)
        return terms | {k: torch.tensor(v, device=self.device) for k, v in self.baselines.items()}

    def finish(self, model: nn.Module, run_dir: Path) -> Path:
        """The trained priors, frozen by stage 2: safetensors with class map and preset."""
        extra = {"preset": self.cfg.preset, "run": self.cfg.run.name, "input": self.stage_cfg.input}
        if self.stage_cfg.model == "recognizer":
            path = self.cfg.recognizer_path
            with staged(path) as local:
                save_recognizer(local, model["hr"], self.classes, extra={**extra, "margin": self.stage_cfg.margin,
                                                                         "margin_m": self.stage_cfg.margin_m,
                                                                         "margin_s": self.stage_cfg.margin_s})
            return path
        path = self.cfg.priors_path
        with staged(path) as local:  # a run in an object store: written here, then uploaded
            save_priors(local, dict(model.items()), get_preset(self.cfg.preset).prior, self.classes, extra=extra)
        return path


def sr_loss(cfg: TrainConfig, classes: list[str], device: torch.device, precision: Precision) -> nn.Module:
    """Stage 2's loss (``stage2.loss``). Its frozen networks (identity priors, ℓp's SqueezeNet) are built on
    every worker, outside DeepSpeed: no optimizer state, not in its checkpoints."""
    stage_cfg = cfg.stage2
    if stage_cfg.loss == "perceptual" and stage_cfg.perceptual_weights == "priors":
        priors = load_priors(local_copy(cfg.priors_path), device, classes=classes)
        return PerceptualLoss({k: precision.module(PriorFeatures(p, k)) for k, p in priors.items()})
    if stage_cfg.loss == "perceptual":
        return PerceptualLoss(precision.module(load_squeezenet(stage_cfg.perceptual_weights, device)))
    if stage_cfg.loss == "mse":
        return MSELoss()
    if stage_cfg.loss == "adversarial":
        return AdversarialLoss(weight=stage_cfg.adversarial_weight)  # its discriminator: SRStage.build_critic
    priors = recognizer = None
    if stage_cfg.uses_priors:
        priors = load_priors(local_copy(cfg.priors_path), device, classes=classes)
        priors = {k: precision.module(p) for k, p in priors.items()}
    if stage_cfg.uses_recognizer:
        recognizer = precision.module(load_recognizer(local_copy(cfg.recognizer_path), device)[0])
    identity = {KEY_OF[sc]: stage_cfg.identity_weight for sc in stage_cfg.identity_scales}
    return CSRIPLoss(priors, alpha=stage_cfg.alpha, recognizer=recognizer, identity=identity).to(device)


class SRStage:
    """Stage 2: the SR network (the cascade, or a Table 1 peer: ``stage2.model``) and its loss (``stage2.loss``:
    eq. (4) with the frozen priors, ℓp, or MSE) at every output it has."""

    number = 2
    telemetry_name = "sr"

    def __init__(self, cfg: TrainConfig, classes: list[str], device: torch.device, precision: Precision):
        self.cfg, self.classes, self.device, self.precision = cfg, classes, device, precision
        self.stage_cfg = cfg.stage2
        self.loss_fn = sr_loss(cfg, classes, device, precision)
        self.degradation = cfg.data.degradation_model()
        self.fixed = self.degradation == PAPER  # the shards' lr is exactly the paper's cascade
        # stage2.identity_on=jpeg: the identity term weighs each face by whether the degradation compressed it
        self.identity_on_jpeg = self.stage_cfg.uses_recognizer and self.stage_cfg.identity_on == "jpeg"

    def build_model(self) -> nn.Module:
        return build_sr(self.stage_cfg.model, preset=self.cfg.preset)

    def build_critic(self) -> nn.Module | None:
        """SRGAN's discriminator (stage2.loss=adversarial), which its loss reads; trained by a second engine."""
        if not isinstance(self.loss_fn, AdversarialLoss):
            return None
        self.loss_fn.critic = build_critic(self.cfg.preset).to(self.device)
        return self.loss_fn.critic

    def begin_epoch(self, epoch: int) -> None:
        """The identity term's schedule (stage2.identity_start, identity_ramp): its weight for this epoch, set on
        the device once (no host sync in the step)."""
        if isinstance(self.loss_fn, CSRIPLoss) and self.loss_fn.identity:
            self.loss_fn.identity_scale.fill_(self.stage_cfg.identity_factor(epoch))

    def train_batch(self, batch: dict, generator: torch.Generator, weigh: bool = True) -> dict:
        """The network's input: the shards' lr, or hr degraded on the device by the configured model; with
        stage2.identity_on=jpeg (and ``weigh``), ``id_weight`` (B,): 1 where that degradation JPEG-compressed."""
        if self.fixed:
            return batch
        extra = {}
        if self.identity_on_jpeg and weigh:  # the draws degrade_lr makes next (sample_params leaves the generator)
            compressed = sample_params(batch["hr"].shape[0], self.degradation, generator).jpeg > 0
            extra["id_weight"] = compressed.float().to(batch["hr"].device, non_blocking=True)  # host -> device only
        lr = degrade_lr(batch["hr"], self.degradation, generator)  # (B, 3, 24, 24); targets stay the clean cascade
        return {**batch, "lr": self.precision.tensor(lr), **extra}

    def val_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """Validation draws from the same distribution, with a generator fixed per batch; its id/* is every
        face's distance (the held-out measure), not the training weight's."""
        return self.train_batch(batch, generator, weigh=False)

    def forward(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return sr_forward(model, self.loss_fn, batch, self.precision)

    @torch.no_grad()
    def validate_batch(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The training loss, and PSNR and SSIM per output scale exactly as `facesr eval quality` scores them
        (facesr.quality: outputs clamped and rounded to 8 bit, torchmetrics, standard constants), so the
        dashboard's val ssim/x8 and the eval table's are the same number on the same images.

        Validation identities are outside the priors' class map (prep splits by identity), so their
        identity term is zero and eq. (4)'s loss is the SSIM part; ce/* is not reported here. The recognizer's
        identity term needs no class: ``id/*`` on these unseen people is the held-out measure of identity kept.
        A peer with one output reports x8 only.
        """
        with self.precision.autocast(batch["lr"].device):
            sr = model(batch["lr"])
            terms = self.loss_fn(sr, batch)
        out = {"loss": terms["loss"].float()} | {k: v.float() for k, v in terms.items()
                                                 if (k.startswith("critic") and k != "critic_loss") or k.startswith("id/")}
        for key in (k for k in TARGETS if k in sr):
            scores = image_scores(finish(sr[key]), batch[key])  # {metric: (B,)}
            out[f"ssim/{SCALE_OF[key]}"] = scores["ssim"].mean()
            out[f"psnr/{SCALE_OF[key]}"] = scores["psnr"].mean()
        return out

    def finish(self, model: nn.Module, run_dir: Path) -> Path:
        path = run_dir / "srnet.safetensors"
        extra = {"preset": self.cfg.preset, "run": self.cfg.run.name, "loss": self.stage_cfg.loss}
        if self.stage_cfg.detail != 1:  # the corrections to bicubic scaled (facesr.detail): what ships
            model, extra["detail"] = with_detail(model, self.stage_cfg.detail), self.stage_cfg.detail
        with staged(path) as local:
            save_srnet(local, model, extra=extra)
        return path


class GateStage:
    """Stage 3: the detail gate of the cascade stage 2 wrote (or ``stage3.srnet``), frozen at full strength on every
    worker (outside DeepSpeed, like stage 2's priors). From each face's lr, degraded on the device by
    ``stage3.degradation``, the gate learns the strength of the cascade's x8 correction that maximises that
    face's PSNR (``facesr.step.gate_forward``); the stage writes the cascade with the gate, its predictions
    scaled by ``stage3.strength``, as the run's ``srnet.safetensors``."""

    number = 3
    telemetry_name = "gate"

    def __init__(self, cfg: TrainConfig, classes: list[str], device: torch.device, precision: Precision):
        self.cfg, self.classes, self.device, self.precision = cfg, classes, device, precision
        self.stage_cfg = cfg.stage3
        self.degradation = self.stage_cfg.degradation_model(cfg.data)
        self.source = local_copy(cfg.srnet_path)
        self.meta = read_meta(self.source)
        self.cascade = at_detail(load_srnet(self.source, device), self.source, 1.0)  # full strength, no gate
        self.deploy = precision.module(self.cascade.deploy()).requires_grad_(False).eval()

    def build_model(self) -> nn.Module:
        return DetailGate()

    def build_critic(self) -> None:
        return None

    def begin_epoch(self, epoch: int) -> None:
        pass

    def train_batch(self, batch: dict, generator: torch.Generator) -> dict:
        lr = degrade_lr(batch["hr"], self.degradation, generator)  # (B, 3, 24, 24)
        return {**batch, "lr": self.precision.tensor(lr)}

    def val_batch(self, batch: dict, generator: torch.Generator) -> dict:
        return self.train_batch(batch, generator)

    def forward(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return gate_forward(model, self.deploy, batch, self.precision, self.stage_cfg.target_max)[0]

    @torch.no_grad()
    def validate_batch(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The loss, the mean prediction and target, and x8 PSNR as `facesr eval quality` scores it of the gated
        output that ships (prediction × stage3.strength, clamped to [0, 1]), of the cascade at full strength and
        of bicubic: whether the gate beats its network on these inputs."""
        terms, c, pred = gate_forward(model, self.deploy, batch, self.precision, self.stage_cfg.target_max)
        bic = upsample_bicubic(batch["lr"].float(), c.shape[-1])
        d = (self.stage_cfg.strength * pred).clamp(0, 1).view(-1, 1, 1, 1)
        for name, img in (("psnr", bic + d * c), ("psnr_full", bic + c), ("psnr_bicubic", bic)):
            terms[f"{name}/x8"] = image_scores(finish(img), batch["hr"])["psnr"].mean()
        return {k: v.float() for k, v in terms.items()}

    def finish(self, model: nn.Module, run_dir: Path) -> Path:
        path = run_dir / "srnet.safetensors"
        net = with_gate(self.cascade, model, self.stage_cfg.strength)
        keep = {k: v for k, v in self.meta.items() if k in ("preset", "run", "loss")}
        extra = {**keep, "gate_strength": self.stage_cfg.strength, "gate_run": self.cfg.run.name,
                 "gate_degradation": str(self.stage_cfg.degradation or self.cfg.data.degradation)}
        with staged(path) as local:
            save_srnet(local, net, extra=extra)
        return path


STAGES: dict[int, type[Stage]] = {1: PriorStage, 2: SRStage, 3: GateStage}




