"""What training takes from the shards: the class map and one loader per (stage number, split, rank, epoch).

Stage 1 (priors) streams only labelled samples (``cls >= 0``) of levels x2, x4,
hr (the paper's random flips and crops are applied on the device by the stage,
``facesr.augment``). Stage 2
streams every sample of all four levels; unlabelled identities still teach
the cascade (their identity term is zero).

Priors are validated on ``data.prior_val_split``: by default prep's
``prior_val`` split (``facesr prep --prior-holdout``: images of their classes
they never train on), else the training images without augmentation. The
``val`` split holds identities the priors have no class for, where top-1 would
be undefined.
"""

from __future__ import annotations

from .config import TrainConfig

PRIOR_LEVELS = ("x2", "x4", "hr")


def read_classes(cfg: TrainConfig, number: int) -> list[str]:
    """The class map of stage ``number``'s shards (stage 1: stage1.shards where set)."""
    from shards.manifest import read_manifest

    return list(read_manifest(cfg.shards_of(number))["classes"])


def _sr_levels(cfg: TrainConfig) -> tuple[str, ...]:
    """Stage 2 decodes lr only when it trains on the shards' own lr (the paper's degradation)."""
    from facesr.degradations import PAPER

    return ("lr", "x2", "x4", "hr") if cfg.data.degradation_model() == PAPER else ("x2", "x4", "hr")


def _levels(cfg: TrainConfig, number: int) -> tuple[str, ...]:
    """What stage ``number`` decodes: the priors' levels (a recognizer's hr), the cascade's, or the gate's hr
    (which it degrades itself)."""
    if number == 1:
        return ("hr",) if cfg.stage1.model == "recognizer" else PRIOR_LEVELS
    return ("hr",) if number == 3 else _sr_levels(cfg)


def split_name(cfg: TrainConfig, number: int, split: str, manifest: dict | None = None) -> str:
    """The manifest split behind (stage ``number``, ``train|val``); ``manifest`` resolves stage 1's ``auto``."""
    if split == "train":
        return cfg.data.train_split
    if number != 1:
        return cfg.data.val_split
    if manifest is None:
        from shards.manifest import read_manifest

        manifest = read_manifest(cfg.shards_of(1), check_files=False)
    return cfg.data.prior_split(manifest)


def build_loader(cfg: TrainConfig, number: int, split: str, micro_batch: int, rank: int, world_size: int, epoch: int):
    """Exactly ``len(loader)`` batches of ``micro_batch`` on every rank; a function of ``epoch``, so a resumed
    run replays the same data epoch. ``split`` is ``train`` or ``val``; validation is not shuffled or augmented
    and always reads epoch 0's stream, so every epoch is scored on the same samples."""
    from shards.manifest import read_manifest, shard_urls, split_samples
    from shards.stream import StreamConfig, build_loader as stream

    train = split == "train"
    manifest = read_manifest(cfg.shards_of(number), check_files=False)  # config.check() verified them before the start
    name = split_name(cfg, number, split, manifest)
    priors = number == 1
    scfg = StreamConfig(
        batch_size=micro_batch,
        num_samples=split_samples(manifest, name, labelled_only=priors),
        workers=cfg.data.loader_workers,
        shuffle=cfg.data.shuffle_buffer if train else 0,
        labelled_only=priors,
        levels=_levels(cfg, number),
        seed=cfg.run.seed,
        pin_memory=cfg.cluster.use_gpu,  # asynchronous host-to-device copies of the uint8 batches
        cache_dir=cfg.data.shard_cache,
        cache_bytes=int(cfg.data.shard_cache_gb * 2**30),
        num_classes=len(manifest["classes"]),  # a cls past the class map is a decode error, not a loss crash
    )
    urls = shard_urls(cfg.shards_of(number), name, manifest=manifest)
    return stream(urls, scfg, rank=rank, world_size=world_size, epoch=epoch if train else 0)
