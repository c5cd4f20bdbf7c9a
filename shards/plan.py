"""Which image goes to which split, class and shard: a pure function of the accepted images and the settings.

Determinism is what makes prep resumable and its output byte-identical: the
same accepted images and settings always give the same ``ShardPlan`` list, so
a rerun can recognise finished shards by their plan fingerprint.

* Splits are by identity (the paper's protocol: test identities are never seen
  in training). Identities are shuffled with the seed and the first
  ``round(test·N)`` go to test, the next ``round(val·N)`` to val; fractions
  count identities, not images.
* The class label set of the recognition priors is the train identities with
  at least ``min_images`` accepted images, sorted by name; ``cls`` is the index
  in that list. Every other sample (val/test identities, and train identities
  under the threshold) has ``cls = -1``: the SR cascade trains on it, the
  priors must skip it (``StreamConfig.labelled_only``).
* ``prior_holdout`` > 0 moves images of each class identity (chosen with the
  seed) into the ``prior_val`` split: images of identities the priors know,
  which they never train on, so that recognition is scored on unseen images.
  Under 1 it is a share (at least one image); 1 or more, a count per class,
  which makes prior_val class-balanced (majority-class rate = chance), where a
  share keeps the source's imbalance (LFW's largest identity: 14%). The SR
  cascade does not train on these images either.
* Within a split, images are shuffled with the seed before cutting into shards,
  so every shard mixes many identities and a small shuffle buffer suffices.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

SPLITS = ("train", "val", "test", "prior_val")
UNLABELLED = -1  # cls of samples outside the prior's class label set


@dataclass(frozen=True)
class SplitConfig:
    by: str = "identity"  # identity: identity-disjoint train/val/test; none: everything in train
    val: float = 0.05  # fraction of identities for validation
    test: float = 0.05  # fraction of identities held out for testing (never seen in training)
    seed: int = 0  # seeds the identity split and the order of images in shards
    min_images: int = 2  # train identities with fewer accepted images get no class (cls = -1)
    prior_holdout: float = 0.0  # images of each class held out for prior validation (prior_val): < 1 share, >= 1 count

    def __post_init__(self):
        if self.by not in ("identity", "none"):
            raise ValueError(f"split-by must be 'identity' or 'none', got {self.by!r}")
        if not (0 <= self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1):
            raise ValueError(f"need 0 <= val, test and val + test < 1, got val={self.val} test={self.test}")
        if self.min_images < 1:
            raise ValueError(f"min-images must be >= 1, got {self.min_images}")
        h = self.prior_holdout
        if h < 0 or (h >= 1 and h != int(h)):
            raise ValueError(f"prior-holdout must be a share in [0, 1) or a whole count >= 1, got {h}")
        if h > 0 and self.min_images < 2:
            raise ValueError("prior-holdout needs min-images >= 2 (a class must keep a training image)")
        if h >= 1 and h >= self.min_images:
            raise ValueError(f"prior-holdout {int(h)} images per class needs min-images > {int(h)} "
                             "(a class must keep a training image)")


@dataclass(frozen=True)
class SampleRef:
    key: str  # WebDataset key inside the shard (no dots)
    path: str  # source image, relative to SRC
    identity: str
    cls: int  # index into the manifest's classes, or UNLABELLED


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    samples: tuple[SampleRef, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"

    def fingerprint(self, settings: dict) -> str:
        """sha256 of everything that determines this shard's bytes (besides library versions)."""
        blob = json.dumps({"settings": settings, "samples": [asdict(s) for s in self.samples]}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()


def split_identities(identities: list[str], cfg: SplitConfig) -> dict[str, str]:
    """identity -> split name; identity-disjoint, deterministic in (sorted identities, seed)."""
    ids = sorted(identities)
    if cfg.by == "none":
        return {i: "train" for i in ids}
    random.Random(f"facesr-split:{cfg.seed}").shuffle(ids)
    n_test, n_val = round(cfg.test * len(ids)), round(cfg.val * len(ids))
    split = {i: "test" for i in ids[:n_test]}
    split.update({i: "val" for i in ids[n_test : n_test + n_val]})
    split.update({i: "train" for i in ids[n_test + n_val :]})
    return split


def label_set(counts: dict[str, int], split_of: dict[str, str], min_images: int) -> list[str]:
    """The priors' classes: train identities with >= min_images accepted images, sorted by name."""
    return sorted(i for i, n in counts.items() if split_of[i] == "train" and n >= min_images)


def sample_splits(
    accepted: list[tuple[str, str]], split_of: dict[str, str], classes: list[str], cfg: SplitConfig
) -> dict[str, str]:
    """path -> split: the identity's split, except each class's ``prior_holdout`` share, which is ``prior_val``."""
    where = {p: split_of[i] for i, p in accepted}
    if cfg.prior_holdout > 0:
        known = set(classes)
        by_class: dict[str, list[str]] = {}
        for i, p in accepted:
            if i in known:
                by_class.setdefault(i, []).append(p)
        for ident, paths in by_class.items():
            paths = sorted(paths)
            random.Random(f"facesr-holdout:{cfg.seed}:{ident}").shuffle(paths)
            h = cfg.prior_holdout
            n = min(len(paths) - 1, int(h) if h >= 1 else max(1, round(h * len(paths))))
            where.update({p: "prior_val" for p in paths[:n]})
    return where


def plan_shards(
    accepted: list[tuple[str, str]], where: dict[str, str], classes: list[str], shard_size: int, seed: int
) -> list[ShardPlan]:
    """Cut each split's (identity, path) list, shuffled with the seed, into shards of ``shard_size``.

    ``where`` maps each sample's path to its split (``sample_splits``).
    """
    cls_of = {name: i for i, name in enumerate(classes)}
    plans = []
    for split in SPLITS:
        items = sorted((p, i) for i, p in accepted if where[p] == split)
        random.Random(f"facesr-order:{seed}:{split}").shuffle(items)
        refs = [SampleRef(f"{split}-{n:08d}", p, i, cls_of.get(i, UNLABELLED)) for n, (p, i) in enumerate(items)]
        for index, start in enumerate(range(0, len(refs), shard_size)):
            plans.append(ShardPlan(split, index, tuple(refs[start : start + shard_size])))
    return plans
