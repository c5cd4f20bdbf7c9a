"""The two things training needs from the shards: the class map and a per-rank, per-epoch loader."""

from __future__ import annotations

from .config import TrainConfig


def read_classes(cfg: TrainConfig) -> list[str]:
    from shards.manifest import read_manifest

    return list(read_manifest(cfg.data.shards)["classes"])


def build_loader(cfg: TrainConfig, split: str, micro_batch: int, rank: int, world_size: int, epoch: int):
    """Batches of ``micro_batch`` for this rank; a function of ``epoch`` so a resumed run replays it.

    ``split`` is ``train`` or ``val`` (mapped to the config's split names); the validation
    stream is not shuffled so every epoch is scored on the same samples.
    """
    from shards.manifest import shard_urls
    from shards.stream import StreamConfig, build_loader as stream

    train = split == "train"
    name = cfg.data.train_split if train else cfg.data.val_split
    scfg = StreamConfig(batch_size=micro_batch, shuffle=train, workers=cfg.data.loader_workers)
    return stream(shard_urls(cfg.data.shards, name), scfg, rank=rank, world_size=world_size, epoch=epoch)
