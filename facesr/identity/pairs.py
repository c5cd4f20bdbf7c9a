"""LFW View 2 pairs: parsing, image paths, and which pairs an evaluation can use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Pair:
    fold: int  # official View 2 fold, 0..9
    same: bool  # same person
    a: tuple[str, int]  # (name, image number) of the face kept at HR
    b: tuple[str, int]  # (name, image number) of the face that is degraded and restored


def read_pairs(path: str | Path) -> list[Pair]:
    """LFW ``pairs.txt`` (View 2): a ``folds<TAB>n`` header, then per fold n same-person and n different pairs."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    head = lines[0].split()
    folds, per = int(head[0]), int(head[1])
    pairs = []
    for i, line in enumerate(lines[1:]):
        f = line.split("\t") if "\t" in line else line.split()
        fold = i // (2 * per)
        if len(f) == 3:
            pairs.append(Pair(fold, True, (f[0], int(f[1])), (f[0], int(f[2]))))
        elif len(f) == 4:
            pairs.append(Pair(fold, False, (f[0], int(f[1])), (f[2], int(f[3]))))
        else:
            raise ValueError(f"{path}:{i + 2}: expected 3 or 4 fields, got {len(f)}: {line!r}")
    if len(pairs) != folds * 2 * per:
        raise ValueError(f"{path}: header promises {folds}x{2 * per} pairs, found {len(pairs)}")
    return pairs


def image_path(root: str | Path, face: tuple[str, int]) -> Path:
    name, idx = face
    return Path(root) / name / f"{name}_{idx:04d}.jpg"


def pair_identities(pairs: Iterable[Pair]) -> set[str]:
    return {n for p in pairs for n in (p.a[0], p.b[0])}


def usable_pairs(
    pairs: list[Pair], root: str | Path, identities: Iterable[str] | None = None, per_fold: int = 0
) -> tuple[list[Pair], dict[str, int]]:
    """Pairs whose two images exist and, when ``identities`` is given, whose face B's person is one of them.

    Only face B is degraded and super-resolved, so only B's person must be unseen by the SR model
    (its test split); face A stays HR. Requiring both would leave almost no different-person pairs.

    ``per_fold`` > 0 keeps at most that many per fold, half same and half different, in file order
    (a quick run that keeps the protocol's balance and folds). Returns (pairs, counts).
    """
    wanted = set(identities) if identities is not None else None
    counts = {"total": len(pairs), "absent": 0, "outside_selection": 0, "over_per_fold": 0, "used": 0}
    kept, taken = [], {}
    for p in pairs:
        if not (image_path(root, p.a).is_file() and image_path(root, p.b).is_file()):
            counts["absent"] += 1
            continue
        if wanted is not None and p.b[0] not in wanted:
            counts["outside_selection"] += 1
            continue
        k = (p.fold, p.same)
        if per_fold and taken.get(k, 0) >= per_fold // 2:
            counts["over_per_fold"] += 1
            continue
        taken[k] = taken.get(k, 0) + 1
        kept.append(p)
    counts["used"] = len(kept)
    return kept, counts


def drawn_pairs(root: str | Path, identities: Iterable[str], n: int, seed: int = 0, folds: int = 10) -> list[Pair]:
    """Verification pairs among ``identities`` only (both faces), for people no pairs.txt covers enough: up to
    ``n`` same-person pairs (every identity with two or more images in turn, seeded) and as many different-person
    pairs, spread over ``folds`` folds alternately. With the test split of an identity-disjoint prep, neither face
    of any pair was seen by anything trained on that prep's other splits."""
    import random

    rng = random.Random(seed)
    images = {}
    for name in sorted(set(identities)):
        files = sorted(Path(root, name).glob(f"{name}_[0-9][0-9][0-9][0-9].jpg"))
        if files:
            images[name] = [int(f.stem[-4:]) for f in files]
    multi = [m for m in images if len(images[m]) >= 2]
    same: list[tuple] = []
    candidates = {m: [(i, j) for a, i in enumerate(images[m]) for j in images[m][a + 1:]] for m in multi}
    for c in candidates.values():
        rng.shuffle(c)
    while len(same) < n and any(candidates.values()):
        for m in multi:  # one pair per person per round: many people rather than the most photographed
            if candidates[m] and len(same) < n:
                i, j = candidates[m].pop()
                same.append(((m, i), (m, j)))
    names = sorted(images)
    diff: set[tuple] = set()
    while len(names) >= 2 and len(diff) < len(same):
        x, y = rng.sample(names, 2)
        diff.add(((x, rng.choice(images[x])), (y, rng.choice(images[y]))))
    pairs = [Pair(k % folds, True, a, b) for k, (a, b) in enumerate(same)]
    pairs += [Pair(k % folds, False, a, b) for k, (a, b) in enumerate(sorted(diff))]
    return pairs
