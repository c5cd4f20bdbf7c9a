"""Typed configuration of a training run: nested dataclasses, YAML files, ``key=value`` overrides.

``load_config(path, overrides)`` builds a ``TrainConfig`` from a YAML file and
dotted overrides (``stage2.lr=0.001``), refusing unknown keys and wrong types
with the field's dotted name. Value checks sit beside the fields they check:
each section's ``validate(key)`` refuses its own impossible values, and
``TrainConfig.validate()`` adds those that tie sections together (elastic runs
and ZeRO, SyncBatchNorm and GPUs, the global batch over every world size).
``check(cfg)`` runs them, then verifies what can be known before any Ray worker
starts from the disk: the shards exist, stage-2 priors exist and were trained
on this data's class map.

Global batch rule (gradient accumulation). ``batch_size`` is the paper's batch:
samples per optimizer step summed over all workers. With W workers and a
per-worker limit M (``max_micro_batch``) the engine takes the smallest
accumulation count A such that W·A divides the batch and batch/(W·A) ≤ M;
each worker then runs A micro-batches of batch/(W·A) per step. The global
batch, hence the optimisation, is the same on 1 CPU or 64 GPUs; if no A
exists (e.g. batch 8 on 3 workers) the run is refused before it starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from facesr.structured import FieldError, build


class ConfigError(ValueError):
    """A configuration problem, with the dotted name of the field at fault (both clipped to one short line)."""

    def __init__(self, field_name: str, msg: str):
        field_name, msg = _clip(field_name, 200), _clip(msg)
        super().__init__(f"{field_name}: {msg}")
        self.field = field_name
        self.message = msg


MAX_MESSAGE = 600  # characters of a config error's message: a value is shown, never expanded
MAX_VALUES = 10_000  # values one field may hold once YAML aliases are expanded (real configs hold a few dozen)
_REPR = reprlib.Repr()  # Python 3.11's takes no keywords
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 6, 80, 80


def _show(value) -> str:
    """A bounded repr of a config value for messages: a YAML alias bomb or a huge number is never expanded."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return _REPR.repr(value)


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """One line of at most ``limit`` characters (control characters escaped)."""
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def _expanded_size(value, limit: int = MAX_VALUES) -> int:
    """How many values ``value`` holds with YAML aliases expanded, counting stops past ``limit`` (bounded work)."""
    n, stack = 0, [value]
    while stack and n <= limit:
        v = stack.pop()
        n += 1
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return n


def _at_least(section, key: str, **lows) -> None:
    """Refuse any of ``section``'s named numbers below its lower bound, naming the dotted key."""
    for name, low in lows.items():
        v = getattr(section, name)
        if v < low:
            raise ConfigError(f"{key}.{name}", f"must be {low} or more, got {_show(v)}")


def _check_finite(obj, key: str) -> None:
    """Every float of a config (nested sections, lists, mappings such as data.degradation) is a number: NaN and
    inf pass every ``<`` check."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _check_finite(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(key, f"expected a finite number, got {obj}")


@dataclass
class RunConfig:
    name: str = "cpu"  # run name; a run started again with the same name resumes from its latest checkpoint
    run_dir: str = ""  # run folder (config, priors, metrics.jsonl, logs); "" = <cluster.storage_path>/<name>
    # 1 = identity priors (or the recognizer), 2 = SR cascade with the frozen priors, 3 = its detail gate
    stages: list[int] = field(default_factory=lambda: [1, 2])
    seed: int = 0  # model init and data-stream seed (shuffle, flips, crops); the stream mixes in epoch and rank
    log_every: int = 10  # optimizer steps between train-metric records (all-reduced over ranks)
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0 = only at the end of each epoch
    keep_checkpoints: int = 2  # checkpoints kept per stage by Ray Train (latest ones)
    # validate every this many epochs, and always after a stage's last; the epochs between are checkpointed with
    # their train figures only (the demo: 4, as 16 validations were 23 s of its 330-s stage 2)
    val_every: int = 1
    telemetry_port: int | None = None  # first Prometheus exporter port (+ local rank); None = no exporter
    # Prometheus file_sd folder shared by all runs; "" = <cluster.storage_path>/prometheus_sd when storage is a
    # folder, none with an object-store URI (nothing every node could write and Prometheus read)
    telemetry_sd_dir: str = ""
    # head port of the HTTP discovery registry (cluster/discovery.py) the driver starts unless the cluster has one;
    # exporters register with it, so Prometheus finds them without a shared folder. None = file_sd only
    telemetry_sd_port: int | None = 9095
    # at a stage's normal end, an exporter a Prometheus watches keeps serving until its final values are scraped,
    # this long at most (the shipped prometheus.yml: 15 s discovery refresh + 15 s scrape); 0 = close at once
    telemetry_linger_s: float = 35.0
    # rank 0 also writes TensorBoard event files of every metrics.jsonl record into <run>/tensorboard/stage<N>
    # (`tensorboard --logdir <run>`): per-scale curves as ssim/train/x8, ce/val/x2, …; needs the tensorboard package
    tensorboard: bool = True

    def validate(self, key: str = "run") -> None:
        if not self.stages or sorted(set(self.stages)) != self.stages or not set(self.stages) <= {1, 2, 3}:
            raise ConfigError(f"{key}.stages", f"expected ascending stage numbers out of 1, 2, 3 (e.g. [1, 2], "
                              f"[2, 3]), got {self.stages}")
        if self.stages == [1, 3]:
            raise ConfigError(f"{key}.stages", "stage 3 gates the cascade stage 2 trains: [1, 2, 3], or [3] with "
                              "stage3.srnet")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"{key}.name", f"use letters, digits, '_', '-', '.' only, got {self.name!r}")
        for name in ("telemetry_port", "telemetry_sd_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{key}.{name}", f"expected a TCP port 0-65535 or null, got {port}")
        _at_least(self, key, seed=0, log_every=1, checkpoint_every=0, keep_checkpoints=1, val_every=1,
                  telemetry_linger_s=0)
        if self.seed >= 2**63:  # torch.manual_seed's range
            raise ConfigError(f"{key}.seed", f"must be below 2**63, got {_show(self.seed)}")


@dataclass
class DataConfig:
    shards: str = "data/shards"  # `facesr prep`'s output (manifest + tars): a folder every node sees, or s3://bucket/prefix
    # local folder on each node that keeps object-store shards once streamed (read from there next time);
    # "" = stream from the bucket every epoch. Bounded by shard_cache_gb, least recently used shards dropped
    shard_cache: str = ""
    shard_cache_gb: float = 20.0
    train_split: str = "train"  # manifest split trained on
    val_split: str = "val"  # split the SR cascade is validated on every epoch (identities unseen in training)
    # split the priors are scored on; auto = prep's prior_val (held-out images of their classes) where the shards
    # have it, else train (images they train on: a fit, not recognition). val/test hold identities with no class.
    prior_val_split: str = "auto"
    loader_workers: int = 1  # decode processes per training worker
    shuffle_buffer: int = 256  # samples in each decode worker's shuffle buffer (shards already mix identities)
    # cap on optimizer steps per epoch; 0 = the whole split (caps serve smoke runs/benchmarks); a stage's own
    # stageN.steps_per_epoch, where set, overrides it for that stage
    steps_per_epoch: int = 0
    val_batches: int = 0  # cap on validation batches per worker; 0 = the whole split
    # How stage 2's network input is made from hr (facesr.degradations): "paper" = the shards' lr (the
    # paper's fixed blur + decimation, fidelity to the paper); "robust" = randomised per sample on the worker
    # (blur, any common resize, noise, JPEG; x2/x4/hr targets stay the clean cascade); "robust_nojpeg" = that
    # without its JPEG step (the demo's: it keeps identity, README issue 25); or a mapping in
    # RobustDegradation.to_dict()'s shape whose missing fields keep robust's defaults.
    degradation: str | dict = "paper"

    def validate(self, key: str = "data") -> None:
        _at_least(self, key, loader_workers=0, shuffle_buffer=0, steps_per_epoch=0, val_batches=0)
        if self.shard_cache_gb <= 0:
            raise ConfigError(f"{key}.shard_cache_gb", f"must be positive, got {self.shard_cache_gb}")
        self.degradation_model(key)

    def degradation_model(self, key: str = "data"):
        """The validated stage-2 degradation model; ConfigError naming the dotted key at fault."""
        from facesr.degradations import DegradationError, resolve as resolve_degradation

        try:
            return resolve_degradation(self.degradation, f"{key}.degradation")
        except DegradationError as e:
            name, _, msg = str(e).partition(": ")
            raise ConfigError(name, _clip(msg)) from None

    def prior_split(self, manifest: dict) -> str:
        """The split stage 1 is validated on (``prior_val_split``, with ``auto`` resolved against the shards)."""
        if self.prior_val_split != "auto":
            return self.prior_val_split
        return "prior_val" if "prior_val" in manifest["splits"] else self.train_split


@dataclass
class ClusterConfig:
    address: str = ""  # Ray address; "" = RAY_ADDRESS if set (ray job submit sets it), else a new local cluster
    num_workers: int = 2  # data-parallel training workers (Ray Train ScalingConfig.num_workers)
    # Elastic training: 0 = fixed at num_workers (a lost node is waited for). 1 <= min_workers < num_workers:
    # after a failure Ray Train restarts from the latest checkpoint with as many workers as the cluster can
    # place (at least min_workers) and grows back to num_workers when nodes return. Needs checkpoints that
    # load at any world size, so engine.zero_stage must be 0, and the global batch must split at every size.
    min_workers: int = 0
    elastic_resize_s: float = 60.0  # elastic: how often a healthy worker group checks whether it can grow
    # elastic: how long a restart waits to place the worker group it sized from the cluster's resources before it
    # sizes again. Right after a node dies the cluster still lists the node's CPUs (~15 s of GCS health checks);
    # a restart sized to them waited Ray Train's 60 s before shrinking (tests/test_cluster.py, elastic)
    elastic_placement_s: float = 10.0
    use_gpu: bool = False  # one GPU per worker, NCCL; False = CPU workers, DeepSpeed's CPU accelerator over gloo
    cpus_per_worker: float = 1.0  # CPUs reserved per worker; also its torch thread count
    gpus_per_worker: float = 1.0  # GPUs reserved per worker when use_gpu
    # where runs live (config, checkpoints, priors, metrics, logs, summary): a local folder, a shared mount, or an
    # object-store URI (s3://bucket/prefix) that every node reaches with its own credentials (shards/store.py)
    storage_path: str = "runs"
    # S3-compatible endpoint (MinIO, Ceph, R2, ...) of s3:// URIs; "" = AWS_ENDPOINT_URL(_S3) if set, else AWS
    s3_endpoint: str = ""
    s3_region: str = ""  # region of the bucket; "" = AWS_REGION / AWS_DEFAULT_REGION if set (credentials: never here)
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before the run fails
    # seconds the driver asks an autoscaler for the nodes the workers need before refusing the run (too few CPUs
    # or GPUs is an error, not a wait); 0 = refuse at once when the cluster's nodes cannot place them
    placement_timeout_s: float = 0.0

    def validate(self, key: str = "cluster") -> None:
        if self.num_workers < 1:
            raise ConfigError(f"{key}.num_workers", "need at least one worker")
        if not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"{key}.min_workers", f"expected 0 (fixed) to num_workers={self.num_workers}, "
                              f"got {self.min_workers}")
        for name in ("cpus_per_worker", "gpus_per_worker", "elastic_resize_s", "elastic_placement_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}", f"must be positive, got {getattr(self, name)}")
        _at_least(self, key, max_failures=0)  # Ray's -1 (retry forever) would loop on a deterministic failure
        if self.placement_timeout_s < 0:
            raise ConfigError(f"{key}.placement_timeout_s", f"must be 0 (refuse at once) or more, got "
                              f"{self.placement_timeout_s}")


@dataclass
class EngineConfig:
    # DeepSpeed ZeRO stage 0-2. 0 = plain data parallel (one gradient all-reduce, full optimizer state
    # per worker): for 4-20M-parameter convnets the optimizer state is tens of MB, so sharding it
    # (ZeRO-1/2) saves little memory and adds an all-gather of the weights every step; measured in the
    # README ("Communication"). 0 is also what elastic runs need.
    zero_stage: int = 0
    precision: str = "auto"  # auto = bf16 autocast where the hardware has bf16 (CUDA sm80+, AMX/AVX512-BF16 CPUs), else fp32; or bf16 | fp32
    channels_last: bool | None = None  # NHWC activations; null = on (faster in both dtypes, measured); false = NCHW
    batchnorm: str = "local"  # local = per-worker batch statistics, running stats averaged each epoch; sync = SyncBatchNorm (GPU only)
    grad_clip: float = 0.0  # gradient-norm clip; 0 = off (the paper does not clip)
    compile: bool = False  # torch.compile the trained module (DeepSpeed engine.compile); measured in README
    # torch.compile of the whole step's forward + loss (facesr.step.compile_forward): off | default (fused
    # kernels) | reduce-overhead (+ CUDA graphs: a launch per graph, not per kernel). off until measured faster
    # on a GPU (`python -m launch.gpu_check` measures all three); SRGAN's two losses need off
    step_compile: str = "off"
    overlap_comm: bool = True  # reduce gradients in buckets while backward is still running (ZeRO-2 hooks)
    bucket_mb: float = 8.0  # gradient bucket size in MB of fp32: ~2 buckets for the paper cascade (17 MB of grads)

    def validate(self, key: str = "engine") -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"{key}.zero_stage", f"expected 0, 1 or 2, got {self.zero_stage}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"{key}.precision", f"expected auto, bf16 or fp32, got {self.precision!r}")
        if self.bucket_mb <= 0:
            raise ConfigError(f"{key}.bucket_mb", f"must be positive, got {self.bucket_mb}")
        if self.grad_clip < 0:
            raise ConfigError(f"{key}.grad_clip", f"must be 0 (off) or positive, got {self.grad_clip}")
        if self.batchnorm not in ("local", "sync"):
            raise ConfigError(f"{key}.batchnorm", f"expected local or sync, got {self.batchnorm!r}")
        from facesr.step import STEP_COMPILE

        if self.step_compile not in STEP_COMPILE:
            raise ConfigError(f"{key}.step_compile", f"expected one of {', '.join(STEP_COMPILE)}, got "
                              f"{self.step_compile!r}")


@dataclass
class StageConfig:
    epochs: int = 1  # passes over the training split
    batch_size: int = 8  # global batch per optimizer step, all workers together (the paper's number)
    max_micro_batch: int = 8  # most samples one worker forwards at once; accumulation makes up the rest
    lr: float = 1e-4  # Adam learning rate at epoch 0
    lr_gamma: float = 1 / 3  # factor applied at each learning-rate step
    lr_every: int = 0  # multiply by lr_gamma every this many epochs; 0 = off
    lr_milestones: list[int] = field(default_factory=list)  # multiply by lr_gamma at the END of these (1-based) epochs
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas (PyTorch defaults; paper gives none)
    weight_decay: float = 0.0  # Adam L2 weight decay (paper gives none)
    warmup_steps: int = 0  # linear LR warm-up over the first optimizer steps (large batches); 0 = none (paper)
    # This stage's cap on optimizer steps per epoch: null = data.steps_per_epoch's, 0 = the whole split (a stage
    # that needs full epochs, e.g. identity-term.yaml's recognizer, under a config that caps the other one)
    steps_per_epoch: int | None = None
    # Exponential moving average of the weights (timm's ModelEmaV3, warm-up on): 0 = off; else its decay, e.g.
    # 0.999 (BasicSR's). The average is what validation scores and the stage writes; it is checkpointed, so a
    # resumed run continues it exactly. The warm-up caps the decay at 1 - (1 + step)^(-2/3): about 0.99 after
    # 1,000 steps, so a short run averages its last ~100 steps whatever the decay.
    ema_decay: float = 0.0

    def validate(self, key: str) -> None:
        for name in ("epochs", "batch_size", "max_micro_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}", "must be at least 1")
        if self.steps_per_epoch is not None:
            _at_least(self, key, steps_per_epoch=0)
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr", "must be positive")
        if self.warmup_steps < 0:
            raise ConfigError(f"{key}.warmup_steps", "must be 0 (none) or more")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{key}.ema_decay", f"0 (off) or a decay in (0, 1), got {self.ema_decay}")
        _at_least(self, key, lr_every=0, weight_decay=0)
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"{key}.lr_gamma", f"a decay factor in (0, 1], got {self.lr_gamma}")
        for i, m in enumerate(self.lr_milestones):
            if m < 1:
                raise ConfigError(f"{key}.lr_milestones[{i}]", f"a 1-based epoch, got {m}")
        if len(self.betas) != 2:
            raise ConfigError(f"{key}.betas", f"expected two Adam betas [beta1, beta2], got {len(self.betas)}")
        for i, b in enumerate(self.betas):
            if not 0 <= b < 1:
                raise ConfigError(f"{key}.betas[{i}]", f"an Adam beta in [0, 1), got {b}")

    def lr_at(self, epoch: int, step: int | None = None) -> float:
        """Learning rate during 0-based ``epoch``; stepped per epoch, except during the warm-up of the first
        ``warmup_steps`` optimizer steps (``step`` = steps taken before this one), where it rises linearly."""
        drops = sum(1 for m in self.lr_milestones if epoch >= m)  # "end of epoch m" = from 0-based epoch m on
        if self.lr_every > 0:
            drops += epoch // self.lr_every
        lr = self.lr * self.lr_gamma**drops
        if step is not None and step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr


@dataclass
class PriorStageConfig(StageConfig):
    augment: bool = True  # the paper's random horizontal flips and random crops of the training images
    crop_pad: int = 2  # crop shift of up to ±crop_pad lr pixels (×2, ×4, ×8 at x2, x4, hr), reflect-padded
    # Cross-entropy weighted by inverse class frequency, so a class with 500 images does not outvote one with 10
    # (LFW's largest identity is 14% of its images); off = the paper's plain mean
    class_balance: bool = False
    # What the priors learn identities from: residual = the paper's high-pass Δx (C-SRIP's identity priors);
    # image = the whole faces, a SqueezeNet trained on faces for ℓp's features offline (perceptual_weights: priors)
    input: str = "residual"
    # What stage 1 trains: priors = the paper's three SqueezeNets (cross-entropy; eq. (4)'s CE and ℓp-on-priors use
    # them); recognizer = one face recognizer on whole hr faces with a margin loss, whose embeddings stage 2's
    # identity term compares (stage2.identity_weight), for people it never saw as well (issue 25)
    model: str = "priors"
    margin: str = "cosface"  # recognizer: cosface (s·(cos θ − m)) or arcface (s·cos(θ + m))
    margin_m: float = 0.35  # recognizer: the margin m (CosFace's 0.35; ArcFace's paper uses 0.5)
    margin_s: float = 30.0  # recognizer: the scale s of the cosine logits
    # The shard set stage 1 trains on; "" = data.shards. A recognizer may learn from more people than stage 2
    # trains on (every training identity plus another face set: `facesr prep ... --exclude DATA_SHARDS` leaves
    # out the people data.shards evaluates on); priors whose cross-entropy stage 2 uses must share its class map
    shards: str = ""

    def validate(self, key: str = "stage1") -> None:
        super().validate(key)
        from facesr.degrade import PRIOR_INPUTS
        from facesr.losses import MARGINS

        if self.input not in PRIOR_INPUTS:
            raise ConfigError(f"{key}.input", f"unknown prior input {self.input!r}; choose one of {', '.join(PRIOR_INPUTS)}")
        if self.model not in STAGE1_MODELS:
            raise ConfigError(f"{key}.model", f"expected one of {', '.join(STAGE1_MODELS)}, got {self.model!r}")
        if self.margin not in MARGINS:
            raise ConfigError(f"{key}.margin", f"expected one of {', '.join(MARGINS)}, got {self.margin!r}")
        if not 0 <= self.margin_m < 1.5:
            raise ConfigError(f"{key}.margin_m", f"expected 0 to 1.5 (radians or cosine units), got {self.margin_m}")
        if not self.margin_s > 0:
            raise ConfigError(f"{key}.margin_s", f"must be positive, got {self.margin_s}")
        if not 0 <= self.crop_pad < 24:
            raise ConfigError(f"{key}.crop_pad", f"must be 0 to 23 lr pixels, got {self.crop_pad}")


STAGE1_MODELS = ("priors", "recognizer")  # stage1.model

# stage2.loss: eq. (4); ℓp on SqueezeNet fire2-4; SRCNN's and VDSR's pixel MSE; SRGAN's MSE + adversarial term
SR_LOSSES = ("csrip", "perceptual", "mse", "adversarial")
IDENTITY_ON = ("all", "jpeg")  # stage2.identity_on: which training faces the identity term acts on


@dataclass
class SRStageConfig(StageConfig):
    # The network stage 2 trains (facesr.models.SR_MODELS): cascade = C-SRIP's; srcnn, vdsr = the paper's Table 1
    # peers on the bicubic-upsampled lr (one x8 output). Sized by the run's model preset (tiny | paper).
    model: str = "cascade"
    # What it is trained with: csrip = eq. (4), SSIM at every output + alpha * identity CE of the frozen priors;
    # perceptual = ℓp, squared fire2-4 feature differences of a frozen SqueezeNet (perceptual_weights); mse = pixel MSE;
    # adversarial = SRGAN: pixel MSE + adversarial_weight * -log D(sr), D (the preset's critic) trained alongside
    loss: str = "csrip"
    alpha: float = 0.001  # weight of the identity cross-entropy in eq. (4); 0 = SSIM only (no priors needed)
    priors: str = ""  # trained priors (safetensors) when stage 1 is not in this run; "" = <run_dir>/priors.safetensors
    # ℓp's SqueezeNet weights: imagenet = torchvision's squeezenet1_1 ImageNet file (torch hub cache, downloaded
    # when absent), or the path of that file (.pth) or of a .safetensors of the same state dict; priors = the
    # frozen stage-1 priors of each output's scale on what they were trained on (stage1.input: residual or image;
    # stage 1 in the run, or stage2.priors)
    perceptual_weights: str = "imagenet"
    adversarial_weight: float = 1e-3  # SRGAN's weight of the generator's adversarial term (Ledig's 10^-3)
    # Identity term (issue 25), added to eq. (4): identity_weight · (1 − cos) of a frozen face recognizer's
    # embeddings of each SR output and its ground truth, at the scales listed; 0 = off (the paper's loss)
    identity_weight: float = 0.0
    identity_scales: list[str] = field(default_factory=lambda: ["x8"])  # outputs it acts on: x2, x4, x8
    identity_start: int = 0  # first (0-based) epoch it acts in: SSIM alone before, so it can converge first
    identity_ramp: int = 0  # epochs over which its weight rises linearly to identity_weight from identity_start
    # which training faces it acts on: all, or jpeg = only those the degradation JPEG-compressed (the others get
    # SSIM alone), so the term can steer the compressed inputs the mix's SSIM loses identity on (issue 25)
    identity_on: str = "all"
    recognizer: str = ""  # trained recognizer (safetensors) when stage 1 is not in this run; "" = <run_dir>/recognizer.safetensors
    # The written network's detail strength (facesr.detail): srnet.safetensors holds the cascade with every output
    # bicubic + detail · (its correction to bicubic), folded into the branches' last convolutions; 1 = as trained.
    # Training, validation and checkpoints use the network as trained; chosen on validation identities (README)
    detail: float = 1.0

    @property
    def uses_priors(self) -> bool:
        """Whether training needs the identity priors of stage 1 (eq. (4) with alpha > 0, or ℓp on their features)."""
        return (self.loss == "csrip" and self.alpha > 0) or (self.loss == "perceptual" and self.perceptual_weights == "priors")

    @property
    def uses_recognizer(self) -> bool:
        """Whether training needs stage 1's face recognizer (the identity term)."""
        return self.loss == "csrip" and self.identity_weight > 0

    def identity_factor(self, epoch: int) -> float:
        """The identity term's share of identity_weight during 0-based ``epoch``: 0 before identity_start, then a
        linear ramp over identity_ramp epochs to 1."""
        if epoch < self.identity_start:
            return 0.0
        return min(1.0, (epoch - self.identity_start + 1) / (self.identity_ramp + 1)) if self.identity_ramp else 1.0

    def validate(self, key: str = "stage2") -> None:
        super().validate(key)
        from facesr.models import SR_MODELS

        if self.model not in SR_MODELS:
            raise ConfigError(f"{key}.model", f"unknown SR model {self.model!r}; choose one of {', '.join(SR_MODELS)}")
        if self.loss not in SR_LOSSES:
            raise ConfigError(f"{key}.loss", f"unknown loss {self.loss!r}; choose one of {', '.join(SR_LOSSES)}")
        if self.alpha < 0:
            raise ConfigError(f"{key}.alpha", f"must be 0 or more, got {self.alpha}")
        if self.adversarial_weight <= 0:
            raise ConfigError(f"{key}.adversarial_weight", f"must be positive, got {self.adversarial_weight}")
        if self.priors and not self.uses_priors:
            raise ConfigError(f"{key}.priors", f"{key}.loss={self.loss} (alpha={self.alpha}) uses no identity priors")
        if not self.identity_weight >= 0:
            raise ConfigError(f"{key}.identity_weight", f"must be 0 or more, got {self.identity_weight}")
        if self.identity_weight > 0 and self.loss != "csrip":
            raise ConfigError(f"{key}.identity_weight", f"the identity term is part of the csrip loss, not {self.loss}")
        from facesr.vocab import SCALES

        if not self.identity_scales or any(sc not in SCALES for sc in self.identity_scales):
            raise ConfigError(f"{key}.identity_scales", f"expected some of {', '.join(SCALES)}, got {self.identity_scales}")
        if self.identity_start < 0 or self.identity_ramp < 0:
            raise ConfigError(f"{key}.identity_start" if self.identity_start < 0 else f"{key}.identity_ramp",
                              "must be 0 or more")
        if self.recognizer and not self.uses_recognizer:
            raise ConfigError(f"{key}.recognizer", f"identity_weight={self.identity_weight}: no identity term uses it")
        if self.identity_on not in IDENTITY_ON:
            raise ConfigError(f"{key}.identity_on", f"expected one of {', '.join(IDENTITY_ON)}, got {self.identity_on!r}")
        from facesr.detail import check_detail

        try:
            check_detail(self.detail, f"{key}.detail")
        except ValueError as e:
            raise ConfigError(f"{key}.detail", str(e).split(": ", 1)[1]) from None
        if self.detail != 1 and self.model != "cascade":
            raise ConfigError(f"{key}.detail", f"scales the cascade's corrections to bicubic; {self.model} has none")


@dataclass
class GateStageConfig(StageConfig):
    # Stage 3 (issue 25): a DetailGate (facesr.detail) learns, from each face's lr alone, the strength of the
    # cascade's corrections that maximises that face's PSNR, <c, hr - bicubic> / <c, c> for the frozen cascade's
    # full x8 correction c; written into srnet.safetensors, which then scales each face's corrections by
    # clamp(strength · prediction, 0, 1) in facesr sr, eval and the exports.
    srnet: str = ""  # the cascade to gate when stage 2 is not in this run; "" = <run_dir>/srnet.safetensors
    # the inputs it learns from, in data.degradation's vocabulary; "" = data.degradation. A wider mix than stage
    # 2's (robust, with JPEG, under a robust_nojpeg cascade) teaches it the inputs the cascade should touch less
    degradation: str | dict = ""
    # the shrink on top of the PSNR-optimal prediction: below 1 keeps identity better on compressed inputs;
    # choose it on validation identities (launch.eval's --gate-strength), never on the faces you report
    strength: float = 0.7
    target_max: float = 2.5  # PSNR-optimal strengths above this (corrections nearly orthogonal to the truth) clipped

    def validate(self, key: str = "stage3") -> None:
        super().validate(key)
        from facesr.detail import check_detail

        for name in ("strength", "target_max"):
            try:
                check_detail(getattr(self, name), f"{key}.{name}")
            except ValueError as e:
                raise ConfigError(f"{key}.{name}", str(e).split(": ", 1)[1]) from None

    def degradation_model(self, data: "DataConfig", key: str = "stage3"):
        """The validated degradation the gate learns from: its own, else data.degradation's."""
        if self.degradation in ("", None):
            return data.degradation_model()
        return DataConfig(degradation=self.degradation).degradation_model(key)


@dataclass
class TrainConfig:
    preset: str = "tiny"  # model preset of facesr.models.PRESETS (tiny | paper; tiny-wide, a capacity probe)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    stage1: PriorStageConfig = field(  # identity priors: Adam 1e-4, batch 128, ×1/3 every 20 epochs
        default_factory=lambda: PriorStageConfig(epochs=60, batch_size=128, max_micro_batch=128, lr=1e-4, lr_every=20)
    )
    stage2: SRStageConfig = field(  # SR cascade: Adam 10/3·1e-3, batch 8, ×1/3 at the end of epochs 10/25/50/80
        default_factory=lambda: SRStageConfig(
            epochs=100, batch_size=8, max_micro_batch=8, lr=10 / 3 * 1e-3, lr_milestones=[10, 25, 50, 80]
        )
    )
    stage3: GateStageConfig = field(  # detail gate: Adam 2e-3, batch 128, 3 passes of fresh degradations
        default_factory=lambda: GateStageConfig(epochs=3, batch_size=128, max_micro_batch=64, lr=2e-3)
    )

    # ---- derived paths (absolute once resolve() ran) ----
    @property
    def run_path(self):
        """The run folder: a ``Path``, or a ``shards.store.ObjectPath`` for an object-store URI (same interface)."""
        from shards.store import path

        return path(self.run.run_dir)

    @property
    def priors_path(self):
        from shards.store import path

        return path(self.stage2.priors) if self.stage2.priors else self.run_path / "priors.safetensors"

    @property
    def recognizer_path(self):
        from shards.store import path

        return path(self.stage2.recognizer) if self.stage2.recognizer else self.run_path / "recognizer.safetensors"

    @property
    def srnet_path(self):
        """The cascade stage 3 gates (and overwrites in this run's folder with the gated one)."""
        from shards.store import path

        return path(self.stage3.srnet) if self.stage3.srnet else self.run_path / "srnet.safetensors"

    @property
    def stage1_needed(self) -> bool:
        """Whether stage 2's loss uses what stage 1 of this config trains (priors or recognizer: stage1.model)."""
        return self.stage2.uses_recognizer if self.stage1.model == "recognizer" else self.stage2.uses_priors

    @property
    def elastic(self) -> bool:
        return 0 < self.cluster.min_workers < self.cluster.num_workers

    @property
    def world_sizes(self) -> range:
        """Every data-parallel world size this run may train at."""
        low = self.cluster.min_workers if self.elastic else self.cluster.num_workers
        return range(low, self.cluster.num_workers + 1)

    def stage_cfg(self, stage_num: int) -> StageConfig:
        """The section of stage 1 (priors), 2 (cascade) or 3 (detail gate)."""
        return {1: self.stage1, 2: self.stage2, 3: self.stage3}[stage_num]

    def shards_of(self, stage_num: int) -> str:
        """The shard set stage ``stage_num`` streams: stage1.shards where set, else data.shards."""
        return self.stage1.shards if stage_num == 1 and self.stage1.shards else self.data.shards

    def steps_cap(self, stage_num: int) -> int:
        """The stage's cap on optimizer steps per epoch (0 = none): its own ``steps_per_epoch``, else data's."""
        own = self.stage_cfg(stage_num).steps_per_epoch
        return self.data.steps_per_epoch if own is None else own

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Value checks: each section's own, then those that tie sections together; ConfigError naming the key."""
        from facesr.models import PRESETS

        if self.preset not in PRESETS:
            raise ConfigError("preset", f"unknown preset {_show(self.preset)}; choose one of {sorted(PRESETS)}")
        _check_finite(self, "")
        self.run.validate("run")
        self.data.validate("data")
        self.cluster.validate("cluster")
        self.engine.validate("engine")
        for stage_num in self.run.stages:
            self.stage_cfg(stage_num).validate(f"stage{stage_num}")
        # ---- across sections
        if self.elastic and self.engine.zero_stage != 0:
            raise ConfigError("engine.zero_stage", f"elastic training (cluster.min_workers={self.cluster.min_workers} "
                              f"< num_workers={self.cluster.num_workers}) needs checkpoints that load at another world "
                              f"size: ZeRO {self.engine.zero_stage} shards the optimizer state per worker; use 0")
        if self.engine.step_compile != "off" and 2 in self.run.stages and self.stage2.loss == "adversarial":
            raise ConfigError("engine.step_compile", "SRGAN backpropagates its two losses through one forward, "
                              "which a compiled graph frees after the first: use off")
        if self.engine.batchnorm == "sync" and not self.cluster.use_gpu:
            raise ConfigError("engine.batchnorm", "sync needs GPUs (torch SyncBatchNorm does not run on CPU/gloo)")
        for stage_num in self.run.stages:
            stage_cfg = self.stage_cfg(stage_num)
            for world in self.world_sizes:
                try:
                    accumulation(stage_cfg.batch_size, world, stage_cfg.max_micro_batch, f"stage{stage_num}.batch_size")
                except ConfigError as e:
                    if not self.elastic:
                        raise
                    lcm = math.lcm(*self.world_sizes)
                    raise ConfigError(e.field, f"{e.message}; an elastic run may train at any of "
                                      f"{self.world_sizes.start}..{self.world_sizes.stop - 1} workers, so the global "
                                      f"batch must be a multiple of {lcm} (or narrow cluster.min_workers)") from None
        both = 1 in self.run.stages and 2 in self.run.stages
        if both and not self.stage1_needed:
            what = "face recognizer" if self.stage1.model == "recognizer" else "identity priors"
            raise ConfigError("run.stages", f"stage 1 trains the {what} (stage1.model={self.stage1.model}), which "
                              f"stage 2 does not use (stage2.loss={self.stage2.loss}, alpha={self.stage2.alpha}, "
                              f"identity_weight={self.stage2.identity_weight}): use run.stages=[2]")
        if both and self.stage2.uses_priors and self.stage1.model != "priors" and not self.stage2.priors:
            raise ConfigError("stage2.priors", "stage 1 trains a recognizer, not the priors that stage2.alpha uses: "
                              "point stage2.priors at a priors file, or set stage2.alpha=0")
        if both and self.stage2.uses_recognizer and self.stage1.model != "recognizer" and not self.stage2.recognizer:
            raise ConfigError("stage2.recognizer", "stage 1 trains the priors, not the recognizer that "
                              "stage2.identity_weight uses: point stage2.recognizer at a recognizer file")
        if self.stage2.uses_recognizer and self.stage2.identity_on == "jpeg" and 2 in self.run.stages:
            jpeg = self.data.degradation_model().jpeg
            if getattr(jpeg, "p", 0) <= 0:
                raise ConfigError("stage2.identity_on", f"jpeg: the identity term acts on JPEG-compressed faces only, "
                                  f"and data.degradation={_clip(str(self.data.degradation))} compresses none")
        if self.stage2.priors and 1 in self.run.stages and self.stage1.model == "priors":
            raise ConfigError("stage2.priors", "set it only for a stage-2 run (run.stages=[2]); stage 1 writes "
                              "<run_dir>/priors.safetensors")
        if self.stage2.recognizer and 1 in self.run.stages and self.stage1.model == "recognizer":
            raise ConfigError("stage2.recognizer", "set it only for a stage-2 run (run.stages=[2]); stage 1 writes "
                              "<run_dir>/recognizer.safetensors")
        if 3 in self.run.stages:
            if self.stage3.srnet and 2 in self.run.stages:
                raise ConfigError("stage3.srnet", "set it only for a stage-3 run (run.stages=[3]); stage 2 writes "
                                  "<run_dir>/srnet.safetensors")
            if 2 in self.run.stages and self.stage2.model != "cascade":
                raise ConfigError("run.stages", f"stage 3 gates the cascade's corrections to bicubic; "
                                  f"stage2.model={self.stage2.model} has none")
            self.stage3.degradation_model(self.data)


# ---------------------------------------------------------------- parsing

MAX_CONFIG_BYTES = 1 << 20  # a run config is a few KB; anything larger was given by mistake
MAX_DEFAULTS_DEPTH = 8  # configs built on configs built on …: a chain this long is a mistake
CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"  # the packaged configs, found by name


def packaged_configs() -> list[str]:
    """Names ``--config`` finds without a path (``demo``, ``paper``, …)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def find_config(name: str | Path, near: Path | None = None) -> Path:
    """A config file: ``name`` as a path (first beside ``near``, the config naming it in ``defaults``), else a
    packaged config by name (``demo`` or ``demo.yaml``); ConfigError naming --config otherwise."""
    p = Path(name)
    candidates = [near / p] if near is not None and not p.is_absolute() else []
    candidates.append(p)
    bare = len(p.parts) == 1
    if bare:
        file = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
        candidates += ([near / file] if near is not None else []) + [CONFIGS / file]
    for c in candidates:
        if c.is_file():
            return c
    hint = f" (nor a packaged config: {', '.join(packaged_configs())})" if bare else ""
    raise ConfigError("--config", f"{p}: no such file{hint}")


def _read_yaml(p: Path) -> dict:
    """One config file's mapping, refusing what is no run config (binary, huge, not YAML, not a mapping)."""
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError("--config", f"{p}: {p.stat().st_size:,} bytes, not a run config (those are a few KB)")
    try:
        data = _yaml_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{p}: not a UTF-8 text file (a run config is YAML)") from None
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{p}: not valid YAML ({e})".replace("\n", " ")) from None
    except (ValueError, RecursionError) as e:  # an integer past Python's digit limit, nesting past the stack
        raise ConfigError("--config", f"{p}: unreadable YAML value ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):  # /etc/passwd parses as one long string: say what it is, not what it says
        raise ConfigError("--config", f"{p}: expected a YAML mapping of sections (preset, run, data, ...), "
                          f"got a {type(data).__name__}")
    return data


def _file_layers(p: Path, chain: tuple[Path, ...] = ()) -> list[dict]:
    """The mappings of ``p``'s ``defaults`` (each with its own, depth first) and then ``p``'s own: merged in this
    order, a config states only what differs from the ones it names."""
    data = _read_yaml(p)
    parents = data.pop("defaults", [])
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise ConfigError("defaults", f"{p}: expected a list of config names, got {_show(parents)}")
    chain = chain + (p.resolve(),)
    if len(chain) > MAX_DEFAULTS_DEPTH:
        raise ConfigError("defaults", f"{p}: configs nested over {MAX_DEFAULTS_DEPTH} deep")
    layers = []
    for name in parents:
        parent = find_config(name, near=p.parent)
        if parent.resolve() in chain:
            raise ConfigError("defaults", f"{p}: {name} is already being loaded (a cycle)")
        layers += _file_layers(parent, chain)
    return layers + [data]


def _check_sizes(layer: dict) -> None:
    """Refuse a field holding a YAML alias bomb before anything expands it (OmegaConf would build every node)."""
    for key, value in layer.items():
        for name, v in (((f"{key}.{k}", v) for k, v in value.items()) if isinstance(value, dict) else [(key, value)]):
            if _expanded_size(v) > MAX_VALUES:
                raise ConfigError(name, f"holds over {MAX_VALUES:,} values once YAML aliases are expanded "
                                  "(an alias bomb?)")


def parse_overrides(overrides: list[str]) -> dict:
    """``["stage2.lr=1e-3", "cluster.num_workers=4"]`` -> nested dict; values read as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key=value (e.g. stage2.lr=0.001)")
        key, raw = (part.strip() for part in item.split("=", 1))
        try:
            value = _yaml_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(key, f"value {_show(raw)} is not valid YAML ({e})".replace("\n", " ")) from None
        except ValueError as e:  # an integer past Python's digit limit
            raise ConfigError(key, f"value {_show(raw)}: {e}") from None
        *sections, name = key.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"{part} is not a section")
        node[name] = value
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A config file (a path or a packaged name; optional) with its ``defaults``, then dotted overrides, merged onto
    TrainConfig's defaults (OmegaConf structured configs: facesr.structured); ConfigError naming the field."""
    layers = _file_layers(find_config(path)) if path is not None else []
    layers.append(parse_overrides(overrides or []))
    for layer in layers:
        _check_sizes(layer)
    try:
        return build(TrainConfig, *layers)
    except FieldError as e:
        raise ConfigError(e.key, e.message) from None


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.1 wants 1.0e-4), and only true/false as booleans (YAML 1.2):
    YAML 1.1 reads off, on, yes, no, y and n as booleans too, so ``engine.step_compile=off`` (or ``off`` in a
    file) became False and then the string 'False'. A bool field still takes those words: OmegaConf converts
    them when it merges (facesr.structured)."""


BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != BOOL]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|^[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?$"),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- checks before any worker starts


def accumulation(batch_size: int, world_size: int, max_micro_batch: int, name: str = "batch_size") -> tuple[int, int]:
    """(micro_batch, accumulation_steps) with micro·accum·world == batch_size; see the module docstring."""
    if batch_size < world_size:
        raise ConfigError(name, f"global batch {batch_size} is smaller than the {world_size} workers")
    for accum in range(1, batch_size // world_size + 1):
        if batch_size % (world_size * accum) == 0 and batch_size // (world_size * accum) <= max_micro_batch:
            return batch_size // (world_size * accum), accum
    raise ConfigError(
        name,
        f"global batch {batch_size} cannot be split over {world_size} workers in micro-batches of at most "
        f"{max_micro_batch} (batch must equal workers × accumulation × micro-batch)",
    )


def _is_uri(path: str) -> bool:
    from shards.store import is_uri

    return is_uri(path)


def resolve(cfg: TrainConfig, base: str | Path | None = None) -> TrainConfig:
    """Absolute paths and filled-in defaults, so workers (other cwd, other node) see the same files."""
    base = Path(base or Path.cwd())

    def absolute(p: str) -> str:
        return p if not p or _is_uri(p) else str((base / p).resolve())

    cfg = dataclasses.replace(cfg)
    cfg.data = dataclasses.replace(cfg.data, shards=absolute(cfg.data.shards))
    cfg.stage1 = dataclasses.replace(cfg.stage1, shards=absolute(cfg.stage1.shards))
    cfg.cluster = dataclasses.replace(cfg.cluster, storage_path=absolute(cfg.cluster.storage_path))
    run_dir = cfg.run.run_dir or (
        str(Path(cfg.cluster.storage_path) / cfg.run.name) if not _is_uri(cfg.cluster.storage_path)
        else f"{cfg.cluster.storage_path.rstrip('/')}/{cfg.run.name}"
    )
    run_dir = absolute(run_dir)
    storage = cfg.cluster.storage_path
    sd_default = "" if _is_uri(storage) else str(Path(storage) / "prometheus_sd")
    sd_dir = absolute(cfg.run.telemetry_sd_dir) if cfg.run.telemetry_sd_dir else sd_default
    cfg.run = dataclasses.replace(cfg.run, run_dir=run_dir, telemetry_sd_dir=sd_dir)
    weights = cfg.stage2.perceptual_weights
    cfg.stage2 = dataclasses.replace(cfg.stage2, priors=absolute(cfg.stage2.priors),
                                     recognizer=absolute(cfg.stage2.recognizer),
                                     perceptual_weights=weights if weights in ("imagenet", "priors") else absolute(weights))
    cfg.stage3 = dataclasses.replace(cfg.stage3, srnet=absolute(cfg.stage3.srnet))
    if any(_is_uri(p) for p in (cfg.cluster.storage_path, run_dir, cfg.data.shards, cfg.stage1.shards, cfg.stage2.priors,
                                cfg.stage2.recognizer, cfg.stage3.srnet)):
        from shards.store import settings

        # the driver's endpoint and region travel to every worker in the config (credentials do not)
        endpoint, region = settings()
        cfg.cluster = dataclasses.replace(cfg.cluster, s3_endpoint=cfg.cluster.s3_endpoint or endpoint,
                                          s3_region=cfg.cluster.s3_region or region)
    return cfg


def check(cfg: TrainConfig) -> dict[int, dict]:
    """Everything that can be refused before a worker starts: the values, then the shards and priors on disk;
    returns each stage's shard manifest (stage number -> manifest)."""
    cfg.validate()
    _check_stores(cfg)
    manifests = _manifests(cfg)
    manifest = manifests.get(2)
    trained_here = 1 in cfg.run.stages
    if 2 in cfg.run.stages and cfg.stage2.uses_priors and not (trained_here and cfg.stage1.model == "priors"):
        _check_priors(cfg, manifest)
    if 2 in cfg.run.stages and cfg.stage2.uses_recognizer and not (trained_here and cfg.stage1.model == "recognizer"):
        _check_recognizer(cfg)
    if 2 in cfg.run.stages and cfg.stage2.loss == "perceptual" and cfg.stage2.perceptual_weights != "priors":
        _check_perceptual(cfg)
    if cfg.run.stages == [3]:
        _check_srnet(cfg)
    return manifests


def _check_srnet(cfg: TrainConfig) -> None:
    """Stage 3's cascade (stage3.srnet, or this run's srnet.safetensors) is there and is a cascade with the skip."""
    from facesr.weights import read_meta
    from shards.store import local_copy

    key = "stage3.srnet" if cfg.stage3.srnet else "run.stages"
    src = cfg.srnet_path
    try:
        meta = read_meta(local_copy(src))
    except Exception as e:
        raise ConfigError(key, f"{src}: no readable SR network to gate ({_clip(str(e))}); train stage 2 first or "
                          "point stage3.srnet at an srnet.safetensors") from None
    if meta.get("kind") != "srnet" or meta.get("model", "cascade") != "cascade" or \
            not (meta.get("sr") or {}).get("image_skip", True):
        raise ConfigError(key, f"{src}: holds {str(meta.get('model', meta.get('kind')))[:40]!r}, not a cascade with "
                          "its bicubic skip, whose corrections a gate scales")


def _check_stores(cfg: TrainConfig) -> None:
    """Object-store URIs answer, with their bucket, and accept this machine's credentials (run: also writes)."""
    from shards.store import StoreError, check_reachable, configure

    configure(cfg.cluster.s3_endpoint, cfg.cluster.s3_region)
    for key, uri, write in (("run.run_dir", cfg.run.run_dir, True), ("data.shards", cfg.data.shards, False),
                            ("stage1.shards", cfg.stage1.shards if 1 in cfg.run.stages else "", False),
                            ("stage2.priors", cfg.stage2.priors if 2 in cfg.run.stages else "", False),
                            ("stage2.recognizer", cfg.stage2.recognizer if 2 in cfg.run.stages else "", False),
                            ("stage3.srnet", cfg.stage3.srnet if 3 in cfg.run.stages else "", False)):
        if _is_uri(uri):
            try:
                check_reachable(uri, "", write=write)
            except StoreError as e:
                raise ConfigError(key, str(e).strip()) from None


def _read_manifest(root: str, key: str) -> dict:
    from shards.manifest import read_manifest

    if not _is_uri(root) and not Path(root).is_dir():
        raise ConfigError(key, f"{root}: no such folder (write shards with `facesr prep` first)")
    try:
        return read_manifest(root)
    except Exception as e:  # the manifest reader's own errors, reworded with the field
        raise ConfigError(key, f"{root}: no readable shard manifest ({e})") from None


def _manifests(cfg: TrainConfig) -> dict[int, dict]:
    """Each configured stage's shard manifest (stage 1: stage1.shards where set), its splits and batch checked."""
    from shards.manifest import shard_urls

    read: dict[str, dict] = {}
    out = {}
    for stage_num in cfg.run.stages:
        root = cfg.shards_of(stage_num)
        where = "stage1.shards" if root != cfg.data.shards else "data.shards"
        manifest = out[stage_num] = read.get(root) or read.setdefault(root, _read_manifest(root, where))
        for key in ("train_split", "prior_val_split" if stage_num == 1 else "val_split"):
            split = cfg.data.prior_split(manifest) if key == "prior_val_split" else getattr(cfg.data, key)
            try:
                urls = shard_urls(root, split, manifest=manifest)
            except Exception as e:
                raise ConfigError(f"data.{key}", f"split {split!r} not in {root} ({e})") from None
            if not urls:
                raise ConfigError(f"data.{key}", f"split {split!r} in {root} has no shards")
            if stage_num == 1 and manifest["splits"][split].get("labelled", 0) == 0:
                raise ConfigError(f"data.{key}", f"split {split!r} of {root} has no labelled samples (cls >= 0) "
                                  "for stage 1")
        batch_size = cfg.stage_cfg(stage_num).batch_size
        n = manifest["splits"][cfg.data.train_split]["labelled" if stage_num == 1 else "samples"]
        if n < batch_size:
            raise ConfigError(f"stage{stage_num}.batch_size", f"{batch_size} exceeds the {n} usable training samples "
                              f"of {root}")
    if (cfg.stage1.shards and cfg.run.stages == [1, 2] and cfg.stage1.model == "priors" and cfg.stage2.uses_priors
            and out[1]["classes"] != out[2]["classes"]):
        raise ConfigError("stage1.shards", f"{cfg.stage1.shards} has another class map ({len(out[1]['classes'])} "
                          f"classes) than data.shards ({len(out[2]['classes'])}), whose labels stage 2's cross-entropy "
                          "gives the priors: train priors on data.shards, or only a recognizer on stage1.shards")
    return out


def _check_perceptual(cfg: TrainConfig) -> None:
    """ℓp's SqueezeNet weights load (downloaded into torch hub's cache first when ``imagenet`` and absent)."""
    from facesr.weights import load_squeezenet

    try:
        load_squeezenet(cfg.stage2.perceptual_weights)
    except (OSError, ValueError) as e:
        raise ConfigError("stage2.perceptual_weights", str(e)) from None


def _check_priors(cfg: TrainConfig, manifest: dict) -> None:
    """The stage-2 priors file against this run's class map and preset (facesr.weights.check_priors)."""
    from facesr.weights import check_priors
    from shards.store import local_copy

    path = cfg.priors_path
    if not path.is_file():
        raise ConfigError("stage2.priors", f"{path}: no trained priors (run stage 1, or point stage2.priors at a "
                          "priors file)")
    try:
        check_priors(local_copy(path), list(manifest["classes"]), cfg.preset)
    except ValueError as e:
        raise ConfigError("stage2.priors", str(e)) from None


def _check_recognizer(cfg: TrainConfig) -> None:
    """The stage-2 face recognizer file exists and holds a recognizer (facesr.weights.check_recognizer)."""
    from facesr.weights import check_recognizer
    from shards.store import local_copy

    path = cfg.recognizer_path
    if not path.is_file():
        raise ConfigError("stage2.recognizer", f"{path}: no trained recognizer (run stage 1 with "
                          "stage1.model=recognizer, or point stage2.recognizer at a recognizer file)")
    try:
        check_recognizer(local_copy(path))
    except ValueError as e:
        raise ConfigError("stage2.recognizer", str(e)) from None
